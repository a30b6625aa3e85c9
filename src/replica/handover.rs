//! Handing a replicated queue's leadership to another member: a node that stops gracefully
//! does it for every queue it leads, so that the queue moves at once instead of after
//! its members noticed the node was gone.
//!
//! The leader stops proposing (it holds every slot of the proposal gate, so the entries
//! in flight commit first and no new one starts), waits until the chosen member has its
//! whole log, and asks it to stand for election. With no appends going out, the other
//! members' leader leases run out within an election timeout and they grant the vote;
//! the old leader grants it too and steps down. Publishes that came meanwhile wait in
//! the gate; once it opens on a node that no longer leads, they are relayed to the new
//! leader (see `super::relay`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::Raft;
use tokio::sync::Semaphore;

use super::QueueTypes;
use crate::cluster::Transport;
use crate::cluster::meta::NodeId;
use crate::cluster::raft_net;
use crate::cluster::wire::GroupId;

/// How long the entries in flight and the chosen member get to catch up.
const SETTLE: Duration = Duration::from_secs(2);
/// How long a hand-over may take in all.
pub const HANDOVER_LIMIT: Duration = Duration::from_secs(5);
/// How often the chosen member is asked to stand while it has not won.
const ASK_EVERY: Duration = Duration::from_millis(250);

/// What a group's hand-over needs.
pub struct Handover<'a> {
    /// The group's Raft node on this member.
    pub raft: &'a Raft<QueueTypes>,
    /// The node's links.
    pub transport: &'a Transport,
    /// The group.
    pub group: GroupId,
    /// This member.
    pub me: NodeId,
    /// Node names by id.
    pub names: &'a BTreeMap<NodeId, String>,
    /// The proposal gate (its permits are the entries that may await their commit).
    pub gate: &'a Semaphore,
    /// The gate's permits.
    pub permits: u32,
    /// The member to hand over to, if it is a reachable voter (else the most caught-up).
    pub prefer: Option<NodeId>,
}

impl Handover<'_> {
    /// Hands the leadership to the preferred member or else the most caught-up reachable
    /// voter. Returns who leads now
    /// when it moved; `None` when this member did not lead or nobody could take over in
    /// time (the group then goes on as it was).
    pub async fn run(&self) -> Option<NodeId> {
        let started = Instant::now();
        if self.raft.metrics().borrow().current_leader != Some(self.me) {
            return None;
        }
        let _held = tokio::time::timeout(SETTLE, self.gate.acquire_many(self.permits))
            .await
            .ok()?
            .ok()?;
        let (target, last) = self.choose()?;
        let caught_up = self
            .raft
            .wait(Some(SETTLE))
            .metrics(
                |m| {
                    m.replication.as_ref().is_some_and(|r| {
                        r.get(&target)
                            .and_then(|l| l.as_ref())
                            .is_some_and(|l| l.index >= last)
                    })
                },
                "the new leader has the whole log",
            )
            .await;
        caught_up.ok()?;
        let name = self.names.get(&target)?;
        while started.elapsed() < HANDOVER_LIMIT {
            raft_net::ask_to_stand(self.transport, name, self.group).await;
            let moved = self
                .raft
                .wait(Some(ASK_EVERY))
                .metrics(
                    |m| m.current_leader.is_some_and(|l| l != self.me),
                    "another member leads",
                )
                .await;
            if let Ok(m) = moved {
                return m.current_leader;
            }
        }
        None
    }

    /// The preferred voter, or else the voter that has the most of the log (not this one,
    /// link up), and the index of this leader's last entry.
    fn choose(&self) -> Option<(NodeId, u64)> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.me) {
            return None;
        }
        let last = m.last_log_index?;
        let replication = m.replication?;
        let candidates: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != self.me)
            .filter(|id| {
                self.names
                    .get(id)
                    .is_some_and(|n| self.transport.is_connected(n))
            })
            .collect();
        if let Some(prefer) = self.prefer {
            return candidates.contains(&prefer).then_some((prefer, last));
        }
        candidates
            .into_iter()
            .max_by_key(|id| {
                replication
                    .get(id)
                    .and_then(|l| l.as_ref())
                    .map_or(0, |l| l.index + 1)
            })
            .map(|id| (id, last))
    }
}
