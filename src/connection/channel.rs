//! One AMQP channel: publish assembly (method, header, body frames), consumers, the
//! unacked-delivery map keyed by delivery tag, prefetch, publisher confirms and
//! transactions. Each AMQP class's methods become calls on the vhost and its queues.

mod direct_reply;
mod remote_queue;

pub use remote_queue::RemoteCall;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, exchange, queue, tx};
use amq_protocol::types::AMQPValue;
use bytes::{Bytes, BytesMut};

use super::sink::{ChannelLink, ConnEvent, ConnShared, ConnStats};
use crate::auth::{Permission, ResourceKind};
use crate::broker::remote_consume::RemoteHold;
use crate::broker::reply_to::PSEUDO_QUEUE;
use crate::broker::sender_selected;
use crate::broker::vhost::generated_name;
use crate::broker::{BrokerState, ExchangeDef, ExchangeKind, VHost};
use crate::protocol::codec::{ContentHeader, InFrame, encode};
use crate::protocol::content::{Assembled, ContentAssembly, Progress};
use crate::protocol::{AmqpError, ReplyCode, reply::amqp_err};
use crate::queue::journal::Writes;
use crate::queue::{
    ConsumerId, ConsumerSpec, Delivery, Enqueued, Message, Offset, Queue, QueueDef,
};

/// Unconfirmed publishes beyond which a confirm-mode publisher counts as not waiting
/// for its confirms (publishers keep a window of a few hundred or thousand).
const UNWAITED_CONFIRMS: usize = 10_000;

/// What the connection must do after a frame on this channel.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing special.
    Continue,
    /// The channel is finished: forget it.
    Closed,
    /// Close the whole connection with this error.
    ConnectionError(AmqpError),
}

#[derive(Debug)]
struct Consumer {
    id: ConsumerId,
    queue: Arc<Queue>,
    /// Set when the queue is hosted on another node: the proxy consuming there.
    remote: Option<Arc<RemoteHold>>,
}

#[derive(Debug)]
struct Unacked {
    queue: Arc<Queue>,
    offset: Offset,
    /// Delivered to a consumer (counts against the channel-wide prefetch), not got.
    counted: bool,
    /// When it was handed out (for consumer_timeout).
    at: Instant,
    /// Set when the queue is hosted on another node: the proxy that holds it there.
    remote: Option<Arc<RemoteHold>>,
}

impl Unacked {
    /// Its host's link was lost: the host put it back, and its tag is unknown now.
    fn is_lost(&self) -> bool {
        self.remote.as_ref().is_some_and(|h| h.is_lost())
    }
}

/// Work a transactional channel holds back until tx.commit.
#[derive(Debug)]
enum TxOp {
    /// A publish (its mandatory flag, the message, its CC/BCC routing keys).
    Publish(bool, Arc<Message>, Vec<String>),
    /// Deliveries acked, rejected or nacked in the transaction (by tag).
    Settle(BTreeMap<u64, Unacked>, Settle),
}

/// What becomes of settled deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// basic.ack: gone.
    Ack,
    /// Back to the queue, redelivered.
    Requeue,
    /// reject/nack without requeue: dead-lettered.
    Reject,
}

impl Settle {
    /// The same settlement, for a queue's host on another node.
    fn remote(self) -> crate::broker::remote_consume::SettleHow {
        use crate::broker::remote_consume::SettleHow;
        match self {
            Settle::Ack => SettleHow::Ack,
            Settle::Requeue => SettleHow::Requeue,
            Settle::Reject => SettleHow::Reject,
        }
    }

    fn discard(requeue: bool) -> Settle {
        if requeue {
            Settle::Requeue
        } else {
            Settle::Reject
        }
    }
}

/// What a tx.commit hands to the journal at once, and the enqueues that follow it.
#[derive(Debug, Default)]
struct TxCommit {
    writes: Writes,
    enqueues: Vec<(Vec<Arc<Queue>>, Arc<Message>)>,
}

/// Publisher-confirm bookkeeping.
#[derive(Debug, Default)]
struct Confirms {
    /// Last sequence number assigned.
    last_seq: u64,
    /// Confirmed and not yet sent.
    ready: Vec<u64>,
    /// Sent up to here (all lower ones too).
    acked_upto: u64,
    /// Waiting for the store.
    outstanding: std::collections::BTreeSet<u64>,
    /// Refused (reject-publish overflow), to be nacked.
    nacks: Vec<u64>,
    /// A nack was ever sent: from then on acks go one by one, so that no `multiple`
    /// ack can cover a nacked publish.
    ever_nacked: bool,
}

/// A channel.
#[derive(Debug)]
pub struct Channel {
    id: u16,
    conn_id: u64,
    user: String,
    vhost: Arc<VHost>,
    broker: Arc<BrokerState>,
    link: Arc<ChannelLink>,
    closing: bool,
    publish: Option<ContentAssembly>,
    consumers: HashMap<Arc<str>, Consumer>,
    unacked: BTreeMap<u64, Unacked>,
    next_tag: u64,
    prefetch: u32,
    confirms: Option<Confirms>,
    tx: Option<Vec<TxOp>>,
    /// tx.commits handed to the store whose commit-ok has not been sent: a later commit
    /// answers after them, never ahead.
    tx_commits_in_flight: u32,
    last_queue: Option<String>,
    frame_max: u32,
    /// The consumer of `amq.rabbitmq.reply-to` on this channel (direct reply-to).
    reply_consumer: Option<direct_reply::ReplyConsumer>,
    /// Exchanges this channel may publish to, checked at access-control generation
    /// `.0`: a publish costs a short scan, not a regex match.
    write_allowed: (u64, Vec<PublishGrant>),
    /// A method waiting for the answer of the node that hosts its queue (the connection
    /// reads nothing more meanwhile).
    remote_call: Option<remote_queue::RemoteCall>,
}

/// Most exchanges remembered in a channel's publish-permission cache (as RabbitMQ's
/// per-channel permission cache).
const WRITE_CACHE_SIZE: usize = 12;

/// Most routing keys remembered per topic exchange whose keys a topic permission
/// restricts.
const TOPIC_KEY_CACHE_SIZE: usize = 16;

/// An exchange this channel may publish to and, when a topic permission restricts its
/// routing keys, the rule and the keys it already allowed.
#[derive(Debug)]
struct PublishGrant {
    exchange: String,
    topic: Option<(Arc<crate::auth::TopicRule>, Vec<String>)>,
}

/// A string-valued argument (`x-dead-letter-exchange`, `alternate-exchange`).
fn string_arg<'a>(args: &'a amq_protocol::types::FieldTable, key: &str) -> Option<&'a str> {
    match args.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

type Result<T> = std::result::Result<T, AmqpError>;

fn s(v: &amq_protocol::types::ShortString) -> &str {
    v.as_str()
}

