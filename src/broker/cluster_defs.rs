//! A clustered node's definitions: the durable exchanges, queues and bindings of every
//! vhost live in the metadata group, not in the node's own definitions table.
//!
//! - Out: what a vhost would store ([`StoreOp::PutDefinition`] / `DeleteDefinition`)
//!   is proposed instead ([`ClusterLink::propose`]); the connection answers once it is
//!   committed. A queue's value carries its home node (the node it was declared on, as
//!   RabbitMQ's default `client-local` locator), which keeps its messages.
//! - In: [`DefinitionsMirror`] applies every committed change to the vhosts of this node,
//!   in log order, whichever node proposed it.
//! - At start: [`agreed_definitions`] turns the definitions the node last agreed to into
//!   the form the store's recovery reads, so that a home node restores its queues'
//!   messages and every node its vhosts before any peer is heard.

use std::sync::{Arc, Weak};

use super::BrokerState;
use super::persist::{StoredBinding, StoredDefinition, StoredExchange, StoredQueue};
use crate::auth::CLUSTER_PREFIX;
use crate::cluster::meta::MetaCommand;
use crate::cluster::meta::proposals::Proposals;
use crate::cluster::meta::storage::{DefinitionChange, Definitions, DefinitionsObserver};
use crate::queue::QueueDef;
use crate::replica::{ReplicaSpec, Replicas, Replication};
use crate::store::StoreOp;

/// First byte of a queue's value in the metadata group: home node, then the stored queue.
const HOMED_QUEUE: u8 = 0xC1;
/// First byte of a replicated queue's value as first written: its group and members (no
/// initial members: they were the members), then the stored queue. Read, no longer written.
const REPLICATED_QUEUE_V1: u8 = 0xC2;
/// First byte of a replicated queue's value: its [`ReplicaSpec`], then the stored queue.
const REPLICATED_QUEUE: u8 = 0xC3;

/// A replicated queue's spec as [`REPLICATED_QUEUE_V1`] values carry it.
#[derive(serde::Deserialize)]
struct SpecV1 {
    group: crate::cluster::wire::GroupId,
    members: Vec<String>,
}

/// Where an agreed queue keeps its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    /// On one node (a classic queue).
    Home(String),
    /// In a Raft group over these members (a quorum queue).
    Replicated(ReplicaSpec),
}

/// A replicated queue as the metadata group knows it (rebalancing reads these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedQueue {
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: String,
    /// The nodes that should hold a replica.
    pub members: Vec<String>,
    /// The node that announced it leads, if any did.
    pub leader: Option<String>,
}

/// A vhost's way into the metadata group.
#[derive(Debug, Clone)]
pub struct ClusterLink {
    /// This node's proposer.
    pub proposals: Proposals,
    /// This node's name (the home of the queues declared here).
    pub node: String,
    /// The node's cluster side, for its status (management API, `warren ctl`).
    pub cluster: crate::cluster::ClusterNode,
    /// Publishes to queues homed on other nodes go through here.
    pub forwarder: super::remote::Forwarder,
    /// Consuming, getting and purging queues hosted on other nodes go through here.
    pub proxies: super::remote_consume::ProxyClient,
    /// This node's members of replicated queues' groups.
    pub replicas: Replicas,
    /// Mirroring policies' changes to existing queues under way.
    pub mirroring: Arc<super::mirror_changes::MirroringChanges>,
}

impl ClusterLink {
    /// Proposes the definition changes among `ops`; returns the others (queue entries,
    /// purges) for the node's own store.
    /// A new queue is replicated as `replication` says for its declaration (None: kept
    /// on this node).
    pub fn propose(
        &self,
        ops: Vec<StoreOp>,
        replication: impl Fn(&QueueDef) -> Option<Replication>,
    ) -> Vec<StoreOp> {
        let mut commands = Vec::new();
        let mut rest = Vec::new();
        for op in ops {
            match op {
                StoreOp::PutDefinition { key, value } if key.starts_with("q/") => {
                    let wanted =
                        StoredQueue::decode(&value).and_then(|q| replication(&q.value.def()));
                    let value = match wanted {
                        Some(replication) => {
                            let members = self.cluster.status().members;
                            let spec = ReplicaSpec::choose(&self.node, &members, &replication);
                            replicated_queue(&spec, &value)
                        }
                        None => homed_queue(&self.node, &value),
                    };
                    commands.push(MetaCommand::PutIfAbsent { key, value });
                }
                StoreOp::PutDefinition { key, value } if key.starts_with("x/") => {
                    commands.push(MetaCommand::PutIfAbsent { key, value });
                }
                StoreOp::PutDefinition { key, value } => {
                    commands.push(MetaCommand::Put { key, value });
                }
                StoreOp::DeleteDefinition { key } => commands.push(MetaCommand::Delete { key }),
                other => rest.push(other),
            }
        }
        if !commands.is_empty() {
            self.proposals.submit(commands);
        }
        rest
    }
}

