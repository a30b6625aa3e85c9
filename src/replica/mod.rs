//! Replicated queues (`x-queue-type: quorum`): one Raft group per queue, on the members
//! its declaration named, sharing the node's store writer (one fsync makes the appends
//! of every group durable) and the node's one link per peer.
//!
//! - The leader of a queue's group hosts the live queue: the same `Queue` as a classic
//!   queue's (consumers, deliveries, acks), whose durable changes go to the group's log
//!   instead of the node's store: a publish is proposed as [`ReplicaRecord::Enqueue`] and
//!   enters the queue only once committed on a majority (so consumers see only committed
//!   messages, and the publisher's confirm means "in the log of a majority, fsynced
//!   there"); deliveries, acks and removals follow as records.
//! - Every member applies the log to its [`machine::ReplicaMachine`]: the committed
//!   messages. A node that becomes leader rebuilds the live queue from it (messages
//!   handed out before come back redelivered); a leader that loses its place cancels its
//!   consumers (basic.cancel) and forgets the live queue. A new leader announces itself
//!   in the metadata group (as RabbitMQ records a quorum queue's leader), and every node
//!   routes the queue's publishes to the leader it knows (`VHost::set_replica_home`).
//! - With at-least-once dead-lettering, a dead-lettered message moves to the group's dead
//!   letters ([`ReplicaRecord::DeadLettered`]) and leaves only once every queue it was
//!   routed to has taken it durably; a new leader republishes those still there.
//! - Groups send nothing while idle: openraft's heartbeats and election timers are off,
//!   and the node's links (their pings, and the link losses and gains they report)
//!   decide when a member stands for election or a leader heartbeats ([`elections`]).
//! - Every member keeps the committed messages in its message log, as a classic queue
//!   keeps its own (see [`machine`]), and in memory only their index: the leader's host
//!   pages bodies as a classic queue's does. A snapshot is then only a log id: the log is
//!   snapshotted and truncated every [`SNAPSHOT_EVERY`] entries or
//!   [`LOG_BYTES_BEFORE_SNAPSHOT`] bytes, so disk and memory follow the backlog. A
//!   follower that needs one gets the messages as a stream through files ([`snapshot`]).

pub mod adopt;
pub mod elections;
pub mod handover;
pub mod machine;
mod relay;
pub mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use self::machine::{RECORDS_PER_ENTRY, ReplicaMachine};
use crate::broker::remote::Forwarder;
use crate::broker::vhost::VHost;
use crate::cluster::Transport;
use crate::cluster::meta::NodeId;
use crate::cluster::raft_log::{RaftLog, lock};
use crate::cluster::raft_net::{self, GroupNetwork};
use crate::cluster::wire::GroupId;
use crate::queue::Queue;
use crate::store::{RecoveredRaftGroup, Store, StoreOp};

/// A snapshot is taken after this many log entries.
pub const SNAPSHOT_EVERY: u64 = 4096;

/// A log holding more than this is snapshotted (and truncated).
const LOG_BYTES_BEFORE_SNAPSHOT: usize = 16 << 20;

/// How long a follower may take to receive and install one segment of a snapshot. The
/// last one is answered once the whole snapshot is installed, which writes the queue's
/// backlog to the follower's store (a few hundred MiB a second): a shorter limit would
/// have the leader give up on a large one and send it again, without end. A follower
/// that stops answering holds up only its own catching up.
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 300_000;

/// Entries a log gains at least between two snapshots taken for its size.
const MIN_ENTRIES_PER_SNAPSHOT: u64 = 16;

/// Replicas of a quorum queue when `x-quorum-initial-group-size` is not given (RabbitMQ's
/// default), or the cluster size when that is smaller.
pub const DEFAULT_GROUP_SIZE: usize = 3;

/// Where a replicated queue lives: its group's id and its members, by node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    /// The group's id on the wire and in the store.
    pub group: GroupId,
    /// The nodes that should hold a replica (`warren ctl add_member` and friends change
    /// them; the group's leader then changes the group's membership to match).
    pub members: Vec<String>,
    /// The members the group was declared with. Only they may initialise the group, and
    /// only while the members are still these: a node added later (or added again after
    /// its removal) must learn the group from its leader, never found a group of its own.
    pub initial: Vec<String>,
}

impl ReplicaSpec {
    /// Whether node `me` may initialise the group's log.
    fn may_initialize(&self, me: &str) -> bool {
        self.members == self.initial && self.initial.iter().any(|m| m == me)
    }
}

/// How many replicas a new replicated queue gets, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// This many members (`x-quorum-initial-group-size`, an `ha-mode: exactly` or `all`
    /// policy), or the cluster size when that is smaller.
    Count(usize),
    /// The named nodes that are cluster members (an `ha-mode: nodes` policy); only the
    /// declaring node when none is.
    Nodes(Vec<String>),
}