impl Channel {
    /// A freshly opened channel.
    pub fn new(
        id: u16,
        conn_id: u64,
        user: String,
        vhost: Arc<VHost>,
        broker: Arc<BrokerState>,
        conn: Arc<ConnShared>,
        frame_max: u32,
    ) -> Channel {
        let link = Arc::new(ChannelLink {
            channel: id,
            conn,
            global_prefetch: AtomicU32::new(0),
            global_unacked: AtomicU32::new(0),
        });
        Channel {
            id,
            conn_id,
            user,
            vhost,
            broker,
            link,
            closing: false,
            publish: None,
            consumers: HashMap::new(),
            unacked: BTreeMap::new(),
            next_tag: 1,
            prefetch: 0,
            confirms: None,
            tx: None,
            tx_commits_in_flight: 0,
            last_queue: None,
            frame_max,
            write_allowed: (u64::MAX, Vec::new()),
            reply_consumer: None,
            remote_call: None,
        }
    }

    /// 403 ACCESS_REFUSED unless this channel's user has `permission` on the resource.
    fn check(&self, kind: ResourceKind, name: &str, permission: Permission) -> Result<()> {
        self.broker
            .access
            .check(&self.user, &self.vhost.name, kind, name, permission)
    }

    /// basic.publish: write permission on the exchange and, on a topic exchange with a
    /// topic permission, on the routing key; cached per channel (exchanges, and the
    /// routing keys allowed) until the users or permissions change.
    fn check_publish(&mut self, exchange: &str, routing_key: &str) -> Result<()> {
        let generation = self.broker.access.generation();
        if self.write_allowed.0 != generation {
            self.write_allowed = (generation, Vec::new());
        }
        let at = match self
            .write_allowed
            .1
            .iter()
            .position(|g| g.exchange == exchange)
        {
            Some(at) => at,
            None => {
                self.check(ResourceKind::Exchange, exchange, Permission::Write)?;
                let topic = self.topic_rule(exchange).map(|rule| (rule, Vec::new()));
                let cache = &mut self.write_allowed.1;
                if cache.len() >= WRITE_CACHE_SIZE {
                    cache.remove(0);
                }
                cache.push(PublishGrant {
                    exchange: exchange.to_string(),
                    topic,
                });
                cache.len() - 1
            }
        };
        let Some((rule, keys)) = &mut self.write_allowed.1[at].topic else {
            return Ok(());
        };
        if keys.iter().any(|k| k == routing_key) {
            return Ok(());
        }
        if !rule.allows(true, routing_key) {
            return Err(crate::auth::AccessControl::topic_refused(
                &self.user,
                &self.vhost.name,
                exchange,
                routing_key,
            ));
        }
        if keys.len() >= TOPIC_KEY_CACHE_SIZE {
            keys.remove(0);
        }
        keys.push(routing_key.to_string());
        Ok(())
    }

    /// This user's topic permission on `exchange` when it is a topic exchange (RabbitMQ
    /// authorises routing keys on topic exchanges only).
    fn topic_rule(&self, exchange: &str) -> Option<Arc<crate::auth::TopicRule>> {
        if exchange.is_empty() {
            return None;
        }
        let rule = self
            .broker
            .access
            .topic_rule(&self.user, &self.vhost.name, exchange)?;
        let x = self.vhost.exchange(exchange).ok()?;
        (x.def.kind == ExchangeKind::Topic).then_some(rule)
    }

    fn send(&self, out: &mut BytesMut, method: AMQPClass) {
        encode::method(out, self.id, method);
    }

