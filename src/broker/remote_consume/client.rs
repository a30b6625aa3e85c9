//! The client's side of proxied consumption: the node a client is connected to asks a
//! queue's host to consume, get, purge or count for it, and hands the host's deliveries
//! to the client's channel. Requests and settlements to one host leave in the order the
//! channels made them (one sending task per host). When the link to a host goes down,
//! its proxy consumers are cancelled (basic.cancel for clients that asked for it, as
//! RabbitMQ does when a classic queue's node goes down) and the deliveries they held are
//! forgotten: the host has put them back in the queue.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Answer, CONSUME_GROUP, Note, SettleHow, ToClient, ToHost, encode};
use crate::cluster::Transport;
use crate::cluster::TransportError;
use crate::connection::sink::{ChannelLink, ConnEvent};
use crate::protocol::{AmqpError, reply::amqp_err};
use crate::queue::{ConsumerId, Entry, Offset, Queue};

/// How long a request waits for its host's answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// A host's answer, or the error the client gets.
pub type RemoteAnswer = Pin<Box<dyn Future<Output = Result<Answer, AmqpError>> + Send>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A proxy consumer's way to its channel.
#[derive(Debug)]
struct Route {
    link: Arc<ChannelLink>,
    tag: Arc<str>,
    consumer: ConsumerId,
    queue: Arc<Queue>,
    no_ack: bool,
    hold: Arc<RemoteHold>,
}

enum Outgoing {
    Note(Vec<u8>),
    Request(
        Vec<u8>,
        oneshot::Sender<Result<crate::cluster::transport::Answer, TransportError>>,
    ),
}

#[derive(Debug)]
struct Inner {
    transport: Transport,
    next_proxy: AtomicU64,
    routes: Mutex<HashMap<u64, Route>>,
    hosts: Mutex<HashMap<String, mpsc::UnboundedSender<Outgoing>>>,
    /// Links lost so far, per host: a hold made before the last loss is gone.
    losses: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outgoing::Note(_) => "Note",
            Outgoing::Request(..) => "Request",
        })
    }
}

/// This node's proxies of queues hosted on other nodes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    inner: Arc<Inner>,
}

/// One proxy on a host (a consumer, or the holder of an ack-mode get): how a channel
/// settles what it holds.
#[derive(Debug)]
pub struct RemoteHold {
    proxy: u64,
    host: String,
    /// The host's loss count when the hold was made.
    epoch: u64,
    client: Weak<Inner>,
}

impl RemoteHold {
    /// Settles deliveries of this proxy on its host (nothing once the link was lost:
    /// the host put them back already).
    pub fn settle(&self, offsets: Vec<Offset>, how: SettleHow) {
        if offsets.is_empty() || self.is_lost() {
            return;
        }
        if let Some(inner) = self.client.upgrade() {
            let proxy = self.proxy;
            ProxyClient { inner }.note(
                &self.host,
                ToHost::Settle {
                    proxy,
                    offsets,
                    how,
                },
            );
        }
    }

    /// The consumer goes (basic.cancel, its channel closed): no more deliveries; what it
    /// holds stays until settled.
    pub fn cancel(&self) {
        let Some(inner) = self.client.upgrade() else {
            return;
        };
        lock(&inner.routes).remove(&self.proxy);
        if !self.is_lost() {
            ProxyClient { inner }.note(&self.host, ToHost::Cancel { proxy: self.proxy });
        }
    }

    /// As [`RemoteHold::cancel`], answered once the host has removed the consumer
    /// (basic.cancel-ok follows that, as RabbitMQ's does).
    pub fn cancel_wait(&self, vhost: &str, queue: &str) -> RemoteAnswer {
        let Some(inner) = self.client.upgrade() else {
            return Box::pin(async { Ok(Answer::Cancelled) });
        };
        lock(&inner.routes).remove(&self.proxy);
        if self.is_lost() {
            return Box::pin(async { Ok(Answer::Cancelled) });
        }
        let request = ToHost::Cancel { proxy: self.proxy };
        ProxyClient { inner }.request(&self.host, vhost, queue, request)
    }

