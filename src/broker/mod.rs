//! The broker's shared state: users, vhosts and, in each vhost, exchanges, bindings and
//! the queue registry. Connections call into it; it never calls into connections.

pub mod alarm;
mod cgroup;
pub mod cluster_defs;
pub mod deadletter;
pub mod definitions;
pub mod disk;
pub mod exchange;
pub mod field_type;
pub mod json;
mod maintenance;
pub mod memory;
pub mod mirror_changes;
pub mod mirroring;
pub mod persist;
pub mod policy;
pub mod rebalance;
mod recovery;
pub mod remote;
pub mod remote_consume;
pub mod reply_to;
pub mod sender_selected;
pub mod vhost;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::auth::{AccessChange, AccessControl, AccessError, VHostRecord};
use crate::config::Config;
use crate::connection::sink::{ConnEvent, ConnShared};
use crate::protocol::{AmqpError, reply::amqp_err};
use crate::queue::journal::Journal;
use crate::store::Store;
pub use exchange::{Binding, Destination, Exchange, ExchangeDef, ExchangeKind};
pub use vhost::VHost;

/// Everything a node shares between its connections.
#[derive(Debug)]
pub struct BrokerState {
    /// Settings the node was started with.
    pub config: Config,
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    next_id: AtomicU64,
    next_msg_id: Arc<AtomicU64>,
    store: Option<Store>,
    journal: Option<Journal>,
    /// Memory and disk alarms.
    pub alarms: alarm::ResourceAlarms,
    /// Live direct reply-to consumers (node-wide: a reply may come from any vhost).
    pub direct_reply_to: reply_to::DirectReplyTo,
    /// Users, vhosts and permissions.
    pub access: AccessControl,
    /// Open connections (after connection.open), by id.
    connections: Mutex<HashMap<u64, ConnectionEntry>>,
    /// Message counters of connections that have ended (see `ConnStats`), plus what the
    /// node did itself on no connection (`count_direct`).
    closed_stats: Mutex<[u64; 10]>,
    /// Connections opened and closed since start (metrics).
    pub connections_opened: AtomicU64,
    /// See `connections_opened`.
    pub connections_closed: AtomicU64,
    /// Set once on a clustered node: how its vhosts reach the metadata group.
    cluster: Arc<OnceLock<cluster_defs::ClusterLink>>,
    /// In maintenance mode (see `maintenance`).
    drained: std::sync::atomic::AtomicBool,
    /// The access-control generation the vhosts' policies were last taken from; held
    /// through a refresh, so refreshes run one at a time.
    policy_generation: Mutex<u64>,
}

impl ConnectionEntry {
    /// RabbitMQ's name of a connection: `client address -> broker address`.
    pub fn name(&self) -> String {
        format!("{} -> {}", self.peer, self.local)
    }

    /// Channels open on it now.
    pub fn channel_count(&self) -> usize {
        self.channel_numbers().len()
    }

