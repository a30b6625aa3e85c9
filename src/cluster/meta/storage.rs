//! The metadata group's log and state machine, kept in memory and made durable in the
//! node's redb file through the store's one writer (so their fsyncs are shared with every
//! other write of the node).
//!
//! - Log: the node's generic Raft log ([`crate::cluster::raft_log`]) for group
//!   [`META_GROUP`].
//! - State machine: the definitions, a map from a broker key to its encoded value (the
//!   broker owns both encodings, as it does for a single node's store). It is rebuilt at
//!   start from the last snapshot (a `raft_state` value) plus the committed log after it.

// openraft's trait methods return its (large) StorageError; the helpers here return the
// same type so that `?` works in them.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::collections::btree_map::Entry as MapEntry;
use std::fmt::Debug;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{MetaCommand, MetaReply, NodeId, TypeConfig};
use crate::cluster::wire::GroupId;
use crate::store::{RecoveredRaftGroup, Store, StoreOp};

/// The metadata group's id on the wire and in the store.
pub const META_GROUP: GroupId = 0;

use crate::cluster::raft_log::{SNAPSHOT, committed_entries, decode, encode, lock};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// The metadata group's log: the node's generic Raft log for group [`META_GROUP`].
pub type LogStore = crate::cluster::raft_log::RaftLog<TypeConfig>;

/// The definitions every node agrees on: broker key -> broker-encoded value.
pub type Definitions = BTreeMap<String, Vec<u8>>;

/// A snapshot as stored and sent: where it stands in the log, and the definitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    definitions: Definitions,
}

/// One definition as a committed command changed it: what was there before and what is
/// there now (`None`: absent). A `PutIfAbsent` that found the key reports the value that
/// stays, so that a node whose own declare lost the race learns the winner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionChange {
    /// Broker key.
    pub key: String,
    /// The value before the command.
    pub old: Option<Vec<u8>>,
    /// The value after it.
    pub new: Option<Vec<u8>>,
}

/// What the broker implements to mirror the agreed definitions in its vhosts: called in
/// log order, before the entry counts as applied on this node (so that a proposer that
/// waited for its entry finds the change in place).
pub trait DefinitionsObserver: Send + Sync {
    /// Committed commands changed these definitions.
    fn changed(&self, changes: &[DefinitionChange]);
    /// The definitions were replaced wholesale (a snapshot from the leader, or a resync
    /// after a failed proposal): make the vhosts match `definitions`.
    fn reset(&self, definitions: &Definitions);
}

#[derive(Debug, Default)]
struct MachineData {
    definitions: Definitions,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
}

/// The metadata state machine: the agreed definitions. Changes are published on a watch
/// channel (the applied log index) so that readers can wait for an entry to be applied.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Store,
    data: Arc<Mutex<MachineData>>,
    applied: watch::Sender<u64>,
    observer: Arc<std::sync::OnceLock<Arc<dyn DefinitionsObserver>>>,
}

impl Debug for dyn DefinitionsObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DefinitionsObserver")
    }
}

impl StateMachine {
    /// The state machine as of the last stored snapshot plus every entry after it that
    /// this node knew to be committed: the definitions this node last agreed to, before
    /// any peer is heard (the broker restores its vhosts, and the messages of its queues,
    /// from them).
    pub fn recover(store: Store, recovered: &RecoveredRaftGroup) -> anyhow::Result<StateMachine> {
        let mut data = MachineData::default();
        if let Some(bytes) = recovered.state.get(SNAPSHOT) {
            let snap: StoredSnapshot = decode(bytes, "metadata snapshot")?;
            data.definitions = snap.definitions.clone();
            data.last_applied = snap.meta.last_log_id;
            data.membership = snap.meta.last_membership.clone();
            data.snapshot = Some(snap);
        }
        let mut ignored = Vec::new();
        for entry in committed_entries::<TypeConfig>(recovered, data.last_applied)? {
            apply_entry(&mut data, entry, &mut ignored);
        }
        let index = data.last_applied.map_or(0, |l| l.index);
        Ok(StateMachine {
            store,
            data: Arc::new(Mutex::new(data)),
            applied: watch::channel(index).0,
            observer: Arc::default(),
        })
    }