    /// Whether the link to the host was lost since the hold was made.
    pub fn is_lost(&self) -> bool {
        self.client.upgrade().is_none_or(|inner| {
            lock(&inner.losses).get(&self.host).copied().unwrap_or(0) != self.epoch
        })
    }
}

/// A delivery from a host for a consumer on this node.
#[derive(Debug)]
pub struct RemoteDelivery {
    /// The proxy it came through (settlements go back through it).
    pub hold: Arc<RemoteHold>,
    /// Tag of the consumer, as the client knows it.
    pub consumer_tag: Arc<str>,
    /// The consumer's id on its channel.
    pub consumer: ConsumerId,
    /// This node's view of the queue (its settings shape the delivery's properties).
    pub queue: Arc<Queue>,
    /// The message and its place in the host's queue.
    pub entry: Entry,
    /// Settled on delivery (auto-ack).
    pub no_ack: bool,
}

impl RemoteDelivery {
    /// A delivery that will not reach its client goes back to the host's queue.
    pub fn give_back(self) {
        if !self.no_ack {
            self.hold
                .settle(vec![self.entry.offset], SettleHow::Requeue);
        }
    }
}

/// What a channel tells its host when it consumes.
#[derive(Debug)]
pub struct ConsumeRequest {
    /// The vhost and queue.
    pub vhost: String,
    /// See `vhost`.
    pub queue: Arc<Queue>,
    /// The consumer's tag and its id on the channel.
    pub tag: Arc<str>,
    /// See `tag`.
    pub consumer: ConsumerId,
    /// x-priority.
    pub priority: i32,
    /// Per-consumer prefetch.
    pub prefetch: u32,
    /// The channel's global prefetch.
    pub global_prefetch: u32,
    /// Auto-ack.
    pub no_ack: bool,
    /// Exclusive consumer.
    pub exclusive: bool,
}

impl ProxyClient {
    /// The client side of this node, on `transport`.
    pub fn new(transport: Transport) -> ProxyClient {
        ProxyClient {
            inner: Arc::new(Inner {
                transport,
                next_proxy: AtomicU64::new(1),
                routes: Mutex::default(),
                hosts: Mutex::default(),
                losses: Mutex::default(),
            }),
        }
    }

    pub(super) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    fn hold(&self, host: &str) -> Arc<RemoteHold> {
        Arc::new(RemoteHold {
            proxy: self.inner.next_proxy.fetch_add(1, Ordering::Relaxed),
            host: host.to_string(),
            epoch: lock(&self.inner.losses).get(host).copied().unwrap_or(0),
            client: Arc::downgrade(&self.inner),
        })
    }

    /// Asks `host` to register a consumer for the channel of `link`; its deliveries go
    /// to that channel from now on. The answer says whether the host took it.
    pub fn consume(
        &self,
        host: &str,
        link: Arc<ChannelLink>,
        c: ConsumeRequest,
    ) -> (Arc<RemoteHold>, RemoteAnswer) {
        let hold = self.hold(host);
        let request = ToHost::Consume {
            proxy: hold.proxy,
            vhost: c.vhost.clone(),
            queue: c.queue.name().to_string(),
            tag: c.tag.to_string(),
            priority: c.priority,
            prefetch: c.prefetch,
            global_prefetch: c.global_prefetch,
            no_ack: c.no_ack,
            exclusive: c.exclusive,
        };
        let (vhost, queue) = (c.vhost, c.queue.name().to_string());
        // Routed before it is asked for: deliveries may come before the answer.
        lock(&self.inner.routes).insert(
            hold.proxy,
            Route {
                link,
                tag: c.tag,
                consumer: c.consumer,
                queue: c.queue,
                no_ack: c.no_ack,
                hold: hold.clone(),
            },
        );
        let answer = self.request(host, &vhost, &queue, request);
        (hold, answer)
    }