/// Key prefix of a replicated queue's leader in the metadata group (as RabbitMQ keeps a
/// quorum queue's leader in its queue record): every node, member of the queue's group or
/// not, routes the queue's publishes to the leader it names.
const LEADER_PREFIX: &str = "l/";

impl ClusterLink {
    /// The leader (and its term) the metadata group names for replicated queue `queue`.
    pub fn announced_leader(&self, vhost: &str, queue: &str) -> Option<(String, u64)> {
        let key = format!("{LEADER_PREFIX}{vhost}\u{0}{queue}");
        let value = self.cluster.meta().machine().get(&key)?;
        let (_, _, leader, term) =
            postcard::from_bytes::<(String, String, String, u64)>(&value).ok()?;
        Some((leader, term))
    }

    /// Announces that this node leads replicated queue `queue` of `vhost` since Raft term
    /// `term` of its group.
    pub fn announce_leader(&self, vhost: &str, queue: &str, term: u64) {
        let key = format!("{LEADER_PREFIX}{vhost}\u{0}{queue}");
        let Ok(value) = postcard::to_stdvec(&(vhost, queue, &self.node, term)) else {
            return;
        };
        self.proposals.submit(vec![MetaCommand::Put { key, value }]);
    }
}

impl ClusterLink {
    /// Waits until this node has applied everything the metadata group committed before
    /// now (an empty proposal's round trip).
    pub async fn caught_up(&self) -> Result<(), crate::cluster::meta::MetaError> {
        let ticket = self.proposals.submit(Vec::new());
        self.proposals.wait(ticket.saturating_sub(1), ticket).await
    }
}

/// Why a replicated queue's members were not changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembersError {
    /// No such queue.
    NotFound,
    /// The change is refused (the text says why).
    Refused(String),
    /// The metadata group did not commit the change.
    NotCommitted,
}

impl ClusterLink {
    /// Adds `node` to the members of replicated queue `queue` of `vhost` (as
    /// `rabbitmq-queues add_member`); answered once the metadata group has committed the
    /// new members. The queue's leader then adds the node to the group: it joins as a
    /// learner, copies the log or a snapshot, and becomes a voter once caught up.
    pub async fn add_member(
        &self,
        vhost: &str,
        queue: &str,
        node: &str,
    ) -> Result<(), MembersError> {
        if !self.cluster.status().members.iter().any(|m| m == node) {
            return Err(MembersError::Refused(format!(
                "{node} is not a cluster member"
            )));
        }
        self.change_members(vhost, queue, |members| {
            if members.iter().any(|m| m == node) {
                return Err(format!("{node} already holds a replica of '{queue}'"));
            }
            Ok(members.iter().cloned().chain([node.to_string()]).collect())
        })
        .await
    }

    /// Removes `node` from the members of replicated queue `queue` of `vhost` (as
    /// `rabbitmq-queues delete_member`); the last member cannot go.
    pub async fn delete_member(
        &self,
        vhost: &str,
        queue: &str,
        node: &str,
    ) -> Result<(), MembersError> {
        self.change_members(vhost, queue, |members| {
            if !members.iter().any(|m| m == node) {
                return Err(format!("{node} holds no replica of '{queue}'"));
            }
            if members.len() == 1 {
                return Err(format!("{node} holds the last replica of '{queue}'"));
            }
            Ok(members.iter().filter(|m| *m != node).cloned().collect())
        })
        .await
    }

    /// The replicated queues of the cluster: (vhost, queue, members).
    pub fn replicated_queues(&self) -> Vec<(String, String, Vec<String>)> {
        let mut out = Vec::new();
        for (_, value) in self.cluster.meta().machine().with_prefix("q/") {
            if let Some((Placement::Replicated(spec), stored)) = split_queue(&value)
                && let Some(q) = StoredQueue::decode(stored)
            {
                out.push((q.value.vhost, q.value.name, spec.members));
            }
        }
        out
    }

