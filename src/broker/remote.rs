//! Publishes to queues homed on another node: the node a client publishes through routes
//! the message, and hands what goes to another node's queues to [`Forwarder`]; the home
//! ([`serve`]) enqueues it as a local publish would and answers once its copy is durable,
//! and only then is the publisher's confirm sent (a home that does not answer makes it a
//! nack). One forwarding task per home puts requests on the link in the order they were
//! made, so one channel's messages reach a queue in the order it published them; the home
//! takes them in that order too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::BrokerState;
use crate::cluster::Transport;
use crate::cluster::transport::Incoming;
use crate::cluster::wire::GroupId;

/// The group id of queue traffic on the inter-node links.
pub const QUEUE_GROUP: GroupId = 1;

/// How long a forwarded publish waits for its home's answer before it is nacked.
const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// Forwarded bytes not yet answered beyond which publishers are held back.
const CONGESTED_BYTES: usize = 64 << 20;

/// What one node asks of a queue's home.
#[derive(Debug, Serialize, Deserialize)]
enum QueueRequest {
    /// A message routed on the sending node to these queues of `vhost`.
    Publish {
        vhost: String,
        queues: Vec<String>,
        persistent: bool,
        /// The message as the store encodes it.
        message: Vec<u8>,
    },
    /// A message a member of the replicated queue `queue` could not propose because it
    /// does not lead the queue's group (see `crate::replica::relay`): the receiver, which
    /// the sender's group names leader, proposes it, or relays it on while `hops` allows.
    Relay {
        vhost: String,
        queue: String,
        /// Relays the message has taken, this one included.
        hops: u8,
        /// The message as the store encodes it.
        message: Vec<u8>,
    },
}

/// The home's answer.
#[derive(Debug, Serialize, Deserialize)]
enum QueueAnswer {
    /// Enqueued, and durable where the queue and message are.
    Stored,
    /// Not taken (the text says why); the publisher gets a nack.
    Refused(String),
}

/// Called with whether the home took the message (durably where it should be).
pub type Done = Box<dyn FnOnce(bool) + Send>;

struct Forward {
    body: Vec<u8>,
    done: Done,
}

/// This node's way to the homes of other nodes' queues.
#[derive(Clone)]
pub struct Forwarder {
    transport: Transport,
    homes: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Forward>>>>,
    in_flight: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Forwards over `transport`.
    pub fn new(transport: Transport) -> Forwarder {
        Forwarder {
            transport,
            homes: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    /// Sends `message` (the store's encoding) for `queues` of `vhost` to their home;
    /// `done` is called with the outcome.
    pub fn publish(
        &self,
        home: &str,
        vhost: &str,
        queues: Vec<String>,
        persistent: bool,
        message: Vec<u8>,
        done: Done,
    ) {
        let request = QueueRequest::Publish {
            vhost: vhost.to_string(),
            queues,
            persistent,
            message,
        };
        self.send(home, &request, done);
    }

    /// Sends `message` (the store's encoding), which this node's member of the replicated
    /// queue `queue` could not propose, to `home`, the member its group names leader;
    /// `hops` counts the relays, this one included. `done` is called with the outcome.
    pub fn relay(
        &self,
        home: &str,
        vhost: &str,
        queue: &str,
        message: Vec<u8>,
        hops: u8,
        done: Done,
    ) {
        let request = QueueRequest::Relay {
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            hops,
            message,
        };
        self.send(home, &request, done);
    }

    /// Queues `request` for `home`, behind what was sent there before.
    fn send(&self, home: &str, request: &QueueRequest, done: Done) {
        let body = match postcard::to_stdvec(request) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cluster: cannot encode a forwarded publish: {e}");
                return done(false);
            }
        };
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        let queue = homes
            .entry(home.to_string())
            .or_insert_with(|| self.start_home(home));
        self.in_flight.fetch_add(body.len(), Ordering::Relaxed);
        if let Err(mpsc::error::SendError(f)) = queue.send(Forward { body, done }) {
            self.in_flight.fetch_sub(f.body.len(), Ordering::Relaxed);
            (f.done)(false);
        }
    }

