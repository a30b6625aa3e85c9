//! The single writer thread: group commit, the flush policy, and applying ops.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, WriteTransaction};

use super::log::{
    ChunkId, ChunkWriter, HeadSplit, LiveIndex, MAX_RAFT_ENTRY_BYTES, RaftCut, Truncation,
};
use super::reader::{ReadJob, ReaderThread};
use super::schema::{ACCESS, DEFINITIONS, MESSAGE_BODIES, MESSAGE_LOG, RAFT_CHUNKS, RAFT_STATE};
use super::{
    Counters, Done, FlushMode, MessageBlob, ReadFailed, ReadRequest, Request, StoreOp,
    fatal_store_failure,
};

/// At most this many requests go into one transaction, so that a flood of publishes cannot
/// make one commit (and the latency of its first waiter) unbounded. The rest go into the
/// next transaction, immediately.
pub(super) const MAX_BATCH_REQUESTS: usize = 16 * 1024;

/// At most about this many payload bytes go into one transaction, for the same reason, and
/// so that its dirty pages fit redb's write buffer (half of the cache, see `CACHE_SIZE_BYTES`).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Hasher for `u64` msg ids and offsets (multiplicative, as FxHash): the log's maps are
/// touched on every enqueue and ack, and SipHash's DoS resistance buys nothing for broker-allocated ids.
#[derive(Default, Clone, Copy)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`IdHasher`]s.
pub(super) type IdBuildHasher = BuildHasherDefault<IdHasher>;

/// Why a batch stopped filling.
enum Control {
    /// Caps reached or nothing more queued: commit and carry on.
    Continue,
    /// [`Request::Close`]: commit durably and stop.
    Close,
    /// [`Request::Pause`]: commit, then wait on the receiver.
    Pause(Receiver<()>),
}

/// The writer thread's state. Only this thread writes to the database.
pub(super) struct Writer {
    db: Database,
    rx: Receiver<Request>,
    flush: FlushMode,
    interval: Duration,
    /// The message log's live state.
    log: LiveIndex,
    /// The chunk being built (its buffer is reused between batches).
    chunk: ChunkWriter,
    /// The Raft groups' log: its live state and the chunk being built.
    raft: RaftStream,
    /// The current group commit (reused between batches).
    batch: Vec<(Vec<StoreOp>, Done)>,
    /// Payload bytes of the current group commit.
    batch_bytes: usize,
    counters: Arc<Counters>,
    /// When the oldest non-durable commit not yet covered by an fsync was made.
    unsynced_since: Option<Instant>,
    /// Reads that arrived with the current batch, handed to the reader thread once it
    /// is committed.
    reads: Vec<ReadRequest>,
    /// The reader thread (see `reader`), started with the writer.
    reader: ReaderThread,
    /// Commits that wrote a chunk number used before (that of a dropped last chunk): the
    /// reader's cached chunk is valid only under the count it was read with.
    reuses: u64,
    /// The highest chunk number written so far.
    highest_chunk: ChunkId,
}

/// The live state of the store's two logs, as recovery rebuilt it.
pub(super) struct LogIndexes {
    /// The message log's.
    pub(super) messages: LiveIndex,
    /// The Raft log's.
    pub(super) raft: LiveIndex,
}

/// The Raft groups' log (`raft_chunks`): the message log's layout, in a log of its
/// own.
pub(super) struct RaftStream {
    index: LiveIndex,
    out: ChunkWriter,
}

impl RaftStream {
    /// The log whose live state is `index`.
    pub(super) fn new(index: LiveIndex) -> RaftStream {
        RaftStream {
            index,
            out: ChunkWriter::default(),
        }
    }

    /// Group `group`'s log cut as `cut` says (recorded only when a live entry goes).
    fn cut(&mut self, group: u64, cut: RaftCut) {
        if self.index.raft_cut(group, cut) {
            self.out.raft_cut(group, cut);
        }
    }
}

/// Turns a panic of the writer thread into the fatal exit: its waiters would otherwise hang
/// and the broker would go on without a store.
struct ExitOnPanic;

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            fatal_store_failure("the writer thread panicked", &"see the panic message above");
        }
    }
}

impl Writer {
    /// A writer over `db`, whose logs hold `logs`, with its reader thread started.
    pub(super) fn new(
        db: Database,
        rx: Receiver<Request>,
        flush: FlushMode,
        interval: Duration,
        logs: LogIndexes,
        split: HeadSplit,
        counters: Arc<Counters>,
    ) -> std::io::Result<Writer> {
        let LogIndexes {
            messages: log,
            raft,
        } = logs;
        counters
            .live_messages
            .store(log.live_messages() as u64, Ordering::Relaxed);
        Ok(Writer {
            db,
            rx,
            flush,
            interval,
            log,
            chunk: ChunkWriter::new(split),
            raft: RaftStream::new(raft),
            batch: Vec::new(),
            batch_bytes: 0,
            counters,
            unsynced_since: None,
            reads: Vec::new(),
            reader: ReaderThread::spawn()?,
            reuses: 0,
            highest_chunk: 0,
        })
    }