    /// Every replicated queue with its members and the leader the metadata group names.
    pub fn led_queues(&self) -> Vec<LedQueue> {
        self.replicated_queues()
            .into_iter()
            .map(|(vhost, name, members)| LedQueue {
                leader: self.announced_leader(&vhost, &name).map(|(l, _)| l),
                vhost,
                name,
                members,
            })
            .collect()
    }

    /// The Raft group of replicated queue `queue` of `vhost`.
    pub fn replica_group(&self, vhost: &str, queue: &str) -> Option<crate::cluster::wire::GroupId> {
        let value = self
            .cluster
            .meta()
            .machine()
            .get(&super::persist::queue_key(vhost, queue))?;
        match split_queue(&value)? {
            (Placement::Replicated(spec), _) => Some(spec.group),
            _ => None,
        }
    }

    /// Hands the leadership of replicated queue `queue` to member `to`, through the node
    /// that leads it; the leader then, if it moved.
    pub async fn hand_over(
        &self,
        vhost: &str,
        queue: &str,
        to: &str,
    ) -> Result<Option<String>, String> {
        let (leader, _) = self
            .announced_leader(vhost, queue)
            .ok_or_else(|| format!("queue '{queue}' in vhost '{vhost}' has no known leader"))?;
        if leader == self.node {
            return self.hand_over_here(vhost, queue, to).await;
        }
        self.proxies
            .hand_over(&leader, vhost, queue, to)
            .await
            .map_err(|e| e.text)
    }

    /// [`ClusterLink::hand_over`] on the node that leads the queue (never passed on: a
    /// node that no longer leads it answers that it did not move).
    pub async fn hand_over_here(
        &self,
        vhost: &str,
        queue: &str,
        to: &str,
    ) -> Result<Option<String>, String> {
        let group = self
            .replica_group(vhost, queue)
            .ok_or_else(|| format!("queue '{queue}' in vhost '{vhost}' is not replicated"))?;
        Ok(self.replicas.hand_over(group, Some(to)).await)
    }

    /// Replicates classic queue `queue` of `vhost`, homed on this node, that a mirroring
    /// policy matches now: its placement becomes a group of this node alone, which its
    /// messages seed (see [`crate::replica::adopt`]); [`ClusterLink::set_members`] then
    /// grows it. Answered once the metadata group committed the change (false: the queue
    /// changed meanwhile, or is not homed here).
    pub async fn replicate_homed(&self, vhost: &str, queue: &str) -> Result<bool, MembersError> {
        let key = super::persist::queue_key(vhost, queue);
        let value = self
            .cluster
            .meta()
            .machine()
            .get(&key)
            .ok_or(MembersError::NotFound)?;
        let Some((Placement::Home(home), stored)) = split_queue(&value) else {
            return Ok(false);
        };
        if home != self.node {
            return Ok(false);
        }
        let me = vec![self.node.clone()];
        let spec = ReplicaSpec {
            group: rand::random::<u64>() | (1 << 63),
            members: me.clone(),
            initial: me,
        };
        let ticket = self.proposals.submit(vec![MetaCommand::PutIfEqual {
            key,
            value: replicated_queue(&spec, stored),
            expected: value.clone(),
        }]);
        self.proposals
            .wait(ticket.saturating_sub(1), ticket)
            .await
            .map_err(|_| MembersError::NotCommitted)?;
        Ok(true)
    }

    /// Where queue `queue` of `vhost` keeps its messages, as the metadata group says:
    /// `Ok(home)` for a queue on one node, `Err(members)` for a replicated one.
    pub fn placement(&self, vhost: &str, queue: &str) -> Option<Result<String, Vec<String>>> {
        let value = self
            .cluster
            .meta()
            .machine()
            .get(&super::persist::queue_key(vhost, queue))?;
        match split_queue(&value)?.0 {
            Placement::Home(home) => Some(Ok(home)),
            Placement::Replicated(spec) => Some(Err(spec.members)),
        }
    }

    /// Makes `members` the wanted members of replicated queue `queue` of `vhost` (a
    /// mirroring policy changed); the queue's leader then changes its group to match.
    pub async fn set_members(
        &self,
        vhost: &str,
        queue: &str,
        members: Vec<String>,
    ) -> Result<(), MembersError> {
        self.change_members(vhost, queue, |_| Ok(members)).await
    }