impl ReplicaSpec {
    /// A new group for a queue declared on `me`. For a count: `me` first, then the
    /// members after it in name order (so that queues spread over the cluster). For named
    /// nodes: those in the cluster, `me` first when named (the first member stands first).
    pub fn choose(me: &str, cluster: &[String], replication: &Replication) -> ReplicaSpec {
        let members = match replication {
            Replication::Count(size) => {
                let mut sorted: Vec<&String> = cluster.iter().collect();
                sorted.sort();
                let start = sorted.iter().position(|n| *n == me).unwrap_or(0);
                (0..sorted.len().min((*size).max(1)))
                    .map(|i| sorted[(start + i) % sorted.len()].clone())
                    .collect()
            }
            Replication::Nodes(named) => {
                let mut members: Vec<String> = Vec::new();
                if named.iter().any(|n| n == me) {
                    members.push(me.to_string());
                }
                for n in named {
                    if cluster.contains(n) && !members.contains(n) {
                        members.push(n.clone());
                    }
                }
                if members.is_empty() {
                    members.push(me.to_string());
                }
                members
            }
        };
        // The top bit keeps queue groups clear of the node's fixed groups (0, 1, ...).
        ReplicaSpec {
            group: rand::random::<u64>() | (1 << 63),
            initial: members.clone(),
            members,
        }
    }
}

/// A durable change of a replicated queue, as its log carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicaRecord {
    /// A message published to the queue (the store's encoding of it). Shared, not
    /// copied, by the log held in memory, the state machine and the live queue (whose
    /// message body is a slice of it), so a replica holds each body once.
    Enqueue(bytes::Bytes),
    /// The message with this key was handed to a consumer.
    Delivered(u64),
    /// The message with this key left (acked, dropped, expired, dead-lettered, purged).
    Remove(u64),
    /// Every message left (the queue was deleted).
    Purge,
    /// The message with this key was dead-lettered at least once (see
    /// `crate::queue::dead_letters`): it leaves the queue's messages but stays in the
    /// group until its targets took it (then a [`ReplicaRecord::Remove`] follows), so
    /// that a new leader dead-letters it again.
    DeadLettered {
        /// The message's key.
        key: u64,
        /// Why it died (for its x-death header when dead-lettered again).
        reason: crate::queue::DeathReason,
    },
}