    /// The thread's body: group commits until [`Request::Close`] or until every handle is
    /// dropped, then a final fsync and a clean close of the database.
    pub(super) fn run(mut self) {
        let _guard = ExitOnPanic;
        loop {
            let Some(first) = self.next_request() else {
                break;
            };
            let control = self.fill_batch(first);
            // A batch no one waits on (acks, deliveries, a queue's own bookkeeping) need
            // not be fsynced at once: it is by the next batch that is, or within the
            // interval. A crash then replays the settlements of that interval (messages
            // come back redelivered), never loses a confirmed message.
            let durable = matches!(control, Control::Close)
                || (self.flush == FlushMode::Sync && self.batch_has_waiters());
            if !self.batch.is_empty() {
                self.commit_batch(durable);
            }
            for read in std::mem::take(&mut self.reads) {
                self.hand_over(read);
            }
            crate::alloc::collect_if_asked();
            match control {
                Control::Continue => {}
                Control::Close => break,
                Control::Pause(rx) => {
                    let _ = rx.recv();
                }
            }
        }
        if self.unsynced_since.is_some() {
            self.sync_now();
        }
        // Every read handed over is answered before the database closes under it.
        let Writer { reader, db, .. } = self;
        reader.stop();
        if let Err(err) = db.close() {
            // Everything was committed durably above; the file is merely marked as needing
            // repair at the next open.
            tracing::error!(error = %err, "store: closing the database failed");
        }
    }

