//! Opening: create the tables, check the schema version, read everything back, and delete
//! what no longer belongs (blobs nothing references, entries whose blob is missing).

use std::collections::HashMap;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::schema::{
    ACCESS, DEFINITIONS, ENTRIES, MESSAGES, META, META_SCHEMA_VERSION, RAFT_LOG, RAFT_STATE,
    SCHEMA_VERSION,
};
use super::writer::RefCounts;
use super::{Recovered, RecoveredEntry, RecoveredRaftGroup};

/// What [`load`] read: the broker's part, and the writer's part.
pub(super) struct Loaded {
    /// Handed to the broker.
    pub(super) recovered: Recovered,
    /// Number of entries referencing each stored message (only messages with at least one).
    pub(super) refcounts: RefCounts,
    /// Stored messages that no entry references: deleted by [`clean_up`].
    pub(super) orphans: Vec<u64>,
    /// Entries whose message is missing: dropped from `recovered`, deleted by [`clean_up`].
    pub(super) dangling: Vec<(String, u64)>,
}

/// Every `(key, value)` of a string-keyed blob table, in key order.
fn read_blobs(
    txn: &ReadTransaction,
    table: redb::TableDefinition<&str, &[u8]>,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let table = txn.open_table(table)?;
    let mut out = Vec::with_capacity(usize::try_from(table.len()?).unwrap_or(0));
    for row in table.iter()? {
        let (key, value) = row?;
        out.push((key.value().to_owned(), value.value().to_vec()));
    }
    Ok(out)
}

/// Creates the tables of a new database and checks the schema version of an existing one.
pub(super) fn init_schema(db: &Database) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let stored = meta.get(META_SCHEMA_VERSION)?.map(|v| v.value());
        match stored {
            None => {
                meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => bail!(
                "database schema version {other} is not supported (this Warren reads version {SCHEMA_VERSION})"
            ),
        }
        txn.open_table(DEFINITIONS)?;
        txn.open_table(ACCESS)?;
        txn.open_table(MESSAGES)?;
        txn.open_table(ENTRIES)?;
    }
    txn.commit()?;
    Ok(())
}

/// Reads every definition, message and queue entry.
///
/// Messages are read first, in key order (split into id ranges read on several threads),
/// into a sorted array with one allocation per blob, shared by the entries of every queue
/// holding it. Entries are read next, in key order, which groups them by queue and sorts
/// each queue by offset, so that no sorting or hashing of entries is needed.
pub(super) fn load(db: &Database) -> anyhow::Result<Loaded> {
    let txn = db.begin_read()?;

    let definitions = read_blobs(&txn, DEFINITIONS)?;
    let access = read_blobs(&txn, ACCESS)?;

    let mut messages = read_messages(&txn)?;
    let next_msg_id = messages.ids.last().map_or(0, |max| max.saturating_add(1));

    let mut queues: HashMap<String, Vec<RecoveredEntry>> = HashMap::new();
    let mut dangling = Vec::new();
    {
        let table = txn.open_table(ENTRIES)?;
        // Entries arrive grouped by queue key: keep the current queue's list at hand and
        // allocate its name only once.
        let mut current: Option<(String, Vec<RecoveredEntry>)> = None;
        for row in table.iter()? {
            let (key, value) = row?;
            let (queue, offset) = key.value();
            let (msg_id, delivery_count) = value.value();
            let Some(slot) = messages.slot(msg_id) else {
                dangling.push((queue.to_owned(), offset));
                continue;
            };
            messages.refs[slot] += 1;
            let blob = &messages.blobs[slot];
            let entry = RecoveredEntry {
                offset,
                msg_id,
                blob: blob.clone(),
                delivered: delivery_count > 0,
                delivery_count,
            };
            match &mut current {
                Some((name, list)) if name == queue => list.push(entry),
                _ => {
                    if let Some((name, list)) = current.take() {
                        queues.insert(name, list);
                    }
                    current = Some((queue.to_owned(), vec![entry]));
                }
            }
        }
        if let Some((name, list)) = current {
            queues.insert(name, list);
        }
    }
    if !dangling.is_empty() {
        tracing::warn!(
            entries = dangling.len(),
            "store: dropping queue entries whose message is missing"
        );
    }

    let mut refcounts = RefCounts::with_capacity_and_hasher(messages.ids.len(), Default::default());
    let mut orphans = Vec::new();
    for (&id, &refs) in messages.ids.iter().zip(&messages.refs) {
        if refs == 0 {
            orphans.push(id);
        } else {
            refcounts.insert(id, refs);
        }
    }
    if !orphans.is_empty() {
        tracing::info!(
            messages = orphans.len(),
            "store: deleting messages that no queue entry references"
        );
    }

    let raft = read_raft(&txn)?;

    Ok(Loaded {
        recovered: Recovered {
            definitions,
            access,
            queues,
            next_msg_id,
            raft,
        },
        refcounts,
        orphans,
        dangling,
    })
}

