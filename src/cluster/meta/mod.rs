//! The metadata Raft group: the cluster's definitions (vhosts, exchanges, bindings,
//! queues with their type and home node) agreed by a majority of the members, on
//! openraft.
//!
//! Every member runs it from the start: fresh nodes with the same `cluster_nodes` all
//! initialise it with the same membership (every listed node a voter; node ids are the
//! positions in the sorted list), which openraft accepts on any number of them and in
//! any order, so the cluster forms by itself. A change ([`MetaGroup::propose`]) is
//! answered once committed on a majority; a node that cannot reach a majority cannot
//! commit and answers [`MetaError::Unavailable`] within its time limit.

pub mod network;
pub mod proposals;
pub mod storage;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, Raft};
use serde::{Deserialize, Serialize};

use self::network::{MetaNetwork, MetaRequest, MetaResponse};
use self::storage::{LogStore, META_GROUP, StateMachine};
use super::membership::Membership;
use super::transport::Transport;
use crate::store::{RecoveredRaftGroup, Store};

/// A member's id in Raft: its position in the sorted `cluster_nodes`, plus one.
pub type NodeId = u64;

/// A change of the definitions. Keys and values are the broker's encodings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Set `key` to `value`.
    Put {
        /// Broker key.
        key: String,
        /// Broker-encoded definition.
        value: Vec<u8>,
    },
    /// Set `key` to `value` unless it exists (the first of two concurrent declares wins).
    PutIfAbsent {
        /// Broker key.
        key: String,
        /// Broker-encoded definition.
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// Broker key.
        key: String,
    },
    /// Remove every key starting with `prefix` (a queue's bindings, a vhost).
    DeletePrefix {
        /// Key prefix.
        prefix: String,
    },
    /// Several changes in one log entry, applied in order (what one node proposed while
    /// the previous proposal was in flight: one round trip and one fsync for all).
    Batch(Vec<MetaCommand>),
    /// Set `key` to `value` only if it holds `expected` now: a change decided on a value
    /// read earlier (a queue's placement or members) never overwrites a change committed
    /// meanwhile, nor brings back a definition deleted meanwhile.
    PutIfEqual {
        /// Broker key.
        key: String,
        /// The value the change was decided on.
        expected: Vec<u8>,
        /// Broker-encoded definition.
        value: Vec<u8>,
    },
}

/// What applying a [`MetaCommand`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaReply {
    /// Whether the definitions changed.
    pub changed: bool,
}

openraft::declare_raft_types!(
    /// openraft's types for the metadata group.
    pub TypeConfig:
        D = MetaCommand,
        R = MetaReply,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Why a definition change was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaError {
    /// No majority could be reached in time (this node is in a minority, or the cluster
    /// has lost its majority): the change was not committed, and may or may not be later.
    Unavailable,
    /// The Raft node stopped.
    Stopped(String),
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaError::Unavailable => write!(f, "the metadata store is unavailable (no majority)"),
            MetaError::Stopped(why) => write!(f, "the metadata group stopped: {why}"),
        }
    }
}

impl std::error::Error for MetaError {}

/// How long a change waits for a majority before it is refused.
pub const PROPOSE_LIMIT: Duration = Duration::from_secs(5);

/// This node's member of the metadata group.
#[derive(Clone)]
pub struct MetaGroup {
    raft: Raft<TypeConfig>,
    machine: StateMachine,
    transport: Transport,
    names: BTreeMap<NodeId, String>,
    me: NodeId,
}