    /// Changes a replicated queue's wanted members with `change` (given the current
    /// ones; an error text refuses), through the metadata group.
    async fn change_members(
        &self,
        vhost: &str,
        queue: &str,
        change: impl FnOnce(&[String]) -> Result<Vec<String>, String>,
    ) -> Result<(), MembersError> {
        let key = super::persist::queue_key(vhost, queue);
        let value = self
            .cluster
            .meta()
            .machine()
            .get(&key)
            .ok_or(MembersError::NotFound)?;
        let Some((placement, stored)) = split_queue(&value) else {
            return Err(MembersError::NotFound);
        };
        let Placement::Replicated(mut spec) = placement else {
            return Err(MembersError::Refused(format!(
                "'{queue}' in vhost '{vhost}' is not a replicated queue"
            )));
        };
        spec.members = change(&spec.members).map_err(MembersError::Refused)?;
        let ticket = self.proposals.submit(vec![MetaCommand::PutIfEqual {
            key,
            value: replicated_queue(&spec, stored),
            expected: value.clone(),
        }]);
        self.proposals
            .wait(ticket.saturating_sub(1), ticket)
            .await
            .map_err(|_| MembersError::NotCommitted)
    }
}

/// A queue's value in the metadata group.
fn homed_queue(home: &str, stored: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + home.len() + stored.len());
    v.push(HOMED_QUEUE);
    v.extend_from_slice(&(home.len() as u16).to_be_bytes());
    v.extend_from_slice(home.as_bytes());
    v.extend_from_slice(stored);
    v
}

/// A replicated queue's value in the metadata group.
fn replicated_queue(spec: &ReplicaSpec, stored: &[u8]) -> Vec<u8> {
    let encoded = postcard::to_stdvec(spec).unwrap_or_default();
    let mut v = Vec::with_capacity(5 + encoded.len() + stored.len());
    v.push(REPLICATED_QUEUE);
    v.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    v.extend_from_slice(&encoded);
    v.extend_from_slice(stored);
    v
}

/// `x-quorum-initial-group-size`, when declared (a positive integer).
pub fn initial_group_size(def: &QueueDef) -> Option<usize> {
    use amq_protocol::types::AMQPValue as V;
    let n = match def.arguments.inner().get("x-quorum-initial-group-size")? {
        V::ShortShortInt(n) => i64::from(*n),
        V::ShortShortUInt(n) => i64::from(*n),
        V::ShortInt(n) => i64::from(*n),
        V::ShortUInt(n) => i64::from(*n),
        V::LongInt(n) => i64::from(*n),
        V::LongUInt(n) => i64::from(*n),
        V::LongLongInt(n) => *n,
        _ => return None,
    };
    usize::try_from(n).ok().filter(|n| *n > 0)
}

/// Where a queue's value says it lives, and its stored queue.
fn split_queue(value: &[u8]) -> Option<(Placement, &[u8])> {
    let (&first, rest) = value.split_first()?;
    match first {
        HOMED_QUEUE => {
            let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            let home = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
            Some((Placement::Home(home.to_string()), rest.get(2 + len..)?))
        }
        REPLICATED_QUEUE | REPLICATED_QUEUE_V1 => {
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let encoded = rest.get(4..4 + len)?;
            let spec: ReplicaSpec = if first == REPLICATED_QUEUE {
                postcard::from_bytes(encoded).ok()?
            } else {
                let v1: SpecV1 = postcard::from_bytes(encoded).ok()?;
                ReplicaSpec {
                    group: v1.group,
                    initial: v1.members.clone(),
                    members: v1.members,
                }
            };
            Some((Placement::Replicated(spec), rest.get(4 + len..)?))
        }
        _ => None,
    }
}

/// The home node and the stored queue of a classic queue's value.
#[cfg(test)]
fn split_homed(value: &[u8]) -> Option<(&str, &[u8])> {
    match split_queue(value)? {
        (Placement::Home(_), stored) => {
            let len = u16::from_be_bytes([value[1], value[2]]) as usize;
            Some((std::str::from_utf8(&value[3..3 + len]).ok()?, stored))
        }
        _ => None,
    }
}

/// The agreed definitions as the store's recovery reads them (queue values without their
/// home: [`DefinitionsMirror::reset`] sets the homes once the vhosts are restored).
pub fn agreed_definitions(defs: &Definitions) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(defs.len());
    for (key, value) in defs {
        if key.starts_with(CLUSTER_PREFIX) || key.starts_with(LEADER_PREFIX) {
            continue;
        } else if key.starts_with("q/") {
            let Some((_, stored)) = split_queue(value) else {
                tracing::error!("cluster: agreed queue {key:?} cannot be read");
                continue;
            };
            out.push((key.clone(), stored.to_vec()));
        } else {
            out.push((key.clone(), value.clone()));
        }
    }
    out
}

