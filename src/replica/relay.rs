//! Publishes that a member of a replicated queue's group cannot propose go to the member
//! that leads the group now, instead of being nacked. That happens while the queue's
//! leadership moves: a node that has not heard yet routes a publish to the old leader, or
//! a leader takes a publish as it hands over or loses its place. RabbitMQ's quorum-queue
//! client likewise sends its pending commands again to the new leader, and the
//! publisher's confirm comes from there.
//!
//! The leader is the one the group's Raft names when it turns the entry away (or, when it
//! names none, the next one it learns of within [`LEADER_WAIT`]): this node itself (the
//! publish is proposed anew), or another member (the publish is sent there with
//! [`Forwarder::relay`]). A publish is relayed at most [`MAX_HOPS`] times, so that members
//! whose views of the leader disagree cannot pass it round for ever; past that, or with no
//! leader known, the publisher gets a nack as before.
//!
//! An entry the new leader dropped from this member's log (openraft's
//! `DeleteConflictLog`) may still be in another member's log, and may still be committed
//! if that member is elected later: its publishes are then stored twice. That is the
//! duplicate a publisher that resends a nacked message makes too, and it is
//! at-least-once, never a loss.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use openraft::{Raft, ServerState};
use tokio::sync::mpsc;

use super::{Ack, Proposal, QueueTypes, ReplicaRecord};
use crate::broker::remote::Forwarder;
use crate::broker::vhost::VHost;
use crate::cluster::meta::NodeId;
use crate::queue::Queue;

/// Relays one publish may take (the first member's own proposal not counted).
pub const MAX_HOPS: u8 = 3;

/// How long a member that was turned away without a leader's name waits to learn one.
const LEADER_WAIT: Duration = Duration::from_secs(5);

/// A publish whose log entry was not appended here, or not kept.
pub struct Unproposed {
    /// The message, as the log carries it.
    pub blob: Bytes,
    /// Hears whether it was committed.
    pub ack: Option<Ack>,
    /// Relays it took to reach this member.
    pub hops: u8,
}

impl Unproposed {
    /// Tells the publisher whether the message was committed.
    pub fn answer(self, committed: bool) {
        if let Some(ack) = self.ack {
            let _ = ack.send(committed);
        }
    }
}

/// What a member needs to relay publishes to its group's leader.
pub struct Relay {
    /// The member's Raft node: who leads, as it knows.
    pub raft: Raft<QueueTypes>,
    /// This member.
    pub me: NodeId,
    /// Node names by Raft id.
    pub names: BTreeMap<NodeId, String>,
    /// The node's way to other nodes' queues.
    pub forwarder: Forwarder,
    /// The queue and its vhost (their names address the relay).
    pub queue: Weak<Queue>,
    pub vhost: Weak<VHost>,
    /// The member's own proposals, for when it leads again.
    pub again: mpsc::WeakUnboundedSender<Proposal>,
}

impl Relay {
    /// Sends `publishes` to the group's leader: `named`, the one that turned their entry
    /// away named, or else the next one this member learns of.
    pub async fn send(&self, named: Option<NodeId>, publishes: Vec<Unproposed>) {
        let leader = match named {
            Some(leader) if leader != self.me => Some(leader),
            _ => self.wait_for_leader().await,
        };
        for p in publishes {
            self.send_one(leader, p);
        }
    }

    fn send_one(&self, leader: Option<NodeId>, p: Unproposed) {
        if p.hops >= MAX_HOPS {
            return p.answer(false);
        }
        match leader {
            Some(leader) if leader == self.me => {
                let proposal = Proposal {
                    record: ReplicaRecord::Enqueue(p.blob),
                    ack: p.ack,
                    hops: p.hops + 1,
                };
                let refused = match self.again.upgrade() {
                    Some(tx) => tx.send(proposal).err().map(|e| e.0),
                    None => Some(proposal),
                };
                if let Some(Proposal { ack: Some(ack), .. }) = refused {
                    let _ = ack.send(false);
                }
            }
            Some(leader) => {
                let (Some(home), Some(queue), Some(vhost)) = (
                    self.names.get(&leader),
                    self.queue.upgrade(),
                    self.vhost.upgrade(),
                ) else {
                    return p.answer(false);
                };
                tracing::debug!(
                    queue = queue.name(),
                    to = home.as_str(),
                    "replicated queue: a publish relayed to its leader"
                );
                let ack = p.ack;
                self.forwarder.relay(
                    home,
                    &vhost.name,
                    queue.name(),
                    p.blob.to_vec(),
                    p.hops + 1,
                    Box::new(move |ok| {
                        if let Some(ack) = ack {
                            let _ = ack.send(ok);
                        }
                    }),
                );
            }
            None => p.answer(false),
        }
    }

    /// The group's leader once this member knows one (itself only once it leads).
    async fn wait_for_leader(&self) -> Option<NodeId> {
        let me = self.me;
        let metrics = self
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(
                |m| match m.current_leader {
                    Some(leader) if leader == me => m.state == ServerState::Leader,
                    Some(_) => true,
                    None => false,
                },
                "a leader is known",
            )
            .await
            .ok()?;
        metrics.current_leader
    }
}
