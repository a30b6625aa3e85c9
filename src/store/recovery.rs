//! Opening: create the tables (or convert a version 1 database), check the schema
//! version, read everything back, and truncate what no longer belongs (dead head chunks of
//! the message log, entries whose message is missing).

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::bail;
use bytes::Bytes;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};

use super::log::{self, ChunkId, ChunkWriter, HeadSplit, LiveIndex};
use super::schema::{
    ACCESS, DEFINITIONS, MESSAGE_BODIES, MESSAGE_LOG, META, META_SCHEMA_VERSION, RAFT_CHUNKS,
    RAFT_STATE, SCHEMA_VERSION, V1_ENTRIES, V1_MESSAGES, V3_RAFT_LOG,
};
use super::writer::IdBuildHasher;
use super::{BlobTrim, Recovered, RecoveredRaftGroup};

/// What [`load`] read: the broker's part, and the writer's part.
pub(super) struct Loaded {
    /// Handed to the broker.
    pub(super) recovered: Recovered,
    /// The message log's live state, for the writer.
    pub(super) index: LiveIndex,
    /// The Raft log's live state, for the writer.
    pub(super) raft_index: LiveIndex,
    /// Entries whose message is missing: dropped from `recovered`, settled by [`clean_up`].
    pub(super) dangling: Vec<(String, u64)>,
    /// Scratch queues holding entries: not in `recovered`, purged by [`clean_up`].
    pub(super) scratch: Vec<String>,
}

/// Every `(key, value)` of a string-keyed blob table, in key order.
fn read_blobs(
    txn: &ReadTransaction,
    table: redb::TableDefinition<&str, &[u8]>,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use redb::ReadableTableMetadata as _;
    let table = txn.open_table(table)?;
    let mut out = Vec::with_capacity(usize::try_from(table.len()?).unwrap_or(0));
    for row in table.iter()? {
        let (key, value) = row?;
        out.push((key.value().to_owned(), value.value().to_vec()));
    }
    Ok(out)
}

/// Creates the tables of a new database, converts a version 1 database, and checks the
/// schema version of an existing one.
pub(super) fn init_schema(db: &Database, split: HeadSplit) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(META)?;
        let stored = meta.get(META_SCHEMA_VERSION)?.map(|v| v.value());
        match stored {
            None => {
                meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
            }
            Some(SCHEMA_VERSION) => {}
            // Its chunks (format 1, blobs inline) are read as they are; its Raft logs
            // move into `raft_chunks`.
            Some(2 | 3) => {
                migrate_raft_rows(&txn)?;
                meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
            }
            Some(1) => {
                migrate_v1(&txn, split)?;
                meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
            }
            Some(other) => bail!(
                "database schema version {other} is not supported (this Warren reads version {SCHEMA_VERSION})"
            ),
        }
        txn.open_table(DEFINITIONS)?;
        txn.open_table(ACCESS)?;
        txn.open_table(MESSAGE_LOG)?;
        txn.open_table(MESSAGE_BODIES)?;
    }
    txn.commit()?;
    Ok(())
}

/// Chunks written by [`migrate_v1`] are cut at about this size, as a group commit's are.
const MIGRATION_CHUNK_BYTES: usize = 16 << 20;

/// Converts version 1's tables (a row per message, a row per entry) into message log
/// chunks, in the same transaction as the version bump, then drops them. Messages no
/// entry names are left behind, entries whose message is missing too (with a warning).
fn migrate_v1(txn: &WriteTransaction, split: HeadSplit) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut chunks = txn.open_table(MESSAGE_LOG)?;
    let mut bodies = txn.open_table(MESSAGE_BODIES)?;
    let mut index = LiveIndex::default();
    let mut out = ChunkWriter::new(split);
    let mut written: HashSet<u64> = HashSet::new();
    let mut chunk = 1u64;
    let (mut entries_moved, mut dangling) = (0u64, 0u64);
    {
        let messages = txn.open_table(V1_MESSAGES)?;
        let entries = txn.open_table(V1_ENTRIES)?;
        for row in entries.iter()? {
            let (key, value) = row?;
            let (queue, offset) = key.value();
            let (msg_id, delivery_count) = value.value();
            if !written.contains(&msg_id) {
                let Some(blob) = messages.get(msg_id)? else {
                    dangling += 1;
                    continue;
                };
                out.put(msg_id, blob.value());
                written.insert(msg_id);
            }
            let q = index.queue_id(queue);
            out.enqueue(q, queue, offset, msg_id, delivery_count);
            entries_moved += 1;
            if out.bytes().len() + out.bodies().len() >= MIGRATION_CHUNK_BYTES {
                chunks.insert(chunk, out.bytes())?;
                if !out.bodies().is_empty() {
                    bodies.insert(chunk, out.bodies())?;
                }
                chunk += 1;
                out.clear();
            }
        }
    }
    if !out.is_empty() {
        chunks.insert(chunk, out.bytes())?;
        if !out.bodies().is_empty() {
            bodies.insert(chunk, out.bodies())?;
        }
    }
    drop(chunks);
    drop(bodies);
    txn.delete_table(V1_ENTRIES)?;
    txn.delete_table(V1_MESSAGES)?;
    if dangling > 0 {
        tracing::warn!(
            entries = dangling,
            "store: dropping queue entries whose message is missing"
        );
    }
    tracing::info!(
        entries = entries_moved,
        messages = written.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store: converted a version 1 database to the message log"
    );
    Ok(())
}

