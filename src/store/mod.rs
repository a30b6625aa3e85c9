//! The node's persistent store: one redb database, `<data_dir>/warren.redb`, holding durable
//! definitions (exchanges, queues, bindings) and every persistent message on a durable queue.
//!
//! The store knows nothing of AMQP: definitions are opaque blobs under string keys that the
//! broker chooses, messages are opaque blobs under `u64` ids that the broker allocates, and a
//! queue is a string key with entries `(offset -> msg id)`. Messages and entries are
//! written as an append-only log, one chunk per group commit, truncated at its head as
//! messages are settled (see `log.rs` for the layout and why it is safe); message bodies
//! sit in rows of their own beside the chunks, so that start-up need not read them.
//!
//! Writes go through exactly one writer thread (redb is synchronous and allows one write
//! transaction at a time), which does **group commit**: it blocks for the first pending
//! request, drains whatever else is already queued (no timer, so no added latency when idle),
//! applies all of it in one write transaction, commits, then releases every waiter. See
//! [`FlushMode`] for when "committed" means "fsynced".
//!
//! A commit that fails is *indeterminate* (the data may or may not be on disk) and the store
//! cannot go on: [`fatal_store_failure`] logs and exits the process. No caller is ever told
//! "not stored".

mod dense;
pub mod histogram;
mod log;
mod reader;
mod recovered;
mod recovery;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

pub use recovered::{
    BlobTrim, DigestFn, HeadDigest, Recovered, RecoveredBlob, RecoveredEntries, RecoveredEntry,
    RecoveredQueue, RecoveredRaftGroup,
};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::oneshot;

/// The fsync policy the writer follows (re-exported: it is the store's knob, set in config).
/// `Sync`: every group commit is fsynced before its waiters are released. `Interval`: group
/// commits are not fsynced and release their waiters at once; the writer fsyncs at most
/// `interval` after the first unsynced commit, and at [`Store::close`].
pub use crate::config::FlushMode;

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "warren.redb";

/// Queue keys that start with this are scratch space: their entries (bodies parked on
/// disk while memory runs short, of messages that must not survive a restart) are
/// purged when the store opens and never recovered.
pub const SCRATCH_PREFIX: &str = "~scratch/";

/// Queue keys that start with this hold a replicated queue's committed messages, on
/// every member of its group: `~replica/<group>` for the queue's messages,
/// `~replica/<group>/<suffix>` for others of the group's (its dead letters). Their
/// entries come back with the group ([`RecoveredRaftGroup::queues`]), not as a
/// classic queue's.
pub const REPLICA_PREFIX: &str = "~replica/";

/// The queue key of Raft group `group`'s messages, or with a `suffix` another of its
/// queue keys.
pub fn replica_queue_key(group: u64, suffix: Option<&str>) -> String {
    match suffix {
        None => format!("{REPLICA_PREFIX}{group:x}"),
        Some(s) => format!("{REPLICA_PREFIX}{group:x}/{s}"),
    }
}

/// The group a [`REPLICA_PREFIX`] queue key belongs to.
pub fn replica_group_of(key: &str) -> Option<u64> {
    let rest = key.strip_prefix(REPLICA_PREFIX)?;
    let hex = rest.split('/').next()?;
    u64::from_str_radix(hex, 16).ok()
}

/// Asks for a read with `ask` (given the callback that takes the answer) and waits for
/// the answer, blocking the calling thread (on a multi-threaded runtime the worker lets
/// its other tasks move elsewhere meanwhile). `None` if the store closed first. For the
/// rare reads whose caller cannot go on without the bodies.
pub fn read_blocking(ask: impl FnOnce(Box<dyn FnOnce(ReadAnswer) + Send>)) -> Option<ReadAnswer> {
    let (tx, rx) = std::sync::mpsc::channel();
    ask(Box::new(move |answer| {
        let _ = tx.send(answer);
    }));
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(|| rx.recv().ok())
    } else {
        rx.recv().ok()
    }
}

/// Exit status used when the store cannot go on (`EX_SOFTWARE` from sysexits.h).
pub const FATAL_EXIT_CODE: i32 = 70;

