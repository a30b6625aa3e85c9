//! The host's side of proxied consumption: other nodes' clients consume, get, purge and
//! count through here. A proxy consumer is a consumer of the queue like any other; its
//! sink ([`RemoteSink`]) sends deliveries over the link to the client's node, one sending
//! task per peer keeping them in queue order. What each proxy holds (deliveries not yet
//! settled) is tracked here, per peer, so that a lost link or a proxy that was let go
//! puts it back in the queue, redelivered, for other consumers.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;

use super::{Answer, CONSUME_GROUP, Note, SettleHow, ToClient, ToHost, encode};
use crate::broker::{BrokerState, VHost};
use crate::cluster::Transport;
use crate::cluster::transport::Responder;
use crate::protocol::{AmqpError, reply::amqp_err};
use crate::queue::journal::Writes;
use crate::queue::{ConsumerId, ConsumerSink, ConsumerSpec, Delivery, Entry, Offset, Queue};

/// Deliveries a proxy consumer may have waiting for the link before its queue stops
/// handing it more (the link's own queue and TCP then hold the rest back).
const MAX_UNSENT: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Deliveries a proxy holds: sent with acks expected, or got, and not yet settled.
#[derive(Debug, Default)]
struct Held(Mutex<BTreeSet<Offset>>);

/// One proxy of a peer: a consumer, or the holder of an ack-mode get.
#[derive(Debug)]
struct Record {
    queue: Arc<Queue>,
    vhost: Arc<VHost>,
    /// The queue's consumer id while the proxy consumes.
    consumer: Option<ConsumerId>,
    sink: Option<Arc<RemoteSink>>,
    held: Arc<Held>,
}

/// What the sending task of a peer puts on the link.
struct Outgoing {
    body: Vec<u8>,
    sink: Option<Arc<RemoteSink>>,
    /// An auto-ack delivery: its stored copy goes once it left (or it comes back).
    auto_ack: Option<(Arc<Queue>, Entry)>,
}

/// Serves other nodes' proxies of the queues hosted on this node.
pub struct ProxyHost {
    broker: Weak<BrokerState>,
    transport: Transport,
    records: Mutex<HashMap<(String, u64), Record>>,
    senders: Mutex<HashMap<String, mpsc::UnboundedSender<Outgoing>>>,
}

impl std::fmt::Debug for ProxyHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHost")
            .field("records", &lock(&self.records).len())
            .finish_non_exhaustive()
    }
}

impl ProxyHost {
    /// The host side of `broker`'s node.
    pub fn new(broker: Weak<BrokerState>, transport: Transport) -> Arc<ProxyHost> {
        Arc::new(ProxyHost {
            broker,
            transport,
            records: Mutex::default(),
            senders: Mutex::default(),
        })
    }