openraft::declare_raft_types!(
    /// openraft's types for a replicated queue's group.
    pub QueueTypes:
        D = Vec<ReplicaRecord>,
        R = (),
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<QueueTypes>,
        SnapshotData = snapshot::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Bytes of records one log entry gathers at most (more wait for the next entry).
pub const ENTRY_BYTES: usize = 128 << 10;

/// Log entries one AppendEntries carries at most. openraft keeps one request in flight per
/// follower, so this bounds a group's rate to this many entries per round trip (follower
/// fsync included): entries are often small (a few publishes each), so it must be large.
/// With [`ENTRY_BYTES`] it also bounds a request (32 MiB) under the link's frame limit.
const ENTRIES_PER_APPEND: u64 = 256;
/// Entries of a group that may await their commit at once (see `propose`).
const ENTRIES_AWAITING_COMMIT: usize = 4;

const _: () =
    assert!(ENTRY_BYTES * ENTRIES_PER_APPEND as usize <= crate::cluster::wire::MAX_FRAME_BYTES / 2);

impl ReplicaRecord {
    /// Approximate encoded size.
    fn size(&self) -> usize {
        match self {
            ReplicaRecord::Enqueue(blob) => blob.len() + 8,
            _ => 12,
        }
    }
}

/// Called with whether a proposed record was committed.
type Ack = oneshot::Sender<bool>;

/// A record handed to a group's proposer.
struct Proposal {
    record: ReplicaRecord,
    /// Hears whether the record was committed.
    ack: Option<Ack>,
    /// Times the record (a publish) was relayed between members (see [`relay`]).
    hops: u8,
}

/// A replicated queue's way into its log (cheap to clone): records are proposed in the
/// order they are handed over.
#[derive(Debug, Clone)]
pub struct ReplicaLog {
    tx: mpsc::UnboundedSender<Proposal>,
    /// The group's machine, once its member runs: where the host's paged bodies are.
    machine: Arc<std::sync::OnceLock<ReplicaMachine>>,
    /// Set while the group's proposer runs (it starts once the group has a leader and,
    /// for a queue that became replicated, its messages are in the group).
    proposing: Arc<std::sync::atomic::AtomicBool>,
}

impl ReplicaLog {
    /// Whether records proposed now go into the log at once, rather than wait for the
    /// group to start: only then does a member take a publish for a leader elsewhere
    /// (a publish that waited past its publisher's patience would be nacked, and then
    /// stored all the same).
    pub fn is_proposing(&self) -> bool {
        self.proposing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Proposes `record`; `ack` hears whether it was committed (false: this node does not
    /// lead the group, or lost its place before the record was committed).
    pub fn propose(&self, record: ReplicaRecord, ack: Option<Ack>) {
        self.propose_relayed(record, ack, 0);
    }

    /// [`ReplicaLog::propose`] for a publish other members relayed `hops` times.
    pub fn propose_relayed(&self, record: ReplicaRecord, ack: Option<Ack>, hops: u8) {
        let proposal = Proposal { record, ack, hops };
        if let Err(mpsc::error::SendError(Proposal { ack: Some(ack), .. })) = self.tx.send(proposal)
        {
            let _ = ack.send(false);
        }
    }

    /// Reads back the bodies of the group's messages by key (see
    /// [`ReplicaMachine::read_bodies`]). Before the member runs the read fails (the host
    /// asks again later): the messages are not gone, only not readable yet.
    pub fn read_bodies(
        &self,
        keys: Vec<u64>,
        done: Box<dyn FnOnce(crate::store::ReadAnswer) + Send>,
    ) {
        match self.machine.get() {
            Some(machine) => machine.read_bodies(keys, done),
            None => done(Err(crate::store::ReadFailed::not_ready(
                "the queue's replica is not running yet",
            ))),
        }
    }

    /// Proposes the changes a queue host recorded as store ops for its own messages
    /// (deliveries, removals, the purge of a deleted queue); others are not the log's.
    pub fn submit_ops(&self, ops: Vec<StoreOp>) {
        for op in ops {
            let record = match op {
                StoreOp::Remove { offset, .. } => ReplicaRecord::Remove(offset),
                StoreOp::MarkDelivered { offset, .. } => ReplicaRecord::Delivered(offset),
                StoreOp::PurgeQueue { .. } => ReplicaRecord::Purge,
                _ => continue,
            };
            self.propose(record, None);
        }
    }
}

struct RunningGroup {
    raft: Option<Raft<QueueTypes>>,
    stop: tokio_util::sync::CancellationToken,
    /// Woken when the queue's wanted members change (its leader then changes the group).
    members_changed: Arc<tokio::sync::Notify>,
    /// The proposal gate: a permit per entry that may await its commit (a hand-over
    /// holds them all).
    gate: Arc<tokio::sync::Semaphore>,
}

/// The replicated queue groups of this node.
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<ReplicasInner>,
}

struct ReplicasInner {
    transport: Transport,
    store: Store,
    me: String,
    ids: BTreeMap<String, NodeId>,
    recovered: Mutex<HashMap<GroupId, RecoveredRaftGroup>>,
    /// The node's message id counter (the machines store their messages).
    msg_ids: Arc<std::sync::atomic::AtomicU64>,
    groups: Mutex<HashMap<GroupId, Arc<Mutex<RunningGroup>>>>,
    /// Cleared while the node is drained: it then never stands for election.
    may_lead: Arc<std::sync::atomic::AtomicBool>,
    /// The node's way to other nodes' queues (publishes relayed to a group's leader).
    forwarder: Forwarder,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("me", &self.inner.me)
            .finish_non_exhaustive()
    }
}

impl Replicas {
    /// The groups of node `me` of a cluster whose members are `names` (sorted; a
    /// member's Raft id is its position plus one, as in the metadata group), from what
    /// the store recovered.
    pub fn new(
        transport: Transport,
        store: Store,
        me: &str,
        names: &[String],
        recovered: HashMap<GroupId, RecoveredRaftGroup>,
        msg_ids: Arc<std::sync::atomic::AtomicU64>,
        forwarder: Forwarder,
    ) -> Replicas {
        let ids = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as NodeId + 1))
            .collect();
        Replicas {
            inner: Arc::new(ReplicasInner {
                transport,
                store,
                me: me.to_string(),
                ids,
                recovered: Mutex::new(recovered),
                msg_ids,
                groups: Mutex::default(),
                may_lead: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                forwarder,
            }),
        }
    }

    /// Node names by id.
    fn names(&self) -> BTreeMap<NodeId, String> {
        self.inner
            .ids
            .iter()
            .map(|(n, id)| (*id, n.clone()))
            .collect()
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// Starts this node's member of `spec`'s group (once) for `queue` of `vhost`, and
    /// gives the queue its log; a classic queue that becomes replicated hands over its
    /// messages as the group's `seed` (see [`adopt`]).
    pub fn ensure(
        &self,
        spec: &ReplicaSpec,
        vhost: &Arc<VHost>,
        queue: &Arc<Queue>,
        seed: Option<adopt::Seed>,
    ) {
        let Some(&me) = self.inner.ids.get(&self.inner.me) else {
            return;
        };
        let mut groups = lock(&self.inner.groups);
        if let Some(running) = groups.get(&spec.group) {
            lock(running).members_changed.notify_one();
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let again = tx.downgrade();
        let machine = Arc::new(std::sync::OnceLock::new());
        let proposing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        queue.attach_replica(ReplicaLog {
            tx,
            machine: machine.clone(),
            proposing: proposing.clone(),
        });
        let members_changed = Arc::new(tokio::sync::Notify::new());
        let gate = Arc::new(tokio::sync::Semaphore::new(ENTRIES_AWAITING_COMMIT));
        let running = Arc::new(Mutex::new(RunningGroup {
            raft: None,
            stop: tokio_util::sync::CancellationToken::new(),
            members_changed: members_changed.clone(),
            gate: gate.clone(),
        }));
        groups.insert(spec.group, running.clone());
        drop(groups);
        let recovered = lock(&self.inner.recovered)
            .remove(&spec.group)
            .unwrap_or_default();
        let members: BTreeMap<NodeId, BasicNode> = spec
            .initial
            .iter()
            .filter_map(|n| {
                let id = self.inner.ids.get(n)?;
                Some((*id, BasicNode { addr: n.clone() }))
            })
            .collect();
        let names = self.names();
        let start = GroupStart {
            transport: self.inner.transport.clone(),
            store: self.inner.store.clone(),
            msg_ids: self.inner.msg_ids.clone(),
            machine,
            group: spec.group,
            me,
            members,
            names,
            recovered,
            queue: Arc::downgrade(queue),
            vhost: Arc::downgrade(vhost),
            running,
            may_initialize: spec.may_initialize(&self.inner.me),
            alone: spec.initial == [self.inner.me.clone()] && spec.members == spec.initial,
            seed,
            declared_first: spec.initial.first() == Some(&self.inner.me),
            members_changed,
            gate,
            may_lead: self.inner.may_lead.clone(),
            forwarder: self.inner.forwarder.clone(),
            again,
            proposing,
        };
        tokio::spawn(async move {
            if let Err(e) = start.run(rx).await {
                tracing::error!("replicated queue: cannot start its group: {e:#}");
            }
        });
    }

    /// Stops this node's member of `group` and removes its log and state from the store
    /// (the queue was deleted).
    pub fn drop_group(&self, group: GroupId) {
        let running = lock(&self.inner.groups).remove(&group);
        let Some(running) = running else {
            return;
        };
        let (raft, stop) = {
            let r = lock(&running);
            (r.raft.clone(), r.stop.clone())
        };
        stop.cancel();
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            if let Some(raft) = raft {
                let _ = raft.shutdown().await;
            }
            store.submit(machine::drop_ops(group));
        });
    }

    /// This node is no longer a wanted member of `group`: once the group's leader has
    /// taken it out of the group (or after a while without a leader that does), its
    /// member stops and its log and state are removed.
    pub fn leave(&self, group: GroupId) {
        let running = lock(&self.inner.groups).get(&group).cloned();
        let Some(running) = running else {
            return;
        };
        let Some(&me) = self.inner.ids.get(&self.inner.me) else {
            return;
        };
        let changed = lock(&running).members_changed.clone();
        // (This node's leader, if it leads, takes itself out.)
        changed.notify_one();
        let replicas = self.clone();
        tokio::spawn(async move {
            // A member still starting (a node that just restarted) is waited for: the
            // group may need it to commit the change that takes it out.
            let deadline = tokio::time::Instant::now() + MEMBERSHIP_CHANGE_TIMEOUT;
            let mut raft = lock(&running).raft.clone();
            while raft.is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                raft = lock(&running).raft.clone();
            }
            if let Some(raft) = raft {
                let _ = raft
                    .wait(Some(MEMBERSHIP_CHANGE_TIMEOUT))
                    // (Applied, not only appended: a leader that takes itself out must
                    // stay until the membership without it is committed.)
                    .metrics(
                        |m| {
                            m.membership_config.membership().get_node(&me).is_none()
                                && m.membership_config.log_id() <= &m.last_applied
                        },
                        "taken out of the group",
                    )
                    .await;
            }
            tracing::info!(
                group,
                "replicated queue: this node no longer holds a replica"
            );
            replicas.drop_group(group);
        });
    }

    /// Drains (`false`) or revives (`true`) this node: a drained node never stands for
    /// election, so it leads no queue once it handed its leaderships over.
    pub fn allow_leadership(&self, allowed: bool) {
        self.inner
            .may_lead
            .store(allowed, std::sync::atomic::Ordering::Release);
    }

    /// Hands over the leadership of every queue this node leads (it is about to stop),
    /// all at once; returns once they moved or [`handover::HANDOVER_LIMIT`] passed.
    pub async fn hand_over_all(&self) {
        let led: Vec<GroupId> = lock(&self.inner.groups)
            .iter()
            .filter(|(_, running)| {
                lock(running).raft.as_ref().is_some_and(|raft| {
                    let leader = raft.metrics().borrow().current_leader;
                    leader.is_some() && leader == self.inner.ids.get(&self.inner.me).copied()
                })
            })
            .map(|(group, _)| *group)
            .collect();
        if led.is_empty() {
            return;
        }
        let moved =
            futures_util::future::join_all(led.iter().map(|g| self.hand_over(*g, None))).await;
        tracing::info!(
            queues = moved.len(),
            handed_over = moved.iter().filter(|m| m.is_some()).count(),
            "replicated queues: leaderships handed over before stopping"
        );
    }

    /// Hands the leadership of `group` (led by this node) to member `to`, or to its most
    /// caught-up member; the node that leads it then, if it moved.
    pub async fn hand_over(&self, group: GroupId, to: Option<&str>) -> Option<String> {
        let me = *self.inner.ids.get(&self.inner.me)?;
        let (raft, gate) = {
            let running = lock(&self.inner.groups).get(&group)?.clone();
            let r = lock(&running);
            (r.raft.clone()?, r.gate.clone())
        };
        let prefer = match to {
            Some(name) => Some(*self.inner.ids.get(name)?),
            None => None,
        };
        let names = self.names();
        let leader = handover::Handover {
            raft: &raft,
            transport: &self.inner.transport,
            group,
            me,
            names: &names,
            gate: &gate,
            permits: ENTRIES_AWAITING_COMMIT as u32,
            prefer,
        }
        .run()
        .await?;
        names.get(&leader).cloned()
    }

    /// Stops every group (the node shuts down).
    pub async fn shutdown(&self) {
        let all: Vec<_> = lock(&self.inner.groups).values().cloned().collect();
        for running in all {
            let raft = lock(&running).raft.clone();
            lock(&running).stop.cancel();
            if let Some(raft) = raft {
                let _ = raft.shutdown().await;
            }
        }
    }
}