impl std::fmt::Debug for MetaGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaGroup")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl MetaGroup {
    /// Starts this node's member from what the store recovered, and initialises the group
    /// if this node has never been part of it.
    pub async fn start(
        membership: &Membership,
        transport: Transport,
        store: Store,
        recovered: RecoveredRaftGroup,
        observer: Option<std::sync::Arc<dyn storage::DefinitionsObserver>>,
    ) -> anyhow::Result<MetaGroup> {
        let names: BTreeMap<NodeId, String> = membership
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (i as NodeId + 1, m.name.clone()))
            .collect();
        let me = membership.me as NodeId + 1;
        let config = Config {
            cluster_name: "warren-metadata".into(),
            heartbeat_interval: 200,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            ..Default::default()
        }
        .validate()
        .context("metadata group settings")?;
        let log = LogStore::recover(store.clone(), META_GROUP, &recovered)?;
        let machine = StateMachine::recover(store, &recovered)?;
        if let Some(o) = observer {
            machine.observe(o);
        }
        let inbox = transport.register(META_GROUP);
        let raft = Raft::new(
            me,
            std::sync::Arc::new(config),
            MetaNetwork {
                transport: transport.clone(),
            },
            log,
            machine.clone(),
        )
        .await
        .context("starting the metadata group")?;
        tokio::spawn(network::serve(raft.clone(), inbox));
        tokio::spawn(log_leader_changes(raft.clone(), names.clone()));
        if !raft
            .is_initialized()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            let voters: BTreeMap<NodeId, BasicNode> = names
                .iter()
                .map(|(id, name)| (*id, BasicNode { addr: name.clone() }))
                .collect();
            // Every fresh member does this with the same voters; openraft refuses it
            // harmlessly once a log exists (e.g. a peer's entries arrived first).
            if let Err(e) = raft.initialize(voters).await {
                tracing::debug!("cluster: metadata group already initialised: {e}");
            }
        }
        Ok(MetaGroup {
            raft,
            machine,
            transport,
            names,
            me,
        })
    }

    /// The leader's node name, if this node knows one.
    pub fn leader(&self) -> Option<String> {
        let leader = self.raft.metrics().borrow().current_leader?;
        self.names.get(&leader).cloned()
    }

    /// The agreed definitions as this node has applied them.
    pub fn machine(&self) -> &StateMachine {
        &self.machine
    }

    /// Proposes a change and waits until a majority has committed it (and this node has
    /// applied it), for at most [`PROPOSE_LIMIT`]. On a node that is not the leader the
    /// change is forwarded to the leader.
    pub async fn propose(&self, command: MetaCommand) -> Result<MetaReply, MetaError> {
        let deadline = Instant::now() + PROPOSE_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MetaError::Unavailable);
            }
            match self.try_propose(command.clone(), left).await {
                Ok((reply, index)) => {
                    self.wait_applied(index, deadline).await?;
                    return Ok(reply);
                }
                Err(Some(e)) => return Err(e),
                // No leader known yet, or it changed: try again shortly.
                Err(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// One attempt: `Err(None)` means "retry".
    async fn try_propose(
        &self,
        command: MetaCommand,
        left: Duration,
    ) -> Result<(MetaReply, u64), Option<MetaError>> {
        let leader = self.raft.metrics().borrow().current_leader;
        match leader {
            Some(id) if id == self.me => {
                match tokio::time::timeout(left, self.raft.client_write(command)).await {
                    Err(_) => Err(Some(MetaError::Unavailable)),
                    Ok(Ok(r)) => Ok((r.data, r.log_id.index)),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(None),
                    Ok(Err(e)) => Err(Some(MetaError::Stopped(e.to_string()))),
                }
            }
            Some(id) => {
                let Some(name) = self.names.get(&id) else {
                    return Err(None);
                };
                let body = postcard::to_stdvec(&MetaRequest::Propose(command))
                    .map_err(|e| Some(MetaError::Stopped(e.to_string())))?;
                match self.transport.call(name, META_GROUP, body, left).await {
                    Ok(answer) => match postcard::from_bytes::<MetaResponse>(&answer) {
                        // Committed at `index`; the caller waits until this node has
                        // applied it too, so that a read here sees the change.
                        Ok(MetaResponse::Propose(Ok((reply, index)))) => Ok((reply, index)),
                        Ok(MetaResponse::Propose(Err(_))) => Err(None),
                        _ => Err(None),
                    },
                    Err(super::TransportError::Timeout) => Err(Some(MetaError::Unavailable)),
                    Err(_) => Err(None),
                }
            }
            None => Err(None),
        }
    }

    /// Waits until this node has applied `index` (or the deadline passes).
    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), MetaError> {
        let mut applied = self.machine.applied();
        let left = deadline.saturating_duration_since(Instant::now());
        let reached = tokio::time::timeout(left, applied.wait_for(|i| *i >= index)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(MetaError::Unavailable),
        }
    }

    /// The group's voters as this node knows them, by name.
    pub fn voters(&self) -> Vec<String> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .voter_ids()
            .filter_map(|id| self.names.get(&id).cloned())
            .collect()
    }

    /// This member's id in the group, by name (`None`: not in `cluster_nodes`).
    pub fn id_of(&self, name: &str) -> Option<NodeId> {
        self.names
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
    }

    /// Asks the leader (or `via`, a member that forwards to it when this node knows no
    /// leader, as a node joining again does) to change the voters; waits until done, for
    /// at most [`PROPOSE_LIMIT`] plus the time a returning member needs to catch up.
    pub async fn change_members(
        &self,
        change: network::MembersChange,
        via: Option<&str>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + PROPOSE_LIMIT * 6;
        let mut target = via.map(str::to_string);
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            let to = match (leader, &target) {
                (Some(id), _) if id == self.me => {
                    return network::change_members(&self.raft, change).await;
                }
                (Some(id), None) => self.names.get(&id).cloned(),
                (_, Some(t)) => Some(t.clone()),
                (None, None) => None,
            };
            if let Some(to) = to {
                let body = postcard::to_stdvec(&MetaRequest::Members(change.clone()))
                    .map_err(|e| e.to_string())?;
                let left = deadline.saturating_duration_since(Instant::now());
                if let Ok(answer) = self.transport.call(&to, META_GROUP, body, left).await {
                    match postcard::from_bytes::<MetaResponse>(&answer) {
                        Ok(MetaResponse::Members(Ok(()))) => return Ok(()),
                        Ok(MetaResponse::Members(Err(e))) => {
                            match e.strip_prefix(network::FORWARD_TO) {
                                Some(leader) if !leader.is_empty() => {
                                    target = Some(leader.to_string());
                                    continue;
                                }
                                Some(_) => {}
                                None => return Err(e),
                            }
                        }
                        _ => {}
                    }
                }
                // Not the leader (any more): ask whoever this node now knows to lead.
                target = via.map(str::to_string).filter(|_| leader.is_none());
            }
            if Instant::now() >= deadline {
                return Err(MetaError::Unavailable.to_string());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Logs every change of the metadata leader as this node sees it (operators read it;
/// the cluster tests wait for it), until the Raft node stops.
async fn log_leader_changes(raft: Raft<TypeConfig>, names: BTreeMap<NodeId, String>) {
    let mut metrics = raft.metrics();
    let mut last: Option<Option<NodeId>> = None;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        if last != Some(leader) {
            match leader.and_then(|id| names.get(&id)) {
                Some(name) => tracing::info!("cluster: metadata leader is {name}"),
                None => tracing::info!("cluster: no metadata leader"),
            }
            last = Some(leader);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
