//! The channel's side of queues hosted on another node (see `broker::remote_consume`):
//! basic.consume, basic.get, queue.purge and a passive queue.declare ask the host, and
//! the connection reads nothing more until the answer is written (so answers keep the
//! order of the methods); deliveries from the host get this channel's delivery tags.

use std::sync::Arc;
use std::time::Instant;

use amq_protocol::protocol::{AMQPClass, basic, queue};
use bytes::BytesMut;

use super::{Channel, Consumer, Outcome, Result, Unacked};
use crate::broker::remote_consume::client::{ConsumeRequest, RemoteAnswer};
use crate::broker::remote_consume::{Answer, ProxyClient, RemoteDelivery, RemoteHold};
use crate::protocol::{AmqpError, reply::amqp_err};
use crate::queue::{ConsumerId, Queue};

/// A method waiting for its queue's host.
pub struct RemoteCall {
    /// The host's answer.
    pub answer: RemoteAnswer,
    then: Then,
}

impl std::fmt::Debug for RemoteCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCall")
            .field("then", &self.then)
            .finish_non_exhaustive()
    }
}

/// What the channel does with the answer.
#[derive(Debug)]
enum Then {
    Consume {
        tag: Arc<str>,
        id: ConsumerId,
        queue: Arc<Queue>,
        hold: Arc<RemoteHold>,
        nowait: bool,
    },
    Get {
        queue: Arc<Queue>,
        hold: Arc<RemoteHold>,
        no_ack: bool,
    },
    Purge {
        nowait: bool,
    },
    Cancel {
        tag: Arc<str>,
        nowait: bool,
    },
    Declare {
        queue: String,
        nowait: bool,
    },
}

impl Then {
    fn class_method(&self) -> (u16, u16) {
        match self {
            Then::Consume { .. } => (60, 20),
            Then::Get { .. } => (60, 70),
            Then::Purge { .. } => (50, 30),
            Then::Cancel { .. } => (60, 30),
            Then::Declare { .. } => (50, 10),
        }
    }
}

impl Channel {
    fn proxies(&self) -> Result<ProxyClient> {
        self.broker
            .cluster_link()
            .map(|l| l.proxies.clone())
            .ok_or_else(|| amqp_err!(InternalError, "this node is not clustered"))
    }

    /// basic.consume from a queue hosted on `host`.
    pub(super) fn consume_remote(
        &mut self,
        host: &str,
        queue: Arc<Queue>,
        c: &basic::Consume,
        tag: Arc<str>,
        id: ConsumerId,
        priority: i32,
    ) -> Result<()> {
        let request = ConsumeRequest {
            vhost: self.vhost.name.clone(),
            queue: queue.clone(),
            tag: tag.clone(),
            consumer: id,
            priority,
            prefetch: self.prefetch,
            global_prefetch: self
                .link
                .global_prefetch
                .load(std::sync::atomic::Ordering::Relaxed),
            no_ack: c.no_ack,
            exclusive: c.exclusive,
        };
        let (hold, answer) = self.proxies()?.consume(host, self.link.clone(), request);
        self.remote_call = Some(RemoteCall {
            answer,
            then: Then::Consume {
                tag,
                id,
                queue,
                hold,
                nowait: c.nowait,
            },
        });
        Ok(())
    }

    /// basic.get from a queue hosted on `host`.
    pub(super) fn get_remote(&mut self, host: &str, queue: Arc<Queue>, no_ack: bool) -> Result<()> {
        let (hold, answer) = self
            .proxies()?
            .get(host, &self.vhost.name, queue.name(), no_ack);
        self.remote_call = Some(RemoteCall {
            answer,
            then: Then::Get {
                queue,
                hold,
                no_ack,
            },
        });
        Ok(())
    }

    /// basic.cancel of a consumer of a queue on another node, when it is one: answered
    /// once the host removed it. False for other consumers.
    pub(super) fn cancel_remote(&mut self, tag: &Arc<str>, nowait: bool) -> bool {
        let Some(hold) = self.consumers.get(tag).and_then(|c| c.remote.clone()) else {
            return false;
        };
        let Some(c) = self.consumers.remove(tag) else {
            return false;
        };
        let answer = hold.cancel_wait(&self.vhost.name, c.queue.name());
        self.remote_call = Some(RemoteCall {
            answer,
            then: Then::Cancel {
                tag: tag.clone(),
                nowait,
            },
        });
        true
    }

    /// queue.purge of a queue hosted on `host`.
    pub(super) fn purge_remote(&mut self, host: &str, queue: &str, nowait: bool) -> Result<()> {
        let answer = self.proxies()?.purge(host, &self.vhost.name, queue);
        self.remote_call = Some(RemoteCall {
            answer,
            then: Then::Purge { nowait },
        });
        Ok(())
    }

