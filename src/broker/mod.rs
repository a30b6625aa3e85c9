//! The broker's shared state: users, vhosts and, in each vhost, exchanges, bindings and
//! the queue registry. Connections call into it; it never calls into connections.

pub mod exchange;
pub mod vhost;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::Config;
pub use exchange::{Binding, Destination, Exchange, ExchangeDef, ExchangeKind};
pub use vhost::VHost;

/// Everything a node shares between its connections.
#[derive(Debug)]
pub struct BrokerState {
    /// Settings the node was started with.
    pub config: Config,
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    next_id: AtomicU64,
}

impl BrokerState {
    /// A broker with the default vhost and its built-in exchanges.
    pub fn new(config: Config) -> Arc<BrokerState> {
        let mut vhosts = HashMap::new();
        vhosts.insert(
            config.default_vhost.clone(),
            VHost::new(&config.default_vhost),
        );
        Arc::new(BrokerState {
            config,
            vhosts: RwLock::new(vhosts),
            next_id: AtomicU64::new(1),
        })
    }

    /// A vhost by name.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
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