    /// A consume its host refused (or never answered): its deliveries, if any come,
    /// are refused in turn.
    pub fn forget(&self, hold: &RemoteHold) {
        lock(&self.inner.routes).remove(&hold.proxy);
        if !hold.is_lost() {
            self.note(&hold.host, ToHost::Cancel { proxy: hold.proxy });
        }
    }

    /// basic.get on `host`; the hold settles the message when it was got with acks.
    pub fn get(
        &self,
        host: &str,
        vhost: &str,
        queue: &str,
        no_ack: bool,
    ) -> (Arc<RemoteHold>, RemoteAnswer) {
        let hold = self.hold(host);
        let request = ToHost::Get {
            proxy: hold.proxy,
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            no_ack,
        };
        (hold, self.request(host, vhost, queue, request))
    }

    /// queue.purge on `host`.
    pub fn purge(&self, host: &str, vhost: &str, queue: &str) -> RemoteAnswer {
        let request = ToHost::Purge {
            vhost: vhost.to_string(),
            queue: queue.to_string(),
        };
        self.request(host, vhost, queue, request)
    }

    /// The queue's counts on `host`.
    pub fn counts(&self, host: &str, vhost: &str, queue: &str) -> RemoteAnswer {
        let request = ToHost::Counts {
            vhost: vhost.to_string(),
            queue: queue.to_string(),
        };
        self.request(host, vhost, queue, request)
    }

    /// The queue's figures on `host`, for the management API.
    pub fn stats(&self, host: &str, vhost: &str, queue: &str) -> RemoteAnswer {
        let request = ToHost::Stats {
            vhost: vhost.to_string(),
            queue: queue.to_string(),
        };
        self.request(host, vhost, queue, request)
    }

    /// Asks `host`, the leader of replicated queue `queue`, to hand it to member `to`;
    /// the leader then, if it moved.
    pub async fn hand_over(
        &self,
        host: &str,
        vhost: &str,
        queue: &str,
        to: &str,
    ) -> Result<Option<String>, AmqpError> {
        let request = ToHost::HandOver {
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            to: to.to_string(),
        };
        match self.request(host, vhost, queue, request).await? {
            Answer::HandedOver(leader) => Ok(leader),
            other => Err(amqp_err!(
                InternalError,
                "unexpected answer to a hand-over: {:?}",
                other
            )),
        }
    }

    fn note(&self, host: &str, note: ToHost) {
        if let Some(body) = encode(&Note::Host(note)) {
            let _ = self.outgoing(host).send(Outgoing::Note(body));
        }
    }