    /// A passive queue.declare of a queue hosted on `host`: the counts are the host's.
    pub(super) fn declare_remote(&mut self, host: &str, queue: &str, nowait: bool) -> Result<()> {
        let answer = self.proxies()?.counts(host, &self.vhost.name, queue);
        self.remote_call = Some(RemoteCall {
            answer,
            then: Then::Declare {
                queue: queue.to_string(),
                nowait,
            },
        });
        Ok(())
    }

    /// The method that now waits for its queue's host, if the last frame made one.
    pub fn take_remote_call(&mut self) -> Option<RemoteCall> {
        self.remote_call.take()
    }

    /// Answers the method that waited for its host.
    pub fn remote_answered(
        &mut self,
        call: RemoteCall,
        answer: std::result::Result<Answer, AmqpError>,
        out: &mut BytesMut,
    ) -> Outcome {
        let class_method = call.then.class_method();
        let result = self.apply_answer(call.then, answer, out);
        self.finish(class_method, result.map(|()| Outcome::Continue), out)
    }

    fn apply_answer(
        &mut self,
        then: Then,
        answer: std::result::Result<Answer, AmqpError>,
        out: &mut BytesMut,
    ) -> Result<()> {
        let unexpected = |a: &Answer| amqp_err!(InternalError, "unexpected answer {:?}", a);
        match then {
            Then::Consume {
                tag,
                id,
                queue,
                hold,
                nowait,
            } => {
                let proxies = self.proxies()?;
                match answer {
                    Ok(Answer::Consuming) if !self.closing && !hold.is_lost() => {}
                    Ok(Answer::Consuming) => {
                        proxies.forget(&hold);
                        return Ok(());
                    }
                    Ok(other) => {
                        proxies.forget(&hold);
                        return Err(unexpected(&other));
                    }
                    Err(e) => {
                        proxies.forget(&hold);
                        return Err(e);
                    }
                }
                self.consumers.insert(
                    tag.clone(),
                    Consumer {
                        id,
                        queue,
                        remote: Some(hold),
                    },
                );
                if !nowait {
                    self.send(
                        out,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: tag.as_ref().into(),
                        })),
                    );
                }
            }
            Then::Get {
                queue,
                hold,
                no_ack,
            } => match answer? {
                Answer::Got(got) => {
                    if self.closing {
                        if let (Some((entry, _)), false) = (&got, no_ack) {
                            hold.settle(
                                vec![entry.offset],
                                crate::broker::remote_consume::SettleHow::Requeue,
                            );
                        }
                        return Ok(());
                    }
                    self.write_got(queue, got, no_ack, Some(hold), out);
                }
                other => return Err(unexpected(&other)),
            },
            Then::Purge { nowait } => match answer? {
                Answer::Purged(n) => {
                    if !nowait && !self.closing {
                        self.send(
                            out,
                            AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                                message_count: n,
                            })),
                        );
                    }
                }
                other => return Err(unexpected(&other)),
            },
            Then::Cancel { tag, nowait } => {
                // The consumer is gone here whatever the host said (a lost host has
                // let it go too).
                if let Err(e) = answer {
                    tracing::debug!("basic.cancel of {tag}: {}", e.reply_text());
                }
                if !nowait && !self.closing {
                    self.send(
                        out,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: tag.as_ref().into(),
                        })),
                    );
                }
            }
            Then::Declare { queue, nowait } => match answer? {
                Answer::Counts {
                    messages,
                    consumers,
                } => {
                    if !nowait && !self.closing {
                        self.send(
                            out,
                            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                                queue: queue.as_str().into(),
                                message_count: messages,
                                consumer_count: consumers,
                            })),
                        );
                    }
                }
                other => return Err(unexpected(&other)),
            },
        }
        Ok(())
    }

    /// Writes a delivery from a queue hosted on another node, or gives it back when its
    /// consumer is gone.
    pub fn deliver_remote(&mut self, d: RemoteDelivery, now: Instant, out: &mut BytesMut) {
        let live = !self.closing
            && !d.hold.is_lost()
            && self
                .consumers
                .get(&d.consumer_tag)
                .is_some_and(|c| c.id == d.consumer);
        if !live {
            return d.give_back();
        }
        let tag = self.write_delivery(&d.consumer_tag, &d.queue, &d.entry, d.no_ack, out);
        if !d.no_ack {
            self.unacked.insert(
                tag,
                Unacked {
                    queue: d.queue,
                    offset: d.entry.offset,
                    counted: false,
                    at: now,
                    remote: Some(d.hold),
                },
            );
        }
    }
}
