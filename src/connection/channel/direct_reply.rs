//! The channel's side of direct reply-to (see `broker::reply_to`): its one reply
//! consumer, the `reply_to` rewrite of its publishes, replies delivered to it, and
//! queue.declare of reply names. RabbitMQ's reply codes and texts.

use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, basic, queue};
use bytes::BytesMut;

use super::{Channel, Result};
use crate::broker::reply_to;
use crate::protocol::codec::{ContentHeader, encode};
use crate::protocol::reply::amqp_err;
use crate::queue::Message;

/// The reply consumer of a channel.
#[derive(Debug)]
pub(super) struct ReplyConsumer {
    tag: Arc<str>,
    /// Its private reply name, registered with the broker.
    name: String,
}

impl Channel {
    /// basic.consume from `amq.rabbitmq.reply-to`: at most one per channel, no-ack only.
    pub(super) fn consume_reply_to(
        &mut self,
        c: basic::Consume,
        tag: Arc<str>,
        out: &mut BytesMut,
    ) -> Result<()> {
        if self.reply_consumer.is_some() {
            return Err(amqp_err!(PreconditionFailed, "reply consumer already set"));
        }
        if !c.no_ack {
            return Err(amqp_err!(
                PreconditionFailed,
                "reply consumer cannot acknowledge"
            ));
        }
        let name = self
            .broker
            .direct_reply_to
            .register(self.link.clone(), tag.clone());
        self.reply_consumer = Some(ReplyConsumer {
            tag: tag.clone(),
            name,
        });
        if !c.nowait {
            self.send(
                out,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.as_ref().into(),
                })),
            );
        }
        Ok(())
    }

    /// Whether `tag` is the reply consumer's tag.
    pub(super) fn is_reply_consumer(&self, tag: &str) -> bool {
        self.reply_consumer
            .as_ref()
            .is_some_and(|r| r.tag.as_ref() == tag)
    }

    /// Cancels the reply consumer (basic.cancel of its tag, or the channel closing):
    /// replies to its name become unroutable.
    pub(super) fn cancel_reply_consumer(&mut self) {
        if let Some(r) = self.reply_consumer.take() {
            self.broker.direct_reply_to.unregister(&r.name);
        }
    }

    /// A publish with `reply_to = amq.rabbitmq.reply-to` gets this channel's reply name
    /// instead; 406 when the channel has no reply consumer. Other publishes are left
    /// as they are (one string comparison).
    pub(super) fn rewrite_reply_to(&self, header: &mut ContentHeader) -> Result<()> {
        let wants = header
            .properties
            .reply_to()
            .as_ref()
            .is_some_and(|r| reply_to::wants_rewrite(r.as_str()));
        if !wants {
            return Ok(());
        }
        let Some(r) = &self.reply_consumer else {
            return Err(amqp_err!(
                PreconditionFailed,
                "fast reply consumer does not exist"
            ));
        };
        let props = header
            .properties
            .clone()
            .with_reply_to(r.name.as_str().into());
        header.raw_properties = encode::properties(&props);
        header.properties = props;
        Ok(())
    }

    /// queue.declare (active or passive) of the pseudo-queue or of a reply name: it
    /// exists, with no messages and one consumer, while its reply consumer lives; 404
    /// otherwise. None when `name` is an ordinary queue name.
    pub(super) fn declare_reply_to(&self, name: &str) -> Option<Result<queue::DeclareOk>> {
        if !reply_to::is_reply_to_name(name) {
            return None;
        }
        if !self.broker.direct_reply_to.exists(name) {
            return Some(Err(amqp_err!(
                NotFound,
                "no queue '{}' in vhost '{}'",
                name,
                self.vhost.name
            )));
        }
        Some(Ok(queue::DeclareOk {
            queue: name.into(),
            message_count: 0,
            consumer_count: 1,
        }))
    }

    /// A publish to a reply name on the default exchange: straight to its reply
    /// consumer, or unroutable (returned if mandatory) when that is gone.
    pub(super) fn publish_reply(&mut self, mandatory: bool, msg: Arc<Message>, out: &mut BytesMut) {
        let delivered = self
            .broker
            .direct_reply_to
            .deliver(&msg.routing_key, msg.clone());
        if !delivered && mandatory {
            self.return_unroutable(&msg, out);
        }
        self.confirm_now();
    }

    /// Writes a reply to this channel's reply consumer (dropped if it was cancelled
    /// meanwhile). No-ack: nothing to track.
    pub fn deliver_reply(&mut self, tag: &str, msg: &Message, out: &mut BytesMut) {
        if self.closing || !self.is_reply_consumer(tag) {
            return;
        }
        let delivery_tag = self.next_tag;
        self.next_tag += 1;
        encode::deliver(
            out,
            self.id,
            tag,
            delivery_tag,
            false,
            &msg.exchange,
            &msg.routing_key,
        );
        encode::content(out, self.id, &msg.raw_properties, &msg.body, self.frame_max);
    }
}

/// Whether a publish on the default exchange addresses a reply consumer.
pub(super) fn is_reply(exchange: &str, routing_key: &str) -> bool {
    exchange.is_empty() && reply_to::is_reply_address(routing_key)
}