/// What a group's start needs.
struct GroupStart {
    transport: Transport,
    store: Store,
    msg_ids: Arc<std::sync::atomic::AtomicU64>,
    /// Where the queue's log finds the machine once it runs.
    machine: Arc<std::sync::OnceLock<ReplicaMachine>>,
    group: GroupId,
    me: NodeId,
    members: BTreeMap<NodeId, BasicNode>,
    names: BTreeMap<NodeId, String>,
    recovered: RecoveredRaftGroup,
    queue: Weak<Queue>,
    vhost: Weak<VHost>,
    running: Arc<Mutex<RunningGroup>>,
    /// This node may initialise the group (see [`ReplicaSpec::may_initialize`]).
    may_initialize: bool,
    /// This node founded the group alone and is still its only wanted member.
    alone: bool,
    /// The messages of the classic queue this group replicates from now on.
    seed: Option<adopt::Seed>,
    /// This node is the first member of the spec (the node that declared the queue).
    declared_first: bool,
    members_changed: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Semaphore>,
    may_lead: Arc<std::sync::atomic::AtomicBool>,
    /// Where publishes this member cannot propose go (see [`relay`]).
    forwarder: Forwarder,
    /// The way back into the group's proposals.
    again: mpsc::WeakUnboundedSender<Proposal>,
    /// Set while the proposer runs.
    proposing: Arc<std::sync::atomic::AtomicBool>,
}

