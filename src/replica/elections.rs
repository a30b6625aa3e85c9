//! Who stands for election in a replicated queue's group, driven by the node's links
//! rather than by per-group timers.
//!
//! A queue's group runs with openraft's heartbeats and election timers off, so an idle
//! queue sends nothing at all (a node with thousands of queues has no heartbeat storm).
//! Failure detection is the node's: its one link per peer pings and is dropped when
//! nothing arrives for a while ([`crate::cluster::transport`]). From that, each member
//! decides:
//! - A follower whose leader's link is down, or whose leader is no longer a voter, or
//!   that knows no leader at all, first nudges the members it can reach (a leader that
//!   hears a nudge sends a heartbeat, which tells the follower who leads and catches it
//!   up), and stands for election once a randomised delay has passed without a leader:
//!   short when a known leader was lost, longer when none was known (a node that
//!   starts, a candidate that lost), so that the leader has time to answer the nudges.
//! - A leader sends a heartbeat to a member whose link comes back (it was restarted or
//!   cut off, may be behind, and knows no leader).
//!
//! Raft's safety does not depend on any of this: a vote is still granted only to a
//! candidate whose log is as complete as the voter's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::{Raft, RaftMetrics, RaftTypeConfig};

use crate::cluster::Transport;
use crate::cluster::meta::NodeId;
use crate::cluster::raft_net;
use crate::cluster::wire::GroupId;

/// The delay (randomised between these) before a follower stands for election after
/// it lost a leader it knew.
const AFTER_LEADER_LOST: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_millis(600));

/// The delay (randomised between these) before a member that knows no leader stands:
/// long enough for its nudges to be answered.
const WITHOUT_LEADER: (Duration, Duration) =
    (Duration::from_millis(1200), Duration::from_millis(2500));

fn randomised((low, high): (Duration, Duration)) -> Duration {
    let span = (high - low).as_millis().max(1) as u64;
    low + Duration::from_millis(rand::random::<u64>() % span)
}

/// One member's view of its group's leadership, and what it does about it.
pub struct Elections<C: RaftTypeConfig<NodeId = NodeId>> {
    raft: Raft<C>,
    transport: Transport,
    group: GroupId,
    me: NodeId,
    /// Node names by id.
    names: BTreeMap<NodeId, String>,
    /// When this member stands unless a reachable leader is known by then.
    stand_at: Option<Instant>,
}

impl<C: RaftTypeConfig<NodeId = NodeId>> Elections<C> {
    /// The watch of member `me` of `group`.
    pub fn new(
        raft: Raft<C>,
        transport: Transport,
        group: GroupId,
        me: NodeId,
        names: BTreeMap<NodeId, String>,
    ) -> Self {
        Elections {
            raft,
            transport,
            group,
            me,
            names,
            stand_at: None,
        }
    }

    /// Whether the member knows a leader it can reach (itself included).
    fn leader_reachable(&self, m: &RaftMetrics<NodeId, C::Node>) -> bool {
        match m.current_leader {
            None => false,
            Some(leader) if leader == self.me => true,
            Some(leader) => {
                m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == leader)
                    && self
                        .names
                        .get(&leader)
                        .is_some_and(|name| self.transport.is_connected(name))
            }
        }
    }

    /// Looks at the group's state and nudges or stands as due. Returns when to look
    /// again at the latest (`None`: only when something changes).
    pub fn look(&mut self, m: &RaftMetrics<NodeId, C::Node>) -> Option<Instant> {
        if self.leader_reachable(m) {
            self.stand_at = None;
            return None;
        }
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.me);
        let now = Instant::now();
        match self.stand_at {
            None => {
                let delay = if m.current_leader.is_some() {
                    AFTER_LEADER_LOST
                } else {
                    WITHOUT_LEADER
                };
                self.stand_at = Some(now + randomised(delay));
                self.nudge_all(m);
            }
            Some(at) if at <= now => {
                if voter {
                    let raft = self.raft.clone();
                    tokio::spawn(async move {
                        let _ = raft.trigger().elect().await;
                    });
                }
                self.stand_at = Some(now + randomised(WITHOUT_LEADER));
                self.nudge_all(m);
            }
            Some(_) => {}
        }
        self.stand_at
    }

    /// The link to `peer` came up: a leader tells it who leads (and catches it up); a
    /// member without a leader asks it.
    pub fn link_gained(&self, peer: &str, m: &RaftMetrics<NodeId, C::Node>) {
        let member = m
            .membership_config
            .membership()
            .nodes()
            .any(|(id, _)| self.names.get(id).is_some_and(|n| n == peer));
        if !member {
            return;
        }
        if m.current_leader == Some(self.me) {
            let raft = self.raft.clone();
            tokio::spawn(async move {
                let _ = raft.trigger().heartbeat().await;
            });
        } else if !self.leader_reachable(m) {
            self.nudge(peer);
        }
    }

    /// Asks every reachable member to heartbeat if it leads.
    fn nudge_all(&self, m: &RaftMetrics<NodeId, C::Node>) {
        for (id, _) in m.membership_config.membership().nodes() {
            if *id == self.me {
                continue;
            }
            if let Some(name) = self.names.get(id)
                && self.transport.is_connected(name)
            {
                self.nudge(name);
            }
        }
    }

    fn nudge(&self, peer: &str) {
        let (transport, peer, group) = (self.transport.clone(), peer.to_string(), self.group);
        tokio::spawn(async move { raft_net::nudge(&transport, &peer, group).await });
    }
}
