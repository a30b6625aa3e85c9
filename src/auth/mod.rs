//! Access control: users (RabbitMQ-compatible password hashes and tags), vhosts, and
//! configure / write / read permissions, checked on every AMQP method that touches a
//! resource, with RabbitMQ's `403 ACCESS_REFUSED` texts.
//!
//! [`AccessControl`] is the one place that holds these definitions. Everything changes
//! through [`AccessControl::change`], which applies an [`AccessChange`] to the in-memory
//! state machine and writes the records through the node's store writer (the `access`
//! table). A metadata Raft group can later take over by replicating the same commands.

pub mod password;
pub mod records;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

pub use records::{PermissionRecord, PolicyRecord, TopicPermissionRecord, UserRecord, VHostRecord};
pub use state::{AccessChange, TopicRule};
use state::{AccessState, Persist};

use crate::cluster::meta::MetaCommand;
use crate::cluster::meta::proposals::Proposals;
use crate::config::Config;
use crate::protocol::{AmqpError, reply::amqp_err};
use crate::store::{Store, StoreOp};

/// Why a change to users, vhosts or permissions was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessError {
    /// The named user, vhost or permission does not exist.
    NotFound(String),
    /// The change is malformed (bad regex, bad hash, empty name).
    Invalid(String),
    /// On a clustered node: the metadata group did not commit the change in time.
    Unavailable(String),
}

impl std::fmt::Display for AccessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessError::NotFound(what) => write!(f, "{what} not found"),
            AccessError::Invalid(why) | AccessError::Unavailable(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for AccessError {}

/// The three kinds of access RabbitMQ distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Declare and delete.
    Configure,
    /// Publish to, bind to.
    Write,
    /// Consume from, bind from, purge.
    Read,
}

/// Kinds of resource a permission covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// An exchange (the default exchange is named `amq.default` for checks).
    Exchange,
    /// A queue.
    Queue,
}

impl ResourceKind {
    fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Exchange => "exchange",
            ResourceKind::Queue => "queue",
        }
    }
}

/// Users, vhosts and permissions of the node, and the checks made against them.
#[derive(Debug)]
pub struct AccessControl {
    state: RwLock<AccessState>,
    store: Option<Store>,
    /// Bumped on every change, so that channels can cache checks (publish) cheaply.
    generation: AtomicU64,
    loopback_users: Vec<String>,
    /// Set on a clustered node: changes are proposed to the metadata group and applied
    /// (on every node) as they are committed, through [`AccessControl::apply_record`].
    cluster: OnceLock<Proposals>,
}

/// Prefix of access-control records among the metadata group's definitions.
pub const CLUSTER_PREFIX: &str = "a/";