impl GroupStart {
    async fn run(self, proposals: mpsc::UnboundedReceiver<Proposal>) -> anyhow::Result<()> {
        let config = Config {
            cluster_name: format!("warren-queue-{:x}", self.group),
            heartbeat_interval: 250,
            // (No election timer runs: these bound the vote requests and set the leader
            // lease, during which a follower that heard from its leader refuses other
            // candidates; a hand-over waits it out.)
            election_timeout_min: 1000,
            election_timeout_max: 1500,
            // An idle group sends nothing: elections are driven by the node's links
            // (see [`elections`]), and a heartbeat goes out only when one is asked for.
            enable_heartbeat: false,
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            max_payload_entries: ENTRIES_PER_APPEND,
            // openraft purges nothing a follower's request in flight starts before: with
            // replication always under way, a purge up to the snapshot itself would wait
            // forever and the log (held in memory) grow without bound. Keeping one
            // request's worth behind the snapshot lets it go through.
            max_in_snapshot_log_to_keep: ENTRIES_PER_APPEND,
            // A snapshot carries the queue's whole backlog (bodies read from the store)
            // in 3 MiB segments; the last one is answered once installed, which stores
            // every message: far more than openraft's 200 ms on a loaded node.
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
            ..Default::default()
        }
        .validate()?;
        let mut recovered = self.recovered;
        let mut seed = self.seed;
        if let Some(s) = &seed {
            let has_state = !recovered.log.is_empty() || !recovered.state.is_empty();
            let adopted = recovered.state.contains_key(adopt::ADOPTED);
            match adopt::seed_start(adopted, has_state, self.alone) {
                adopt::SeedStart::Seed { reset: false } => {}
                adopt::SeedStart::Seed { reset: true } => {
                    tracing::warn!(
                        group = self.group,
                        "mirrored queue: its seeding did not finish: seeded again"
                    );
                    self.store.commit(machine::drop_ops(self.group)).await;
                    recovered = RecoveredRaftGroup::default();
                }
                adopt::SeedStart::DropCopies => {
                    self.store.submit(vec![StoreOp::PurgeQueue {
                        queue: s.classic_key.clone(),
                    }]);
                    seed = None;
                }
            }
        }
        let log = RaftLog::<QueueTypes>::recover(self.store.clone(), self.group, &recovered)?;
        let log_size = log.clone();
        let machine = ReplicaMachine::recover(
            self.store.clone(),
            self.group,
            self.msg_ids.clone(),
            &mut recovered,
        )?;
        let _ = self.machine.set(machine.clone());
        let inbox = self.transport.register(self.group);
        let network = GroupNetwork {
            transport: self.transport.clone(),
            group: self.group,
        };
        let raft = Raft::new(self.me, Arc::new(config), network, log, machine.clone()).await?;
        let stop = {
            let mut r = lock(&self.running);
            r.raft = Some(raft.clone());
            r.stop.clone()
        };
        if stop.is_cancelled() {
            let _ = raft.shutdown().await;
            return Ok(());
        }
        // (Served first: a member that waits to be initialised by another must hear it.)
        tokio::spawn(raft_net::serve(raft.clone(), inbox, self.may_lead.clone()));
        if self.may_initialize && !raft.is_initialized().await? {
            tokio::spawn(initialize(
                raft.clone(),
                self.members.clone(),
                self.declared_first,
            ));
        }
        if let Some(seed) = seed {
            // (Before any proposal: publishes wait behind the queue's messages.)
            let count = seed.entries.len();
            match adopt::seed(&raft, &self.store, self.group, self.me, seed).await {
                Ok(seeded) => tracing::info!(
                    group = self.group,
                    messages = seeded,
                    "mirrored queue: its messages now in its group"
                ),
                Err(e) => {
                    // (Its classic copies stay: the next start seeds again.)
                    tracing::error!(
                        group = self.group,
                        messages = count,
                        "mirrored queue: cannot seed its group: {e:#}"
                    );
                    let _ = raft.shutdown().await;
                    return Ok(());
                }
            }
        }
        let relay = Arc::new(relay::Relay {
            raft: raft.clone(),
            me: self.me,
            names: self.names.clone(),
            forwarder: self.forwarder,
            queue: self.queue.clone(),
            vhost: self.vhost.clone(),
            again: self.again,
        });
        tokio::spawn(propose(
            raft.clone(),
            proposals,
            self.gate.clone(),
            stop.clone(),
            relay,
            self.proposing,
        ));
        let leadership = Leadership {
            elections: elections::Elections::new(
                raft.clone(),
                self.transport.clone(),
                self.group,
                self.me,
                self.names.clone(),
                self.may_lead.clone(),
            ),
            losses: self.transport.link_losses(),
            gains: self.transport.link_gains(),
            raft,
            machine,
            me: self.me,
            names: self.names,
            queue: self.queue,
            vhost: self.vhost,
            members_changed: self.members_changed,
            reconciling: Arc::default(),
            log: log_size,
        };
        tokio::select! {
            _ = leadership.follow() => {}
            _ = stop.cancelled() => {}
        }
        Ok(())
    }
}