    /// Whether publishers should wait for forwarded messages to be answered.
    pub fn is_congested(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) >= CONGESTED_BYTES
    }

    fn start_home(&self, home: &str) -> mpsc::UnboundedSender<Forward> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Forward>();
        let transport = self.transport.clone();
        let in_flight = self.in_flight.clone();
        let home = home.to_string();
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let size = f.body.len();
                let sent = transport.request(&home, QUEUE_GROUP, f.body).await;
                let in_flight = in_flight.clone();
                let home = home.clone();
                tokio::spawn(async move {
                    let answer = match sent {
                        Ok(answer) => answer.wait(ANSWER_LIMIT).await,
                        Err(e) => Err(e),
                    };
                    in_flight.fetch_sub(size, Ordering::Relaxed);
                    let ok = match answer.map(|a| postcard::from_bytes::<QueueAnswer>(&a)) {
                        Ok(Ok(QueueAnswer::Stored)) => true,
                        Ok(Ok(QueueAnswer::Refused(why))) => {
                            tracing::debug!("cluster: {home} refused a forwarded publish: {why}");
                            false
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("cluster: unreadable answer from {home}: {e}");
                            false
                        }
                        Err(e) => {
                            tracing::debug!("cluster: a publish forwarded to {home} failed: {e}");
                            false
                        }
                    };
                    (f.done)(ok);
                });
            }
        });
        tx
    }
}

/// Serves the queue traffic other nodes send to this node's queues, in arrival order.
pub async fn serve(broker: Weak<BrokerState>, mut inbox: mpsc::Receiver<Incoming>) {
    while let Some(incoming) = inbox.recv().await {
        let Some(broker) = broker.upgrade() else {
            return;
        };
        let Some(reply) = incoming.reply else {
            continue;
        };
        let answer = match postcard::from_bytes::<QueueRequest>(&incoming.body) {
            Err(e) => Err(format!("unreadable request: {e}")),
            Ok(QueueRequest::Publish {
                vhost,
                queues,
                persistent,
                message,
            }) => accept_publish(&broker, &vhost, &queues, persistent, message),
            Ok(QueueRequest::Relay {
                vhost,
                queue,
                hops,
                message,
            }) => accept_relay(&broker, &vhost, &queue, hops, message),
        };
        tokio::spawn(async move {
            let answer = match answer {
                Ok((false, durable)) => {
                    if durable.await {
                        QueueAnswer::Stored
                    } else {
                        QueueAnswer::Refused("a replicated queue did not commit it".into())
                    }
                }
                Ok((true, durable)) => {
                    durable.await;
                    QueueAnswer::Refused("a queue refused it (reject-publish)".into())
                }
                Err(why) => QueueAnswer::Refused(why),
            };
            match postcard::to_stdvec(&answer) {
                Ok(body) => reply.reply(body).await,
                Err(e) => tracing::error!("cluster: cannot encode an answer: {e}"),
            }
        });
    }
}

/// Whether a queue refused a forwarded message, and when its copies are durable.
type Accepted = (bool, std::pin::Pin<Box<dyn Future<Output = bool> + Send>>);

/// A forwarded message, enqueued now into those of `queues` that are homed here.
fn accept_publish(
    broker: &BrokerState,
    vhost: &str,
    queues: &[String],
    persistent: bool,
    message: Vec<u8>,
) -> Result<Accepted, String> {
    let v = broker
        .vhost(vhost)
        .ok_or_else(|| format!("no vhost '{vhost}'"))?;
    let store_id = persistent.then(|| broker.next_msg_id());
    let blob = Bytes::from(message);
    let msg = super::persist::decode_message(&blob, store_id.unwrap_or(0))
        .ok_or_else(|| "unreadable message".to_string())?;
    let msg = crate::queue::Message { store_id, ..msg };
    let (refused, durable) = v.enqueue_forwarded(queues, msg);
    Ok((refused, Box::pin(durable)))
}

/// A message another member of a replicated queue relayed here (see
/// `crate::replica::relay`): proposed to this node's member of the queue's group, which
/// relays it on if it does not lead the group either.
fn accept_relay(
    broker: &BrokerState,
    vhost: &str,
    queue: &str,
    hops: u8,
    message: Vec<u8>,
) -> Result<Accepted, String> {
    let v = broker
        .vhost(vhost)
        .ok_or_else(|| format!("no vhost '{vhost}'"))?;
    let q = v
        .find_queue(queue)
        .filter(|q| q.is_replicated())
        .ok_or_else(|| format!("no replicated queue '{queue}' here"))?;
    if !q.replica().is_some_and(|log| log.is_proposing()) {
        return Err(format!("the group of '{queue}' is not running here yet"));
    }
    let blob = Bytes::from(message);
    let msg =
        super::persist::decode_message(&blob, 0).ok_or_else(|| "unreadable message".to_string())?;
    let store_id = msg.is_persistent().then(|| broker.next_msg_id());
    let msg = crate::queue::Message { store_id, ..msg };
    let (ack, committed) = tokio::sync::oneshot::channel();
    let refused =
        q.enqueue_relayed(Arc::new(msg), Some(ack), hops) == crate::queue::Enqueued::Rejected;
    Ok((
        refused,
        Box::pin(async move { committed.await.unwrap_or(false) }),
    ))
}
