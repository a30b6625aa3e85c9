//! Direct reply-to, as RabbitMQ's `amq.rabbitmq.reply-to`: an RPC client consumes (no-ack)
//! from that pseudo-queue, publishes requests with `reply_to` set to it, and the broker
//! rewrites `reply_to` to a private name `amq.rabbitmq.reply-to.<secret>`; a reply
//! published to that name on the default exchange goes straight to the client's
//! consumer, with no queue in between. A reply whose consumer is gone is unroutable.
//!
//! The node keeps one registry of live reply consumers, keyed by their private names.
//! The channel that owns a reply consumer registers it and removes it when the
//! consumer is cancelled or the channel closes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::vhost::generated_name;
use crate::queue::Message;

/// The pseudo-queue RPC clients consume from and name as `reply_to`.
pub const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";

/// The start of every private reply name (the routing key of a reply).
const REPLY_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Whether a queue name or routing key is the pseudo-queue or a private reply name:
/// such names never denote a real queue.
pub fn is_reply_to_name(name: &str) -> bool {
    name.starts_with(PSEUDO_QUEUE)
}

/// Whether a routing key on the default exchange addresses a reply consumer.
pub fn is_reply_address(routing_key: &str) -> bool {
    routing_key.starts_with(REPLY_PREFIX)
}

/// Whether a `reply_to` property asks for the publisher's own reply consumer.
pub fn wants_rewrite(reply_to: &str) -> bool {
    reply_to == PSEUDO_QUEUE
}

/// Where a reply consumer's messages go: the channel that consumes.
pub trait ReplySink: Send + Sync + std::fmt::Debug {
    /// Hands a reply to the consumer `consumer_tag`; false when its channel is gone.
    fn reply(&self, consumer_tag: Arc<str>, msg: Arc<Message>) -> bool;
}

#[derive(Debug)]
struct ReplyConsumer {
    sink: Arc<dyn ReplySink>,
    consumer_tag: Arc<str>,
}

/// The node's live reply consumers by private name.
#[derive(Debug, Default)]
pub struct DirectReplyTo {
    consumers: RwLock<HashMap<String, ReplyConsumer>>,
}

impl DirectReplyTo {
    /// Registers a reply consumer; returns its private reply name.
    pub fn register(&self, sink: Arc<dyn ReplySink>, consumer_tag: Arc<str>) -> String {
        let name = generated_name(REPLY_PREFIX);
        self.consumers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), ReplyConsumer { sink, consumer_tag });
        name
    }

    /// Forgets a reply consumer (cancelled, or its channel closed).
    pub fn unregister(&self, name: &str) {
        self.consumers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Whether `name` is the pseudo-queue or a live reply consumer's name: what
    /// queue.declare of such a name reports as an existing queue.
    pub fn exists(&self, name: &str) -> bool {
        name == PSEUDO_QUEUE
            || self
                .consumers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(name)
    }

    /// Delivers a reply to the consumer named by `routing_key`; false when there is
    /// none (the reply is then unroutable).
    pub fn deliver(&self, routing_key: &str, msg: Arc<Message>) -> bool {
        let target = self
            .consumers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(routing_key)
            .map(|c| (c.sink.clone(), c.consumer_tag.clone()));
        match target {
            Some((sink, tag)) => sink.reply(tag, msg),
            None => false,
        }
    }
}