    /// Numbers of the channels open on it now.
    pub fn channel_numbers(&self) -> Vec<u16> {
        self.shared
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What the broker knows of an open connection: who it is, and how to reach its task.
#[derive(Debug, Clone)]
pub struct ConnectionEntry {
    /// Node-unique id.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The broker's end of the socket.
    pub local: SocketAddr,
    /// It came over TLS.
    pub tls: bool,
    /// When connection.open succeeded (ms since the epoch).
    pub connected_at_ms: u64,
    /// Authenticated user.
    pub user: String,
    /// The vhost it opened.
    pub vhost: String,
    /// The connection task's shared state (its event channel).
    pub shared: Arc<ConnShared>,
}

/// The paging settings of the node's queues.
fn paging(config: &Config, alarms: &alarm::ResourceAlarms) -> crate::queue::Paging {
    crate::queue::Paging {
        body_window: config.queue_body_window as usize,
        memory_short: alarms.memory_short(),
    }
}

impl BrokerState {
    /// A broker with the vhosts `access` knows, each with its built-in exchanges.
    pub fn new(config: Config, store: Option<Store>, access: AccessControl) -> Arc<BrokerState> {
        let mut vhosts = HashMap::new();
        let next_msg_id = Arc::new(AtomicU64::new(1));
        let cluster: Arc<OnceLock<cluster_defs::ClusterLink>> = Arc::default();
        let alarms = alarm::ResourceAlarms::new(
            config.memory_high_watermark,
            store.as_ref().map(|_| config.data_dir.clone()),
            config.disk_free_limit,
        );
        for v in access.vhosts() {
            let vhost = VHost::new(
                &v.name,
                store.clone(),
                paging(&config, &alarms),
                next_msg_id.clone(),
                cluster.clone(),
            );
            vhosts.insert(v.name, vhost);
        }
        // Measure before any client is served: a node that starts on a full disk must
        // not take publishes in its first tick.
        alarms.check();
        Arc::new(BrokerState {
            config,
            vhosts: RwLock::new(vhosts),
            next_id: AtomicU64::new(1),
            next_msg_id,
            journal: store.clone().map(Journal::new),
            store,
            alarms,
            access,
            connections: Mutex::default(),
            closed_stats: Mutex::default(),
            connections_opened: AtomicU64::new(0),
            connections_closed: AtomicU64::new(0),
            direct_reply_to: Default::default(),
            cluster,
            policy_generation: Mutex::new(u64::MAX),
            drained: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes this a clustered node's broker: durable definitions go to the metadata group.
    pub fn join_cluster(&self, link: cluster_defs::ClusterLink) {
        let _ = self.cluster.set(link);
    }

    /// This node's way into the metadata group, on a clustered node.
    pub fn cluster_link(&self) -> Option<&cluster_defs::ClusterLink> {
        self.cluster.get()
    }

    /// The node's store (None only for brokers started without persistence).
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Where publishes and settlements become durable (None without persistence).
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// The node's message id counter, for others that store messages (replicated
    /// queues' machines).
    pub fn msg_ids(&self) -> Arc<AtomicU64> {
        self.next_msg_id.clone()
    }

    /// An id for a persistent message's stored copy.
    pub fn next_msg_id(&self) -> u64 {
        self.next_msg_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A vhost by name.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Timer work of every vhost (TTL expiry, x-expires).
    pub fn tick(&self) {
        let vhosts: Vec<Arc<VHost>> = self
            .vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let now = crate::queue::now_ms();
        self.alarms.check();
        self.refresh_policies();
        for v in vhosts {
            v.tick(now);
        }
    }

    /// Every vhost, by name.
    pub fn vhost_list(&self) -> Vec<Arc<VHost>> {
        let mut list: Vec<Arc<VHost>> = self
            .vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Creates a vhost (or updates its metadata) with the built-in exchanges.
    pub async fn add_vhost(&self, record: VHostRecord) -> Result<(), AccessError> {
        let name = record.name.clone();
        self.access.change(AccessChange::PutVHost(record)).await?;
        self.ensure_vhost(&name);
        Ok(())
    }

    /// Stores a policy (validated as RabbitMQ does; the error is RabbitMQ's text) and
    /// applies it.
    pub async fn set_policy(&self, policy: crate::auth::PolicyRecord) -> Result<(), String> {
        self.access
            .change(AccessChange::PutPolicy(policy))
            .await
            .map_err(|e| e.to_string())?;
        self.refresh_policies();
        Ok(())
    }

    /// Deletes a policy; the queues it applied to get their declared settings back.
    pub async fn clear_policy(&self, vhost: &str, name: &str) -> Result<(), AccessError> {
        self.access
            .change(AccessChange::DeletePolicy(vhost.into(), name.into()))
            .await?;
        self.refresh_policies();
        Ok(())
    }

    /// Gives every vhost its current policies (each applies the one in force to its
    /// queues when they changed). Called after a policy change, at start, when the
    /// metadata group applies an access record, and from the ticker when access control
    /// changed some other way (definitions import).
    ///
    /// Refreshes run one at a time and a refresh returns only once the policies it saw are
    /// applied: a policy change is answered after its own call, and a ticker refresh
    /// that began first must neither cut that call short nor apply older policies after
    /// it.
    pub fn refresh_policies(&self) {
        let mut applied = self
            .policy_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let generation = self.access.generation();
        if *applied == generation {
            return;
        }
        *applied = generation;
        let all = self.access.policies();
        for v in self.vhost_list() {
            let mine = all.iter().filter(|p| p.vhost == v.name).cloned().collect();
            v.set_policies(mine);
        }
    }

    /// The vhost `name`, created (empty, with its built-in exchanges) if missing.
    pub fn ensure_vhost(&self, name: &str) -> Arc<VHost> {
        self.vhosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| {
                VHost::new(
                    name,
                    self.store.clone(),
                    paging(&self.config, &self.alarms),
                    self.next_msg_id.clone(),
                    self.cluster.clone(),
                )
            })
            .clone()
    }

    /// Drops vhost `name` from this node and closes its connections, keeping what it
    /// stored (a clustered node mirroring a deletion: its exchanges and queues were
    /// deleted by the same agreed batch). Returns the vhost.
    pub fn forget_vhost(&self, name: &str) -> Option<Arc<VHost>> {
        let removed = self
            .vhosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.close_connections(
            |c| c.vhost == name,
            &amqp_err!(ConnectionForced, "vhost '{}' is deleted", name),
        );
        removed
    }

    /// Deletes a vhost: its permissions, queues (with their messages) and exchanges;
    /// connections to it are closed with 320 CONNECTION_FORCED, as RabbitMQ does.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), AccessError> {
        let change = AccessChange::DeleteVHost(name.to_string());
        if self.cluster.get().is_some() {
            // Its definitions go in the same agreed batch; every node's mirror removes
            // them (the home nodes their messages) and then the vhost.
            let also = ["b/", "q/", "x/"]
                .iter()
                .map(|kind| crate::cluster::meta::MetaCommand::DeletePrefix {
                    prefix: format!("{kind}{name}\u{0}"),
                })
                .collect();
            return self.access.change_with(change, also).await;
        }
        self.access.change(change).await?;
        if let Some(v) = self.forget_vhost(name) {
            v.delete_everything();
        }
        Ok(())
    }

    /// Deletes a user and its permissions; its open connections are closed with 320
    /// CONNECTION_FORCED.
    pub async fn delete_user(&self, name: &str) -> Result<(), AccessError> {
        self.access
            .change(AccessChange::DeleteUser(name.to_string()))
            .await?;
        self.close_connections(
            |c| c.user == name,
            &amqp_err!(ConnectionForced, "user '{}' is deleted", name),
        );
        Ok(())
    }

    /// Notes an opened connection (connection.open-ok sent).
    pub fn register_connection(&self, entry: ConnectionEntry) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.id, entry);
    }

    /// Forgets a connection that ended, keeping its message counters in the totals
    /// (both under the registry's lock, so that a reader of the totals never misses it).
    pub fn deregister_connection(&self, id: u64, stats: [u64; 10]) {
        let mut open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if open.remove(&id).is_some() {
            self.connections_closed.fetch_add(1, Ordering::Relaxed);
        }
        let mut closed = self.closed_stats.lock().unwrap_or_else(|p| p.into_inner());
        for (total, n) in closed.iter_mut().zip(stats) {
            *total += n;
        }
    }

    /// Counts messages the node handled itself, on no client connection (a publish or
    /// get through the management API), in the totals (`ConnStats::values` order): in
    /// RabbitMQ those go through a direct connection's channel, so they show in the
    /// overview's message_stats and the channel metrics like any client's.
    pub fn count_direct(&self, stats: [u64; 10]) {
        let mut totals = self.closed_stats.lock().unwrap_or_else(|p| p.into_inner());
        for (total, n) in totals.iter_mut().zip(stats) {
            *total += n;
        }
    }

    /// Message counters (in `ConnStats::values` order) of every connection so far:
    /// the closed ones' totals plus the open ones' current counts.
    pub fn message_totals(&self) -> [u64; 10] {
        let open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mut totals = *self.closed_stats.lock().unwrap_or_else(|p| p.into_inner());
        for c in open.values() {
            for (total, n) in totals.iter_mut().zip(c.shared.stats.values()) {
                *total += n;
            }
        }
        totals
    }

    /// Every open connection, by id.
    pub fn connections(&self) -> Vec<ConnectionEntry> {
        let mut list: Vec<ConnectionEntry> = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Asks every connection matching `which` to close with `reason`; returns how many.
    pub fn close_connections(
        &self,
        which: impl Fn(&ConnectionEntry) -> bool,
        reason: &AmqpError,
    ) -> usize {
        let targets: Vec<ConnectionEntry> = self
            .connections()
            .into_iter()
            .filter(|c| which(c))
            .collect();
        for c in &targets {
            let _ = c.shared.tx.send(ConnEvent::Close(reason.clone()));
        }
        targets.len()
    }

    /// A node-unique id (connections, consumers).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}
