//! The reader thread: answers [`super::Store::read_messages`] apart from the writer.
//!
//! A read must see every write submitted before it, and the chunks it names must still
//! be the ones the writer's index located (compaction drops and rewrites head chunks,
//! and the number of a dropped last chunk is used again). So the writer, right after the
//! commit that precedes a read, locates its ids in its in-memory index and opens a redb
//! read transaction: that snapshot holds exactly those chunks however the writer goes
//! on. It hands both here ([`ReadJob`]) and goes back to committing; this thread fetches
//! the rows, copies the bodies out and answers. A paged backlog's drain then no longer
//! waits for the writer between every commit, nor the writer for its copies.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use redb::ReadTransaction;

use super::log::{ChunkId, copy_blob, find_puts};
use super::schema::{MESSAGE_BODIES, MESSAGE_LOG};
use super::{ReadAnswer, ReadFailed, fatal_store_failure};

/// One read, as the writer prepared it.
pub(super) struct ReadJob {
    /// A snapshot taken right after the commit that preceded the read.
    pub txn: ReadTransaction,
    /// The ids asked for, in the order of the answer.
    pub ids: Vec<u64>,
    /// The chunks holding them in that snapshot, in increasing order, each with the
    /// positions in `ids` of the messages it holds (ids not found are answered `None`).
    pub by_chunk: Vec<(ChunkId, Vec<usize>)>,
    /// The writer's count of reused chunk numbers when it took the snapshot: a cached
    /// chunk read under another count may be another chunk of the same number.
    pub reuses: u64,
    /// Who hears the answer.
    pub done: Box<dyn FnOnce(ReadAnswer) + Send>,
}

/// The chunk read last: a queue drains its backlog in order, so the next read usually
/// wants the same chunk.
struct CachedChunk {
    chunk: ChunkId,
    reuses: u64,
    records: Bytes,
    bodies: Option<Bytes>,
}

/// Turns a panic of the reader thread into the fatal exit: readers waiting for an
/// answer would otherwise wait for good.
struct ExitOnPanic;

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            fatal_store_failure("the reader thread panicked", &"see the panic message above");
        }
    }
}

/// How long the reader keeps its cached chunk without a read: a drained backlog's last
/// chunk (up to a batch's size) need not stay in memory.
const CACHE_IDLE: Duration = Duration::from_secs(1);

/// The running reader thread, owned by the writer.
pub(super) struct ReaderThread {
    /// Where the writer sends prepared reads.
    pub jobs: Sender<ReadJob>,
    thread: JoinHandle<()>,
}

impl ReaderThread {
    /// Starts the reader thread.
    pub fn spawn() -> std::io::Result<ReaderThread> {
        let (jobs, rx) = std::sync::mpsc::channel::<ReadJob>();
        let thread = std::thread::Builder::new()
            .name("warren-store-read".into())
            .spawn(move || run(rx))?;
        Ok(ReaderThread { jobs, thread })
    }

    /// Answers every job sent so far, then ends the thread.
    pub fn stop(self) {
        drop(self.jobs);
        if self.thread.join().is_err() {
            tracing::error!("store: the reader thread failed");
        }
    }
}

fn run(rx: Receiver<ReadJob>) {
    let _guard = ExitOnPanic;
    let mut cache: Option<CachedChunk> = None;
    loop {
        match rx.recv_timeout(CACHE_IDLE) {
            Ok(job) => {
                let answer = read(&mut cache, &job);
                (job.done)(answer);
            }
            Err(RecvTimeoutError::Timeout) => cache = None,
            Err(RecvTimeoutError::Disconnected) => break,
        }
        crate::alloc::collect_if_asked();
    }
}

/// The blobs `job` asks for, from its snapshot. Each chunk needed is read once.
fn read(cache: &mut Option<CachedChunk>, job: &ReadJob) -> ReadAnswer {
    let ids = &job.ids;
    let mut answer: Vec<Option<Bytes>> = vec![None; ids.len()];
    let failed = |e: &dyn std::fmt::Display| ReadFailed::error(e);
    let table = job.txn.open_table(MESSAGE_LOG).map_err(|e| failed(&e))?;
    let bodies_table = job.txn.open_table(MESSAGE_BODIES).map_err(|e| failed(&e))?;
    for (chunk, slots) in &job.by_chunk {
        let chunk = *chunk;
        let cached = match cache.take() {
            Some(cached) if cached.chunk == chunk && cached.reuses == job.reuses => cached,
            _ => {
                let Some(row) = table.get(chunk).map_err(|e| failed(&e))? else {
                    tracing::error!(chunk, "store: a live message's chunk is missing");
                    continue;
                };
                CachedChunk {
                    chunk,
                    reuses: job.reuses,
                    records: Bytes::copy_from_slice(row.value()),
                    bodies: None,
                }
            }
        };
        let cached = cache.insert(cached);
        let wanted: HashMap<u64, usize> = slots.iter().map(|&i| (ids[i], i)).collect();
        let found = find_puts(chunk, &cached.records, |id| wanted.contains_key(&id))
            .map_err(|e| failed(&e))?;
        if cached.bodies.is_none() && found.iter().any(|(_, _, body)| body.len > 0) {
            let row = bodies_table.get(chunk).map_err(|e| failed(&e))?;
            let bytes = row.map_or_else(Bytes::new, |r| Bytes::copy_from_slice(r.value()));
            cached.bodies = Some(bytes);
        }
        let bodies = cached.bodies.as_deref().unwrap_or(&[]);
        for (msg_id, head, body) in found {
            if let Some(&i) = wanted.get(&msg_id) {
                // A copy: the answer must not keep the whole chunk in memory.
                let blob = copy_blob(chunk, &cached.records, bodies, head, body)
                    .map_err(|e| failed(&e))?;
                answer[i] = Some(blob);
            }
        }
    }
    Ok(answer)
}