    fn request(&self, host: &str, vhost: &str, queue: &str, request: ToHost) -> RemoteAnswer {
        // RabbitMQ's answer when a classic queue's node is down.
        let down = {
            let (host, vhost, queue) = (host.to_string(), vhost.to_string(), queue.to_string());
            move |why: String| {
                tracing::debug!("cluster: {host} did not answer for queue '{queue}': {why}");
                amqp_err!(
                    NotFound,
                    "home node '{}' of durable queue '{}' in vhost '{}' is down or inaccessible",
                    host,
                    queue,
                    vhost
                )
            }
        };
        let (tx, rx) = oneshot::channel();
        let queued = encode(&Note::Host(request)).map(|body| {
            self.outgoing(host)
                .send(Outgoing::Request(body, tx))
                .is_ok()
        });
        Box::pin(async move {
            if queued != Some(true) {
                return Err(down("not sent".into()));
            }
            let answer = match rx.await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => return Err(down(e.to_string())),
                Err(_) => return Err(down("not sent".into())),
            };
            let body = answer
                .wait(ANSWER_LIMIT)
                .await
                .map_err(|e| down(e.to_string()))?;
            postcard::from_bytes::<Answer>(&body)
                .map_err(|e| down(format!("unreadable answer: {e}")))?
                .into_result()
        })
    }

    /// The sending task of `host` (started on first use).
    fn outgoing(&self, host: &str) -> mpsc::UnboundedSender<Outgoing> {
        let mut hosts = lock(&self.inner.hosts);
        if let Some(tx) = hosts.get(host)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let transport = self.inner.transport.clone();
        let host_name = host.to_string();
        tokio::spawn(async move {
            while let Some(o) = rx.recv().await {
                match o {
                    Outgoing::Note(body) => {
                        if let Err(e) = transport.send(&host_name, CONSUME_GROUP, body).await {
                            tracing::debug!("cluster: a settlement for {host_name} is lost: {e}");
                        }
                    }
                    Outgoing::Request(body, answer) => {
                        let sent = transport.request(&host_name, CONSUME_GROUP, body).await;
                        let _ = answer.send(sent);
                    }
                }
            }
        });
        hosts.insert(host.to_string(), tx.clone());
        tx
    }

    /// A message from host `from`.
    pub(super) fn handle(&self, from: &str, note: ToClient) {
        match note {
            ToClient::Deliver { proxy, entry } => {
                let routed = lock(&self.inner.routes).get(&proxy).map(|r| {
                    (
                        r.link.clone(),
                        RemoteDelivery {
                            hold: r.hold.clone(),
                            consumer_tag: r.tag.clone(),
                            consumer: r.consumer,
                            queue: r.queue.clone(),
                            entry: entry.clone(),
                            no_ack: r.no_ack,
                        },
                    )
                });
                let Some((link, delivery)) = routed else {
                    // Its consumer is gone: the message goes back, and the host stops.
                    let offsets = vec![entry.offset];
                    self.note(
                        from,
                        ToHost::Settle {
                            proxy,
                            offsets,
                            how: SettleHow::Requeue,
                        },
                    );
                    self.note(from, ToHost::Cancel { proxy });
                    return;
                };
                let size = delivery.entry.msg.size();
                let conn = &link.conn;
                conn.pending.fetch_add(1, Ordering::Relaxed);
                conn.pending_bytes.fetch_add(size, Ordering::Relaxed);
                if let Err(e) = conn
                    .tx
                    .send(ConnEvent::RemoteDeliver(link.channel, delivery))
                {
                    conn.pending.fetch_sub(1, Ordering::Relaxed);
                    conn.pending_bytes.fetch_sub(size, Ordering::Relaxed);
                    if let ConnEvent::RemoteDeliver(_, d) = e.0 {
                        d.give_back();
                    }
                }
            }
            ToClient::Cancelled { proxy } => {
                let route = lock(&self.inner.routes).remove(&proxy);
                if let Some(r) = route {
                    let _ = r
                        .link
                        .conn
                        .tx
                        .send(ConnEvent::Cancelled(r.link.channel, r.tag));
                }
                // The host may let go of the proxy once what it holds is settled.
                self.note(from, ToHost::Cancel { proxy });
            }
        }
    }

    /// The link to `host` went down: its consumers here are cancelled and what they
    /// held is forgotten (the host requeued it).
    pub(super) fn host_lost(&self, host: &str) {
        *lock(&self.inner.losses)
            .entry(host.to_string())
            .or_default() += 1;
        let gone: Vec<Route> = {
            let mut routes = lock(&self.inner.routes);
            let proxies: Vec<u64> = routes
                .iter()
                .filter(|(_, r)| r.hold.host == host)
                .map(|(p, _)| *p)
                .collect();
            proxies.iter().filter_map(|p| routes.remove(p)).collect()
        };
        for r in gone {
            let _ = r
                .link
                .conn
                .tx
                .send(ConnEvent::Cancelled(r.link.channel, r.tag));
        }
    }
}