    /// Handles one message of a peer, and answers it when it is a request.
    pub(super) async fn handle(&self, peer: &str, request: ToHost, reply: Option<Responder>) {
        let answer = match request {
            ToHost::Settle {
                proxy,
                offsets,
                how,
            } => return self.settle(peer, proxy, offsets, how),
            ToHost::Cancel { proxy } => {
                self.cancel(peer, proxy);
                Ok(Answer::Cancelled)
            }
            ToHost::HandOver { vhost, queue, to } => {
                // (It takes a moment: the link's other traffic does not wait for it.)
                let broker = self.broker.clone();
                tokio::spawn(async move {
                    let link = broker.upgrade();
                    let moved = match link.as_ref().and_then(|b| b.cluster_link()) {
                        Some(link) => link.hand_over_here(&vhost, &queue, &to).await,
                        None => Err("not clustered".to_string()),
                    };
                    let answer = match moved {
                        Ok(leader) => Answer::HandedOver(leader),
                        Err(e) => {
                            Answer::Refused(crate::protocol::ReplyCode::InternalError.code(), e)
                        }
                    };
                    if let (Some(reply), Ok(body)) = (reply, postcard::to_stdvec(&answer)) {
                        reply.reply(body).await;
                    }
                });
                return;
            }
            ToHost::Consume {
                proxy,
                vhost,
                queue,
                tag,
                priority,
                prefetch,
                global_prefetch,
                no_ack,
                exclusive,
            } => self
                .hosted(&vhost, &queue)
                .and_then(|(v, q)| {
                    let spec = ConsumerSpec {
                        id: self.broker.upgrade().map_or(0, |b| b.next_id()),
                        priority,
                        prefetch,
                        no_ack,
                    };
                    self.consume(peer, proxy, v, q, spec, tag, exclusive, global_prefetch)
                })
                .map(|()| Answer::Consuming),
            ToHost::Get {
                proxy,
                vhost,
                queue,
                no_ack,
            } => self.hosted(&vhost, &queue).map(|(v, q)| {
                let got = q.get(no_ack);
                if let (Some((entry, _)), false) = (&got, no_ack) {
                    let held = Arc::new(Held::default());
                    lock(&held.0).insert(entry.offset);
                    let record = Record {
                        queue: q.clone(),
                        vhost: v,
                        consumer: None,
                        sink: None,
                        held,
                    };
                    lock(&self.records).insert((peer.to_string(), proxy), record);
                }
                Answer::Got(got)
            }),
            ToHost::Purge { vhost, queue } => self
                .hosted(&vhost, &queue)
                .map(|(_, q)| Answer::Purged(q.purge() as u32)),
            ToHost::Stats { vhost, queue } => self.hosted(&vhost, &queue).map(|(_, q)| {
                let s = q.snapshot();
                Answer::Stats {
                    ready: s.ready,
                    unacked: s.unacked,
                    ready_bytes: s.ready_bytes,
                    consumers: s.consumers,
                    memory: s.memory,
                    dead_letters: s.dead_letters,
                }
            }),
            ToHost::Counts { vhost, queue } => self.hosted(&vhost, &queue).map(|(_, q)| {
                let counts = q.counts();
                Answer::Counts {
                    messages: counts.messages,
                    consumers: counts.consumers,
                }
            }),
        };
        let answer = answer.unwrap_or_else(|e| Answer::refused(&e));
        let Some(reply) = reply else { return };
        match postcard::to_stdvec(&answer) {
            Ok(body) => reply.reply(body).await,
            Err(e) => tracing::error!("cluster: cannot encode a proxy answer: {e}"),
        }
    }