    /// Sets who mirrors the definitions (once, before the Raft node starts applying).
    pub fn observe(&self, observer: Arc<dyn DefinitionsObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Tells the observer to make its vhosts match the definitions as applied here (after
    /// a proposal of this node failed: whatever it changed locally in advance is undone).
    pub fn resync(&self) {
        if let Some(o) = self.observer.get() {
            let defs = self.definitions();
            o.reset(&defs);
        }
    }

    /// A copy of the definitions now.
    pub fn definitions(&self) -> Definitions {
        lock(&self.data).definitions.clone()
    }

    /// One definition.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.data).definitions.get(key).cloned()
    }

    /// Every definition whose key starts with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        lock(&self.data)
            .definitions
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The index of the last applied entry, as a watch.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn persist_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        let value = encode(snap)?;
        self.store.submit(vec![StoreOp::RaftPutState {
            group: META_GROUP,
            key: SNAPSHOT.into(),
            value,
        }]);
        Ok(())
    }
}

/// Applies one log entry to the machine, noting the definitions it changed.
fn apply_entry(
    data: &mut MachineData,
    entry: Entry<TypeConfig>,
    changes: &mut Vec<DefinitionChange>,
) -> MetaReply {
    data.last_applied = Some(entry.log_id);
    match entry.payload {
        EntryPayload::Blank => MetaReply { changed: false },
        EntryPayload::Normal(command) => apply_command(&mut data.definitions, command, changes),
        EntryPayload::Membership(m) => {
            data.membership = StoredMembership::new(Some(entry.log_id), m);
            MetaReply { changed: false }
        }
    }
}