/// Applies the metadata group's committed changes to this node's vhosts.
#[derive(Debug)]
pub struct DefinitionsMirror {
    broker: Weak<BrokerState>,
    node: String,
}

impl DefinitionsMirror {
    /// The mirror of `broker`'s vhosts on node `node`.
    pub fn new(broker: &Arc<BrokerState>, node: &str) -> Arc<DefinitionsMirror> {
        Arc::new(DefinitionsMirror {
            broker: Arc::downgrade(broker),
            node: node.to_string(),
        })
    }

    fn put(&self, broker: &BrokerState, key: &str, value: &[u8]) {
        if let Some(record) = key.strip_prefix(CLUSTER_PREFIX) {
            broker.access.apply_record(record, Some(value));
            if let Some(vhost) = record.strip_prefix("v/") {
                broker.ensure_vhost(vhost);
            }
            // A policy is in force from its entry on, not from the next tick: a queue
            // the log declares right after it must be made with it.
            broker.refresh_policies();
        } else if key.starts_with("x/") {
            let Some(d) = StoredExchange::decode(value) else {
                return tracing::error!("cluster: agreed exchange {key:?} cannot be read");
            };
            if let (Some(vhost), Some(def)) = (broker.vhost(&d.value.vhost), d.value.def()) {
                vhost.mirror_exchange(def);
            }
        } else if key.starts_with("q/") {
            let Some(q) = split_queue(value).and_then(|(placement, stored)| {
                StoredQueue::decode(stored).map(|q| (placement, q.value))
            }) else {
                return tracing::error!("cluster: agreed queue {key:?} cannot be read");
            };
            let (placement, stored) = q;
            let Some(vhost) = broker.vhost(&stored.vhost) else {
                return;
            };
            match placement {
                Placement::Home(home) => {
                    let home = (home != self.node).then_some(home);
                    vhost.mirror_queue(stored.def(), home);
                }
                Placement::Replicated(spec) => self.put_replicated(broker, &vhost, stored, &spec),
            }
        } else if key.starts_with(LEADER_PREFIX) {
            let Ok((vhost, queue, leader)) =
                postcard::from_bytes::<(String, String, String)>(value)
            else {
                return tracing::error!("cluster: agreed queue leader {key:?} cannot be read");
            };
            if let Some(vhost) = broker.vhost(&vhost)
                && vhost.find_queue(&queue).is_some_and(|q| q.is_replicated())
            {
                let home = (leader != self.node).then_some(leader);
                vhost.set_replica_home(&queue, home);
            }
        } else if key.starts_with("b/") {
            let Some(b) = StoredBinding::decode(value) else {
                return tracing::error!("cluster: agreed binding {key:?} cannot be read");
            };
            if let Some(vhost) = broker.vhost(&b.value.vhost) {
                vhost.restore_binding(b.value);
            }
        }
    }

    /// An agreed replicated queue: its placeholder here (publishes routed on this node
    /// go to its leader), and this node's member of its group when it is one.
    fn put_replicated(
        &self,
        broker: &BrokerState,
        vhost: &Arc<crate::broker::vhost::VHost>,
        stored: StoredQueue,
        spec: &ReplicaSpec,
    ) {
        let member = spec.members.contains(&self.node);
        let def = stored.def();
        // A classic queue of this node that a mirroring policy now replicates (or whose
        // seeding a stop cut short): its messages seed the group, and a new incarnation
        // of the queue takes its place (deliveries of the old one are settled there, in
        // vain: their messages come back redelivered).
        // (Only once the node's groups can start: at start, definitions are put in
        // place before.)
        let mut seed = None;
        if member
            && broker.cluster_link().is_some()
            && let Some(old) = vhost.find_queue(&def.name)
            && old.replica().is_none()
            && vhost.remote_home(&def.name).is_none()
            && old.holds_messages()
        {
            let entries = old.surrender();
            vhost.renew_queue(&old);
            seed = Some(crate::replica::adopt::Seed {
                classic_key: super::persist::queue_key(&vhost.name, &def.name).into(),
                scratch_key: old.scratch_key(),
                entries,
            });
        }
        // The leader it knows stays; a new queue starts with its first member (the node
        // that declared it, which stands first) as leader, until its group says.
        let first = spec.members.first().filter(|f| **f != self.node).cloned();
        let home = match vhost.find_queue(&def.name) {
            Some(_) => vhost.remote_home(&def.name),
            None => first,
        };
        vhost.mirror_queue(def, home);
        let Some(q) = vhost.find_queue(&stored.name) else {
            return;
        };
        // Replicated from the start, before its group runs here: until then nothing
        // takes its messages outside its log (they are refused, and nacked).
        q.mark_replicated();
        q.set_members(spec.members.clone());
        if let Some(link) = broker.cluster_link() {
            if member {
                link.replicas.ensure(spec, vhost, &q, seed);
            } else {
                link.replicas.leave(spec.group);
            }
        }
    }