/// Deletes the orphans and dangling entries that [`load`] found, in one durable commit.
pub(super) fn clean_up(db: &Database, loaded: &Loaded) -> anyhow::Result<()> {
    if loaded.orphans.is_empty() && loaded.dangling.is_empty() {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let mut messages = txn.open_table(MESSAGES)?;
        for id in &loaded.orphans {
            messages.remove(*id)?;
        }
        let mut entries = txn.open_table(ENTRIES)?;
        for (queue, offset) in &loaded.dangling {
            entries.remove((queue.as_str(), *offset))?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Every stored message, sorted by id, with a fast id -> position lookup.
struct Messages {
    /// Sorted msg ids.
    ids: Vec<u64>,
    /// `blobs[i]` is the blob of `ids[i]`.
    blobs: Vec<Bytes>,
    /// `refs[i]` counts the entries found so far that reference `ids[i]`.
    refs: Vec<u32>,
    /// When ids are dense (as the broker allocates them): position of `ids[0] + k` at `k`,
    /// or `u32::MAX` for a gap. Otherwise empty, and lookups binary-search `ids`.
    dense: Vec<u32>,
}

impl Messages {
    fn new(ids: Vec<u64>, blobs: Vec<Bytes>) -> Messages {
        let refs = vec![0; ids.len()];
        let mut dense = Vec::new();
        if let (Some(&first), Some(&last)) = (ids.first(), ids.last()) {
            let span = last - first;
            // At most 4 bytes of index per possible id, and at most twice as many ids as
            // messages: dense is then no bigger than the ids themselves.
            if span < 2 * ids.len() as u64 && ids.len() < u32::MAX as usize {
                dense = vec![u32::MAX; span as usize + 1];
                for (position, &id) in ids.iter().enumerate() {
                    dense[(id - first) as usize] = position as u32;
                }
            }
        }
        Messages {
            ids,
            blobs,
            refs,
            dense,
        }
    }

    /// Position of `msg_id`, if stored.
    fn slot(&self, msg_id: u64) -> Option<usize> {
        if self.dense.is_empty() {
            return self.ids.binary_search(&msg_id).ok();
        }
        let first = *self.ids.first()?;
        let k = usize::try_from(msg_id.checked_sub(first)?).ok()?;
        match self.dense.get(k) {
            Some(&position) if position != u32::MAX => Some(position as usize),
            _ => None,
        }
    }
}

/// Reads the messages table, split into id ranges scanned in parallel (up to 8 threads, one
/// per 10,000 messages at least): recovery time is dominated by copying the blobs out of the
/// file into fresh memory, which can use several cores.
fn read_messages(txn: &ReadTransaction) -> anyhow::Result<Messages> {
    let table = txn.open_table(MESSAGES)?;
    let first = table.first()?.map(|(id, _)| id.value());
    let last = table.last()?.map(|(id, _)| id.value());
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(Messages::new(Vec::new(), Vec::new()));
    };
    let len = usize::try_from(table.len()?).context("message count")?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts = threads.clamp(1, 8).min(len.div_ceil(10_000)).max(1) as u64;
    let step = (last - first) / parts + 1;

    let scan = |part: u64| -> anyhow::Result<(Vec<u64>, Vec<Bytes>)> {
        let lo = first.saturating_add(part.saturating_mul(step));
        let hi = lo.saturating_add(step);
        let expect = len / parts as usize + 1;
        let mut ids = Vec::with_capacity(expect);
        let mut blobs = Vec::with_capacity(expect);
        let range = if part + 1 == parts {
            table.range(lo..)?
        } else {
            table.range(lo..hi)?
        };
        for row in range {
            let (id, blob) = row?;
            ids.push(id.value());
            blobs.push(Bytes::copy_from_slice(blob.value()));
        }
        Ok((ids, blobs))
    };
    let results: Vec<anyhow::Result<(Vec<u64>, Vec<Bytes>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..parts)
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .name("warren-recovery".into())
                    .spawn_scoped(s, move || scan(part));
                (part, spawned)
            })
            .collect();
        let mut results = vec![scan(0)];
        for (part, spawned) in handles {
            results.push(match spawned {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a recovery thread panicked"))),
                // No thread to be had: scan that range here.
                Err(_) => scan(part),
            });
        }
        results
    });
    let mut ids = Vec::with_capacity(len);
    let mut blobs = Vec::with_capacity(len);
    for result in results {
        let (part_ids, part_blobs) = result?;
        ids.extend(part_ids);
        blobs.extend(part_blobs);
    }
    Ok(Messages::new(ids, blobs))
}

/// Reads every Raft group's log and values; none when the tables were never created
/// (a single node).
fn read_raft(txn: &ReadTransaction) -> anyhow::Result<HashMap<u64, RecoveredRaftGroup>> {
    let mut groups: HashMap<u64, RecoveredRaftGroup> = HashMap::new();
    match txn.open_table(RAFT_LOG) {
        Ok(table) => {
            for row in table.iter()? {
                let (key, value) = row?;
                let (group, index) = key.value();
                groups
                    .entry(group)
                    .or_default()
                    .log
                    .push((index, value.value().to_vec()));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match txn.open_table(RAFT_STATE) {
        Ok(table) => {
            for row in table.iter()? {
                let (key, value) = row?;
                let (group, name) = key.value();
                groups
                    .entry(group)
                    .or_default()
                    .state
                    .insert(name.to_owned(), value.value().to_vec());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(groups)
}