/// Applies one command to the definitions, noting what it changed in `changes`.
fn apply_command(
    defs: &mut Definitions,
    command: MetaCommand,
    changes: &mut Vec<DefinitionChange>,
) -> MetaReply {
    match command {
        MetaCommand::Put { key, value } => {
            let old = defs.insert(key.clone(), value.clone());
            let changed = old.is_none();
            changes.push(DefinitionChange {
                key,
                old,
                new: Some(value),
            });
            MetaReply { changed }
        }
        MetaCommand::PutIfAbsent { key, value } => match defs.entry(key.clone()) {
            MapEntry::Vacant(slot) => {
                slot.insert(value.clone());
                changes.push(DefinitionChange {
                    key,
                    old: None,
                    new: Some(value),
                });
                MetaReply { changed: true }
            }
            MapEntry::Occupied(slot) => {
                let current = slot.get().clone();
                changes.push(DefinitionChange {
                    key,
                    old: Some(current.clone()),
                    new: Some(current),
                });
                MetaReply { changed: false }
            }
        },
        MetaCommand::PutIfEqual {
            key,
            expected,
            value,
        } => match defs.get_mut(&key) {
            Some(current) if *current == expected => {
                let old = std::mem::replace(current, value.clone());
                changes.push(DefinitionChange {
                    key,
                    old: Some(old),
                    new: Some(value),
                });
                MetaReply { changed: true }
            }
            _ => MetaReply { changed: false },
        },
        MetaCommand::Delete { key } => {
            let old = defs.remove(&key);
            let changed = old.is_some();
            if changed {
                changes.push(DefinitionChange {
                    key,
                    old,
                    new: None,
                });
            }
            MetaReply { changed }
        }
        MetaCommand::DeletePrefix { prefix } => {
            let keys: Vec<String> = defs
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for k in &keys {
                let old = defs.remove(k);
                changes.push(DefinitionChange {
                    key: k.clone(),
                    old,
                    new: None,
                });
            }
            MetaReply {
                changed: !keys.is_empty(),
            }
        }
        MetaCommand::Batch(commands) => {
            let mut changed = false;
            for c in commands {
                changed |= apply_command(defs, c, changes).changed;
            }
            MetaReply { changed }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let snap = {
            let mut data = lock(&self.data);
            data.snapshots_built += 1;
            let index = data.last_applied.map_or(0, |l| l.index);
            let snap = StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: data.last_applied,
                    last_membership: data.membership.clone(),
                    snapshot_id: format!("{index}-{}", data.snapshots_built),
                },
                definitions: data.definitions.clone(),
            };
            data.snapshot = Some(snap.clone());
            snap
        };
        self.persist_snapshot(&snap)?;
        Ok(Snapshot {
            meta: snap.meta.clone(),
            snapshot: Box::new(Cursor::new(encode(&snap.definitions)?.to_vec())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let data = lock(&self.data);
        Ok((data.last_applied, data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaReply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut changes = Vec::new();
        let last = {
            let mut data = lock(&self.data);
            for entry in entries {
                replies.push(apply_entry(&mut data, entry, &mut changes));
            }
            data.last_applied.map_or(0, |l| l.index)
        };
        if let Some(o) = self.observer.get()
            && !changes.is_empty()
        {
            o.changed(&changes);
        }
        self.applied.send_replace(last);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let definitions: Definitions =
            postcard::from_bytes(snapshot.get_ref()).map_err(|e| StorageError::IO {
                source: StorageIOError::read_snapshot(Some(meta.signature()), AnyError::error(e)),
            })?;
        let snap = StoredSnapshot {
            meta: meta.clone(),
            definitions: definitions.clone(),
        };
        if let Some(o) = self.observer.get() {
            o.reset(&definitions);
        }
        let index = {
            let mut data = lock(&self.data);
            data.definitions = definitions;
            data.last_applied = meta.last_log_id;
            data.membership = meta.last_membership.clone();
            data.snapshot = Some(snap.clone());
            data.last_applied.map_or(0, |l| l.index)
        };
        self.persist_snapshot(&snap)?;
        self.applied.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let snap = lock(&self.data).snapshot.clone();
        match snap {
            None => Ok(None),
            Some(s) => Ok(Some(Snapshot {
                meta: s.meta.clone(),
                snapshot: Box::new(Cursor::new(encode(&s.definitions)?.to_vec())),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_command(defs: &mut Definitions, command: MetaCommand) -> MetaReply {
        super::apply_command(defs, command, &mut Vec::new())
    }

    #[test]
    fn commands_change_the_definitions_as_named() {
        let mut defs = Definitions::new();
        let put = |k: &str, v: &str| MetaCommand::Put {
            key: k.into(),
            value: v.as_bytes().to_vec(),
        };
        assert!(apply_command(&mut defs, put("q/%2f/a", "1")).changed);
        assert!(
            !apply_command(&mut defs, put("q/%2f/a", "2")).changed,
            "replaced"
        );
        assert_eq!(defs["q/%2f/a"], b"2");
        let keep = MetaCommand::PutIfAbsent {
            key: "q/%2f/a".into(),
            value: b"3".to_vec(),
        };
        assert!(!apply_command(&mut defs, keep).changed);
        assert_eq!(defs["q/%2f/a"], b"2", "the first declare wins");
        apply_command(&mut defs, put("b/%2f/a/1", ""));
        apply_command(&mut defs, put("b/%2f/a/2", ""));
        apply_command(&mut defs, put("b/%2f/b/1", ""));
        let gone = MetaCommand::DeletePrefix {
            prefix: "b/%2f/a/".into(),
        };
        assert!(apply_command(&mut defs, gone).changed);
        let left: Vec<&String> = defs.keys().collect();
        assert_eq!(left, ["b/%2f/b/1", "q/%2f/a"]);
        let stale = MetaCommand::PutIfEqual {
            key: "q/%2f/a".into(),
            expected: b"1".to_vec(),
            value: b"4".to_vec(),
        };
        assert!(!apply_command(&mut defs, stale).changed);
        assert_eq!(
            defs["q/%2f/a"], b"2",
            "decided on a value that changed since"
        );
        let fresh = MetaCommand::PutIfEqual {
            key: "q/%2f/a".into(),
            expected: b"2".to_vec(),
            value: b"5".to_vec(),
        };
        assert!(apply_command(&mut defs, fresh).changed);
        assert_eq!(defs["q/%2f/a"], b"5");
        let gone = MetaCommand::PutIfEqual {
            key: "q/%2f/none".into(),
            expected: b"2".to_vec(),
            value: b"5".to_vec(),
        };
        assert!(!apply_command(&mut defs, gone).changed);
        assert!(!defs.contains_key("q/%2f/none"), "never brought back");
        let del = MetaCommand::Delete {
            key: "q/%2f/a".into(),
        };
        assert!(apply_command(&mut defs, del.clone()).changed);
        assert!(!apply_command(&mut defs, del).changed, "already gone");
    }
}