/// redb page cache. The store reads only at recovery, so a large cache would mostly hold a
/// second copy of messages the broker already has in memory. redb gives up to half of it to
/// the dirty pages of the open write transaction: 32 MiB holds a full group commit (its
/// payload is capped at 16 MiB) without spilling, which measurably slowed writes at 16 MiB.
const CACHE_SIZE_BYTES: usize = 64 * 1024 * 1024;

/// redb page cache while the store is read back at start: chunks are read once each,
/// so caching them only holds memory (up to the cache's size, at the node's peak).
const RECOVERY_CACHE_SIZE_BYTES: usize = 4 * 1024 * 1024;

/// Opens (creating, or repairing after an unclean shutdown) the database at `path`.
fn open_database(path: &Path, cache_size: usize) -> anyhow::Result<redb::Database> {
    redb::Builder::new()
        .set_cache_size(cache_size)
        .set_repair_callback(|session| {
            tracing::warn!(
                progress = session.progress(),
                "store: repairing database after an unclean shutdown"
            );
        })
        .create(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Ops waiting for the writer from which the store counts as congested: publishers that
/// feed it are held back (store flow control) until it catches up. Publishers that wait
/// for confirms never get near it; one that does not could otherwise queue store work
/// (and copies of its messages) faster than the disk takes it, without bound.
pub const CONGESTED_OPS: u64 = 20_000;
/// Payload bytes waiting for the writer from which the store counts as congested.
pub const CONGESTED_BYTES: u64 = 16 << 20;

/// Logs `what` and `err`, then exits the process with [`FATAL_EXIT_CODE`].
///
/// This is the store's only reaction to a failed write: a commit that fails (disk full, I/O
/// error) is indeterminate, the writer's view of the database can no longer be trusted, and
/// telling a publisher "not stored" could be a lie in either direction. Exiting keeps the
/// promise: nothing unconfirmed was confirmed, and a restart recovers whatever did reach the
/// disk (at worst redelivering).
pub fn fatal_store_failure(what: &str, err: &dyn std::fmt::Display) -> ! {
    tracing::error!(
        error = %err,
        "store: {what}; the outcome of the pending writes is unknown, exiting with status {FATAL_EXIT_CODE}"
    );
    std::process::exit(FATAL_EXIT_CODE)
}

/// An encoded message as [`StoreOp::PutMessage`] hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageBlob {
    /// The whole blob; the writer cuts it into head and body with its split.
    Whole(Bytes),
    /// The head (everything before the body) and the body apart, written as they are:
    /// a fresh publish's body, still the slice of the frame it arrived in, is copied
    /// once, into the chunk, instead of first into a blob of its own that another
    /// thread then frees.
    Parts {
        /// What the split would cut from the front of the whole blob.
        head: Bytes,
        /// The rest: the message's body.
        body: Bytes,
    },
}

impl MessageBlob {
    /// Bytes of the whole blob.
    pub fn len(&self) -> usize {
        match self {
            MessageBlob::Whole(blob) => blob.len(),
            MessageBlob::Parts { head, body } => head.len() + body.len(),
        }
    }

    /// True for a blob of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Bytes> for MessageBlob {
    fn from(blob: Bytes) -> MessageBlob {
        MessageBlob::Whole(blob)
    }
}

/// One change to the store. A batch of them is applied in the order given, inside one
/// transaction shared with every other request of the same group commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Create or replace a definition. Keys are namespaced by the broker, e.g.
    /// `"x/<vhost>/<name>"`, `"q/<vhost>/<name>"`, `"b/<...>"`.
    PutDefinition {
        /// Broker-chosen key; [`Recovered::definitions`] comes back sorted by it.
        key: String,
        /// Broker-encoded definition.
        value: Vec<u8>,
    },
    /// Delete a definition (absent keys are ignored).
    DeleteDefinition {
        /// Key given to [`StoreOp::PutDefinition`].
        key: String,
    },
    /// Create or replace an access-control record (user, vhost, permission), in its own
    /// table beside the definitions.
    PutAccess {
        /// Key chosen by the access-control module; [`Recovered::access`] is sorted by it.
        key: String,
        /// Its encoded record.
        value: Vec<u8>,
    },
    /// Delete an access-control record (absent keys are ignored).
    DeleteAccess {
        /// Key given to [`StoreOp::PutAccess`].
        key: String,
    },
    /// Store a message blob once, however many queues will hold it. Follow it with one
    /// [`StoreOp::Enqueue`] per queue (in the same batch, normally): the blob lives as long as
    /// some entry references it. A blob that no entry ever references is never recovered,
    /// and its bytes go when the log is truncated past them.
    PutMessage {
        /// Broker-allocated id, unique for the life of the database (start from
        /// [`Recovered::next_msg_id`]).
        msg_id: u64,
        /// The encoded message.
        blob: MessageBlob,
    },
    /// Add a queue entry referencing a stored message (takes one reference to it). Replacing
    /// an existing `(queue, offset)` releases the reference the old entry held.
    Enqueue {
        /// Queue key (the broker's choice, e.g. the definition key of the queue), shared
        /// by the queue's records.
        queue: Arc<str>,
        /// Position in the queue; recovery returns entries in ascending offset order.
        offset: u64,
        /// A message stored by an earlier (or the same) batch's [`StoreOp::PutMessage`].
        msg_id: u64,
    },
    /// Remove a queue entry (ack, expiry, drop...). Releases its reference; a blob with no
    /// references left is forgotten at the end of the batch, so moving a message between
    /// queues within one batch (Remove, then Enqueue elsewhere) is safe. Across batches,
    /// Enqueue the new entry before Removing the old one. Absent entries are ignored.
    Remove {
        /// Queue key.
        queue: Arc<str>,
        /// Offset given to [`StoreOp::Enqueue`].
        offset: u64,
    },
    /// Record one delivery of the entry, so that after a crash it comes back with
    /// `delivered: true` (AMQP `redelivered`). Absent entries are ignored.
    MarkDelivered {
        /// Queue key.
        queue: Arc<str>,
        /// Offset given to [`StoreOp::Enqueue`].
        offset: u64,
    },
    /// Remove every entry of a queue (queue.delete, queue.purge), releasing their messages.
    /// The queue's definition is separate: delete it with [`StoreOp::DeleteDefinition`].
    PurgeQueue {
        /// Queue key.
        queue: Arc<str>,
    },
    /// Append (or overwrite) entry `index` of Raft group `group`'s log.
    RaftAppend {
        /// The group.
        group: u64,
        /// The entry's log index.
        index: u64,
        /// The encoded entry.
        entry: Bytes,
    },
    /// Delete every entry of `group`'s log from `index` on (a conflicting suffix).
    RaftTruncateFrom {
        /// The group.
        group: u64,
        /// First index removed.
        index: u64,
    },
    /// Delete every entry of `group`'s log up to `index` included (covered by a snapshot).
    RaftPurgeUpTo {
        /// The group.
        group: u64,
        /// Last index removed.
        index: u64,
    },
    /// Delete every entry and value of `group` (a replicated queue was deleted).
    RaftDropGroup {
        /// The group.
        group: u64,
    },
    /// Store a durable value of `group` (its vote, committed index, snapshot).
    RaftPutState {
        /// The group.
        group: u64,
        /// The value's name.
        key: String,
        /// The encoded value.
        value: Bytes,
    },
}