impl AccessControl {
    /// Loads the stored records. On a node with neither users nor vhosts (first start),
    /// creates `default_vhost` and `default_user` (tag administrator, all permissions on
    /// it), as RabbitMQ does, and stores them.
    pub async fn open(
        records: &[(String, Vec<u8>)],
        store: Option<Store>,
        config: &Config,
    ) -> AccessControl {
        let access = AccessControl {
            state: RwLock::new(AccessState::from_records(records)),
            store,
            generation: AtomicU64::new(0),
            loopback_users: config.loopback_users.clone(),
            cluster: OnceLock::new(),
        };
        let fresh = {
            let s = access.read();
            s.users.is_empty() && s.vhosts.is_empty()
        };
        if fresh {
            let seed = [
                AccessChange::PutVHost(VHostRecord {
                    name: config.default_vhost.clone(),
                    description: "Default virtual host".into(),
                    tags: Vec::new(),
                }),
                AccessChange::PutUser(UserRecord {
                    name: config.default_user.clone(),
                    password_hash: password::hash(&config.default_pass),
                    hashing_algorithm: password::SHA256.into(),
                    tags: vec!["administrator".into()],
                }),
                AccessChange::SetPermissions(PermissionRecord {
                    user: config.default_user.clone(),
                    vhost: config.default_vhost.clone(),
                    configure: ".*".into(),
                    write: ".*".into(),
                    read: ".*".into(),
                }),
            ];
            for change in seed {
                if let Err(e) = access.change(change).await {
                    tracing::error!("cannot create the default user and vhost: {e}");
                }
            }
            tracing::info!(
                user = %config.default_user,
                vhost = %config.default_vhost,
                "created the default user and vhost"
            );
        }
        access
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, AccessState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` and returns once it is stored durably.
    pub async fn change(&self, change: AccessChange) -> Result<(), AccessError> {
        self.change_with(change, Vec::new()).await
    }

    /// [`AccessControl::change`]; on a clustered node `also` (definition changes that go
    /// with it, e.g. a deleted vhost's exchanges and queues) is proposed before it in the
    /// same batch.
    pub async fn change_with(
        &self,
        change: AccessChange,
        also: Vec<MetaCommand>,
    ) -> Result<(), AccessError> {
        if let Some(proposals) = self.cluster.get() {
            // Validated on a copy; the state changes when the group commits it.
            let persisted = self.read().clone().apply(change)?;
            let mut commands = also;
            commands.extend(persisted.into_iter().map(|p| match p {
                Persist::Put(key, value) => MetaCommand::Put {
                    key: format!("{CLUSTER_PREFIX}{key}"),
                    value,
                },
                Persist::Delete(key) => MetaCommand::Delete {
                    key: format!("{CLUSTER_PREFIX}{key}"),
                },
            }));
            let ticket = proposals.submit(commands);
            return proposals.wait(ticket - 1, ticket).await.map_err(|e| {
                AccessError::Unavailable(format!("the metadata store operation timed out: {e}"))
            });
        }
        let committed = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            let persisted = state.apply(change)?;
            self.generation.fetch_add(1, Ordering::Release);
            let ops: Vec<StoreOp> = persisted
                .into_iter()
                .map(|p| match p {
                    Persist::Put(key, value) => StoreOp::PutAccess { key, value },
                    Persist::Delete(key) => StoreOp::DeleteAccess { key },
                })
                .collect();
            // Queued under the lock, so the store sees changes in the order applied.
            self.store.as_ref().map(|s| s.commit(ops))
        };
        if let Some(done) = committed {
            done.await;
        }
        Ok(())
    }

    /// Makes this a clustered node's access control (see the `cluster` field).
    pub fn join_cluster(&self, proposals: Proposals) {
        let _ = self.cluster.set(proposals);
    }

    /// A committed access-control record of the metadata group (`key` without
    /// [`CLUSTER_PREFIX`]): set, or removed when `value` is `None`.
    pub fn apply_record(&self, key: &str, value: Option<&[u8]>) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.load_record(key, value) {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Counter of changes so far: a cached check is valid while it is unchanged.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Creates or updates a user with a new password (hashed here) and tags.
    pub async fn put_user(
        &self,
        name: &str,
        password: &str,
        tags: Vec<String>,
    ) -> Result<(), AccessError> {
        self.change(AccessChange::PutUser(UserRecord {
            name: name.into(),
            password_hash: password::hash(password),
            hashing_algorithm: password::SHA256.into(),
            tags,
        }))
        .await
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<UserRecord> {
        self.read().users.values().cloned().collect()
    }

    /// One user.
    pub fn user(&self, name: &str) -> Option<UserRecord> {
        self.read().users.get(name).cloned()
    }

    /// Every vhost, by name.
    pub fn vhosts(&self) -> Vec<VHostRecord> {
        self.read().vhosts.values().cloned().collect()
    }

    /// One vhost.
    pub fn vhost(&self, name: &str) -> Option<VHostRecord> {
        self.read().vhosts.get(name).cloned()
    }

    /// Every permission, by vhost then user.
    pub fn permissions(&self) -> Vec<PermissionRecord> {
        self.read()
            .permissions
            .values()
            .map(|p| p.record.clone())
            .collect()
    }

    /// Every policy, by vhost and name.
    pub fn policies(&self) -> Vec<PolicyRecord> {
        self.read().policies.values().cloned().collect()
    }

    /// The policies of one vhost.
    pub fn vhost_policies(&self, vhost: &str) -> Vec<PolicyRecord> {
        self.read()
            .policies
            .values()
            .filter(|p| p.vhost == vhost)
            .cloned()
            .collect()
    }

    /// Every topic permission, by vhost, user and exchange.
    pub fn topic_permissions(&self) -> Vec<TopicPermissionRecord> {
        self.read()
            .topic_permissions
            .values()
            .map(|t| t.record.clone())
            .collect()
    }

    /// `user`'s topic permission on `exchange` in `vhost`, if one is set: without one,
    /// every routing key is allowed, as in RabbitMQ. Channels cache the rule.
    pub fn topic_rule(&self, user: &str, vhost: &str, exchange: &str) -> Option<Arc<TopicRule>> {
        self.read()
            .topic_permissions
            .get(&(vhost.to_string(), user.to_string(), exchange.to_string()))
            .cloned()
    }

    /// RabbitMQ's 403 for a routing or binding key a topic permission refuses.
    pub fn topic_refused(user: &str, vhost: &str, exchange: &str, key: &str) -> AmqpError {
        amqp_err!(
            AccessRefused,
            "access to topic '{}' in exchange '{}' in vhost '{}' refused for user '{}'",
            key,
            exchange,
            vhost,
            user
        )
    }

    /// Topic authorisation of a key on a topic exchange: `write` for a publish's
    /// routing key, read for a binding key (queue and exchange binds and unbinds).
    pub fn check_topic(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        key: &str,
        write: bool,
    ) -> Result<(), AmqpError> {
        match self.topic_rule(user, vhost, exchange) {
            Some(rule) if !rule.allows(write, key) => {
                Err(Self::topic_refused(user, vhost, exchange, key))
            }
            _ => Ok(()),
        }
    }

    /// The user named `user` if `password` is theirs.
    pub fn authenticate(&self, user: &str, password: &str) -> Option<UserRecord> {
        let state = self.read();
        let u = state.users.get(user)?;
        if u.password_hash.is_empty() {
            return None;
        }
        password::verify(&u.hashing_algorithm, &u.password_hash, password).then(|| u.clone())
    }

    /// Whether `user` may log in only from loopback addresses (`loopback_users`).
    pub fn loopback_only(&self, user: &str) -> bool {
        self.loopback_users.iter().any(|u| u == user)
    }

    /// connection.open: the vhost must exist (530 "vhost X not found") and the user
    /// must have permissions in it (530 "access to vhost ... refused").
    pub fn check_vhost(&self, user: &str, vhost: &str) -> Result<(), AmqpError> {
        let state = self.read();
        if !state.vhosts.contains_key(vhost) {
            return Err(amqp_err!(NotAllowed, "vhost {} not found", vhost));
        }
        if !state
            .permissions
            .contains_key(&(vhost.to_string(), user.to_string()))
        {
            return Err(amqp_err!(
                NotAllowed,
                "access to vhost '{}' refused for user '{}'",
                vhost,
                user
            ));
        }
        Ok(())
    }

    /// Whether `user` has `permission` on a resource, as RabbitMQ decides it: the
    /// user's pattern for the vhost matches the name anywhere (unanchored).
    pub fn allowed(
        &self,
        user: &str,
        vhost: &str,
        kind: ResourceKind,
        name: &str,
        permission: Permission,
    ) -> bool {
        let name = if kind == ResourceKind::Exchange && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        let state = self.read();
        let Some(p) = state
            .permissions
            .get(&(vhost.to_string(), user.to_string()))
        else {
            return false;
        };
        match permission {
            Permission::Configure => &p.configure,
            Permission::Write => &p.write,
            Permission::Read => &p.read,
        }
        .is_match(name)
    }

    /// [`AccessControl::allowed`] as an AMQP check: 403 ACCESS_REFUSED with RabbitMQ's
    /// text when refused.
    pub fn check(
        &self,
        user: &str,
        vhost: &str,
        kind: ResourceKind,
        name: &str,
        permission: Permission,
    ) -> Result<(), AmqpError> {
        if self.allowed(user, vhost, kind, name, permission) {
            return Ok(());
        }
        let shown = if kind == ResourceKind::Exchange && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        Err(amqp_err!(
            AccessRefused,
            "access to {} '{}' in vhost '{}' refused for user '{}'",
            kind.as_str(),
            shown,
            vhost,
            user
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fresh() -> AccessControl {
        AccessControl::open(&[], None, &Config::defaults()).await
    }

    fn perms(user: &str, vhost: &str, c: &str, w: &str, r: &str) -> AccessChange {
        AccessChange::SetPermissions(PermissionRecord {
            user: user.into(),
            vhost: vhost.into(),
            configure: c.into(),
            write: w.into(),
            read: r.into(),
        })
    }

    #[tokio::test]
    async fn first_start_creates_guest_with_all_rights_on_the_default_vhost() {
        let a = fresh().await;
        let guest = a.authenticate("guest", "guest").expect("guest logs in");
        assert_eq!(guest.tags, vec!["administrator"]);
        assert!(a.authenticate("guest", "wrong").is_none());
        assert!(a.check_vhost("guest", "/").is_ok());
        assert!(a.allowed(
            "guest",
            "/",
            ResourceKind::Queue,
            "q",
            Permission::Configure
        ));
        assert!(a.loopback_only("guest"));
    }

    #[tokio::test]
    async fn patterns_are_unanchored_and_empty_means_nothing_but_amq_default_is_named() {
        let a = fresh().await;
        a.put_user("bob", "pw", vec![]).await.expect("user");
        a.change(perms("bob", "/", "^bob-", "x", ""))
            .await
            .expect("perms");
        let q = ResourceKind::Queue;
        assert!(a.allowed("bob", "/", q, "bob-1", Permission::Configure));
        assert!(!a.allowed("bob", "/", q, "alice-bob-1", Permission::Configure));
        assert!(a.allowed("bob", "/", q, "a-x-b", Permission::Write));
        assert!(!a.allowed("bob", "/", q, "q", Permission::Read));
        assert!(!a.allowed("bob", "/", q, "", Permission::Configure));
        // The default exchange is checked as amq.default, which "^$" does not match.
        assert!(!a.allowed("bob", "/", ResourceKind::Exchange, "", Permission::Read));
        let e = a
            .check("bob", "/", ResourceKind::Exchange, "", Permission::Write)
            .expect_err("refused");
        assert_eq!(
            e.reply_text(),
            "ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' refused for user 'bob'"
        );
    }

    #[tokio::test]
    async fn bad_changes_are_refused_and_leave_the_state_alone() {
        let a = fresh().await;
        let before = a.generation();
        assert!(matches!(
            a.change(perms("nobody", "/", ".*", ".*", ".*")).await,
            Err(AccessError::NotFound(_))
        ));
        assert!(matches!(
            a.change(perms("guest", "/", "(", ".*", ".*")).await,
            Err(AccessError::Invalid(_))
        ));
        assert_eq!(a.generation(), before);
        assert!(a.allowed(
            "guest",
            "/",
            ResourceKind::Queue,
            "q",
            Permission::Configure
        ));
    }

    #[tokio::test]
    async fn deleting_a_user_or_vhost_takes_its_permissions_along() {
        let a = fresh().await;
        a.change(AccessChange::PutVHost(VHostRecord {
            name: "v".into(),
            description: String::new(),
            tags: vec![],
        }))
        .await
        .expect("vhost");
        a.change(perms("guest", "v", ".*", ".*", ".*"))
            .await
            .expect("perms");
        assert_eq!(a.permissions().len(), 2);
        a.change(AccessChange::DeleteVHost("v".into()))
            .await
            .expect("deleted");
        assert_eq!(a.permissions().len(), 1);
        a.change(AccessChange::DeleteUser("guest".into()))
            .await
            .expect("deleted");
        assert!(a.permissions().is_empty());
        assert!(a.authenticate("guest", "guest").is_none());
    }
}
