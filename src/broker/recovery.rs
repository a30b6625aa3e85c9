//! Rebuilding the broker from what the store read back at start.
//!
//! Recovery never deletes what it could not read: a definition that does not decode (or
//! whose vhost is gone) is logged as an error at every start and stays in the store with
//! the messages of its queue, for an operator to deal with. What it does remove are queue
//! entries whose queue has no definition at all: those were left by a publish that raced
//! the queue's deletion. Definitions stored as JSON by earlier versions are rewritten in
//! the binary format.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::BrokerState;
use super::persist::{self, StoredBinding, StoredDefinition, StoredExchange, StoredQueue};
use crate::queue::{Message, PagedHead};
use crate::store::{Recovered, RecoveredBlob, StoreOp};

impl BrokerState {
    /// Rebuilds durable exchanges, queues, bindings and messages from the store.
    pub fn recover(&self, recovered: Recovered) {
        self.next_msg_id
            .fetch_max(recovered.next_msg_id.max(1), Ordering::Relaxed);
        let defs = &recovered.definitions;
        let mut rewrites: Vec<StoreOp> = Vec::new();
        let mut kept = 0usize;
        let of_kind = |prefix: &'static str| {
            defs.iter()
                .filter(move |(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.as_str(), v.as_slice()))
        };

        for (key, value) in of_kind("x/") {
            let Some(d) = StoredExchange::decode(value) else {
                kept += 1;
                tracing::error!("stored exchange {key:?} cannot be read; it stays in the store");
                continue;
            };
            let (Some(def), Some(vhost)) = (d.value.def(), self.vhost(&d.value.vhost)) else {
                kept += 1;
                tracing::error!(
                    "stored exchange {key:?} (type {:?}, vhost {:?}) cannot be restored; it \
                     stays in the store",
                    d.value.kind,
                    d.value.vhost
                );
                continue;
            };
            vhost.restore_exchange(def);
            if d.legacy {
                rewrites.push(StoreOp::PutDefinition {
                    key: key.to_string(),
                    value: d.value.encode(),
                });
            }
        }

        let mut queues = HashMap::new();
        let mut unrestored_queues: HashSet<&str> = HashSet::new();
        for (key, value) in of_kind("q/") {
            let restored = StoredQueue::decode(value).and_then(|d| {
                let vhost = self.vhost(&d.value.vhost)?;
                Some((vhost.restore_queue(d.value.def()), d))
            });
            let Some((queue, d)) = restored else {
                kept += 1;
                unrestored_queues.insert(key);
                tracing::error!(
                    "stored queue {key:?} cannot be read or its vhost is gone; it and its \
                     messages stay in the store"
                );
                continue;
            };
            queues.insert(key.to_string(), queue);
            if d.legacy {
                rewrites.push(StoreOp::PutDefinition {
                    key: key.to_string(),
                    value: d.value.encode(),
                });
            }
        }

        for (key, value) in of_kind("b/") {
            let Some(d) = StoredBinding::decode(value) else {
                kept += 1;
                tracing::error!("stored binding {key:?} cannot be read; it stays in the store");
                continue;
            };
            let Some(vhost) = self.vhost(&d.value.vhost) else {
                kept += 1;
                tracing::error!("stored binding {key:?} belongs to a vhost that is gone");
                continue;
            };
            if d.legacy {
                // JSON-era keys embedded the arguments as JSON: move to today's key.
                let new_key = persist::binding_key(&d.value.vhost, &d.value);
                if new_key != key {
                    rewrites.push(StoreOp::DeleteDefinition {
                        key: key.to_string(),
                    });
                }
                rewrites.push(StoreOp::PutDefinition {
                    key: new_key,
                    value: d.value.encode(),
                });
            }
            vhost.restore_binding(d.value);
        }

        let mut messages: HashMap<u64, Arc<Message>> = HashMap::new();
        let mut count = 0usize;
        for (key, entries) in recovered.queues {
            let Some(queue) = queues.get(&key) else {
                if unrestored_queues.contains(key.as_str()) {
                    tracing::error!(
                        "{} stored messages of queue {key:?} stay in the store until its \
                         definition can be read",
                        entries.len()
                    );
                } else {
                    tracing::warn!(
                        "removing {} stored messages of queue {key:?}, which no longer exists",
                        entries.len()
                    );
                    rewrites.push(StoreOp::PurgeQueue { queue: key.into() });
                }
                continue;
            };
            for (offset, e) in entries.into_iter().enumerate() {
                let blob = match e.blob {
                    RecoveredBlob::Whole(blob) => blob,
                    RecoveredBlob::OnDisk { words, tail_len } => {
                        // Its body stays in the store until the queue needs it.
                        let head = PagedHead::from_words(words);
                        if queue.restore_paged(
                            offset as u64,
                            e.msg_id,
                            head,
                            tail_len,
                            e.delivered,
                            e.delivery_count.saturating_sub(1),
                        ) {
                            count += 1;
                        } else {
                            tracing::error!(
                                "stored message {} of queue {key:?} cannot be read; it stays in \
                                 the store",
                                e.msg_id
                            );
                        }
                        continue;
                    }
                };
                let msg = match messages.get(&e.msg_id) {
                    Some(m) => m.clone(),
                    None => match persist::decode_message(&blob, e.msg_id) {
                        Some(m) => Arc::new(m),
                        None => {
                            tracing::error!(
                                "stored message {} of queue {key:?} cannot be read; it stays in \
                                 the store",
                                e.msg_id
                            );
                            continue;
                        }
                    },
                };
                let id = e.msg_id;
                let kept = msg.clone();
                let paged = queue.restore(
                    offset as u64,
                    msg,
                    e.delivered,
                    e.delivery_count.saturating_sub(1),
                );
                // Shared with the other queues that hold it, unless this one keeps it on
                // disk only (a backlog past the body window is not all held here).
                if !paged {
                    messages.insert(id, kept);
                }
                count += 1;
            }
        }
        if let Some(store) = &self.store
            && !rewrites.is_empty()
        {
            store.submit(rewrites);
        }
        if kept > 0 {
            tracing::error!(
                definitions = kept,
                "some stored definitions could not be restored (see above); they are kept in \
                 the store"
            );
        }
        tracing::info!(
            definitions = defs.len(),
            messages = count,
            "recovered durable state"
        );
    }
}