    /// `queue` of `vhost`, when this node hosts it.
    fn hosted(&self, vhost: &str, queue: &str) -> Result<(Arc<VHost>, Arc<Queue>), AmqpError> {
        let v = self
            .broker
            .upgrade()
            .and_then(|b| b.vhost(vhost))
            .ok_or_else(|| amqp_err!(NotFound, "no vhost '{}'", vhost))?;
        match (v.find_queue(queue), v.remote_home(queue)) {
            (Some(q), None) => Ok((v, q)),
            (Some(_), Some(home)) => Err(amqp_err!(
                NotFound,
                "queue '{}' in vhost '{}' is hosted on node '{}', not on '{}'",
                queue,
                vhost,
                home,
                self.transport.me()
            )),
            (None, _) => Err(amqp_err!(
                NotFound,
                "no queue '{}' in vhost '{}'",
                queue,
                vhost
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn consume(
        &self,
        peer: &str,
        proxy: u64,
        vhost: Arc<VHost>,
        queue: Arc<Queue>,
        spec: ConsumerSpec,
        tag: String,
        exclusive: bool,
        global_prefetch: u32,
    ) -> Result<(), AmqpError> {
        let key = (peer.to_string(), proxy);
        if lock(&self.records).contains_key(&key) {
            return Err(amqp_err!(NotAllowed, "proxy {} is already in use", proxy));
        }
        let held = Arc::new(Held::default());
        let sink = Arc::new_cyclic(|me| RemoteSink {
            me: me.clone(),
            proxy,
            out: self.sender(peer),
            held: held.clone(),
            unsent: AtomicUsize::new(0),
            global_prefetch,
            unacked: AtomicU32::new(0),
            waiting: Mutex::new(None),
        });
        // Recorded first: deliveries may start inside `consume`.
        lock(&self.records).insert(
            key.clone(),
            Record {
                queue: queue.clone(),
                vhost,
                consumer: Some(spec.id),
                sink: Some(sink.clone()),
                held,
            },
        );
        if let Err(e) = queue.consume(spec, Arc::from(tag), exclusive, sink) {
            lock(&self.records).remove(&key);
            return Err(e);
        }
        Ok(())
    }

    /// The sending task of `peer` (started on first use).
    fn sender(&self, peer: &str) -> mpsc::UnboundedSender<Outgoing> {
        let mut senders = lock(&self.senders);
        if let Some(tx) = senders.get(peer)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let transport = self.transport.clone();
        let broker = self.broker.clone();
        let peer_name = peer.to_string();
        tokio::spawn(async move {
            while let Some(o) = rx.recv().await {
                let sent = transport.send(&peer_name, CONSUME_GROUP, o.body).await;
                if let Some((queue, entry)) = o.auto_ack {
                    if sent.is_ok() {
                        let mut writes = Writes::default();
                        queue.settle_written_auto_ack(&entry, &mut writes);
                        if let Some(journal) = broker.upgrade().and_then(|b| b.journal().cloned())
                            && !writes.is_empty()
                        {
                            journal.append(writes);
                        }
                    } else {
                        queue.return_undelivered(entry);
                    }
                }
                if let Some(sink) = o.sink {
                    sink.unsent.fetch_sub(1, Ordering::Relaxed);
                    sink.kick();
                }
            }
        });
        senders.insert(peer.to_string(), tx.clone());
        tx
    }

    /// The client settled deliveries of one proxy. Offsets the proxy does not hold (it
    /// was let go, or they were settled before) are left alone.
    fn settle(&self, peer: &str, proxy: u64, offsets: Vec<Offset>, how: SettleHow) {
        let key = (peer.to_string(), proxy);
        let (queue, sink, offsets) = {
            let mut records = lock(&self.records);
            let Some(r) = records.get(&key) else { return };
            let offsets: Vec<Offset> = {
                let mut held = lock(&r.held.0);
                offsets.into_iter().filter(|o| held.remove(o)).collect()
            };
            let found = (r.queue.clone(), r.sink.clone(), offsets);
            if r.consumer.is_none() && lock(&r.held.0).is_empty() {
                records.remove(&key);
            }
            found
        };
        if offsets.is_empty() {
            return;
        }
        let n = offsets.len() as u32;
        match how {
            SettleHow::Ack => queue.settle(offsets, None),
            SettleHow::Requeue => queue.requeue(offsets),
            SettleHow::Reject => queue.reject(offsets),
        }
        if let Some(sink) = sink {
            sink.settled(n);
        }
    }

    /// The client's consumer went (basic.cancel, its channel closed).
    fn cancel(&self, peer: &str, proxy: u64) {
        let key = (peer.to_string(), proxy);
        let (queue, vhost, consumer) = {
            let mut records = lock(&self.records);
            let Some(r) = records.get_mut(&key) else {
                return;
            };
            let Some(consumer) = r.consumer.take() else {
                return;
            };
            let found = (r.queue.clone(), r.vhost.clone(), consumer);
            if lock(&r.held.0).is_empty() {
                records.remove(&key);
            }
            found
        };
        if queue.cancel(consumer) {
            vhost.remove_queue(&queue);
        }
    }

    /// The link to `peer` went down: its proxies are let go; what they held goes back
    /// to the queues, redelivered.
    pub(super) fn peer_lost(&self, peer: &str) {
        let gone: Vec<Record> = {
            let mut records = lock(&self.records);
            let keys: Vec<(String, u64)> =
                records.keys().filter(|(p, _)| p == peer).cloned().collect();
            keys.iter().filter_map(|k| records.remove(k)).collect()
        };
        if !gone.is_empty() {
            tracing::info!(
                "cluster: link to {peer} lost: {} proxied consumers and gets let go",
                gone.len()
            );
        }
        for r in gone {
            if let Some(consumer) = r.consumer
                && r.queue.cancel(consumer)
            {
                r.vhost.remove_queue(&r.queue);
            }
            let held: Vec<Offset> = std::mem::take(&mut *lock(&r.held.0)).into_iter().collect();
            if !held.is_empty() {
                r.queue.requeue(held);
            }
        }
    }
}

/// A proxy consumer as its queue sees it: deliveries go over the link to the client's
/// node. Credit: the consumer's own prefetch is the queue's (as for any consumer); the
/// channel's global prefetch is kept here for this consumer; and no more than
/// [`MAX_UNSENT`] deliveries wait for the link.
#[derive(Debug)]
struct RemoteSink {
    me: Weak<RemoteSink>,
    proxy: u64,
    out: mpsc::UnboundedSender<Outgoing>,
    held: Arc<Held>,
    unsent: AtomicUsize,
    global_prefetch: u32,
    unacked: AtomicU32,
    waiting: Mutex<Option<Weak<Queue>>>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl RemoteSink {
    /// Settlements freed `n` of the channel-wide credit (the queue is kicked: its lock
    /// must not be held).
    fn settled(&self, n: u32) {
        self.free(n);
        self.kick();
    }

    /// Gives back `n` of the channel-wide credit.
    fn free(&self, n: u32) {
        let _ = self
            .unacked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Tells a queue that waits for credit to try again.
    fn kick(&self) {
        let waiting = lock(&self.waiting).take();
        if let Some(q) = waiting.and_then(|w| w.upgrade()) {
            q.kick();
        }
    }
}

impl ConsumerSink for RemoteSink {
    fn has_credit(&self, no_ack: bool) -> bool {
        if self.out.is_closed() || self.unsent.load(Ordering::Relaxed) >= MAX_UNSENT {
            return false;
        }
        if no_ack || self.global_prefetch == 0 {
            return true;
        }
        let limit = self.global_prefetch;
        self.unacked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn return_credit(&self, no_ack: bool) {
        // Called by the queue under its lock: no kick from here.
        if !no_ack && self.global_prefetch != 0 {
            self.free(1);
        }
    }

    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
        let offset = delivery.entry.offset;
        let note = Note::Client(ToClient::Deliver {
            proxy: self.proxy,
            entry: delivery.entry.clone(),
        });
        let Some(body) = encode(&note) else {
            return Err(delivery);
        };
        if !delivery.no_ack {
            lock(&self.held.0).insert(offset);
        }
        let auto_ack = delivery
            .no_ack
            .then(|| (delivery.queue.clone(), delivery.entry.clone()));
        self.unsent.fetch_add(1, Ordering::Relaxed);
        let sent = self.out.send(Outgoing {
            body,
            sink: self.me.upgrade(),
            auto_ack,
        });
        if sent.is_err() {
            self.unsent.fetch_sub(1, Ordering::Relaxed);
            if !delivery.no_ack {
                lock(&self.held.0).remove(&offset);
                if self.global_prefetch != 0 {
                    self.unacked.fetch_sub(1, Ordering::Relaxed);
                }
            }
            return Err(delivery);
        }
        Ok(())
    }

    fn cancelled(&self, _consumer_tag: Arc<str>) {
        if let Some(body) = encode(&Note::Client(ToClient::Cancelled { proxy: self.proxy })) {
            let _ = self.out.send(Outgoing {
                body,
                sink: None,
                auto_ack: None,
            });
        }
    }

    fn wait_for_credit(&self, queue: Weak<Queue>) {
        *lock(&self.waiting) = Some(queue);
        // Credit may have come back between the queue's look and now.
        if !self.out.is_closed()
            && self.unsent.load(Ordering::Relaxed) < MAX_UNSENT
            && (self.global_prefetch == 0
                || self.unacked.load(Ordering::Relaxed) < self.global_prefetch)
        {
            // The queue holds its lock while it asks: kick it from elsewhere.
            let me = self.me.clone();
            tokio::spawn(async move {
                if let Some(sink) = me.upgrade() {
                    sink.kick();
                }
            });
        }
    }

    fn is_behind(&self) -> bool {
        self.unsent.load(Ordering::Relaxed) >= MAX_UNSENT / 4
    }
}