impl StoreOp {
    /// Bytes of payload this op carries, used to bound the size of a group commit.
    fn payload_len(&self) -> usize {
        match self {
            StoreOp::PutDefinition { value, .. } | StoreOp::PutAccess { value, .. } => value.len(),
            StoreOp::PutMessage { blob, .. } => blob.len(),
            StoreOp::RaftAppend { entry, .. } => entry.len(),
            StoreOp::RaftPutState { value, .. } => value.len(),
            _ => 0,
        }
    }
}

/// Counters of the writer's work, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed (one per group commit, plus interval fsyncs).
    pub transactions: u64,
    /// Of those, the ones committed with fsync (`Durability::Immediate`).
    pub durable_commits: u64,
    /// Requests ([`Store::commit`], [`Store::submit`], [`Store::commit_then`]) applied.
    pub requests: u64,
    /// [`StoreOp`]s applied.
    pub ops: u64,
    /// [`StoreOp`]s waiting for the writer now.
    pub queued_ops: u64,
    /// Payload bytes waiting for the writer now.
    pub queued_bytes: u64,
    /// Stored messages some queue entry names, after the last commit.
    pub live_messages: u64,
}

/// Upper bounds (seconds) of the commit latency histogram.
const COMMIT_SECONDS_BOUNDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Upper bounds of the group-commit size histogram (requests per transaction).
const BATCH_REQUESTS_BOUNDS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
];

