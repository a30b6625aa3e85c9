//! The access-control state machine: users, vhosts and permissions, changed only by
//! applying an [`AccessChange`]. Every change is a plain command, so the same log of
//! commands can later be replicated by a metadata Raft group instead of being written
//! to this node's store alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::records::{
    PermissionRecord, PolicyRecord, TopicPermissionRecord, UserRecord, VHostRecord,
};
use super::{AccessError, password};

/// One change to users, vhosts or permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessChange {
    /// Create or replace a user.
    PutUser(UserRecord),
    /// Delete a user and every permission it has.
    DeleteUser(String),
    /// Create or replace a vhost's metadata.
    PutVHost(VHostRecord),
    /// Delete a vhost and every permission on it.
    DeleteVHost(String),
    /// Set a user's permissions in a vhost.
    SetPermissions(PermissionRecord),
    /// Remove a user's permissions in a vhost: (user, vhost).
    ClearPermissions(String, String),
    /// Set a user's topic permission on one exchange of a vhost.
    SetTopicPermission(TopicPermissionRecord),
    /// Remove a user's topic permissions in a vhost: on one exchange, or on all.
    ClearTopicPermissions {
        /// The user.
        user: String,
        /// The vhost.
        vhost: String,
        /// Only this exchange's (all when `None`).
        exchange: Option<String>,
    },
    /// Create or replace a policy (validated as RabbitMQ validates it).
    PutPolicy(PolicyRecord),
    /// Delete a policy: (vhost, name).
    DeletePolicy(String, String),
}

/// A topic permission, compiled with `{username}` and `{vhost}` already expanded (they
/// are fixed for the record), so a check is one regex match and a channel can cache it.
#[derive(Debug)]
pub struct TopicRule {
    /// As set.
    pub record: TopicPermissionRecord,
    write: Regex,
    read: Regex,
}

impl TopicRule {
    fn compile(record: TopicPermissionRecord) -> Result<TopicRule, AccessError> {
        let expand = |p: &str| {
            p.replace("{username}", &record.user)
                .replace("{vhost}", &record.vhost)
        };
        Ok(TopicRule {
            write: compile(&expand(&record.write))?,
            read: compile(&expand(&record.read))?,
            record,
        })
    }

    /// Whether `key` may be published with (`write`) or bound with (`read`).
    pub fn allows(&self, write: bool, key: &str) -> bool {
        if write {
            self.write.is_match(key)
        } else {
            self.read.is_match(key)
        }
    }
}

/// A user's permissions in one vhost, compiled.
#[derive(Debug, Clone)]
pub(super) struct Permissions {
    pub(super) record: PermissionRecord,
    pub(super) configure: Regex,
    pub(super) write: Regex,
    pub(super) read: Regex,
}

/// Compiles a permission pattern as RabbitMQ reads it: unanchored, and the empty
/// pattern means "nothing" (RabbitMQ turns it into `^$`).
fn compile(pattern: &str) -> Result<Regex, AccessError> {
    let pattern = if pattern.is_empty() { "^$" } else { pattern };
    Regex::new(pattern)
        .map_err(|e| AccessError::Invalid(format!("invalid regular expression '{pattern}': {e}")))
}

impl Permissions {
    pub(super) fn compile(record: PermissionRecord) -> Result<Permissions, AccessError> {
        Ok(Permissions {
            configure: compile(&record.configure)?,
            write: compile(&record.write)?,
            read: compile(&record.read)?,
            record,
        })
    }
}

/// What a changed record means for the store: the record under its key, or its removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persist {
    /// Write `value` under `key`.
    Put(String, Vec<u8>),
    /// Remove `key`.
    Delete(String),
}

/// Every user, vhost and permission of the node.
#[derive(Debug, Default, Clone)]
pub(super) struct AccessState {
    pub(super) users: BTreeMap<String, UserRecord>,
    pub(super) vhosts: BTreeMap<String, VHostRecord>,
    /// Keyed by (vhost, user).
    pub(super) permissions: BTreeMap<(String, String), Permissions>,
    /// Keyed by (vhost, user, exchange).
    pub(super) topic_permissions: BTreeMap<(String, String, String), Arc<TopicRule>>,
    /// Keyed by (vhost, name).
    pub(super) policies: BTreeMap<(String, String), PolicyRecord>,
}

/// Store key of a user record.
pub(super) fn user_key(name: &str) -> String {
    format!("u/{name}")
}

/// Store key of a vhost record.
pub(super) fn vhost_key(name: &str) -> String {
    format!("v/{name}")
}

/// Store key of a topic permission record.
pub(super) fn topic_permission_key(vhost: &str, user: &str, exchange: &str) -> String {
    format!("t/{vhost}\u{0}{user}\u{0}{exchange}")
}

