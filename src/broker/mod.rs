//! The broker's shared state: users, vhosts and, in each vhost, exchanges, bindings and
//! the queue registry. Connections call into it; it never calls into connections.

pub mod alarm;
mod cgroup;
pub mod deadletter;
pub mod disk;
pub mod exchange;
pub mod field_type;
pub mod memory;
pub mod persist;
mod recovery;
pub mod reply_to;
pub mod sender_selected;
pub mod vhost;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::Config;
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
    /// Memory and disk alarms.
    pub alarms: alarm::ResourceAlarms,
    /// Live direct reply-to consumers (node-wide: a reply may come from any vhost).
    pub direct_reply_to: reply_to::DirectReplyTo,
}

impl BrokerState {
    /// A broker with the default vhost and its built-in exchanges.
    pub fn new(config: Config, store: Option<Store>) -> Arc<BrokerState> {
        let mut vhosts = HashMap::new();
        let next_msg_id = Arc::new(AtomicU64::new(1));
        let alarms = alarm::ResourceAlarms::new(
            config.memory_high_watermark,
            store.as_ref().map(|_| config.data_dir.clone()),
            config.disk_free_limit,
        );
        vhosts.insert(
            config.default_vhost.clone(),
            VHost::new(&config.default_vhost, store.clone(), next_msg_id.clone()),
        );
        // Measure before any client is served: a node that starts on a full disk must
        // not take publishes in its first tick.
        alarms.check();
        Arc::new(BrokerState {
            config,
            vhosts: RwLock::new(vhosts),
            next_id: AtomicU64::new(1),
            next_msg_id,
            store,
            alarms,
            direct_reply_to: Default::default(),
        })
    }

    /// The node's store (None only for brokers started without persistence).
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
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
        for v in vhosts {
            v.tick(now);
        }
    }

    /// Checks a login. Only the configured default user exists for now.
    pub fn authenticate(&self, user: &str, pass: &str) -> bool {
        user == self.config.default_user && pass == self.config.default_pass
    }

    /// Whether `user` may log in only from loopback addresses.
    pub fn loopback_only(&self, user: &str) -> bool {
        self.config.loopback_users.iter().any(|u| u == user)
    }

    /// A node-unique id (connections, consumers).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}