/// The writer's histograms, for the metrics endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreHistograms {
    /// Seconds from the start of a write transaction to the end of its commit (with
    /// its fsync, for durable commits).
    pub commit_seconds: histogram::HistogramSnapshot,
    /// Requests (publishes, acks, definition changes...) per group commit.
    pub batch_requests: histogram::HistogramSnapshot,
}

/// Shared between the handles and the writer thread.
#[derive(Debug)]
struct Counters {
    transactions: AtomicU64,
    durable_commits: AtomicU64,
    requests: AtomicU64,
    ops: AtomicU64,
    /// Ops sent to the writer and not yet committed.
    queued_ops: AtomicU64,
    /// Payload bytes sent to the writer and not yet committed.
    queued_bytes: AtomicU64,
    /// Messages live in the log after the last commit.
    live_messages: AtomicU64,
    /// Requests ever sent to the writer.
    sent: AtomicU64,
    commit_seconds: histogram::Histogram,
    batch_requests: histogram::Histogram,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            transactions: AtomicU64::new(0),
            durable_commits: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            queued_ops: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            live_messages: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            commit_seconds: histogram::Histogram::new(&COMMIT_SECONDS_BOUNDS),
            batch_requests: histogram::Histogram::new(&BATCH_REQUESTS_BOUNDS),
        }
    }
}

impl Counters {
    fn snapshot(&self) -> StoreStats {
        StoreStats {
            transactions: self.transactions.load(Ordering::Relaxed),
            durable_commits: self.durable_commits.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
            queued_ops: self.queued_ops.load(Ordering::Relaxed),
            queued_bytes: self.queued_bytes.load(Ordering::Relaxed),
            live_messages: self.live_messages.load(Ordering::Relaxed),
        }
    }
}

/// How the writer tells a requester that its ops are committed.
enum Done {
    /// Fire and forget ([`Store::submit`]).
    Nothing,
    /// Wake a [`Store::commit`] future.
    Wake(oneshot::Sender<()>),
    /// Run a [`Store::commit_then`] callback on the writer thread.
    Call(Box<dyn FnOnce() + Send>),
}

/// The answer to [`Store::read_messages`]: for each id asked, in order, its blob, or
/// `None` when no live entry references it (settled, purged, or never stored).
pub type ReadAnswer = Result<Vec<Option<Bytes>>, ReadFailed>;

/// Reading stored messages failed: the blobs are still there as far as anyone knows;
/// ask again later.
#[derive(Debug, Clone)]
pub struct ReadFailed {
    /// What went wrong.
    pub reason: String,
    /// The source cannot read yet (a replica whose member is starting) rather than
    /// failed: expected for a while, so not worth an error in the log.
    pub not_ready: bool,
}

impl ReadFailed {
    /// A read that failed (an I/O or database error).
    pub fn error(reason: impl std::fmt::Display) -> ReadFailed {
        ReadFailed {
            reason: reason.to_string(),
            not_ready: false,
        }
    }

    /// A read asked of a source that cannot answer yet.
    pub fn not_ready(reason: impl std::fmt::Display) -> ReadFailed {
        ReadFailed {
            reason: reason.to_string(),
            not_ready: true,
        }
    }
}

impl std::fmt::Display for ReadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading stored messages failed: {}", self.reason)
    }
}

/// Blobs asked for by [`Store::read_messages`], and who hears the answer.
struct ReadRequest {
    ids: Vec<u64>,
    done: Box<dyn FnOnce(ReadAnswer) + Send>,
}

/// A message to the writer thread.
enum Request {
    /// Ops to apply in the next group commit, and their payload bytes.
    Ops {
        ops: Vec<StoreOp>,
        done: Done,
        bytes: usize,
    },
    /// Blobs of stored messages, answered once what was queued before it is committed.
    Read(ReadRequest),
    /// Commit what is queued before this, fsync, and stop.
    Close,
    /// Test hook: the writer blocks until the sender side is dropped or sends, so that a test
    /// can queue requests and observe that they land in one transaction.
    Pause(mpsc::Receiver<()>),
}

/// State shared by every clone of a [`Store`].
struct Inner {
    tx: mpsc::Sender<Request>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    path: PathBuf,
}