    /// Blocks for the first request of the next batch. With non-durable commits pending, it
    /// wakes up when they are due for an fsync, and does it. `None` once every handle is gone.
    fn next_request(&mut self) -> Option<Request> {
        loop {
            let Some(since) = self.unsynced_since else {
                return self.rx.recv().ok();
            };
            let deadline = since + self.interval;
            let now = Instant::now();
            if now >= deadline {
                self.sync_now();
                continue;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(request) => return Some(request),
                Err(RecvTimeoutError::Timeout) => self.sync_now(),
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Moves `first` and whatever else is already queued (up to the caps) into the batch.
    fn fill_batch(&mut self, first: Request) -> Control {
        let mut next = Some(first);
        loop {
            let request = match next.take() {
                Some(request) => request,
                None => match self.rx.try_recv() {
                    Ok(request) => request,
                    Err(_) => return Control::Continue,
                },
            };
            match request {
                Request::Ops { ops, done, bytes } => {
                    self.batch_bytes = self.batch_bytes.saturating_add(bytes);
                    self.batch.push((ops, done));
                    if self.batch.len() >= MAX_BATCH_REQUESTS || self.batch_bytes >= MAX_BATCH_BYTES
                    {
                        return Control::Continue;
                    }
                }
                Request::Read(read) => self.reads.push(read),
                Request::Close => return Control::Close,
                Request::Pause(rx) => return Control::Pause(rx),
            }
        }
    }

    /// Whether some request of the batch waits for its commit.
    fn batch_has_waiters(&self) -> bool {
        self.batch
            .iter()
            .any(|(_, done)| !matches!(done, Done::Nothing))
    }

    /// Applies the batch in one write transaction, commits it (with fsync if `durable`), then
    /// releases its waiters. Any failure is fatal.
    fn commit_batch(&mut self, durable: bool) {
        let started = Instant::now();
        let mut txn = self
            .db
            .begin_write()
            .unwrap_or_else(|err| fatal_store_failure("beginning a write transaction", &err));
        if !durable && let Err(err) = txn.set_durability(Durability::None) {
            fatal_store_failure("setting the durability of a transaction", &err);
        }
        if let Err(err) = apply(
            &txn,
            &self.batch,
            &mut self.log,
            &mut self.chunk,
            &mut self.raft,
        ) {
            fatal_store_failure("writing a batch", &err);
        }
        if let Err(err) = txn.commit() {
            fatal_store_failure("committing a batch", &err);
        }
        // A commit writes a chunk numbered after every chunk still stored, which reuses
        // the number of a last chunk that was dropped (all its messages gone): a chunk
        // the reader cached with that number (or a later one) is not the one stored now.
        if self.log.current() <= self.highest_chunk {
            self.reuses += 1;
        }
        self.highest_chunk = self.highest_chunk.max(self.log.current());
        self.counters
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.counters
            .batch_requests
            .observe(self.batch.len() as f64);

        let ops: usize = self.batch.iter().map(|(ops, _)| ops.len()).sum();
        let counters = &self.counters;
        counters.queued_ops.fetch_sub(ops as u64, Ordering::Relaxed);
        counters.queued_bytes.fetch_sub(
            std::mem::take(&mut self.batch_bytes) as u64,
            Ordering::Relaxed,
        );
        counters.transactions.fetch_add(1, Ordering::Relaxed);
        counters
            .requests
            .fetch_add(self.batch.len() as u64, Ordering::Relaxed);
        counters.ops.fetch_add(ops as u64, Ordering::Relaxed);
        counters
            .live_messages
            .store(self.log.live_messages() as u64, Ordering::Relaxed);
        if durable {
            counters.durable_commits.fetch_add(1, Ordering::Relaxed);
            self.unsynced_since = None;
        } else if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }

        for (_, done) in self.batch.drain(..) {
            match done {
                Done::Nothing => {}
                Done::Wake(tx) => {
                    // The waiter may have given up (future dropped); nothing to do then.
                    let _ = tx.send(());
                }
                Done::Call(callback) => callback(),
            }
        }
    }

    /// Hands `read` to the reader thread with the chunks its messages are in now and a
    /// snapshot that holds them (see `reader`); answers at once when none is stored.
    fn hand_over(&mut self, read: ReadRequest) {
        let mut by_chunk: std::collections::BTreeMap<ChunkId, Vec<usize>> = Default::default();
        for (i, id) in read.ids.iter().enumerate() {
            if let Some(chunk) = self.log.locate(*id) {
                by_chunk.entry(chunk).or_default().push(i);
            }
        }
        if by_chunk.is_empty() {
            let answer = vec![None; read.ids.len()];
            (read.done)(Ok(answer));
            return;
        }
        let txn = match self.db.begin_read() {
            Ok(txn) => txn,
            Err(err) => {
                (read.done)(Err(ReadFailed::error(err)));
                return;
            }
        };
        let job = ReadJob {
            txn,
            ids: read.ids,
            by_chunk: by_chunk.into_iter().collect(),
            reuses: self.reuses,
            done: read.done,
        };
        if let Err(std::sync::mpsc::SendError(job)) = self.reader.jobs.send(job) {
            (job.done)(Err(ReadFailed::error("the store's reader has stopped")));
        }
    }

    /// Makes every earlier non-durable commit durable: an empty transaction committed with
    /// `Durability::Immediate`.
    fn sync_now(&mut self) {
        let txn = self
            .db
            .begin_write()
            .unwrap_or_else(|err| fatal_store_failure("beginning a write transaction", &err));
        if let Err(err) = txn.commit() {
            fatal_store_failure("fsyncing earlier commits", &err);
        }
        self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .durable_commits
            .fetch_add(1, Ordering::Relaxed);
        self.unsynced_since = None;
    }
}

/// Applies every op of `batch`, in order, inside `txn`, with the tables opened once: the
/// message and entry ops become the records of one new chunk of the message log (see
/// [`super::log`]), the Raft ops those of one new chunk of the Raft log, and each log's
/// dead or worth-rewriting head chunks go.
fn apply(
    txn: &WriteTransaction,
    batch: &[(Vec<StoreOp>, Done)],
    log: &mut LiveIndex,
    out: &mut ChunkWriter,
    raft: &mut RaftStream,
) -> anyhow::Result<()> {
    let mut definitions = txn.open_table(DEFINITIONS)?;
    let mut access = txn.open_table(ACCESS)?;
    let mut chunks = txn.open_table(MESSAGE_LOG)?;
    let mut bodies = txn.open_table(MESSAGE_BODIES)?;
    // The Raft values' table is opened only by batches that touch it: a single node
    // never does.
    let mut raft_state = None;
    let current = log.next_chunk();
    log.begin(current);
    out.clear();
    let raft_current = raft.index.next_chunk();
    raft.index.begin(raft_current);
    raft.out.clear();

    for op in batch.iter().flat_map(|(ops, _)| ops) {
        match op {
            StoreOp::PutDefinition { key, value } => {
                definitions.insert(key.as_str(), value.as_slice())?;
            }
            StoreOp::DeleteDefinition { key } => {
                definitions.remove(key.as_str())?;
            }
            StoreOp::PutAccess { key, value } => {
                access.insert(key.as_str(), value.as_slice())?;
            }
            StoreOp::DeleteAccess { key } => {
                access.remove(key.as_str())?;
            }
            StoreOp::PutMessage { msg_id, blob } => {
                match blob {
                    MessageBlob::Whole(blob) => out.put(*msg_id, blob),
                    MessageBlob::Parts { head, body } => out.put_parts(*msg_id, head, body),
                }
                log.put(*msg_id, blob.len());
            }
            StoreOp::Enqueue {
                queue,
                offset,
                msg_id,
            } => {
                let q = log.queue_id_of(queue);
                if log.enqueue(q, *offset, *msg_id) {
                    out.enqueue(q, log.name(q), *offset, *msg_id, 0);
                } else {
                    tracing::error!(
                        msg_id,
                        queue = &**queue,
                        offset,
                        "store: Enqueue of a message that is not stored; entry not written"
                    );
                }
            }
            StoreOp::Remove { queue, offset } => {
                if let Some(q) = log.known_queue_of(queue)
                    && log.remove(q, *offset)
                {
                    out.remove(q, log.name(q), *offset);
                }
            }
            StoreOp::MarkDelivered { queue, offset } => {
                if let Some(q) = log.known_queue_of(queue)
                    && log.delivered(q, *offset)
                {
                    out.delivered(q, log.name(q), *offset);
                }
            }
            StoreOp::PurgeQueue { queue } => {
                if let Some(q) = log.known_queue_of(queue)
                    && log.purge(q)
                {
                    out.purge(q, log.name(q));
                }
            }
            StoreOp::RaftAppend {
                group,
                index,
                entry,
            } => {
                if entry.len() > MAX_RAFT_ENTRY_BYTES {
                    anyhow::bail!(
                        "a Raft entry of group {group} is {} bytes, more than a chunk records",
                        entry.len()
                    );
                }
                raft.index.raft_append(*group, *index, entry.len());
                raft.out.raft_entry(*group, *index, entry);
            }
            StoreOp::RaftTruncateFrom { group, index } => {
                raft.cut(*group, RaftCut::From(*index));
            }
            StoreOp::RaftPurgeUpTo { group, index } => {
                raft.cut(*group, RaftCut::UpTo(*index));
            }
            StoreOp::RaftDropGroup { group } => {
                raft.cut(*group, RaftCut::All);
                let state = match &mut raft_state {
                    Some(t) => t,
                    None => raft_state.insert(txn.open_table(RAFT_STATE)?),
                };
                let next = group.saturating_add(1);
                state.retain_in((*group, "")..(next, ""), |_, _| false)?;
            }
            StoreOp::RaftPutState { group, key, value } => {
                let state = match &mut raft_state {
                    Some(t) => t,
                    None => raft_state.insert(txn.open_table(RAFT_STATE)?),
                };
                state.insert((*group, key.as_str()), value.as_ref())?;
            }
        }
    }
    log.end_ops();
    truncate_and_write(&mut chunks, Some(&mut bodies), log, out)?;
    raft.index.end_ops();
    // Its table is opened only when there is something to write or delete: a single
    // node never creates it.
    if raft.out.is_empty() && raft.index.next_truncation().is_none() {
        raft.index.finish(0, false);
        return Ok(());
    }
    let mut raft_chunks = txn.open_table(RAFT_CHUNKS)?;
    truncate_and_write(&mut raft_chunks, None, &mut raft.index, &mut raft.out)
}

/// Deletes or rewrites the log's head chunks as [`LiveIndex::next_truncation`] decides,
/// then stores the current chunk if it must be. `bodies` is the chunks' bodies table (the
/// Raft log has none).
pub(super) fn truncate_and_write(
    chunks: &mut redb::Table<'_, u64, &'static [u8]>,
    mut bodies: Option<&mut redb::Table<'_, u64, &'static [u8]>>,
    log: &mut LiveIndex,
    out: &mut ChunkWriter,
) -> anyhow::Result<()> {
    while let Some(truncation) = log.next_truncation() {
        let head = match truncation {
            Truncation::Delete(head) => head,
            Truncation::Rewrite(head) => {
                if let Some(bytes) = chunks.get(head)? {
                    let body_row = match bodies.as_deref() {
                        Some(bodies) => bodies.get(head)?,
                        None => None,
                    };
                    let chunk_bodies = body_row.as_ref().map_or(&[][..], |row| row.value());
                    log.rewrite(head, bytes.value(), chunk_bodies, out)?;
                }
                head
            }
        };
        chunks.remove(head)?;
        if let Some(bodies) = bodies.as_deref_mut() {
            bodies.remove(head)?;
        }
        log.deleted(head);
    }
    let size = out.bytes().len() + out.bodies().len();
    if log.finish(size, !out.is_empty()) {
        chunks.insert(log.current(), out.bytes())?;
        // A dropped last chunk's number is used again: its old bodies go either way.
        if let Some(bodies) = bodies {
            if out.bodies().is_empty() {
                bodies.remove(log.current())?;
            } else {
                bodies.insert(log.current(), out.bodies())?;
            }
        }
    }
    Ok(())
}