    /// Starts this node's members of the agreed replicated queues' groups (at start, once
    /// the node's links run; changes after that start them as they are applied).
    pub fn start_replicas(&self, definitions: &Definitions) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        for (key, value) in definitions.range("q/".to_string()..) {
            if !key.starts_with("q/") {
                break;
            }
            if let Some((Placement::Replicated(spec), stored)) = split_queue(value)
                && let Some(q) = StoredQueue::decode(stored)
                && let Some(vhost) = broker.vhost(&q.value.vhost)
            {
                self.put_replicated(&broker, &vhost, q.value, &spec);
            }
        }
    }

    fn gone(&self, broker: &BrokerState, key: &str, old: &[u8]) {
        if let Some(record) = key.strip_prefix(CLUSTER_PREFIX) {
            broker.access.apply_record(record, None);
            if let Some(vhost) = record.strip_prefix("v/") {
                broker.forget_vhost(vhost);
            }
            broker.refresh_policies();
        } else if key.starts_with("x/") {
            if let Some(d) = StoredExchange::decode(old)
                && let Some(vhost) = broker.vhost(&d.value.vhost)
            {
                vhost.mirror_exchange_gone(&d.value.name);
            }
        } else if key.starts_with("q/") {
            let Some((placement, stored)) = split_queue(old) else {
                return;
            };
            if let Some(q) = StoredQueue::decode(stored)
                && let Some(vhost) = broker.vhost(&q.value.vhost)
            {
                vhost.mirror_queue_gone(&q.value.name);
            }
            if let (Placement::Replicated(spec), Some(link)) = (placement, broker.cluster_link()) {
                link.replicas.drop_group(spec.group);
            }
        } else if key.starts_with("b/")
            && let Some(b) = StoredBinding::decode(old)
            && let Some(vhost) = broker.vhost(&b.value.vhost)
        {
            vhost.mirror_binding_gone(&b.value);
        }
    }
}

impl DefinitionsObserver for DefinitionsMirror {
    fn changed(&self, changes: &[DefinitionChange]) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        for c in changes {
            match (&c.old, &c.new) {
                (_, Some(new)) => self.put(&broker, &c.key, new),
                (Some(old), None) => self.gone(&broker, &c.key, old),
                (None, None) => {}
            }
        }
    }

    fn reset(&self, definitions: &Definitions) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        // What is here but not agreed goes (bindings first, then queues and exchanges);
        // then everything agreed is put in place (access records and vhosts first,
        // bindings last). Access records only ever come in here: a node's own seeded
        // user and vhost are not agreed records, and stay.
        let mut local: Vec<(String, Vec<u8>)> = Vec::new();
        for vhost in broker.vhost_list() {
            local.extend(vhost.durable_definitions());
        }
        local.sort_by_key(|(k, _)| !k.starts_with("b/"));
        for (key, value) in &local {
            if !definitions.contains_key(key) {
                let old = if key.starts_with("q/") {
                    homed_queue(&self.node, value)
                } else {
                    value.clone()
                };
                self.gone(&broker, key, &old);
            }
        }
        let mut agreed: Vec<(&String, &Vec<u8>)> = definitions.iter().collect();
        // (Queue leaders after their queues.)
        agreed.sort_by_key(|(k, _)| {
            (
                !k.starts_with(CLUSTER_PREFIX),
                k.starts_with("b/") || k.starts_with(LEADER_PREFIX),
            )
        });
        for (key, value) in agreed {
            self.put(&broker, key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_value_carries_its_home() {
        let v = homed_queue("rabbit@n1", b"\x02stored");
        assert_eq!(split_homed(&v), Some(("rabbit@n1", &b"\x02stored"[..])));
        assert_eq!(split_homed(b"\x02stored"), None, "not a homed value");
        assert_eq!(split_homed(&v[..4]), None, "truncated");
    }
}
