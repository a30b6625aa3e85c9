//! Consuming, getting and purging through any node: a client connected to one node uses a
//! queue hosted on another as RabbitMQ proxies it ("a client may connect to any node and
//! use any queue").
//!
//! - [`client`]: the side of the node the client is connected to. A channel asks the
//!   queue's host (the one lookup [`super::VHost::remote_home`]) to register a proxy
//!   consumer, to get, purge or count; deliveries come back over the link and are written
//!   on the client's channel with the channel's own delivery tags; settlements go back.
//! - [`host`]: the side of the node that hosts the queue. A proxy consumer is an ordinary
//!   consumer of the queue whose [`crate::queue::ConsumerSink`] sends deliveries over the
//!   link; what each proxy holds (unacked deliveries and gets) is tracked per peer, so
//!   that a lost link requeues it (redelivered) for other consumers.
//!
//! Both sides share one group on the inter-node links, [`CONSUME_GROUP`], served in
//! arrival order by [`serve`]: requests and settlements from a peer are applied in the
//! order its channels made them. Nothing here depends on how the host was chosen, so a
//! queue whose host moves (a replicated queue's leader) is proxied the same way.

pub mod client;
pub mod host;

use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::BrokerState;
use crate::cluster::transport::Incoming;
use crate::cluster::wire::GroupId;
use crate::protocol::{AmqpError, ReplyCode};
use crate::queue::{Entry, Offset};

pub use client::{ProxyClient, RemoteDelivery, RemoteHold};
pub use host::ProxyHost;

/// The group id of proxied consumption on the inter-node links.
pub const CONSUME_GROUP: GroupId = 2;

/// What becomes of deliveries a proxy holds, as the client settled them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleHow {
    /// basic.ack: gone.
    Ack,
    /// Back to the queue, redelivered (nack/reject with requeue, recover, a channel
    /// that closed, a delivery that found its consumer gone).
    Requeue,
    /// nack/reject without requeue: dead-lettered or dropped.
    Reject,
}

/// What a client's node asks of a queue's host (requests expect an [`Answer`]).
#[derive(Debug, Serialize, Deserialize)]
enum ToHost {
    /// Register proxy consumer `proxy` on `queue`.
    Consume {
        proxy: u64,
        vhost: String,
        queue: String,
        tag: String,
        priority: i32,
        /// Per-consumer prefetch (basic.qos), enforced by the queue.
        prefetch: u32,
        /// The channel's global prefetch (basic.qos global), enforced for this consumer.
        global_prefetch: u32,
        no_ack: bool,
        exclusive: bool,
    },
    /// basic.get; unless `no_ack` the message is held by proxy `proxy`.
    Get {
        proxy: u64,
        vhost: String,
        queue: String,
        no_ack: bool,
    },
    /// queue.purge.
    Purge { vhost: String, queue: String },
    /// The counts of queue.declare-ok.
    Counts { vhost: String, queue: String },
    /// The figures the management API lists for the queue (a node that does not host
    /// it lists its host's, as RabbitMQ lists a queue's leader's).
    Stats { vhost: String, queue: String },
    /// Hand the leadership of replicated queue `queue` to member `to` (rebalancing).
    HandOver {
        vhost: String,
        queue: String,
        to: String,
    },
    /// One-way: the client settled these deliveries of proxy `proxy`.
    Settle {
        proxy: u64,
        offsets: Vec<Offset>,
        how: SettleHow,
    },
    /// Proxy `proxy` stops consuming (what it holds stays until settled); answered
    /// when sent as a request (basic.cancel), one-way otherwise (a closing channel).
    Cancel { proxy: u64 },
}

/// What a host sends a client's node, one-way.
#[derive(Debug, Serialize, Deserialize)]
enum ToClient {
    /// A delivery to proxy consumer `proxy`.
    Deliver { proxy: u64, entry: Entry },
    /// The queue cancelled proxy consumer `proxy` (it was deleted).
    Cancelled { proxy: u64 },
}