/// Moves version 3's Raft log rows (a `raft_log` row per entry) into chunks of the
/// Raft log, in the same transaction as the version bump, then drops their table.
fn migrate_raft_rows(txn: &WriteTransaction) -> anyhow::Result<()> {
    let rows = match txn.open_table(V3_RAFT_LOG) {
        Ok(rows) => rows,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut chunks = txn.open_table(RAFT_CHUNKS)?;
    let mut chunk = chunks
        .last()?
        .map_or(1, |(last, _)| last.value().saturating_add(1));
    let mut out = ChunkWriter::default();
    let mut moved = 0u64;
    for row in rows.iter()? {
        let (key, value) = row?;
        let (group, index) = key.value();
        out.raft_entry(group, index, value.value());
        moved += 1;
        if out.bytes().len() >= MIGRATION_CHUNK_BYTES {
            chunks.insert(chunk, out.bytes())?;
            chunk += 1;
            out.clear();
        }
    }
    if !out.is_empty() {
        chunks.insert(chunk, out.bytes())?;
    }
    drop(rows);
    drop(chunks);
    txn.delete_table(V3_RAFT_LOG)?;
    tracing::info!(
        entries = moved,
        "store: moved the Raft logs of a version 3 database into chunks"
    );
    Ok(())
}

/// Reads every definition and access record, and replays the message log into queue
/// entries (see [`log::Replay`]), reading the chunks one at a time and keeping none. With
/// a `trim`, each blob's head is summed up as it goes by, and the only blobs copied are
/// those a queue's head window brings back whole, read from the few chunks that hold
/// them; without one, every live blob comes back whole.
pub(super) fn load(db: &Database, trim: Option<BlobTrim>) -> anyhow::Result<Loaded> {
    let txn = db.begin_read()?;

    let definitions = read_blobs(&txn, DEFINITIONS)?;
    let access = read_blobs(&txn, ACCESS)?;

    let table = txn.open_table(MESSAGE_LOG)?;
    let mut replay = log::Replay::new(trim.map(|t| t.digest));
    for row in table.iter()? {
        let (key, value) = row?;
        replay.scan(key.value(), value.value())?;
    }
    let mut replayed = replay.finish(trim.map(|t| t.whole_per_queue));
    if !replayed.dangling.is_empty() {
        tracing::warn!(
            entries = replayed.dangling.len(),
            "store: dropping queue entries whose message is missing"
        );
    }
    if replayed.orphans > 0 {
        tracing::info!(
            messages = replayed.orphans,
            "store: messages that no queue entry references go with their chunks"
        );
    }

    let bodies = txn.open_table(MESSAGE_BODIES)?;
    let blobs = read_whole(&table, &bodies, &replayed.whole_blobs())?;
    drop(bodies);
    for queue in replayed.queues.values_mut() {
        queue.attach(&blobs);
    }
    drop(blobs);
    drop(table);

    let raft_replayed = replay_raft(&txn)?;
    let mut raft = read_raft(&txn, raft_replayed.raft)?;
    let mut queues = replayed.queues;
    // A replicated queue's committed messages are its group's, not a classic queue's.
    let replica_keys: Vec<String> = queues
        .keys()
        .filter(|k| k.starts_with(super::REPLICA_PREFIX))
        .cloned()
        .collect();
    for key in replica_keys {
        let group = super::replica_group_of(&key);
        if let (Some(group), Some(entries)) = (group, queues.remove(&key)) {
            raft.entry(group).or_default().queues.insert(key, entries);
        }
    }

    Ok(Loaded {
        recovered: Recovered {
            definitions,
            access,
            queues,
            next_msg_id: replayed.next_msg_id,
            raft,
        },
        index: replayed.index,
        raft_index: raft_replayed.index,
        dangling: replayed.dangling,
        scratch: replayed.scratch,
    })
}

/// Copies of the blobs `wanted` (`(chunk, msg id)`, sorted), read from their chunks,
/// each chunk once.
fn read_whole(
    table: &redb::ReadOnlyTable<u64, &[u8]>,
    bodies: &redb::ReadOnlyTable<u64, &[u8]>,
    wanted: &[(ChunkId, u64)],
) -> anyhow::Result<HashMap<u64, Bytes, IdBuildHasher>> {
    let mut blobs: HashMap<u64, Bytes, IdBuildHasher> = HashMap::default();
    blobs.reserve(wanted.len());
    for group in wanted.chunk_by(|a, b| a.0 == b.0) {
        let chunk = group[0].0;
        let Some(row) = table.get(chunk)? else {
            // Its entries are left out (and logged) by `RecoveredQueue::attach`.
            continue;
        };
        let bytes = row.value();
        let here = |id: u64| group.binary_search(&(chunk, id)).is_ok();
        let found = log::find_puts(chunk, bytes, here)?;
        let body_row = match found.iter().any(|(_, _, body)| body.len > 0) {
            true => bodies.get(chunk)?,
            false => None,
        };
        let chunk_bodies = body_row.as_ref().map_or(&[][..], |row| row.value());
        for (msg_id, head, body) in found {
            let blob = log::copy_blob(chunk, bytes, chunk_bodies, head, body)?;
            blobs.insert(msg_id, blob);
        }
    }
    Ok(blobs)
}

/// Settles the dangling entries [`load`] found, purges the scratch queues, and deletes
/// the dead head chunks, in one durable commit (nothing is written when there is nothing to do).
pub(super) fn clean_up(db: &Database, loaded: &mut Loaded, split: HeadSplit) -> anyhow::Result<()> {
    let index = &mut loaded.index;
    let current = index.next_chunk();
    index.begin(current);
    let mut out = ChunkWriter::new(split);
    for (queue, offset) in &loaded.dangling {
        let q = index.queue_id(queue);
        out.remove(q, queue, *offset);
    }
    for queue in &loaded.scratch {
        let q = index.queue_id(queue);
        if index.purge(q) {
            out.purge(q, queue);
        }
    }
    index.end_ops();
    if !loaded.scratch.is_empty() {
        tracing::info!(
            queues = loaded.scratch.len(),
            "store: transient messages parked on disk before the restart are discarded"
        );
    }
    if out.is_empty() && index.next_truncation().is_none() {
        index.finish(0, false);
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let mut chunks = txn.open_table(MESSAGE_LOG)?;
        let mut bodies = txn.open_table(MESSAGE_BODIES)?;
        super::writer::truncate_and_write(&mut chunks, Some(&mut bodies), index, &mut out)?;
    }
    txn.commit()?;
    Ok(())
}

/// Replays the Raft log's chunks (none when its table was never created: a single
/// node).
fn replay_raft(txn: &ReadTransaction) -> anyhow::Result<log::Replayed> {
    let mut replay = log::Replay::new(None);
    match txn.open_table(RAFT_CHUNKS) {
        Ok(table) => {
            for row in table.iter()? {
                let (key, value) = row?;
                replay.scan(key.value(), value.value())?;
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(replay.finish(None))
}

/// Every Raft group's log (its live entries, as the Raft log's replay found them)
/// and values (none when their table was never created: a single node).
fn read_raft(
    txn: &ReadTransaction,
    logs: HashMap<u64, BTreeMap<u64, Vec<u8>>>,
) -> anyhow::Result<HashMap<u64, RecoveredRaftGroup>> {
    let mut groups: HashMap<u64, RecoveredRaftGroup> = HashMap::new();
    for (group, log) in logs {
        groups.entry(group).or_default().log = log.into_iter().collect();
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