/// Cloneable handle to the single writer thread. Cheap to clone; `Send + Sync`.
///
/// Ordering: requests from one thread are applied in the order their calls were made
/// ([`Store::commit`] enqueues when called, not when awaited). A [`Store::commit`] resolves
/// only after everything submitted before it is committed too.
///
/// Shutdown: call [`Store::close`]. Dropping every handle also stops the writer (after a
/// final fsync), but nothing waits for it, so a process that exits right away may lose the
/// unsynced tail of [`FlushMode::Interval`].
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed, converting a version 1 layout) `<dir>/warren.redb`, reads
    /// everything back, truncates what no longer belongs (dead head chunks of the message
    /// log, entries whose blob is missing), and starts the writer thread. `interval` is the
    /// fsync period for [`FlushMode::Interval`] and is ignored for [`FlushMode::Sync`].
    ///
    /// Every live blob comes back whole: for tests and tools; the broker opens with
    /// [`Store::open_trimmed`]. Blocking, for seconds on a big store: call it before
    /// serving, or in `tokio::task::spawn_blocking`.
    pub fn open(
        dir: &Path,
        flush: FlushMode,
        interval: Duration,
    ) -> anyhow::Result<(Store, Recovered)> {
        Store::open_trimmed(dir, flush, interval, None)
    }

    /// [`Store::open`], reading back only what `trim` asks of each message: each chunk's
    /// records are read once, with the heads of their blobs, and bodies only for the
    /// queues' head windows; the other messages cost their entry in the writer's index
    /// and a 40-byte record in the recovered list. The writer keeps heads and bodies
    /// apart as `trim` says, for the next start-up. Blocking: a fraction of a second per
    /// million messages, plus redb's repair after an unclean shutdown.
    pub fn open_trimmed(
        dir: &Path,
        flush: FlushMode,
        interval: Duration,
        trim: Option<BlobTrim>,
    ) -> anyhow::Result<(Store, Recovered)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
        let path = dir.join(DB_FILE_NAME);
        let started = std::time::Instant::now();
        // Recovery reads every chunk once: through a small cache, so that the chunks it
        // passes do not stay in memory. The writer's database is opened afterwards.
        let split = trim.map(|t| t.head_len);
        let db = open_database(&path, RECOVERY_CACHE_SIZE_BYTES)?;
        recovery::init_schema(&db, split)
            .with_context(|| format!("initialising {}", path.display()))?;
        let mut loaded =
            recovery::load(&db, trim).with_context(|| format!("reading {}", path.display()))?;
        recovery::clean_up(&db, &mut loaded, split)
            .with_context(|| format!("cleaning up {}", path.display()))?;
        db.close()
            .with_context(|| format!("closing {} after recovery", path.display()))?;
        let db = open_database(&path, CACHE_SIZE_BYTES)?;
        let recovered = loaded.recovered;
        tracing::info!(
            path = %path.display(),
            definitions = recovered.definitions.len(),
            queues = recovered.queues.len(),
            messages = loaded.index.live_messages(),
            chunks = loaded.index.chunk_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store: recovered"
        );

        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel();
        let writer = writer::Writer::new(
            db,
            rx,
            flush,
            interval,
            writer::LogIndexes {
                messages: loaded.index,
                raft: loaded.raft_index,
            },
            split,
            counters.clone(),
        )
        .context("spawning the store reader thread")?;
        let thread = std::thread::Builder::new()
            .name("warren-store".into())
            .spawn(move || writer.run())
            .context("spawning the store writer thread")?;
        let store = Store {
            inner: Arc::new(Inner {
                tx,
                thread: Mutex::new(Some(thread)),
                counters,
                path,
            }),
        };
        Ok((store, recovered))
    }

    /// Applies `ops` in the next group commit; the returned future resolves once they (and
    /// everything submitted before them) are durable as the [`FlushMode`] promises. The ops
    /// are queued when this is called, not when the future is first polled. An empty `ops`
    /// is a barrier.
    ///
    /// If the store was closed, the future never resolves (an error is logged): a confirm
    /// must never be sent for data that was not stored.
    pub fn commit(&self, ops: Vec<StoreOp>) -> impl Future<Output = ()> + Send + use<> {
        let (tx, rx) = oneshot::channel();
        self.send_ops(ops, Done::Wake(tx));
        async move {
            if rx.await.is_err() {
                tracing::error!("store: commit dropped because the store is closed");
                std::future::pending::<()>().await;
            }
        }
    }

    /// Applies `ops` in the next group commit without waiting: for consumer acks and
    /// [`StoreOp::MarkDelivered`], where a crash before the commit means a redelivery, never a
    /// loss.
    pub fn submit(&self, ops: Vec<StoreOp>) {
        if !ops.is_empty() {
            self.send_ops(ops, Done::Nothing);
        }
    }

    /// Like [`Store::commit`], but runs `done` on the writer thread once the ops are durable,
    /// for hot paths that should not allocate a future and a task per message. `done` must be
    /// quick and must not block or panic (a send on a channel is the intended use). If the
    /// store was closed, `done` is dropped without being called.
    /// Returns the request's number (see `send_ops`).
    pub fn commit_then(&self, ops: Vec<StoreOp>, done: Box<dyn FnOnce() + Send>) -> u64 {
        self.send_ops(ops, Done::Call(done))
    }

    /// Reads the blobs of stored messages `ids` back (a queue's bodies that it keeps on
    /// disk only), and calls `done` with them, in the order asked, on the writer thread
    /// (it must be quick: a send on a channel). The writer looks each message up where
    /// the log holds it now (head compaction moves messages to newer chunks), after
    /// committing whatever was submitted before this call, so a message whose
    /// [`StoreOp::PutMessage`] was handed over earlier is found. Blobs are copies: they
    /// hold no chunk's memory. If the store is closed, `done` is dropped without a call.
    pub fn read_messages(&self, ids: Vec<u64>, done: Box<dyn FnOnce(ReadAnswer) + Send>) {
        self.send(Request::Read(ReadRequest { ids, done }));
    }

    /// Commits (with fsync) everything submitted so far, stops the writer thread and closes
    /// the database, blocking until done. Later requests are dropped with an error logged.
    /// Idempotent. Blocks the calling thread: from async code, call it in
    /// `tokio::task::spawn_blocking` (or accept a short stall at shutdown).
    pub fn close(&self) {
        let handle = match self.inner.thread.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(handle) = handle else { return };
        // A send error means the writer already stopped; join it all the same.
        let _ = self.inner.tx.send(Request::Close);
        if handle.join().is_err() {
            // Unreachable in practice: a panicking writer exits the process.
            tracing::error!("store: writer thread panicked");
        }
    }

    /// Whether more work waits for the writer than `CONGESTED_OPS` or `CONGESTED_BYTES`:
    /// publishers feeding the store should pause.
    pub fn is_congested(&self) -> bool {
        let c = &self.inner.counters;
        c.queued_ops.load(Ordering::Relaxed) >= CONGESTED_OPS
            || c.queued_bytes.load(Ordering::Relaxed) >= CONGESTED_BYTES
    }

    /// Requests ever sent to the writer (by any handle): a caller that compares it
    /// before and after some work knows whether that work may have written anything.
    pub fn sent_requests(&self) -> u64 {
        self.inner.counters.sent.load(Ordering::Relaxed)
    }

    /// Counters of the writer's work so far.
    pub fn stats(&self) -> StoreStats {
        self.inner.counters.snapshot()
    }

    /// Commit latency and group-commit size distributions so far.
    pub fn histograms(&self) -> StoreHistograms {
        let c = &self.inner.counters;
        StoreHistograms {
            commit_seconds: c.commit_seconds.snapshot(),
            batch_requests: c.batch_requests.snapshot(),
        }
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Queues ops for the writer, counting them (and their payload) as waiting.
    /// Queues a request for the writer; returns its number (1 for the first request of
    /// the store, counted over every handle).
    fn send_ops(&self, ops: Vec<StoreOp>, done: Done) -> u64 {
        let bytes = ops
            .iter()
            .fold(0usize, |sum, op| sum.saturating_add(op.payload_len()));
        let c = &self.inner.counters;
        c.queued_ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        c.queued_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let number = c.sent.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(Request::Ops { ops, done, bytes });
        number
    }

    fn send(&self, request: Request) {
        if self.inner.tx.send(request).is_err() {
            tracing::error!("store: request dropped because the store is closed");
        }
    }

    /// Test hook: makes the writer wait, after the requests queued so far, until the returned
    /// sender is used or dropped (ordering tests hold commits back with it).
    pub fn pause(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Request::Pause(rx));
        tx
    }
}