/// Everything on [`CONSUME_GROUP`].
#[derive(Debug, Serialize, Deserialize)]
enum Note {
    Host(ToHost),
    Client(ToClient),
}

/// A host's answer to a request.
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    /// The proxy consumer is registered.
    Consuming,
    /// The proxy consumer is gone: nothing more is delivered to it.
    Cancelled,
    /// basic.get's message and the count left, or nothing (get-empty).
    Got(Option<(Entry, u32)>),
    /// Messages purged.
    Purged(u32),
    /// Ready messages and consumers.
    Counts {
        /// Ready messages.
        messages: u32,
        /// Consumers.
        consumers: u32,
    },
    /// A queue's figures for the management API.
    Stats {
        /// Messages ready for delivery.
        ready: u64,
        /// Messages delivered and not yet acknowledged.
        unacked: u64,
        /// Body bytes of the ready messages.
        ready_bytes: u64,
        /// Consumers.
        consumers: u64,
        /// Estimated memory of the messages.
        memory: u64,
        /// Dead letters held for their targets, and their body bytes.
        dead_letters: (u64, u64),
    },
    /// The node that leads the queue after a hand-over (`None`: it did not move).
    HandedOver(Option<String>),
    /// Refused with this AMQP error (code, text), as the host's own channel would.
    Refused(u16, String),
}

impl Answer {
    fn refused(e: &AmqpError) -> Answer {
        Answer::Refused(e.code.code(), e.text.clone())
    }

    /// The error a refusal stands for (anything else is `Ok`).
    pub fn into_result(self) -> Result<Answer, AmqpError> {
        match self {
            Answer::Refused(code, text) => Err(AmqpError::new(
                ReplyCode::from_code(code).unwrap_or(ReplyCode::InternalError),
                text,
            )),
            other => Ok(other),
        }
    }
}

fn encode(note: &Note) -> Option<Vec<u8>> {
    postcard::to_stdvec(note)
        .map_err(|e| tracing::error!("cluster: cannot encode a proxy message: {e}"))
        .ok()
}

/// Starts this node's two sides of proxied consumption on `transport`: the requests and
/// settlements of other nodes' clients for queues hosted here, and the deliveries for
/// this node's clients from queues hosted elsewhere; lost links are let go on both sides.
pub fn start(broker: &Arc<BrokerState>, transport: &crate::cluster::Transport) -> ProxyClient {
    let inbox = transport.register(CONSUME_GROUP);
    let host = ProxyHost::new(Arc::downgrade(broker), transport.clone());
    let client = ProxyClient::new(transport.clone());
    tokio::spawn(serve(
        Arc::downgrade(broker),
        host,
        client.clone(),
        inbox,
        transport.link_losses(),
    ));
    client
}

/// Serves [`CONSUME_GROUP`] in arrival order, and the loss of links between messages.
async fn serve(
    broker: Weak<BrokerState>,
    host: Arc<ProxyHost>,
    client: ProxyClient,
    mut inbox: mpsc::Receiver<Incoming>,
    mut losses: broadcast::Receiver<String>,
) {
    loop {
        tokio::select! {
            lost = losses.recv() => match lost {
                Ok(peer) => {
                    host.peer_lost(&peer);
                    client.host_lost(&peer);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Some losses were missed: let go of every peer not linked now.
                    for peer in client.transport().status() {
                        if !peer.connected {
                            host.peer_lost(&peer.name);
                            client.host_lost(&peer.name);
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = inbox.recv() => {
                let Some(incoming) = incoming else { return };
                if broker.strong_count() == 0 {
                    return;
                }
                let note = match postcard::from_bytes::<Note>(&incoming.body) {
                    Ok(note) => note,
                    Err(e) => {
                        tracing::warn!("cluster: unreadable proxy message from {}: {e}", incoming.from);
                        continue;
                    }
                };
                match note {
                    Note::Host(request) => host.handle(&incoming.from, request, incoming.reply).await,
                    Note::Client(note) => client.handle(&incoming.from, note),
                }
            }
        }
    }
}