fn topic_key_of(r: &TopicPermissionRecord) -> (String, String, String) {
    (r.vhost.clone(), r.user.clone(), r.exchange.clone())
}

/// Store key of a policy record.
pub(super) fn policy_key(vhost: &str, name: &str) -> String {
    format!("pol/{vhost}\u{0}{name}")
}

/// Store key of a permission record.
pub(super) fn permission_key(vhost: &str, user: &str) -> String {
    format!("p/{vhost}\u{0}{user}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl AccessState {
    /// Rebuilds the state from stored `(key, value)` records; unreadable ones are skipped
    /// with a warning.
    pub(super) fn from_records(records: &[(String, Vec<u8>)]) -> AccessState {
        let mut state = AccessState::default();
        for (key, value) in records {
            state.load_record(key, Some(value));
        }
        state
    }

    /// Sets (`Some`) or removes (`None`) one stored record; `false` (with a warning) when
    /// it cannot be read.
    pub(super) fn load_record(&mut self, key: &str, value: Option<&[u8]>) -> bool {
        let loaded = match (key.split_once('/'), value) {
            (Some(("u", name)), None) => self.users.remove(name).map(drop),
            (Some(("v", name)), None) => self.vhosts.remove(name).map(drop),
            (Some(("p", both)), None) => both.split_once('\u{0}').and_then(|(vhost, user)| {
                self.permissions
                    .remove(&(vhost.to_string(), user.to_string()))
                    .map(drop)
            }),
            (Some(("u", _)), Some(value)) => serde_json::from_slice::<UserRecord>(value)
                .ok()
                .map(|u| self.users.insert(u.name.clone(), u))
                .map(drop),
            (Some(("v", _)), Some(value)) => serde_json::from_slice::<VHostRecord>(value)
                .ok()
                .map(|v| self.vhosts.insert(v.name.clone(), v))
                .map(drop),
            (Some(("p", _)), Some(value)) => serde_json::from_slice::<PermissionRecord>(value)
                .ok()
                .and_then(|p| Permissions::compile(p).ok())
                .map(|p| {
                    let k = (p.record.vhost.clone(), p.record.user.clone());
                    self.permissions.insert(k, p);
                }),
            (Some(("t", all)), None) => {
                let mut parts = all.splitn(3, '\u{0}');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(vhost), Some(user), Some(exchange)) => self
                        .topic_permissions
                        .remove(&(vhost.into(), user.into(), exchange.into()))
                        .map(drop),
                    _ => None,
                }
            }
            (Some(("t", _)), Some(value)) => serde_json::from_slice::<TopicPermissionRecord>(value)
                .ok()
                .and_then(|t| TopicRule::compile(t).ok())
                .map(|t| {
                    let k = topic_key_of(&t.record);
                    self.topic_permissions.insert(k, Arc::new(t));
                }),
            (Some(("pol", both)), None) => both.split_once('\u{0}').and_then(|(vhost, name)| {
                self.policies
                    .remove(&(vhost.to_string(), name.to_string()))
                    .map(drop)
            }),
            (Some(("pol", _)), Some(value)) => {
                serde_json::from_slice::<PolicyRecord>(value).ok().map(|p| {
                    self.policies.insert((p.vhost.clone(), p.name.clone()), p);
                })
            }
            _ => None,
        };
        if loaded.is_none() && value.is_some() {
            tracing::warn!("skipping unreadable access-control record {key:?}");
        }
        loaded.is_some()
    }

    /// Applies `change`, returning what to write to the store; the state is unchanged
    /// when the change is refused.
    pub(super) fn apply(&mut self, change: AccessChange) -> Result<Vec<Persist>, AccessError> {
        match change {
            AccessChange::PutUser(user) => {
                if user.name.is_empty() {
                    return Err(AccessError::Invalid("user name must not be empty".into()));
                }
                if !user.password_hash.is_empty()
                    && !password::is_well_formed(&user.hashing_algorithm, &user.password_hash)
                {
                    return Err(AccessError::Invalid(format!(
                        "password hash of user '{}' is not a {} hash",
                        user.name, user.hashing_algorithm
                    )));
                }
                let put = Persist::Put(user_key(&user.name), json(&user));
                self.users.insert(user.name.clone(), user);
                Ok(vec![put])
            }
            AccessChange::DeleteUser(name) => {
                if self.users.remove(&name).is_none() {
                    return Err(AccessError::NotFound(format!("user '{name}'")));
                }
                let mut out = vec![Persist::Delete(user_key(&name))];
                self.permissions.retain(|(vhost, user), _| {
                    let keep = *user != name;
                    if !keep {
                        out.push(Persist::Delete(permission_key(vhost, user)));
                    }
                    keep
                });
                self.topic_permissions.retain(|(vhost, user, x), _| {
                    let keep = *user != name;
                    if !keep {
                        out.push(Persist::Delete(topic_permission_key(vhost, user, x)));
                    }
                    keep
                });
                Ok(out)
            }
            AccessChange::PutVHost(vhost) => {
                if vhost.name.is_empty() {
                    return Err(AccessError::Invalid("vhost name must not be empty".into()));
                }
                let put = Persist::Put(vhost_key(&vhost.name), json(&vhost));
                self.vhosts.insert(vhost.name.clone(), vhost);
                Ok(vec![put])
            }
            AccessChange::DeleteVHost(name) => {
                if self.vhosts.remove(&name).is_none() {
                    return Err(AccessError::NotFound(format!("vhost '{name}'")));
                }
                let mut out = vec![Persist::Delete(vhost_key(&name))];
                self.permissions.retain(|(vhost, user), _| {
                    let keep = *vhost != name;
                    if !keep {
                        out.push(Persist::Delete(permission_key(vhost, user)));
                    }
                    keep
                });
                self.topic_permissions.retain(|(vhost, user, x), _| {
                    let keep = *vhost != name;
                    if !keep {
                        out.push(Persist::Delete(topic_permission_key(vhost, user, x)));
                    }
                    keep
                });
                self.policies.retain(|(vhost, policy), _| {
                    let keep = *vhost != name;
                    if !keep {
                        out.push(Persist::Delete(policy_key(vhost, policy)));
                    }
                    keep
                });
                Ok(out)
            }
            AccessChange::SetPermissions(record) => {
                if !self.users.contains_key(&record.user) {
                    return Err(AccessError::NotFound(format!("user '{}'", record.user)));
                }
                if !self.vhosts.contains_key(&record.vhost) {
                    return Err(AccessError::NotFound(format!("vhost '{}'", record.vhost)));
                }
                let compiled = Permissions::compile(record)?;
                let r = &compiled.record;
                let put = Persist::Put(permission_key(&r.vhost, &r.user), json(r));
                self.permissions
                    .insert((r.vhost.clone(), r.user.clone()), compiled);
                Ok(vec![put])
            }
            AccessChange::ClearPermissions(user, vhost) => {
                if self
                    .permissions
                    .remove(&(vhost.clone(), user.clone()))
                    .is_none()
                {
                    return Err(AccessError::NotFound(format!(
                        "permissions of user '{user}' in vhost '{vhost}'"
                    )));
                }
                Ok(vec![Persist::Delete(permission_key(&vhost, &user))])
            }
            AccessChange::PutPolicy(policy) => {
                if !self.vhosts.contains_key(&policy.vhost) {
                    return Err(AccessError::NotFound(format!("vhost '{}'", policy.vhost)));
                }
                crate::broker::policy::validate(&policy).map_err(AccessError::Invalid)?;
                let put = Persist::Put(policy_key(&policy.vhost, &policy.name), json(&policy));
                self.policies
                    .insert((policy.vhost.clone(), policy.name.clone()), policy);
                Ok(vec![put])
            }
            AccessChange::DeletePolicy(vhost, name) => {
                if self
                    .policies
                    .remove(&(vhost.clone(), name.clone()))
                    .is_none()
                {
                    return Err(AccessError::NotFound(format!(
                        "policy '{name}' in vhost '{vhost}'"
                    )));
                }
                Ok(vec![Persist::Delete(policy_key(&vhost, &name))])
            }
            AccessChange::SetTopicPermission(record) => {
                if !self.users.contains_key(&record.user) {
                    return Err(AccessError::NotFound(format!("user '{}'", record.user)));
                }
                if !self.vhosts.contains_key(&record.vhost) {
                    return Err(AccessError::NotFound(format!("vhost '{}'", record.vhost)));
                }
                let rule = TopicRule::compile(record)?;
                let r = &rule.record;
                let put = Persist::Put(
                    topic_permission_key(&r.vhost, &r.user, &r.exchange),
                    json(r),
                );
                self.topic_permissions
                    .insert(topic_key_of(r), Arc::new(rule));
                Ok(vec![put])
            }
            AccessChange::ClearTopicPermissions {
                user,
                vhost,
                exchange,
            } => {
                let mut out = Vec::new();
                self.topic_permissions.retain(|(v, u, x), _| {
                    let hit = *v == vhost && *u == user && exchange.as_ref().is_none_or(|e| e == x);
                    if hit {
                        out.push(Persist::Delete(topic_permission_key(v, u, x)));
                    }
                    !hit
                });
                if out.is_empty() {
                    return Err(AccessError::NotFound(format!(
                        "topic permissions of user '{user}' in vhost '{vhost}'"
                    )));
                }
                Ok(out)
            }
        }
    }
}