/// Initialises a new group's log with its members. openraft starts an election on every
/// member that initialises, so members initialising together split their votes and the
/// queue has no leader (and nacks) until election timeouts and leader leases have passed:
/// the declaring node initialises and stands at once; the other members wait for it to
/// reach them ([`FIRST_MEMBER_GRACE`]) and initialise themselves only when it does not
/// (it died right after the declaration), so the group forms without it.
async fn initialize(raft: Raft<QueueTypes>, members: BTreeMap<NodeId, BasicNode>, first: bool) {
    if !first {
        let reached = raft
            .wait(Some(FIRST_MEMBER_GRACE))
            .metrics(
                |m| {
                    m.membership_config
                        .membership()
                        .voter_ids()
                        .next()
                        .is_some()
                },
                "the declaring node reached this member",
            )
            .await;
        if reached.is_ok() {
            return;
        }
    }
    // (openraft refuses harmlessly once a log exists.)
    if let Err(e) = raft.initialize(members).await {
        tracing::debug!("replicated queue: group already initialised: {e}");
    }
    if first {
        stand_first(raft).await;
    }
}

/// How long a member of a new group waits for the declaring node before it initialises
/// the group itself.
const FIRST_MEMBER_GRACE: Duration = Duration::from_secs(5);

/// The declaring node stands for election at once (initialising does that) instead of
/// after an election timeout, so that a new queue takes publishes within a round trip,
/// and again every
/// [`STAND_AGAIN_AFTER`] while no leader is known (its first call may reach members whose
/// group has not started yet): publishes routed to it meanwhile would otherwise be nacked
/// when another member's timeout made that one the leader.
async fn stand_first(raft: Raft<QueueTypes>) {
    // (Initialising stood for the first time.)
    for _ in 0..STAND_ATTEMPTS {
        let known = raft
            .wait(Some(STAND_AGAIN_AFTER))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await;
        if known.is_ok() {
            return;
        }
        if let Err(e) = raft.trigger().elect().await {
            tracing::debug!("replicated queue: cannot stand for election: {e}");
            return;
        }
    }
}

/// How long the declaring node waits for its election before it stands again (well under
/// the other members' election timeouts).
const STAND_AGAIN_AFTER: Duration = Duration::from_millis(300);
/// How often it stands at most.
const STAND_ATTEMPTS: usize = 5;