    /// Handles one frame for this channel.
    pub fn handle_frame(&mut self, frame: InFrame, out: &mut BytesMut) -> Outcome {
        if self.closing {
            // After our channel.close only close / close-ok count.
            return match frame {
                InFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => {
                    Outcome::Closed
                }
                InFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(_))) => {
                    self.send(
                        out,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                    Outcome::Closed
                }
                _ => Outcome::Continue,
            };
        }
        let (class_method, result) = match frame {
            InFrame::Method(_, method) => {
                let cm = (method.get_amqp_class_id(), method.get_amqp_method_id());
                if let Some(p) = &self.publish {
                    // The error names the publish whose content was interrupted.
                    let expected = if p.has_header() {
                        "expected content body, got non content body frame instead"
                    } else {
                        "expected content header for class 60, got non content header frame instead"
                    };
                    ((60, 40), Err(amqp_err!(UnexpectedFrame, "{}", expected)))
                } else {
                    (cm, self.handle_method(method, out))
                }
            }
            InFrame::Header(_, header) => ((60, 40), self.content_header(header, out)),
            InFrame::Body(_, body) => ((60, 40), self.content_body(body, out)),
            InFrame::Heartbeat(_) => (
                (0, 0),
                Err(amqp_err!(UnexpectedFrame, "type 8, all octets = <<>>")),
            ),
        };
        self.finish(class_method, result, out)
    }

    /// A method's outcome: an error closes the channel (or, for a connection error,
    /// the connection), naming the method.
    fn finish(
        &mut self,
        class_method: (u16, u16),
        result: Result<Outcome>,
        out: &mut BytesMut,
    ) -> Outcome {
        match result {
            Ok(outcome) => outcome,
            Err(mut e) => {
                e.class_method = class_method;
                if e.code.is_connection_error() {
                    return Outcome::ConnectionError(e);
                }
                self.close_with(e, out);
                Outcome::Continue
            }
        }
    }

    /// consumer_timeout: when the oldest unacknowledged delivery has waited longer than
    /// `timeout`, the channel is closed with 406 (as RabbitMQ) and its unacked messages
    /// go back to their queues.
    pub fn check_consumer_timeout(&mut self, now: Instant, timeout: Duration, out: &mut BytesMut) {
        let overdue = self
            .unacked
            .first_key_value()
            .is_some_and(|(_, u)| now.duration_since(u.at) > timeout);
        if overdue && !self.closing {
            let e = amqp_err!(
                PreconditionFailed,
                "delivery acknowledgement on channel {} timed out. Timeout value used: {} ms. \
                 This timeout value can be configured, see consumers doc guide to learn more",
                self.id,
                timeout.as_millis()
            );
            self.close_with(e, out);
        }
    }

    /// Closes the channel from our side with a channel error.
    fn close_with(&mut self, e: AmqpError, out: &mut BytesMut) {
        tracing::debug!(
            channel = self.id,
            code = e.code.code(),
            "closing channel: {}",
            e.reply_text()
        );
        self.send(
            out,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: e.code.code(),
                reply_text: e.reply_text().into(),
                class_id: e.class_method.0,
                method_id: e.class_method.1,
            })),
        );
        self.closing = true;
        self.release();
    }

    fn handle_method(&mut self, method: AMQPClass, out: &mut BytesMut) -> Result<Outcome> {
        match method {
            AMQPClass::Channel(m) => return self.channel_method(m, out),
            AMQPClass::Exchange(m) => self.exchange_method(m, out)?,
            AMQPClass::Queue(m) => self.queue_method(m, out)?,
            AMQPClass::Basic(m) => self.basic_method(m, out)?,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(sel)) => {
                if self.tx.is_some() {
                    return Err(amqp_err!(
                        PreconditionFailed,
                        "cannot switch from tx to confirm mode"
                    ));
                }
                self.confirms.get_or_insert_with(Confirms::default);
                if !sel.nowait {
                    self.send(
                        out,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
            }
            AMQPClass::Tx(m) => self.tx_method(m, out)?,
            AMQPClass::Access(_) => {
                self.send(
                    out,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
            }
            // A connection method on a channel, or one no channel handles.
            _ => return Err(amqp_err!(CommandInvalid, "unimplemented method")),
        }
        Ok(Outcome::Continue)
    }

    fn channel_method(&mut self, m: channel::AMQPMethod, out: &mut BytesMut) -> Result<Outcome> {
        match m {
            channel::AMQPMethod::Close(_) => {
                self.release();
                self.send(
                    out,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(Outcome::Closed)
            }
            channel::AMQPMethod::CloseOk(_) => Ok(Outcome::Closed),
            channel::AMQPMethod::Flow(flow) if !flow.active => {
                // As RabbitMQ: clients may not stop the broker's deliveries this way.
                Err(amqp_err!(NotImplemented, "active=false"))
            }
            channel::AMQPMethod::Flow(_) => {
                // active=true: deliveries were never stopped; just acknowledge.
                self.send(
                    out,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: true,
                    })),
                );
                Ok(Outcome::Continue)
            }
            channel::AMQPMethod::Open(_) => {
                Err(amqp_err!(ChannelError, "second 'channel.open' seen"))
            }
            other => Err(amqp_err!(
                CommandInvalid,
                "unexpected method channel.{}",
                AMQPClass::Channel(other).get_amqp_method_id()
            )),
        }
    }

    fn exchange_method(&mut self, m: exchange::AMQPMethod, out: &mut BytesMut) -> Result<()> {
        let reply = match m {
            exchange::AMQPMethod::Declare(d) => {
                let kind = match ExchangeKind::parse(s(&d.kind)) {
                    Some(k) => k,
                    None if d.passive => ExchangeKind::Direct,
                    None => {
                        return Err(amqp_err!(
                            CommandInvalid,
                            "invalid exchange type '{}'",
                            s(&d.kind)
                        ));
                    }
                };
                let name = s(&d.exchange);
                if !d.passive && !name.is_empty() {
                    self.check(ResourceKind::Exchange, name, Permission::Configure)?;
                    if let Some(ae) = string_arg(&d.arguments, "alternate-exchange")
                        && self.vhost.exchange(name).is_err()
                    {
                        self.check(ResourceKind::Exchange, name, Permission::Read)?;
                        self.check(ResourceKind::Exchange, ae, Permission::Write)?;
                    }
                }
                let def = ExchangeDef {
                    name: name.to_string(),
                    kind,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                };
                self.vhost.declare_exchange(def, d.passive)?;
                (!d.nowait).then_some(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}))
            }
            exchange::AMQPMethod::Delete(d) => {
                if !s(&d.exchange).is_empty() {
                    self.check(
                        ResourceKind::Exchange,
                        s(&d.exchange),
                        Permission::Configure,
                    )?;
                }
                self.vhost.delete_exchange(s(&d.exchange), d.if_unused)?;
                (!d.nowait).then_some(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}))
            }
            exchange::AMQPMethod::Bind(b) => {
                self.check_bind(
                    ResourceKind::Exchange,
                    s(&b.destination),
                    s(&b.source),
                    s(&b.routing_key),
                )?;
                self.vhost.bind_exchange(
                    s(&b.destination),
                    s(&b.source),
                    s(&b.routing_key),
                    b.arguments,
                )?;
                (!b.nowait).then_some(exchange::AMQPMethod::BindOk(exchange::BindOk {}))
            }
            exchange::AMQPMethod::Unbind(b) => {
                self.check_bind(
                    ResourceKind::Exchange,
                    s(&b.destination),
                    s(&b.source),
                    s(&b.routing_key),
                )?;
                self.vhost.unbind_exchange(
                    s(&b.destination),
                    s(&b.source),
                    s(&b.routing_key),
                    &b.arguments,
                )?;
                (!b.nowait).then_some(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {}))
            }
            other => {
                return Err(amqp_err!(
                    CommandInvalid,
                    "unexpected method exchange.{}",
                    AMQPClass::Exchange(other).get_amqp_method_id()
                ));
            }
        };
        if let Some(r) = reply {
            self.send(out, AMQPClass::Exchange(r));
        }
        Ok(())
    }

    /// Binding and unbinding, as RabbitMQ checks them: write on the destination, read on
    /// the source (the default exchange is refused by the vhost with its own text), and
    /// read on the binding key when the source is a topic exchange with a topic
    /// permission.
    fn check_bind(
        &self,
        kind: ResourceKind,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<()> {
        self.check(kind, destination, Permission::Write)?;
        if !source.is_empty() && !destination.is_empty() {
            self.check(ResourceKind::Exchange, source, Permission::Read)?;
            if let Some(rule) = self.topic_rule(source)
                && !rule.allows(false, key)
            {
                return Err(crate::auth::AccessControl::topic_refused(
                    &self.user,
                    &self.vhost.name,
                    source,
                    key,
                ));
            }
        }
        Ok(())
    }

    /// The queue name a method refers to; empty means the last one declared here.
    fn queue_name(&self, name: &str) -> Result<String> {
        if !name.is_empty() {
            return Ok(name.to_string());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| amqp_err!(NotFound, "no previously declared queue"))
    }

    fn queue_method(&mut self, m: queue::AMQPMethod, out: &mut BytesMut) -> Result<()> {
        let reply = match m {
            queue::AMQPMethod::Declare(d) => {
                if let Some(ok) = self.declare_reply_to(s(&d.queue)) {
                    let ok = ok?;
                    (!d.nowait).then_some(queue::AMQPMethod::DeclareOk(ok))
                } else {
                    let name = if d.passive {
                        self.queue_name(s(&d.queue))?
                    } else if d.queue.as_str().is_empty() {
                        generated_name("amq.gen-")
                    } else {
                        s(&d.queue).to_string()
                    };
                    if !d.passive {
                        self.check(ResourceKind::Queue, &name, Permission::Configure)?;
                        if let Some(dlx) = string_arg(&d.arguments, "x-dead-letter-exchange") {
                            self.check(ResourceKind::Queue, &name, Permission::Read)?;
                            self.check(ResourceKind::Exchange, dlx, Permission::Write)?;
                        }
                    }
                    let def = QueueDef {
                        name,
                        durable: d.durable,
                        exclusive_owner: d.exclusive.then_some(self.conn_id),
                        auto_delete: d.auto_delete,
                        arguments: d.arguments,
                    };
                    let server_named = !d.passive && d.queue.as_str().is_empty();
                    let (q, _created) =
                        self.vhost
                            .declare_queue(def, d.passive, server_named, self.conn_id)?;
                    self.last_queue = Some(q.name().to_string());
                    if d.passive
                        && let Some(host) = self.vhost.remote_home(q.name())
                    {
                        return self.declare_remote(&host, q.name(), d.nowait);
                    }
                    let counts = q.counts();
                    (!d.nowait).then(|| {
                        queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: q.name().into(),
                            message_count: counts.messages,
                            consumer_count: counts.consumers,
                        })
                    })
                }
            }
            queue::AMQPMethod::Bind(b) => {
                let name = self.queue_name(s(&b.queue))?;
                self.check_bind(
                    ResourceKind::Queue,
                    &name,
                    s(&b.exchange),
                    s(&b.routing_key),
                )?;
                self.vhost.bind_queue(
                    &name,
                    s(&b.exchange),
                    s(&b.routing_key),
                    b.arguments,
                    self.conn_id,
                )?;
                (!b.nowait).then_some(queue::AMQPMethod::BindOk(queue::BindOk {}))
            }
            queue::AMQPMethod::Unbind(b) => {
                let name = self.queue_name(s(&b.queue))?;
                self.check_bind(
                    ResourceKind::Queue,
                    &name,
                    s(&b.exchange),
                    s(&b.routing_key),
                )?;
                self.vhost.unbind_queue(
                    &name,
                    s(&b.exchange),
                    s(&b.routing_key),
                    &b.arguments,
                    self.conn_id,
                )?;
                Some(queue::AMQPMethod::UnbindOk(queue::UnbindOk {}))
            }
            queue::AMQPMethod::Purge(p) => {
                let name = self.queue_name(s(&p.queue))?;
                self.check(ResourceKind::Queue, &name, Permission::Read)?;
                let q = self.vhost.queue(&name, self.conn_id)?;
                if let Some(host) = self.vhost.remote_home(q.name()) {
                    return self.purge_remote(&host, q.name(), p.nowait);
                }
                let purged = q.purge();
                (!p.nowait).then_some(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                    message_count: purged as u32,
                }))
            }
            queue::AMQPMethod::Delete(d) => {
                let name = self.queue_name(s(&d.queue))?;
                self.check(ResourceKind::Queue, &name, Permission::Configure)?;
                let count =
                    self.vhost
                        .delete_queue(&name, d.if_unused, d.if_empty, self.conn_id)?;
                (!d.nowait).then_some(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                    message_count: count,
                }))
            }
            other => {
                return Err(amqp_err!(
                    CommandInvalid,
                    "unexpected method queue.{}",
                    AMQPClass::Queue(other).get_amqp_method_id()
                ));
            }
        };
        if let Some(r) = reply {
            self.send(out, AMQPClass::Queue(r));
        }
        Ok(())
    }

    fn basic_method(&mut self, m: basic::AMQPMethod, out: &mut BytesMut) -> Result<()> {
        match m {
            basic::AMQPMethod::Publish(p) => {
                if p.immediate {
                    return Err(amqp_err!(NotImplemented, "immediate=true"));
                }
                self.publish = Some(ContentAssembly::new(p));
            }
            basic::AMQPMethod::Qos(q) => {
                if q.global {
                    self.link
                        .global_prefetch
                        .store(q.prefetch_count as u32, Ordering::Relaxed);
                    for c in self.consumers.values() {
                        c.queue.kick();
                    }
                } else {
                    self.prefetch = q.prefetch_count as u32;
                    // As RabbitMQ: a per-consumer qos lifts a channel-wide limit set
                    // before it (so the order of the two settings matters).
                    if self.link.global_prefetch.swap(0, Ordering::Relaxed) != 0 {
                        for c in self.consumers.values() {
                            c.queue.kick();
                        }
                    }
                }
                self.send(
                    out,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
            }
            basic::AMQPMethod::Consume(c) => self.consume(c, out)?,
            basic::AMQPMethod::Cancel(c) => {
                let tag: Arc<str> = Arc::from(s(&c.consumer_tag));
                if self.is_reply_consumer(&tag) {
                    self.cancel_reply_consumer();
                } else if self.cancel_remote(&tag, c.nowait) {
                    return Ok(());
                } else {
                    self.cancel_consumer(&tag);
                }
                if !c.nowait {
                    self.send(
                        out,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
            }
            basic::AMQPMethod::Get(g) => self.get(g, out)?,
            basic::AMQPMethod::Ack(a) => {
                self.settle_tags(a.delivery_tag, a.multiple, Settle::Ack)?
            }
            basic::AMQPMethod::Reject(r) => {
                self.settle_tags(r.delivery_tag, false, Settle::discard(r.requeue))?
            }
            basic::AMQPMethod::Nack(n) => {
                self.settle_tags(n.delivery_tag, n.multiple, Settle::discard(n.requeue))?
            }
            basic::AMQPMethod::Recover(r) => {
                self.recover(r.requeue)?;
                self.send(
                    out,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
            }
            basic::AMQPMethod::RecoverAsync(r) => self.recover(r.requeue)?,
            other => {
                return Err(amqp_err!(
                    CommandInvalid,
                    "unexpected method basic.{}",
                    AMQPClass::Basic(other).get_amqp_method_id()
                ));
            }
        }
        Ok(())
    }

    fn consume(&mut self, c: basic::Consume, out: &mut BytesMut) -> Result<()> {
        let direct_reply = c.queue.as_str() == PSEUDO_QUEUE;
        let q = if direct_reply {
            None
        } else {
            let name = self.queue_name(s(&c.queue))?;
            self.check(ResourceKind::Queue, &name, Permission::Read)?;
            Some(self.vhost.queue(&name, self.conn_id)?)
        };
        let tag: Arc<str> = if c.consumer_tag.as_str().is_empty() {
            Arc::from(generated_name("amq.ctag-"))
        } else {
            Arc::from(s(&c.consumer_tag))
        };
        if self.consumers.contains_key(&tag) || self.is_reply_consumer(&tag) {
            return Err(amqp_err!(
                NotAllowed,
                "attempt to reuse consumer tag '{}'",
                tag
            ));
        }
        let Some(q) = q else {
            return self.consume_reply_to(c, tag, out);
        };
        let priority = match c.arguments.inner().get("x-priority") {
            None => 0,
            Some(v) => crate::queue::args::int_value(v).ok_or_else(|| {
                amqp_err!(
                    PreconditionFailed,
                    "invalid arg 'x-priority' for consumer: {:?}",
                    v
                )
            })? as i32,
        };
        let id = self.broker.next_id();
        if let Some(host) = self.vhost.remote_home(q.name()) {
            return self.consume_remote(&host, q, &c, tag, id, priority);
        }
        let spec = ConsumerSpec {
            id,
            priority,
            prefetch: self.prefetch,
            no_ack: c.no_ack,
        };
        self.consumers.insert(
            tag.clone(),
            Consumer {
                id,
                queue: q.clone(),
                remote: None,
            },
        );
        if let Err(e) = q.consume(spec, tag.clone(), c.exclusive, self.link.clone()) {
            self.consumers.remove(&tag);
            return Err(e);
        }
        // consume-ok still goes out before any delivery: deliveries travel through the
        // connection's event queue, which is read only after this batch's output is written.
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

    fn cancel_consumer(&mut self, tag: &Arc<str>) {
        let Some(c) = self.consumers.remove(tag) else {
            return;
        };
        match &c.remote {
            Some(hold) => hold.cancel(),
            None => {
                if c.queue.cancel(c.id) {
                    self.vhost.remove_queue(&c.queue);
                }
            }
        }
    }

    /// The broker cancelled a consumer (its queue was deleted).
    pub fn server_cancel(&mut self, tag: &Arc<str>, notify: bool, out: &mut BytesMut) {
        // A consumer of a queue on another node is cancelled when the link to that node
        // is lost: what the channel got from there is unknown from now on.
        self.unacked.retain(|_, u| !u.is_lost());
        if self.consumers.remove(tag).is_some() && notify && !self.closing {
            self.send(
                out,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: tag.as_ref().into(),
                    nowait: true,
                })),
            );
        }
    }

    fn get(&mut self, g: basic::Get, out: &mut BytesMut) -> Result<()> {
        let name = self.queue_name(s(&g.queue))?;
        self.check(ResourceKind::Queue, &name, Permission::Read)?;
        let q = self.vhost.queue(&name, self.conn_id)?;
        if let Some(host) = self.vhost.remote_home(q.name()) {
            return self.get_remote(&host, q, g.no_ack);
        }
        let got = q.get(g.no_ack);
        self.write_got(q, got, g.no_ack, None, out);
        Ok(())
    }

    /// basic.get's answer: get-ok with the message, or get-empty. `remote` is the
    /// proxy that holds the message when its queue is hosted on another node.
    fn write_got(
        &mut self,
        q: Arc<Queue>,
        got: Option<(crate::queue::Entry, u32)>,
        no_ack: bool,
        remote: Option<Arc<RemoteHold>>,
        out: &mut BytesMut,
    ) {
        match got {
            None => self.send(
                out,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            ),
            Some((entry, left)) => {
                let stats = &self.link.conn.stats;
                ConnStats::add(
                    if no_ack {
                        &stats.get_no_ack
                    } else {
                        &stats.get_ack
                    },
                    1,
                );
                if entry.redelivered {
                    ConnStats::add(&stats.redelivered, 1);
                }
                let tag = self.next_tag;
                self.next_tag += 1;
                if !no_ack {
                    self.unacked.insert(
                        tag,
                        Unacked {
                            queue: q.clone(),
                            offset: entry.offset,
                            counted: false,
                            at: Instant::now(),
                            remote,
                        },
                    );
                }
                self.send(
                    out,
                    AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                        delivery_tag: tag,
                        redelivered: entry.redelivered,
                        exchange: entry.msg.exchange.as_str().into(),
                        routing_key: entry.msg.routing_key.as_str().into(),
                        message_count: left,
                    })),
                );
                let props = delivery_properties(&q, &entry);
                encode::content(out, self.id, &props, &entry.msg.body, self.frame_max);
            }
        }
    }

    /// Writes a delivery from a queue, or gives it back when its consumer is gone. An
    /// auto-ack delivery's stored copy is settled into `written` (to be submitted once
    /// `out` reached the socket).
    pub fn deliver(&mut self, d: Delivery, now: Instant, out: &mut BytesMut, written: &mut Writes) {
        let live = !self.closing
            && self
                .consumers
                .get(&d.consumer_tag)
                .is_some_and(|c| c.id == d.consumer);
        if !live {
            if !d.no_ack {
                self.link.global_unacked.fetch_sub(1, Ordering::Relaxed);
            }
            d.queue.return_undelivered(d.entry);
            return;
        }
        let tag = self.write_delivery(&d.consumer_tag, &d.queue, &d.entry, d.no_ack, out);
        if d.no_ack {
            d.queue.settle_written_auto_ack(&d.entry, written);
        } else {
            self.unacked.insert(
                tag,
                Unacked {
                    queue: d.queue,
                    offset: d.entry.offset,
                    counted: true,
                    at: now,
                    remote: None,
                },
            );
        }
    }

    /// Writes basic.deliver and the message under the channel's next delivery tag,
    /// which it returns.
    fn write_delivery(
        &mut self,
        consumer_tag: &str,
        queue: &Queue,
        entry: &crate::queue::Entry,
        no_ack: bool,
        out: &mut BytesMut,
    ) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        let msg = &entry.msg;
        encode::deliver(
            out,
            self.id,
            consumer_tag,
            tag,
            entry.redelivered,
            &msg.exchange,
            &msg.routing_key,
        );
        let props = delivery_properties(queue, entry);
        encode::content(out, self.id, &props, &msg.body, self.frame_max);
        let stats = &self.link.conn.stats;
        ConnStats::add(
            if no_ack {
                &stats.delivered_no_ack
            } else {
                &stats.delivered_ack
            },
            1,
        );
        if entry.redelivered {
            ConnStats::add(&stats.redelivered, 1);
        }
        tag
    }

    /// Removes the unacked deliveries named by (tag, multiple); 406 on an unknown tag.
    fn take_unacked(&mut self, tag: u64, multiple: bool) -> Result<BTreeMap<u64, Unacked>> {
        let unknown = || amqp_err!(PreconditionFailed, "unknown delivery tag {}", tag);
        if multiple {
            // As RabbitMQ: the tag itself must be outstanding, even when earlier ones are.
            if tag != 0 && self.unacked.get(&tag).is_none_or(|u| u.is_lost()) {
                return Err(unknown());
            }
            let upto = if tag == 0 { u64::MAX } else { tag };
            let keep = self.unacked.split_off(&upto.saturating_add(1));
            let mut taken = std::mem::replace(&mut self.unacked, keep);
            if taken.is_empty() && tag != 0 {
                return Err(unknown());
            }
            taken.retain(|_, u| !u.is_lost());
            Ok(taken)
        } else {
            Ok(BTreeMap::from([(tag, self.take_one_unacked(tag)?)]))
        }
    }

    /// Takes the one outstanding delivery `tag` out of the unacked set.
    fn take_one_unacked(&mut self, tag: u64) -> Result<Unacked> {
        self.unacked
            .remove(&tag)
            .filter(|u| !u.is_lost())
            .ok_or_else(|| amqp_err!(PreconditionFailed, "unknown delivery tag {}", tag))
    }

    /// An ack, reject or nack: applied now, or, in a transaction, taken out of the
    /// unacked set now (so a second ack of the tag is a 406 at once) and applied at
    /// commit, or put back at rollback.
    fn settle_tags(&mut self, tag: u64, multiple: bool, how: Settle) -> Result<()> {
        // The common case, one delivery settled outside a transaction, without the map
        // of taken deliveries.
        if !multiple && self.tx.is_none() {
            let one = self.take_one_unacked(tag)?;
            self.settle(vec![one], how, None);
            return Ok(());
        }
        let taken = self.take_unacked(tag, multiple)?;
        match &mut self.tx {
            Some(tx) => tx.push(TxOp::Settle(taken, how)),
            None => self.settle(taken.into_values().collect(), how, None),
        }
        Ok(())
    }

    /// Puts the deliveries held by an unfinished transaction back into the unacked set.
    fn restore_tx_settles(&mut self, ops: Vec<TxOp>) {
        for op in ops {
            if let TxOp::Settle(taken, _) = op {
                self.unacked.extend(taken);
            }
        }
    }

    /// Acks, requeues or rejects (dead-letters) deliveries, one call per queue.
    fn settle(&mut self, taken: Vec<Unacked>, how: Settle, mut writes: Option<&mut Writes>) {
        if taken.is_empty() {
            return;
        }
        if matches!(how, Settle::Ack) {
            ConnStats::add(&self.link.conn.stats.acked, taken.len() as u64);
        }
        let counted = taken.iter().filter(|u| u.counted).count() as u32;
        self.link
            .global_unacked
            .fetch_sub(counted, Ordering::Relaxed);
        let mut groups: Vec<(Arc<Queue>, Vec<Offset>)> = Vec::new();
        let mut remote: Vec<(Arc<RemoteHold>, Vec<Offset>)> = Vec::new();
        for u in taken {
            if let Some(hold) = u.remote {
                match remote.iter_mut().find(|(h, _)| Arc::ptr_eq(h, &hold)) {
                    Some((_, offsets)) => offsets.push(u.offset),
                    None => remote.push((hold, vec![u.offset])),
                }
                continue;
            }
            match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
                Some((_, offsets)) => offsets.push(u.offset),
                None => groups.push((u.queue, vec![u.offset])),
            }
        }
        for (q, offsets) in groups {
            match how {
                Settle::Requeue => q.requeue(offsets),
                Settle::Reject => q.reject(offsets),
                Settle::Ack => q.settle(offsets, writes.as_deref_mut()),
            }
        }
        // Queues hosted on another node settle there (in a transaction: at commit,
        // without waiting for the host).
        for (hold, offsets) in remote {
            hold.settle(offsets, how.remote());
        }
    }

    fn recover(&mut self, requeue: bool) -> Result<()> {
        if !requeue {
            return Err(amqp_err!(NotImplemented, "requeue=false"));
        }
        let all = std::mem::take(&mut self.unacked).into_values().collect();
        self.settle(all, Settle::Requeue, None);
        Ok(())
    }

    fn tx_method(&mut self, m: tx::AMQPMethod, out: &mut BytesMut) -> Result<()> {
        let reply = match m {
            tx::AMQPMethod::Select(_) => {
                if self.confirms.is_some() {
                    return Err(amqp_err!(
                        PreconditionFailed,
                        "cannot switch from confirm to tx mode"
                    ));
                }
                self.tx.get_or_insert_with(Vec::new);
                tx::AMQPMethod::SelectOk(tx::SelectOk {})
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = self.tx.replace(Vec::new()) else {
                    return Err(amqp_err!(
                        PreconditionFailed,
                        "channel is not transactional"
                    ));
                };
                // Everything the transaction did goes to the store as one request (one
                // write transaction); commit-ok waits for it, and its publishes reach
                // the queues only after the request was handed to the store.
                // Publishes are routed first: routing can fail (an exchange deleted since),
                // and then nothing at all is applied.
                let mut commit = TxCommit::default();
                let (publishes, settles): (Vec<TxOp>, Vec<TxOp>) = ops
                    .into_iter()
                    .partition(|op| matches!(op, TxOp::Publish(..)));
                for op in publishes {
                    if let TxOp::Publish(mandatory, msg, cc) = op
                        && let Err(e) =
                            self.route_and_enqueue(mandatory, msg, &cc, out, Some(&mut commit))
                    {
                        self.restore_tx_settles(settles);
                        return Err(e);
                    }
                }
                for op in settles {
                    if let TxOp::Settle(taken, how) = op {
                        self.settle(taken.into_values().collect(), how, Some(&mut commit.writes));
                    }
                }
                let journal = self.broker.journal().cloned();
                if commit
                    .enqueues
                    .iter()
                    .any(|(qs, _)| qs.iter().any(|q| q.is_replicated()))
                {
                    // Replicated queues take the publishes through their logs: commit-ok
                    // waits for the store and for every log to have committed them.
                    self.tx_commits_in_flight += 1;
                    let stored = journal.map(|j| j.append_wait(commit.writes));
                    let committed = enqueue_tx_publishes(commit.enqueues);
                    let tx = self.link.conn.tx.clone();
                    let ch = self.id;
                    tokio::spawn(async move {
                        if let Some(stored) = stored {
                            stored.await;
                        }
                        let mut all = true;
                        for c in committed {
                            all &= c.await.unwrap_or(false);
                        }
                        let _ = tx.send(if all {
                            ConnEvent::TxCommitted(ch)
                        } else {
                            ConnEvent::Close(amqp_err!(
                                InternalError,
                                "a quorum queue did not commit the transaction's messages"
                            ))
                        });
                    });
                    return Ok(());
                }
                match journal {
                    // A commit with nothing to store still goes through the journal when
                    // an earlier one is in flight: the journal answers in order.
                    Some(journal) if !commit.writes.is_empty() || self.tx_commits_in_flight > 0 => {
                        self.tx_commits_in_flight += 1;
                        let tx = self.link.conn.tx.clone();
                        let ch = self.id;
                        journal.append_then(
                            commit.writes,
                            Box::new(move || {
                                let _ = tx.send(ConnEvent::TxCommitted(ch));
                            }),
                        );
                        enqueue_tx_publishes(commit.enqueues);
                        return Ok(());
                    }
                    _ => {
                        enqueue_tx_publishes(commit.enqueues);
                    }
                }
                tx::AMQPMethod::CommitOk(tx::CommitOk {})
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(ops) = self.tx.replace(Vec::new()) else {
                    return Err(amqp_err!(
                        PreconditionFailed,
                        "channel is not transactional"
                    ));
                };
                self.restore_tx_settles(ops);
                tx::AMQPMethod::RollbackOk(tx::RollbackOk {})
            }
            other => {
                return Err(amqp_err!(
                    CommandInvalid,
                    "unexpected method tx.{}",
                    AMQPClass::Tx(other).get_amqp_method_id()
                ));
            }
        };
        self.send(out, AMQPClass::Tx(reply));
        Ok(())
    }

    fn content_header(
        &mut self,
        header: Box<ContentHeader>,
        out: &mut BytesMut,
    ) -> Result<Outcome> {
        let Some(p) = self.publish.as_mut() else {
            return Err(amqp_err!(
                UnexpectedFrame,
                "expected method frame, got non method frame instead"
            ));
        };
        let max = self.broker.config.max_message_size();
        if !p.has_header() && header.body_size > max {
            self.publish = None;
            return Err(amqp_err!(
                PreconditionFailed,
                "message size {} is larger than configured max size {}",
                header.body_size,
                max
            ));
        }
        if p.header(header)? == Progress::Complete {
            self.complete_publish(out)?;
        }
        Ok(Outcome::Continue)
    }

    fn content_body(&mut self, body: Bytes, out: &mut BytesMut) -> Result<Outcome> {
        let Some(p) = self.publish.as_mut() else {
            return Err(amqp_err!(
                UnexpectedFrame,
                "expected method frame, got non method frame instead"
            ));
        };
        if p.body(body)? == Progress::Complete {
            self.complete_publish(out)?;
        }
        Ok(Outcome::Continue)
    }

    fn complete_publish(&mut self, out: &mut BytesMut) -> Result<()> {
        let Some(Assembled {
            method,
            mut header,
            body,
        }) = self.publish.take().and_then(ContentAssembly::finish)
        else {
            return Ok(());
        };
        self.check_publish(method.exchange.as_str(), method.routing_key.as_str())?;
        ConnStats::add(&self.link.conn.stats.published, 1);
        self.rewrite_reply_to(&mut header)?;
        let (cc, without_bcc) = sender_selected::extra_routing_keys(&header.properties)?;
        if let Some(props) = without_bcc {
            header.raw_properties = encode::properties(&props);
            header.properties = props;
        }
        if let Some(exp) = header.properties.expiration()
            && exp.as_str().parse::<u64>().is_err()
        {
            return Err(amqp_err!(
                PreconditionFailed,
                "invalid expiration '{}': {{error,badarg}}",
                exp.as_str()
            ));
        }
        if let Some(uid) = header.properties.user_id()
            && uid.as_str() != self.user
        {
            return Err(amqp_err!(
                PreconditionFailed,
                "user_id property set to '{}' but authenticated user was '{}'",
                uid.as_str(),
                self.user
            ));
        }
        let persistent = *header.properties.delivery_mode() == Some(2);
        let msg = Arc::new(Message {
            exchange: String::from(method.exchange),
            routing_key: String::from(method.routing_key),
            properties: header.properties,
            raw_properties: header.raw_properties,
            body,
            store_id: persistent.then(|| self.broker.next_msg_id()),
            published_ms: crate::queue::now_ms(),
        });
        if let Some(tx) = &mut self.tx {
            // Check the exchange now, as RabbitMQ does, but enqueue only at commit.
            if !msg.exchange.is_empty() {
                self.vhost.exchange(&msg.exchange)?;
            }
            tx.push(TxOp::Publish(method.mandatory, msg, cc));
            return Ok(());
        }
        self.route_and_enqueue(method.mandatory, msg, &cc, out, None)
    }

    fn route_and_enqueue(
        &mut self,
        mandatory: bool,
        msg: Arc<Message>,
        cc: &[String],
        out: &mut BytesMut,
        tx: Option<&mut TxCommit>,
    ) -> Result<()> {
        if direct_reply::is_reply(&msg.exchange, &msg.routing_key) {
            self.publish_reply(mandatory, msg, out);
            return Ok(());
        }
        let mut queues = if cc.is_empty() {
            self.vhost.route(
                &msg.exchange,
                &msg.routing_key,
                msg.properties.headers().as_ref(),
            )?
        } else {
            let keys: Vec<&str> = std::iter::once(msg.routing_key.as_str())
                .chain(cc.iter().map(String::as_str))
                .collect();
            self.vhost
                .route_keys(&msg.exchange, &keys, msg.properties.headers().as_ref())?
        };
        // On a clustered node, queues homed elsewhere get the message from their home, and
        // replicated queues through their log.
        let remote = self.split_remote(&mut queues);
        if !remote.is_empty() && tx.is_some() {
            // Transactions over queues of other nodes are not supported yet.
            if let Some(q) = self.vhost.find_queue(&remote[0].1[0]) {
                self.vhost.check_local(&q)?;
            }
        }
        // (A transaction's publishes to replicated queues are proposed at commit.)
        let replicated = if tx.is_none() {
            split_replicated(&mut queues)
        } else {
            Vec::new()
        };
        if queues.is_empty() && remote.is_empty() && replicated.is_empty() {
            let stats = &self.link.conn.stats;
            ConnStats::add(
                if mandatory {
                    &stats.returned
                } else {
                    &stats.dropped
                },
                1,
            );
        }
        if queues.is_empty() && remote.is_empty() && replicated.is_empty() && mandatory {
            self.return_unroutable(&msg, out);
        }
        // Persistent copies go to the store before the queues see the message, so that
        // no ack of it can reach the store first.
        // Queues that refuse it (x-overflow reject-publish) are skipped; the publisher
        // gets a nack. reject-publish-dlx queues dead-letter it themselves.
        let mut refused = false;
        queues.retain(|q| {
            let refuse = q.refuses(msg.size());
            refused |= refuse;
            !refuse
        });
        if !remote.is_empty() || !replicated.is_empty() {
            self.publish_with_remote(msg, queues, remote, replicated, refused);
            return Ok(());
        }
        let mut writes = Writes::default();
        writes.publish(&queues, &msg);
        if let Some(commit) = tx {
            commit.writes.append(writes);
            commit.enqueues.push((queues, msg));
            return Ok(());
        }
        let seq = self.confirms.as_mut().map(|c| {
            c.last_seq += 1;
            c.last_seq
        });
        match (self.broker.journal(), seq) {
            (Some(journal), Some(seq)) if !writes.is_empty() => {
                if let Some(c) = &mut self.confirms {
                    c.outstanding.insert(seq);
                    // A publisher in confirm mode that does not wait for its confirms is
                    // held back like one that asks for none (a windowed one never gets here).
                    if c.outstanding.len() > UNWAITED_CONFIRMS && journal.is_congested() {
                        self.link.conn.held_by_store.store(true, Ordering::Relaxed);
                    }
                }
                let tx = self.link.conn.tx.clone();
                let ch = self.id;
                journal.append_then(
                    writes,
                    Box::new(move || {
                        let _ = tx.send(ConnEvent::Stored(ch, vec![seq]));
                    }),
                );
            }
            (Some(journal), None) => {
                // Store flow control, for publishers that do not wait for confirms (those
                // that do are held back by their window): the next publishes wait for the
                // writer.
                if !writes.is_empty() && journal.is_congested() {
                    self.link.conn.held_by_store.store(true, Ordering::Relaxed);
                }
                journal.append(writes)
            }
            (_, Some(seq)) => {
                if let Some(c) = &mut self.confirms {
                    c.ready.push(seq);
                }
            }
            (None, None) => {}
        }
        for q in &queues {
            let enqueued = q.enqueue(msg.clone());
            if q.congested() {
                self.link.conn.held_by(q);
            }
            if enqueued == Enqueued::Rejected {
                // Lost a race with other publishers for the last place (the queue
                // removed its stored copy).
                // reject-publish and reject-publish-dlx alike: the publisher gets a nack
                // (the -dlx queue dead-letters the message too).
                refused = true;
            }
        }
        if refused && let (Some(c), Some(seq)) = (&mut self.confirms, seq) {
            // A nack replaces the ack (one answer per publish).
            c.ready.retain(|s| *s != seq);
            c.outstanding.remove(&seq);
            c.nacks.push(seq);
        }
        Ok(())
    }

    /// Takes the queues homed on other nodes out of `queues`: their names by home.
    /// (Replicated queues led elsewhere count as homed on their leader.)
    fn split_remote(&self, queues: &mut Vec<Arc<Queue>>) -> Vec<(String, Vec<String>)> {
        let mut remote: Vec<(String, Vec<String>)> = Vec::new();
        if self.broker.cluster_link().is_none() || !self.vhost.has_remote_queues() {
            return remote;
        }
        queues.retain(|q| {
            let Some(home) = self.vhost.remote_home(q.name()) else {
                return true;
            };
            match remote.iter_mut().find(|(h, _)| *h == home) {
                Some((_, names)) => names.push(q.name().to_string()),
                None => remote.push((home, vec![q.name().to_string()])),
            }
            false
        });
        remote
    }

    /// A publish that reaches queues of other nodes or replicated queues (and maybe
    /// local ones): the local copies are stored and enqueued as usual, the message is
    /// forwarded to each home and proposed to each replicated queue's log, and the
    /// publisher's confirm waits for all of them (a nack if a home did not take it, a log
    /// did not commit it, or a local queue refused it).
    fn publish_with_remote(
        &mut self,
        msg: Arc<Message>,
        queues: Vec<Arc<Queue>>,
        remote: Vec<(String, Vec<String>)>,
        replicated: Vec<Arc<Queue>>,
        mut refused: bool,
    ) {
        let Some(link) = self.broker.cluster_link() else {
            return;
        };
        let mut answers = Vec::with_capacity(remote.len() + replicated.len());
        for q in &replicated {
            let (ack, committed) = tokio::sync::oneshot::channel();
            if q.enqueue_tracked(msg.clone(), Some(ack)) == Enqueued::Rejected {
                refused = true;
            }
            answers.push(committed);
        }
        let mut writes = Writes::default();
        writes.publish(&queues, &msg);
        let local = match self.broker.journal() {
            Some(journal) if !writes.is_empty() => Some(journal.append_wait(writes)),
            _ => None,
        };
        for q in &queues {
            // A queue that lost a race for its last place removes its copy itself.
            if q.enqueue(msg.clone()) == Enqueued::Rejected {
                refused = true;
            }
        }
        let blob = msg.encode().to_vec();
        for (home, names) in remote {
            let (answered, answer) = tokio::sync::oneshot::channel();
            link.forwarder.publish(
                &home,
                &self.vhost.name,
                names,
                msg.store_id.is_some(),
                blob.clone(),
                Box::new(move |ok| {
                    let _ = answered.send(ok);
                }),
            );
            answers.push(answer);
        }
        let seq = self.confirms.as_mut().map(|c| {
            c.last_seq += 1;
            c.outstanding.insert(c.last_seq);
            c.last_seq
        });
        // Flow control: a publisher waits while the homes are far behind.
        if link.forwarder.is_congested() {
            self.link.conn.held_by_store.store(true, Ordering::Relaxed);
        }
        let tx = self.link.conn.tx.clone();
        let ch = self.id;
        tokio::spawn(async move {
            if let Some(local) = local {
                local.await;
            }
            let mut ok = !refused;
            for a in answers {
                ok &= a.await.unwrap_or(false);
            }
            if let Some(seq) = seq {
                let _ = tx.send(if ok {
                    ConnEvent::Stored(ch, vec![seq])
                } else {
                    ConnEvent::Nacked(ch, vec![seq])
                });
            }
        });
    }

    /// basic.return of a mandatory message that reached no queue.
    fn return_unroutable(&self, msg: &Message, out: &mut BytesMut) {
        self.send(
            out,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: ReplyCode::NoRoute.code(),
                reply_text: "NO_ROUTE".into(),
                exchange: msg.exchange.as_str().into(),
                routing_key: msg.routing_key.as_str().into(),
            })),
        );
        encode::content(out, self.id, &msg.raw_properties, &msg.body, self.frame_max);
    }

    /// In confirm mode, confirms a publish that needs nothing stored.
    fn confirm_now(&mut self) {
        if let Some(c) = &mut self.confirms {
            c.last_seq += 1;
            c.ready.push(c.last_seq);
        }
    }

    /// The store committed this channel's transaction: commit-ok may go.
    pub fn tx_committed(&mut self, out: &mut BytesMut) {
        self.tx_commits_in_flight = self.tx_commits_in_flight.saturating_sub(1);
        if !self.closing {
            self.send(
                out,
                AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
            );
        }
    }

    /// Publishes stored by the store (confirms waiting for fsync).
    pub fn stored(&mut self, seqs: &[u64]) {
        if let Some(c) = &mut self.confirms {
            for seq in seqs {
                // Not outstanding any more means it was nacked meanwhile.
                if c.outstanding.remove(seq) {
                    c.ready.push(*seq);
                }
            }
        }
    }

    /// Publishes that could not be made safe: nacked (unless answered already).
    pub fn nacked(&mut self, seqs: &[u64]) {
        if let Some(c) = &mut self.confirms {
            for seq in seqs {
                if c.outstanding.remove(seq) {
                    c.nacks.push(*seq);
                }
            }
        }
    }

    /// Writes the confirms that became ready, coalesced with `multiple` where possible:
    /// everything below the oldest publish still waiting for the store is confirmed.
    pub fn flush_confirms(&mut self, out: &mut BytesMut) {
        let Some(c) = &mut self.confirms else { return };
        ConnStats::add(&self.link.conn.stats.confirmed, c.ready.len() as u64);
        for seq in c.nacks.drain(..) {
            encode::confirm(out, self.id, seq, false, false);
            c.ever_nacked = true;
        }
        if c.ready.is_empty() {
            return;
        }
        if c.ever_nacked {
            for seq in c.ready.drain(..) {
                encode::confirm(out, self.id, seq, false, true);
            }
            return;
        }
        let low = c.outstanding.first().copied().unwrap_or(u64::MAX);
        let mut upto = None;
        for seq in c.ready.drain(..) {
            if seq < low {
                upto = Some(upto.map_or(seq, |u: u64| u.max(seq)));
            } else {
                encode::confirm(out, self.id, seq, false, true);
            }
        }
        if let Some(tag) = upto
            && tag > c.acked_upto
        {
            encode::confirm(out, self.id, tag, tag > c.acked_upto + 1, true);
            c.acked_upto = tag;
        }
    }

    /// Lets go of everything the channel holds: consumers are cancelled, unacked
    /// messages go back to their queues (marked redelivered).
    pub fn release(&mut self) {
        self.cancel_reply_consumer();
        let tags: Vec<Arc<str>> = self.consumers.keys().cloned().collect();
        for tag in tags {
            self.cancel_consumer(&tag);
        }
        if let Some(ops) = self.tx.take() {
            self.restore_tx_settles(ops);
        }
        let all: Vec<Unacked> = std::mem::take(&mut self.unacked).into_values().collect();
        self.settle(all, Settle::Requeue, None);
        self.publish = None;
    }
}