/// Proposes records in the order they came, as many per log entry as are waiting. The
/// publishes of an entry this member could not append, or whose entry the group's new
/// leader dropped, go to that leader (see [`relay`]) instead of being nacked.
async fn propose(
    raft: Raft<QueueTypes>,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    uncommitted: Arc<tokio::sync::Semaphore>,
    stop: tokio_util::sync::CancellationToken,
    relay: Arc<relay::Relay>,
    proposing: Arc<std::sync::atomic::AtomicBool>,
) {
    // Publishes made while the group's first election runs wait for it.
    let _ = raft
        .wait(Some(Duration::from_secs(5)))
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await;
    /// Clears the flag however the proposer ends.
    struct Proposing(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Proposing {
        fn drop(&mut self) {
            self.0.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
    proposing.store(true, std::sync::atomic::Ordering::Relaxed);
    let _proposing = Proposing(proposing);
    // A few entries at most await their commit at once: while they do, the records that
    // come pile up in the channel and the next entry takes them all, so that under load
    // entries carry hundreds of records (each entry costs the Raft core, the logs and
    // the followers a fixed amount) while a lone publish still goes out at once.
    // (`uncommitted` holds ENTRIES_AWAITING_COMMIT permits.)
    loop {
        let first = tokio::select! {
            p = rx.recv() => p,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { return };
        let permit = tokio::select! {
            p = uncommitted.clone().acquire_owned() => p.ok(),
            _ = stop.cancelled() => None,
        };
        let mut entry = Entry::default();
        entry.add(first);
        while entry.records.len() < RECORDS_PER_ENTRY && entry.bytes < ENTRY_BYTES {
            match rx.try_recv() {
                Ok(p) => entry.add(p),
                Err(_) => break,
            }
        }
        let Entry {
            records,
            publishes,
            acks,
            ..
        } = entry;
        match raft.client_write_ff(records).await {
            Ok(answer) => {
                let relay = relay.clone();
                tokio::spawn(async move {
                    let answer = answer.await;
                    drop(permit);
                    let ok = matches!(answer, Ok(Ok(_)));
                    for ack in acks {
                        let _ = ack.send(ok);
                    }
                    match answer {
                        Ok(Ok(_)) => {
                            for p in publishes {
                                p.answer(true);
                            }
                        }
                        Ok(Err(openraft::error::ClientWriteError::ForwardToLeader(to))) => {
                            relay.send(to.leader_id, publishes).await;
                        }
                        _ => {
                            for p in publishes {
                                p.answer(false);
                            }
                        }
                    }
                });
            }
            Err(_) => {
                for ack in acks {
                    let _ = ack.send(false);
                }
                for p in publishes {
                    p.answer(false);
                }
            }
        }
    }
}

/// The records of one log entry, and who hears whether they were committed.
#[derive(Default)]
struct Entry {
    records: Vec<ReplicaRecord>,
    bytes: usize,
    /// Its publishes, which another member may take if this one cannot (see [`relay`]).
    publishes: Vec<relay::Unproposed>,
    /// The acknowledgements of its other records.
    acks: Vec<Ack>,
}

impl Entry {
    fn add(&mut self, p: Proposal) {
        self.bytes += p.record.size();
        match &p.record {
            ReplicaRecord::Enqueue(blob) => self.publishes.push(relay::Unproposed {
                blob: blob.clone(),
                ack: p.ack,
                hops: p.hops,
            }),
            _ => self.acks.extend(p.ack),
        }
        self.records.push(p.record);
    }
}

/// Follows who leads the group: hosts the live queue while this node does, and tells the
/// vhost where the queue's publishes go otherwise.
struct Leadership {
    raft: Raft<QueueTypes>,
    machine: ReplicaMachine,
    me: NodeId,
    names: BTreeMap<NodeId, String>,
    queue: Weak<Queue>,
    vhost: Weak<VHost>,
    members_changed: Arc<tokio::sync::Notify>,
    /// A membership change of this leader runs.
    reconciling: Arc<std::sync::atomic::AtomicBool>,
    log: RaftLog<QueueTypes>,
    /// Nudges and stands for election when the leader cannot be reached.
    elections: elections::Elections<QueueTypes>,
    /// The node's links that go down, and come up (the failure detector).
    losses: tokio::sync::broadcast::Receiver<String>,
    gains: tokio::sync::broadcast::Receiver<String>,
}

impl Leadership {
    /// Snapshots the group once its log holds more than [`LOG_BYTES_BEFORE_SNAPSHOT`]
    /// (besides every [`SNAPSHOT_EVERY`] entries): with entries of hundreds of records,
    /// a count alone would let the log (kept in memory for replication as well as on
    /// disk) grow to gigabytes. A snapshot costs nothing to take (the machine's messages
    /// are stored as it applies them).
    fn snapshot_when_large(&self) {
        let m = self.raft.metrics().borrow().clone();
        let (applied, snapshot) = (
            m.last_applied.map_or(0, |l| l.index),
            m.snapshot.map_or(0, |l| l.index),
        );
        let bytes = self.log.bytes();
        if applied.saturating_sub(snapshot) >= MIN_ENTRIES_PER_SNAPSHOT
            && bytes > LOG_BYTES_BEFORE_SNAPSHOT
        {
            let raft = self.raft.clone();
            tokio::spawn(async move {
                let _ = raft.trigger().snapshot().await;
            });
        }
    }

    /// While this node leads: makes the group's voters the queue's wanted members (new
    /// ones join as learners first and become voters once caught up; a leader that is
    /// itself removed steps down once the change is committed). One change at a time;
    /// a change that fails is tried again on the next look.
    fn reconcile(&self, queue: &Queue) {
        use std::sync::atomic::Ordering;
        let wanted: BTreeMap<NodeId, String> = queue
            .members()
            .into_iter()
            .filter_map(|n| Some((*self.ids().get(&n)?, n)))
            .collect();
        let voters: std::collections::BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if wanted.is_empty()
            || wanted.keys().copied().eq(voters.iter().copied())
            || self.reconciling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let raft = self.raft.clone();
        let reconciling = self.reconciling.clone();
        let name = queue.name().to_string();
        tokio::spawn(async move {
            for (id, node) in &wanted {
                if voters.contains(id) {
                    continue;
                }
                let added = tokio::time::timeout(
                    MEMBERSHIP_CHANGE_TIMEOUT,
                    raft.add_learner(*id, BasicNode { addr: node.clone() }, true),
                )
                .await;
                if !matches!(added, Ok(Ok(_))) {
                    tracing::warn!(
                        queue = name,
                        node,
                        "replicated queue: cannot add a member yet"
                    );
                    reconciling.store(false, Ordering::Release);
                    return;
                }
            }
            let ids: std::collections::BTreeSet<NodeId> = wanted.keys().copied().collect();
            match tokio::time::timeout(
                MEMBERSHIP_CHANGE_TIMEOUT,
                raft.change_membership(ids, false),
            )
            .await
            {
                Ok(Ok(_)) => tracing::info!(
                    queue = name,
                    members = ?wanted.values().collect::<Vec<_>>(),
                    "replicated queue: members changed"
                ),
                _ => tracing::warn!(queue = name, "replicated queue: members not changed yet"),
            }
            reconciling.store(false, Ordering::Release);
        });
    }

    /// Node ids by name.
    fn ids(&self) -> BTreeMap<String, NodeId> {
        self.names.iter().map(|(id, n)| (n.clone(), *id)).collect()
    }

    async fn follow(mut self) {
        let mut metrics = self.raft.metrics();
        let mut hosting = false;
        // The leader acted on last (metrics change on every append: act on changes of
        // leader only).
        let mut acted_on: Option<Option<NodeId>> = None;
        loop {
            let (leader, state, term) = {
                let m = metrics.borrow_and_update();
                (m.current_leader, m.state, m.current_term)
            };
            let (Some(queue), Some(vhost)) = (self.queue.upgrade(), self.vhost.upgrade()) else {
                return;
            };
            let leads = leader == Some(self.me) && state == ServerState::Leader;
            if leads && !hosting {
                // Entries of earlier terms count as committed once this term's first
                // entry is: wait for them to be applied before building the queue.
                // (Bounded: a check that cannot finish is asked again.)
                let confirmed =
                    tokio::time::timeout(Duration::from_secs(5), self.raft.ensure_linearizable())
                        .await;
                match confirmed {
                    Ok(Ok(_)) => {
                        // (The group's first term has no earlier leader.)
                        self.machine.host(queue.clone(), term > 1);
                        queue.note_leader(term);
                        vhost.set_replica_home(queue.name(), None);
                        vhost.announce_replica_leader(queue.name(), term);
                        tracing::info!(
                            queue = queue.name(),
                            "replicated queue: this node leads it now"
                        );
                        hosting = true;
                        acted_on = Some(leader);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
                continue;
            }
            // (A node that names itself leader before it is one waits until it is.)
            if !leads && leader != Some(self.me) && acted_on != Some(leader) {
                if hosting {
                    if let Some(host) = self.machine.unhost() {
                        host.step_down();
                    }
                    hosting = false;
                }
                if let Some(name) = leader.and_then(|id| self.names.get(&id)) {
                    queue.note_leader(term);
                    vhost.set_replica_home(queue.name(), Some(name.clone()));
                    // Consumers that attached here while no leader was known are
                    // cancelled: they attach again where the queue is served.
                    queue.step_down();
                    acted_on = Some(leader);
                }
            }
            // A leader whose announcement did not make it into the metadata group (no
            // majority there at the time) announces again.
            if hosting && !vhost.replica_leader_announced(queue.name(), term) {
                vhost.announce_replica_leader(queue.name(), term);
            }
            if hosting {
                self.reconcile(&queue);
            }
            self.snapshot_when_large();
            drop((queue, vhost));
            let look_again =
                self.elections
                    .look(&metrics.borrow())
                    .map_or(REANNOUNCE_EVERY, |at| {
                        at.saturating_duration_since(std::time::Instant::now())
                            .min(REANNOUNCE_EVERY)
                    });
            // (A timeout only means: look again.)
            let changed = tokio::time::timeout(look_again, async {
                tokio::select! {
                    changed = metrics.changed() => changed.is_ok(),
                    _ = self.members_changed.notified() => true,
                    _ = self.losses.recv() => true,
                    gained = self.gains.recv() => {
                        if let Ok(peer) = gained {
                            self.elections.link_gained(&peer, &self.raft.metrics().borrow());
                        }
                        true
                    }
                }
            });
            if let Ok(false) = changed.await {
                return;
            }
        }
    }
}

/// How long a leader waits for a new member to catch up, or a membership change to be
/// committed, before it tries again.
const MEMBERSHIP_CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a leader looks whether the metadata group knows it leads.
const REANNOUNCE_EVERY: Duration = Duration::from_secs(10);