/// The properties a delivery carries: the publisher's bytes unchanged, except that
/// queues with x-delivery-limit add `x-delivery-count` to redelivered messages.
fn delivery_properties(q: &Queue, entry: &crate::queue::Entry) -> Bytes {
    if q.delivery_limit().is_none() || entry.delivery_count == 0 {
        return entry.msg.raw_properties.clone();
    }
    let mut props = entry.msg.properties.clone();
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(entry.delivery_count as i64),
    );
    props = props.with_headers(headers);
    encode::properties(&props)
}

/// Takes the replicated queues (led by this node, or not yet known to be led elsewhere)
/// out of `queues`: their publishes go through their logs.
fn split_replicated(queues: &mut Vec<Arc<Queue>>) -> Vec<Arc<Queue>> {
    if !queues.iter().any(|q| q.is_replicated()) {
        return Vec::new();
    }
    let (replicated, rest) = std::mem::take(queues)
        .into_iter()
        .partition(|q| q.is_replicated());
    *queues = rest;
    replicated
}

/// A committed transaction's publishes enter their queues; the answers of the replicated
/// queues' logs (whether each committed its copy).
fn enqueue_tx_publishes(
    enqueues: Vec<(Vec<Arc<Queue>>, Arc<Message>)>,
) -> Vec<tokio::sync::oneshot::Receiver<bool>> {
    let mut committed = Vec::new();
    for (queues, msg) in enqueues {
        for q in queues {
            if q.is_replicated() {
                let (ack, answer) = tokio::sync::oneshot::channel();
                q.enqueue_tracked(msg.clone(), Some(ack));
                committed.push(answer);
            } else {
                q.enqueue(msg.clone());
            }
        }
    }
    committed
}
