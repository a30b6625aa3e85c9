//! The message log: how persistent messages and queue entries are laid out in redb.
//!
//! # Design
//!
//! Every durable queue's history is an append-only log of records: a message stored
//! (`Put`), an entry added to a queue (`Enqueue`), an entry settled (`Remove`), a delivery
//! recorded (`Delivered`), a queue emptied (`Purge`). Settlements make older records dead;
//! the log is truncated at its head once the records there are dead. A Raft group's log
//! (a replicated queue's, the metadata group's) is the same shape: entries appended by
//! index, made dead by a snapshot that covers them (or by a conflicting leader, or the
//! group's end). Its entries are therefore records of the same format (`RaftEntry`, and
//! `RaftCut` for the three ways a log is shortened), kept alive and rewritten by the
//! same rules ([`LiveIndex`]), written by the same group commit. They go into a log of
//! their own (the `raft_chunks` table, a second [`LiveIndex`]), not into the messages'
//! chunks: a message dies when it is settled, an entry when a snapshot covers it, and
//! mixed in one chunk each kept the other alive (measured on a replicated queue: the
//! log held four times its live bytes, and the leader moved 0.71 of the messages).
//!
//! Physically, the records of all queues of a group commit go into **one chunk**, a single
//! redb row of the `message_log` table keyed by a chunk number that only grows. One
//! publish of a 1 KiB message therefore costs a few dozen bytes appended to a buffer, not
//! a B-tree insert per message and per entry; an ack appends a 13-byte record, not a
//! B-tree delete. Redb stays the store: it gives the chunks crash-safe commits, and the
//! definitions, access records and Raft rows beside them share the same transaction.
//!
//! Chunk format: one format byte, then records, each a tag byte and little-endian fields.
//! Queues are named inside each chunk (`Name` maps a chunk-local number to the queue key
//! the first time the chunk uses it), so that a chunk can be read alone, whatever chunks
//! before it have been deleted. A `Put` carries only the head of its blob (what the
//! broker needs to order and expire the message, as [`HeadSplit`] cuts it); the bodies
//! of a chunk's `Put`s, one after the other, are the chunk's row of `message_bodies`,
//! written and deleted in the same transactions as the chunk. Start-up thus reads the
//! records of every message and none of the bodies. Chunks written before (format 1)
//! carry whole blobs; they are read as they are and rewritten in today's format.
//!
//! # Truncation
//!
//! The writer keeps, in memory, where each live entry and each live message was last
//! written ([`LiveIndex`]) and how many live records each chunk holds. Only the **head**
//! (oldest) chunk is ever deleted: a chunk's `Remove` records may settle entries of older
//! chunks, so deleting a chunk out of order could bring settled messages back. Deleting the
//! head is always safe once its records are dead, because nothing older is left for its
//! settlements to act on. A head kept alive by a few long-lived messages (a consumer that
//! holds one unacked message while millions flow past) would pin every chunk behind it, so
//! when the log is larger than [`COMPACT_FLOOR_BYTES`] and more than twice the live
//! message bytes, the head's live records are written again into the current chunk and the
//! head is deleted, in the same transaction. Disk use thus follows the backlog, not the
//! history.
//!
//! # Recovery
//!
//! [`Replay`] reads the chunks in order, one at a time: where each message's last `Put` is
//! (a rewrite may have moved it into a chunk after the one holding one of its entries),
//! and the entry records applied in order; messages and entries are matched at the end,
//! and an entry whose message is in no chunk is dangling and is dropped. Reference counts
//! and the live records of each chunk are computed from the result, which is exactly the
//! writer's in-memory state before the crash. No chunk is kept: as a `Put` goes by, the
//! broker's digest of its blob's head (priority, publish time, TTL) is all that is kept
//! of it, and only the blobs of each queue's head window are read whole (their chunks'
//! bodies rows too) and copied (`recovery::load`), so a backlog's bodies are neither
//! read, held nor copied at start-up.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::dense::{DenseMap, DenseValue};
use super::recovered::{DigestFn, HeadDigest, RecoveredQueue};
use super::writer::IdBuildHasher;

/// Number of a chunk (its row key); chunks are written in increasing order.
pub(super) type ChunkId = u64;

/// A queue's number in one writer's (or one replay's) memory.
pub(super) type QueueId = u32;

/// The chunk format of Warren before bodies moved out of the chunk (a `Put` record
/// carries its whole blob): still read.
const FORMAT_INLINE: u8 = 1;

/// The chunk format this code writes: a `Put` record carries the head of its blob (as
/// the writer's [`HeadSplit`] cuts it), and the rest, the body, goes into the chunk's
/// row of the `message_bodies` table, bodies in the order of their records. Start-up
/// reads the chunks and not the bodies.
const FORMAT_SPLIT: u8 = 2;

const TAG_NAME: u8 = 1;
const TAG_PUT: u8 = 2;
const TAG_ENQUEUE: u8 = 3;
const TAG_REMOVE: u8 = 4;
const TAG_DELIVERED: u8 = 5;
const TAG_PURGE: u8 = 6;
const TAG_RAFT_ENTRY: u8 = 7;
const TAG_RAFT_TRUNCATE: u8 = 8;
const TAG_RAFT_PURGE: u8 = 9;
const TAG_RAFT_DROP: u8 = 10;

/// Below this many bytes of log, the head is never rewritten to truncate it: a small log
/// of mostly settled chunks costs less than copying its live messages.
pub(super) const COMPACT_FLOOR_BYTES: u64 = 64 << 20;

/// At most this many heads are rewritten per group commit, so that compaction adds a
/// bounded amount of work (a chunk is at most one group commit's payload) to a commit.
const COMPACT_HEADS_PER_COMMIT: usize = 1;

/// Where a blob's head ends (the broker's format; `None` when it cannot tell, and the
/// whole blob is then kept as the body). Without one, every blob is all body.
pub(super) type HeadSplit = Option<fn(&[u8]) -> Option<usize>>;

/// A range of bytes in a chunk or in its bodies row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Span {
    pub(super) start: usize,
    pub(super) len: usize,
}

impl Span {
    /// The bytes of `buf` it covers; `None` when `buf` is shorter.
    pub(super) fn of<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        buf.get(self.start..self.start.checked_add(self.len)?)
    }
}

/// A chunk that cannot be read: recovery refuses to guess.
#[derive(Debug)]
pub(super) struct DamagedChunk {
    chunk: ChunkId,
    at: usize,
    what: &'static str,
}

impl std::fmt::Display for DamagedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "message log chunk {} is damaged at byte {}: {}",
            self.chunk, self.at, self.what
        )
    }
}

impl std::error::Error for DamagedChunk {}

/// One record, as read from a chunk. Queue numbers are chunk-local (see `Name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Record<'a> {
    /// Chunk-local queue number `local` stands for the queue key `name`.
    Name { local: u32, name: &'a str },
    /// Message `msg_id`: its blob is its `head` (in the chunk) followed by its `body`
    /// (in the chunk's bodies row; empty in an inline chunk, whose `head` is the whole
    /// blob).
    Put { msg_id: u64, head: Span, body: Span },
    /// Entry (`local`, `offset`) holds `msg_id` and was delivered `delivery_count` times.
    Enqueue {
        local: u32,
        offset: u64,
        msg_id: u64,
        delivery_count: u32,
    },
    /// Entry (`local`, `offset`) is settled.
    Remove { local: u32, offset: u64 },
    /// Entry (`local`, `offset`) was delivered once more.
    Delivered { local: u32, offset: u64 },
    /// Every entry of queue `local` so far is settled.
    Purge { local: u32 },
    /// Entry `index` of Raft group `group`'s log, encoded as the bytes `entry` (in the
    /// chunk) covers; it replaces an entry of that index written before.
    RaftEntry { group: u64, index: u64, entry: Span },
    /// Raft group `group`'s entries written before are cut as `cut` says.
    RaftCut { group: u64, cut: RaftCut },
}

/// Which entries of a Raft group's log a record drops: the three ways openraft (and a
/// queue's deletion) shorten a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RaftCut {
    /// From this index on (a suffix that conflicts with the leader's log).
    From(u64),
    /// Up to this index included (a snapshot covers them).
    UpTo(u64),
    /// All of them (the group is gone).
    All,
}

impl RaftCut {
    /// Takes the entries it drops out of `log` (a group's entries by index).
    pub(super) fn take<V>(self, log: &mut BTreeMap<u64, V>) -> BTreeMap<u64, V> {
        match self {
            RaftCut::From(index) => log.split_off(&index),
            RaftCut::UpTo(index) => match index.checked_add(1) {
                Some(next) => {
                    let kept = log.split_off(&next);
                    std::mem::replace(log, kept)
                }
                None => std::mem::take(log),
            },
            RaftCut::All => std::mem::take(log),
        }
    }
}

/// Reads the records of one chunk in order.
pub(super) struct ChunkReader<'a> {
    chunk: ChunkId,
    buf: &'a [u8],
    pos: usize,
    /// Whether `Put` records carry their body elsewhere ([`FORMAT_SPLIT`]).
    split: bool,
    /// Where the next body starts in the bodies row.
    body_at: usize,
}

impl<'a> ChunkReader<'a> {
    /// A reader over chunk `chunk`'s bytes; fails when the format is not this code's.
    pub(super) fn new(chunk: ChunkId, buf: &'a [u8]) -> Result<ChunkReader<'a>, DamagedChunk> {
        let split = match buf.first() {
            Some(&FORMAT_SPLIT) => true,
            Some(&FORMAT_INLINE) => false,
            _ => {
                return Err(DamagedChunk {
                    chunk,
                    at: 0,
                    what: "unknown chunk format",
                });
            }
        };
        Ok(ChunkReader {
            chunk,
            buf,
            pos: 1,
            split,
            body_at: 0,
        })
    }

    fn damaged(&self, what: &'static str) -> DamagedChunk {
        DamagedChunk {
            chunk: self.chunk,
            at: self.pos,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DamagedChunk> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| self.damaged("record cut short"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, DamagedChunk> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, DamagedChunk> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// The next record, `None` at the end of the chunk.
    pub(super) fn next_record(&mut self) -> Result<Option<Record<'a>>, DamagedChunk> {
        let Some(&tag) = self.buf.get(self.pos) else {
            return Ok(None);
        };
        self.pos += 1;
        let record = match tag {
            TAG_NAME => {
                let local = self.u32()?;
                let len = self.u32()? as usize;
                let name = std::str::from_utf8(self.take(len)?)
                    .map_err(|_| self.damaged("queue name is not UTF-8"))?;
                Record::Name { local, name }
            }
            TAG_PUT if self.split => {
                let msg_id = self.u64()?;
                let head_len = self.u32()? as usize;
                let body_len = self.u32()? as usize;
                let head = Span {
                    start: self.pos,
                    len: head_len,
                };
                self.take(head_len)?;
                let body = Span {
                    start: self.body_at,
                    len: body_len,
                };
                self.body_at = self
                    .body_at
                    .checked_add(body_len)
                    .ok_or_else(|| self.damaged("bodies overflow"))?;
                Record::Put { msg_id, head, body }
            }
            TAG_PUT => {
                let msg_id = self.u64()?;
                let len = self.u32()? as usize;
                let head = Span {
                    start: self.pos,
                    len,
                };
                self.take(len)?;
                Record::Put {
                    msg_id,
                    head,
                    body: Span::default(),
                }
            }
            TAG_ENQUEUE => Record::Enqueue {
                local: self.u32()?,
                offset: self.u64()?,
                msg_id: self.u64()?,
                delivery_count: self.u32()?,
            },
            TAG_REMOVE => Record::Remove {
                local: self.u32()?,
                offset: self.u64()?,
            },
            TAG_DELIVERED => Record::Delivered {
                local: self.u32()?,
                offset: self.u64()?,
            },
            TAG_PURGE => Record::Purge { local: self.u32()? },
            TAG_RAFT_ENTRY => {
                let group = self.u64()?;
                let index = self.u64()?;
                let len = self.u32()? as usize;
                let entry = Span {
                    start: self.pos,
                    len,
                };
                self.take(len)?;
                Record::RaftEntry {
                    group,
                    index,
                    entry,
                }
            }
            TAG_RAFT_TRUNCATE => Record::RaftCut {
                group: self.u64()?,
                cut: RaftCut::From(self.u64()?),
            },
            TAG_RAFT_PURGE => Record::RaftCut {
                group: self.u64()?,
                cut: RaftCut::UpTo(self.u64()?),
            },
            TAG_RAFT_DROP => Record::RaftCut {
                group: self.u64()?,
                cut: RaftCut::All,
            },
            _ => return Err(self.damaged("unknown record tag")),
        };
        Ok(Some(record))
    }
}

/// The `Put` records in chunk `chunk` (whose bytes are `bytes`) of the messages `wanted`
/// accepts: `(msg id, head, body)`. Only record headers are read.
pub(super) fn find_puts(
    chunk: ChunkId,
    bytes: &[u8],
    mut wanted: impl FnMut(u64) -> bool,
) -> Result<Vec<(u64, Span, Span)>, DamagedChunk> {
    let mut reader = ChunkReader::new(chunk, bytes)?;
    let mut found = Vec::new();
    while let Some(record) = reader.next_record()? {
        if let Record::Put { msg_id, head, body } = record
            && wanted(msg_id)
        {
            found.push((msg_id, head, body));
        }
    }
    Ok(found)
}

/// A copy of a blob whose `head` is in chunk `chunk` (`bytes`) and whose `body` is in
/// the chunk's bodies row (`bodies`).
pub(super) fn copy_blob(
    chunk: ChunkId,
    bytes: &[u8],
    bodies: &[u8],
    head: Span,
    body: Span,
) -> Result<bytes::Bytes, DamagedChunk> {
    let missing = |what| DamagedChunk {
        chunk,
        at: head.start,
        what,
    };
    let head = head.of(bytes).ok_or_else(|| missing("record cut short"))?;
    let body = body
        .of(bodies)
        .ok_or_else(|| missing("a body is missing from the chunk's bodies"))?;
    let mut blob = Vec::with_capacity(head.len() + body.len());
    blob.extend_from_slice(head);
    blob.extend_from_slice(body);
    Ok(blob.into())
}

/// Builds one chunk. Queue numbers written are the writer's [`QueueId`]s; each is named
/// in the chunk before its first use.
#[derive(Debug)]
pub(super) struct ChunkWriter {
    buf: Vec<u8>,
    /// The chunk's bodies row.
    bodies: Vec<u8>,
    named: HashSet<QueueId, IdBuildHasher>,
    /// Records written since the last `clear`.
    records: usize,
    split: HeadSplit,
}

impl Default for ChunkWriter {
    fn default() -> ChunkWriter {
        ChunkWriter::new(None)
    }
}

impl ChunkWriter {
    /// A writer that cuts blobs into head and body with `split`.
    pub(super) fn new(split: HeadSplit) -> ChunkWriter {
        ChunkWriter {
            buf: vec![FORMAT_SPLIT],
            bodies: Vec::new(),
            named: HashSet::default(),
            records: 0,
            split,
        }
    }

    /// Starts over with an empty chunk, keeping the buffers' memory.
    pub(super) fn clear(&mut self) {
        self.buf.clear();
        self.buf.push(FORMAT_SPLIT);
        self.bodies.clear();
        self.named.clear();
        self.records = 0;
    }

    /// The chunk's bodies (its row of `message_bodies`; none stored when empty).
    pub(super) fn bodies(&self) -> &[u8] {
        &self.bodies
    }

    /// Whether no record was written since the last `clear`.
    pub(super) fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The chunk's bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn queue(&mut self, queue: QueueId, name: &str) {
        if self.named.insert(queue) {
            self.buf.push(TAG_NAME);
            self.u32(queue);
            self.u32(name.len() as u32);
            self.buf.extend_from_slice(name.as_bytes());
        }
        self.records += 1;
    }

    /// Appends a `Put` of `blob`, cut into head and body as the writer's split says.
    pub(super) fn put(&mut self, msg_id: u64, blob: &[u8]) {
        let head_len = self
            .split
            .and_then(|split| split(blob))
            .filter(|&n| n <= blob.len())
            .unwrap_or(0);
        let (head, body) = blob.split_at(head_len);
        self.put_parts(msg_id, head, body);
    }

    /// Appends a `Put` of the blob `head` then `body`.
    pub(super) fn put_parts(&mut self, msg_id: u64, head: &[u8], body: &[u8]) {
        self.buf.push(TAG_PUT);
        self.u64(msg_id);
        self.u32(head.len() as u32);
        self.u32(body.len() as u32);
        self.buf.extend_from_slice(head);
        self.bodies.extend_from_slice(body);
        self.records += 1;
    }

    /// Appends an `Enqueue`.
    pub(super) fn enqueue(
        &mut self,
        queue: QueueId,
        name: &str,
        offset: u64,
        msg_id: u64,
        delivery_count: u32,
    ) {
        self.queue(queue, name);
        self.buf.push(TAG_ENQUEUE);
        self.u32(queue);
        self.u64(offset);
        self.u64(msg_id);
        self.u32(delivery_count);
    }

    /// Appends a `Remove`.
    pub(super) fn remove(&mut self, queue: QueueId, name: &str, offset: u64) {
        self.queue(queue, name);
        self.buf.push(TAG_REMOVE);
        self.u32(queue);
        self.u64(offset);
    }

    /// Appends a `Delivered`.
    pub(super) fn delivered(&mut self, queue: QueueId, name: &str, offset: u64) {
        self.queue(queue, name);
        self.buf.push(TAG_DELIVERED);
        self.u32(queue);
        self.u64(offset);
    }

    /// Appends a `Purge`.
    pub(super) fn purge(&mut self, queue: QueueId, name: &str) {
        self.queue(queue, name);
        self.buf.push(TAG_PURGE);
        self.u32(queue);
    }

    /// Appends entry `index` of Raft group `group` (`entry` is at most
    /// [`MAX_RAFT_ENTRY_BYTES`] long; the writer checks).
    pub(super) fn raft_entry(&mut self, group: u64, index: u64, entry: &[u8]) {
        self.buf.push(TAG_RAFT_ENTRY);
        self.u64(group);
        self.u64(index);
        self.u32(entry.len() as u32);
        self.buf.extend_from_slice(entry);
        self.records += 1;
    }

    /// Appends a cut of Raft group `group`'s log.
    pub(super) fn raft_cut(&mut self, group: u64, cut: RaftCut) {
        let (tag, index) = match cut {
            RaftCut::From(index) => (TAG_RAFT_TRUNCATE, Some(index)),
            RaftCut::UpTo(index) => (TAG_RAFT_PURGE, Some(index)),
            RaftCut::All => (TAG_RAFT_DROP, None),
        };
        self.buf.push(tag);
        self.u64(group);
        if let Some(index) = index {
            self.u64(index);
        }
        self.records += 1;
    }
}

/// The longest Raft entry a chunk records (its length is a `u32`). A replicated
/// queue's entries are bounded far below it (a batch of records of at most one
/// 512 MiB message past its byte bound).
pub(super) const MAX_RAFT_ENTRY_BYTES: usize = u32::MAX as usize;

/// A chunk number as the writer's index keeps it: its low 32 bits. Every chunk a live
/// record names lies within 2^32 chunks below the newest one (the head is rewritten
/// before it falls [`MAX_CHUNK_SPAN`] behind), so the low bits name it alone, and the
/// index pays 4 bytes per record for it instead of 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkTag(u32);

impl ChunkTag {
    fn of(chunk: ChunkId) -> ChunkTag {
        ChunkTag(chunk as u32)
    }

    /// The chunk it names, the newest chunk being `newest`.
    fn chunk(self, newest: ChunkId) -> ChunkId {
        newest.wrapping_sub(u64::from((newest as u32).wrapping_sub(self.0)))
    }
}

/// The head is rewritten (whatever the log's size) once it is this many chunks behind
/// the current one, so that [`ChunkTag`]s stay unambiguous. At one commit per
/// millisecond that is 24 days of a single message pinning the head.
pub(super) const MAX_CHUNK_SPAN: u64 = 1 << 31;

/// Where a live entry was last written, and what it holds (16 bytes: the writer keeps
/// one per live entry of every backlog).
#[derive(Debug, Clone, Copy)]
struct LiveEntry {
    /// `u64::MAX` marks a vacant slot of a [`DenseMap`] (ids are handed out from 0).
    msg_id: u64,
    chunk: ChunkTag,
    delivery_count: u32,
}

impl DenseValue for LiveEntry {
    const VACANT: LiveEntry = LiveEntry {
        msg_id: u64::MAX,
        chunk: ChunkTag(0),
        delivery_count: 0,
    };

    fn is_vacant(&self) -> bool {
        self.msg_id == u64::MAX
    }
}

/// A stored message: the chunk holding its blob, and how many live entries name it
/// (12 bytes, one per live message).
#[derive(Debug, Clone, Copy)]
struct LiveMsg {
    chunk: ChunkTag,
    refs: u32,
    /// Its blob's length; `u32::MAX` marks a vacant slot (a message is at most 512 MiB).
    len: u32,
}

impl DenseValue for LiveMsg {
    const VACANT: LiveMsg = LiveMsg {
        chunk: ChunkTag(0),
        refs: 0,
        len: u32::MAX,
    };

    fn is_vacant(&self) -> bool {
        self.len == u32::MAX
    }
}

/// Where a live Raft entry was written, and its length (the writer keeps one per entry
/// of every group's log: logs are short, a snapshot truncates them).
#[derive(Debug, Clone, Copy)]
struct LiveRaftEntry {
    chunk: ChunkTag,
    len: u32,
}

/// A head that only Raft entries of groups being truncated keep alive (a snapshot cut
/// each one's oldest entries within the last [`RAFT_ACTIVE_CHUNKS`] chunks) is left
/// for their snapshots to truncate, rather than copied forward, until it is this many
/// chunks behind the current one: an active group's log spans a few thousand commits
/// (it is snapshotted every `replica::SNAPSHOT_EVERY` entries, or sooner when large).
/// Entries of a group that is not being truncated (the metadata group's short,
/// long-lived log, or a queue gone idle) are copied forward as any live record is. The
/// wait also ends once the log is [`RAFT_WAIT_MAX_FACTOR`] times its live bytes (or the
/// floor), which bounds the dead bytes it lets pile up.
pub(super) const RAFT_HEAD_GRACE: u64 = 1 << 13;

/// See [`RAFT_HEAD_GRACE`].
const RAFT_ACTIVE_CHUNKS: u64 = 1 << 10;

/// See [`RAFT_HEAD_GRACE`].
const RAFT_WAIT_MAX_FACTOR: u64 = 4;

/// One Raft group's live log entries by index, and the chunk that last recorded a cut
/// of its oldest entries (a snapshot's), if any did.
#[derive(Debug, Default)]
struct RaftGroupIndex {
    entries: BTreeMap<u64, LiveRaftEntry>,
    last_purge: Option<ChunkId>,
}

/// What the log knows of one stored chunk.
#[derive(Debug, Clone, Copy, Default)]
struct ChunkInfo {
    /// Its size in bytes.
    bytes: u64,
    /// Live entries whose last `Enqueue` is here, plus referenced messages whose `Put` is,
    /// plus live Raft entries written here.
    live: u64,
}

/// One chunk's deletion or rewrite, decided by [`LiveIndex::next_truncation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Truncation {
    /// The head holds nothing live: delete it.
    Delete(ChunkId),
    /// The head holds live records, and the log is worth shrinking: write them again
    /// (read the chunk, hand it to [`LiveIndex::rewrite`]), then delete it.
    Rewrite(ChunkId),
}

/// The live state of the log: every live entry and message and where it was last
/// written, and what each chunk still holds. The writer's memory of the store.
#[derive(Debug, Default)]
pub(super) struct LiveIndex {
    names: Vec<String>,
    ids: HashMap<String, QueueId>,
    /// Per queue, its live entries by offset.
    queues: Vec<DenseMap<LiveEntry>>,
    /// Live messages by id.
    msgs: DenseMap<LiveMsg>,
    /// Per Raft group, its live log entries.
    raft: HashMap<u64, RaftGroupIndex>,
    chunks: BTreeMap<ChunkId, ChunkInfo>,
    /// Sum of the sizes of the stored chunks.
    log_bytes: u64,
    /// Sum of the blob sizes of referenced messages and of live Raft entries.
    live_bytes: u64,
    /// Messages whose reference count fell to zero in the current commit.
    released: Vec<u64>,
    /// The chunk the current commit writes.
    current: ChunkId,
    /// The greatest chunk begun or scanned: what [`ChunkTag`]s are read against.
    newest: ChunkId,
    /// Heads rewritten in the current commit.
    rewritten: usize,
    /// The queue key looked up last: the ops of a commit mostly name the same few queues,
    /// each with one shared key, so a pointer comparison usually spares hashing the name.
    last: Option<(std::sync::Arc<str>, QueueId)>,
}

impl LiveIndex {
    /// The queue's number, allocated on first use.
    pub(super) fn queue_id(&mut self, name: &str) -> QueueId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as QueueId;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        self.queues.push(DenseMap::default());
        id
    }

    /// The queue's number, if it was ever used.
    pub(super) fn known_queue(&self, name: &str) -> Option<QueueId> {
        self.ids.get(name).copied()
    }

    /// [`LiveIndex::queue_id`] for a shared key, remembering the last one.
    pub(super) fn queue_id_of(&mut self, key: &std::sync::Arc<str>) -> QueueId {
        if let Some((last, id)) = &self.last
            && std::sync::Arc::ptr_eq(last, key)
        {
            return *id;
        }
        let id = self.queue_id(key);
        self.last = Some((key.clone(), id));
        id
    }

    /// [`LiveIndex::known_queue`] for a shared key, remembering the last one.
    pub(super) fn known_queue_of(&mut self, key: &std::sync::Arc<str>) -> Option<QueueId> {
        if let Some((last, id)) = &self.last
            && std::sync::Arc::ptr_eq(last, key)
        {
            return Some(*id);
        }
        let id = self.known_queue(key)?;
        self.last = Some((key.clone(), id));
        Some(id)
    }

    /// The key of queue `queue`.
    pub(super) fn name(&self, queue: QueueId) -> &str {
        &self.names[queue as usize]
    }

    /// Number of messages with at least one live entry.
    pub(super) fn live_messages(&self) -> usize {
        self.msgs.len()
    }

    /// The chunk holding the blob of stored message `msg_id` (wherever compaction moved
    /// it), if the message is still referenced.
    pub(super) fn locate(&self, msg_id: u64) -> Option<ChunkId> {
        self.msgs
            .get(msg_id)
            .filter(|m| m.refs > 0)
            .map(|m| self.full(m.chunk))
    }

    /// Number of stored chunks.
    pub(super) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Starts a commit that writes chunk `chunk` (greater than every stored chunk).
    pub(super) fn begin(&mut self, chunk: ChunkId) {
        self.current = chunk;
        self.newest = chunk;
        self.rewritten = 0;
        self.chunks.insert(chunk, ChunkInfo::default());
    }

    /// The chunk the current commit writes.
    pub(super) fn current(&self) -> ChunkId {
        self.current
    }

    /// Number for the chunk after every stored one.
    pub(super) fn next_chunk(&self) -> ChunkId {
        self.chunks
            .last_key_value()
            .map_or(1, |(&last, _)| last.saturating_add(1))
    }

    /// The chunk `tag` names.
    fn full(&self, tag: ChunkTag) -> ChunkId {
        tag.chunk(self.newest)
    }

    fn live_add(&mut self, chunk: ChunkId) {
        if let Some(info) = self.chunks.get_mut(&chunk) {
            info.live += 1;
        }
    }

    fn live_sub(&mut self, chunk: ChunkId) {
        if let Some(info) = self.chunks.get_mut(&chunk) {
            info.live = info.live.saturating_sub(1);
        }
    }

    /// A message stored in the current chunk.
    pub(super) fn put(&mut self, msg_id: u64, len: usize) {
        let current = self.current;
        let len = len as u32;
        match self.msgs.get_mut(msg_id) {
            Some(msg) => {
                let (old, refs) = (msg.chunk, msg.refs);
                let old_len = msg.len;
                msg.chunk = ChunkTag::of(current);
                msg.len = len;
                if refs > 0 {
                    self.live_bytes = self.live_bytes - u64::from(old_len) + u64::from(len);
                    self.live_sub(self.full(old));
                    self.live_add(current);
                }
            }
            None => {
                self.msgs.insert(
                    msg_id,
                    LiveMsg {
                        chunk: ChunkTag::of(current),
                        refs: 0,
                        len,
                    },
                );
                // Deleted at the end of the commit unless an entry names it by then.
                self.released.push(msg_id);
            }
        }
    }

    fn take_ref(&mut self, msg_id: u64) -> bool {
        let Some(msg) = self.msgs.get_mut(msg_id) else {
            return false;
        };
        msg.refs = msg.refs.saturating_add(1);
        if msg.refs == 1 {
            let (chunk, len) = (msg.chunk, msg.len);
            self.live_bytes += u64::from(len);
            self.live_add(self.full(chunk));
        }
        true
    }

    fn release(&mut self, msg_id: u64) {
        let Some(msg) = self.msgs.get_mut(msg_id) else {
            tracing::error!(
                msg_id,
                "store: an entry named a message the log does not hold"
            );
            return;
        };
        msg.refs = msg.refs.saturating_sub(1);
        if msg.refs == 0 {
            let (chunk, len) = (msg.chunk, msg.len);
            self.live_bytes = self.live_bytes.saturating_sub(u64::from(len));
            self.live_sub(self.full(chunk));
            self.released.push(msg_id);
        }
    }

    /// An entry added in the current chunk; false (nothing changes) when its message is
    /// not stored.
    pub(super) fn enqueue(&mut self, queue: QueueId, offset: u64, msg_id: u64) -> bool {
        if !self.take_ref(msg_id) {
            return false;
        }
        let entry = LiveEntry {
            msg_id,
            chunk: ChunkTag::of(self.current),
            delivery_count: 0,
        };
        let replaced = self.queues[queue as usize].insert(offset, entry);
        self.live_add(self.current);
        if let Some(old) = replaced {
            self.live_sub(self.full(old.chunk));
            self.release(old.msg_id);
        }
        true
    }

    /// An entry settled; false when it is not live.
    pub(super) fn remove(&mut self, queue: QueueId, offset: u64) -> bool {
        let Some(old) = self.queues[queue as usize].remove(offset) else {
            return false;
        };
        self.live_sub(self.full(old.chunk));
        self.release(old.msg_id);
        true
    }

    /// An entry delivered once more; false when it is not live.
    pub(super) fn delivered(&mut self, queue: QueueId, offset: u64) -> bool {
        match self.queues[queue as usize].get_mut(offset) {
            Some(entry) => {
                entry.delivery_count = entry.delivery_count.saturating_add(1);
                true
            }
            None => false,
        }
    }

    /// Every entry of a queue settled; false when it had none.
    pub(super) fn purge(&mut self, queue: QueueId) -> bool {
        let entries = std::mem::take(&mut self.queues[queue as usize]);
        if entries.is_empty() {
            return false;
        }
        for (_, entry) in entries.iter() {
            self.live_sub(self.full(entry.chunk));
            self.release(entry.msg_id);
        }
        true
    }

    /// Entry `index` of Raft group `group`, `len` bytes, written in the current chunk
    /// (replacing one of that index written before).
    pub(super) fn raft_append(&mut self, group: u64, index: u64, len: usize) {
        let current = self.current;
        let entry = LiveRaftEntry {
            chunk: ChunkTag::of(current),
            len: len as u32,
        };
        let old = self
            .raft
            .entry(group)
            .or_default()
            .entries
            .insert(index, entry);
        self.live_add(current);
        self.live_bytes += len as u64;
        if let Some(old) = old {
            self.raft_dead(old);
        }
    }

    fn raft_dead(&mut self, entry: LiveRaftEntry) {
        self.live_sub(self.full(entry.chunk));
        self.live_bytes = self.live_bytes.saturating_sub(u64::from(entry.len));
    }

    /// Raft group `group`'s log cut as `cut` says; false when no live entry goes.
    pub(super) fn raft_cut(&mut self, group: u64, cut: RaftCut) -> bool {
        let Some(log) = self.raft.get_mut(&group) else {
            return false;
        };
        let gone = cut.take(&mut log.entries);
        if matches!(cut, RaftCut::UpTo(_)) && !gone.is_empty() {
            log.last_purge = Some(self.current);
        }
        if log.entries.is_empty() {
            self.raft.remove(&group);
        }
        for entry in gone.values() {
            self.raft_dead(*entry);
        }
        !gone.is_empty()
    }

    /// Forgets the messages no entry names any more (their records die with their chunk).
    pub(super) fn end_ops(&mut self) {
        for msg_id in std::mem::take(&mut self.released) {
            if self.msgs.get(msg_id).is_some_and(|m| m.refs == 0) {
                self.msgs.remove(msg_id);
            }
        }
    }

    /// What to truncate next in this commit, if anything: dead heads always, and while
    /// the log is more than twice its live bytes (and above the floor), a live head,
    /// unless only Raft entries keep it and it is not yet [`RAFT_HEAD_GRACE`] behind:
    /// a group's snapshot soon makes those dead, and copying them would only write the
    /// group's log twice.
    pub(super) fn next_truncation(&self) -> Option<Truncation> {
        let (&head, info) = self.chunks.first_key_value()?;
        if head == self.current {
            return None;
        }
        if info.live == 0 {
            return Some(Truncation::Delete(head));
        }
        if self.rewritten >= COMPACT_HEADS_PER_COMMIT {
            return None;
        }
        let behind = self.current.saturating_sub(head);
        let too_old = behind >= MAX_CHUNK_SPAN;
        let worth_it = self.log_bytes > COMPACT_FLOOR_BYTES
            && self.log_bytes > self.live_bytes.saturating_mul(2);
        // The groups are looked at last: only when the head would be rewritten.
        let rewrite = too_old || (worth_it && !self.left_for_snapshots(head, behind));
        rewrite.then_some(Truncation::Rewrite(head))
    }

    /// Whether the head `head`, `behind` chunks behind the current one, is left for
    /// Raft snapshots to truncate (see [`RAFT_HEAD_GRACE`]). Never in the message log,
    /// which holds no Raft entries.
    fn left_for_snapshots(&self, head: ChunkId, behind: u64) -> bool {
        behind < RAFT_HEAD_GRACE
            && self.log_bytes
                < (self.live_bytes.max(COMPACT_FLOOR_BYTES)).saturating_mul(RAFT_WAIT_MAX_FACTOR)
            && self.head_groups_are_active(head)
    }

    /// Whether the Raft groups whose oldest live entry is in chunk `head` (at least one)
    /// all had their oldest entries cut within the last [`RAFT_ACTIVE_CHUNKS`] chunks:
    /// their snapshots go on truncating them, and will soon reach this chunk. A group whose oldest entry lies elsewhere (a rewrite
    /// moved it) is not seen, so the answer errs toward rewriting, which only costs a
    /// copy.
    fn head_groups_are_active(&self, head: ChunkId) -> bool {
        let mut found = false;
        for log in self.raft.values() {
            let Some((_, oldest)) = log.entries.first_key_value() else {
                continue;
            };
            if self.full(oldest.chunk) != head {
                continue;
            }
            let purging = log
                .last_purge
                .is_some_and(|at| self.current.saturating_sub(at) <= RAFT_ACTIVE_CHUNKS);
            if !purging {
                return false;
            }
            found = true;
        }
        found
    }

    /// The head `chunk` (with bytes `bytes`) is rewritten: its live records go into `out`
    /// (the current chunk) and move there. Call [`LiveIndex::deleted`] next.
    pub(super) fn rewrite(
        &mut self,
        chunk: ChunkId,
        bytes: &[u8],
        bodies: &[u8],
        out: &mut ChunkWriter,
    ) -> Result<(), DamagedChunk> {
        let current = self.current;
        let mut reader = ChunkReader::new(chunk, bytes)?;
        let mut local: HashMap<u32, QueueId> = HashMap::new();
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Name { local: l, name } => {
                    if let Some(&id) = self.ids.get(name) {
                        local.insert(l, id);
                    }
                }
                Record::Put { msg_id, head, body } => {
                    let Some(msg) = self.msgs.get_mut(msg_id) else {
                        continue;
                    };
                    if msg.chunk != ChunkTag::of(chunk) || msg.refs == 0 {
                        continue;
                    }
                    msg.chunk = ChunkTag::of(current);
                    let head_bytes = head
                        .of(bytes)
                        .ok_or_else(|| reader.damaged("record cut short"))?;
                    if body.len == 0 {
                        // Whole in the chunk (an inline chunk): cut it as new ones are.
                        out.put(msg_id, head_bytes);
                    } else {
                        let body_bytes = body
                            .of(bodies)
                            .ok_or_else(|| reader.damaged("a body is missing"))?;
                        out.put_parts(msg_id, head_bytes, body_bytes);
                    }
                    self.live_sub(chunk);
                    self.live_add(current);
                }
                Record::Enqueue {
                    local: l, offset, ..
                } => {
                    let Some(&queue) = local.get(&l) else {
                        continue;
                    };
                    let Some(entry) = self.queues[queue as usize].get_mut(offset) else {
                        continue;
                    };
                    if entry.chunk != ChunkTag::of(chunk) {
                        continue;
                    }
                    entry.chunk = ChunkTag::of(current);
                    let (msg_id, count) = (entry.msg_id, entry.delivery_count);
                    out.enqueue(queue, &self.names[queue as usize], offset, msg_id, count);
                    self.live_sub(chunk);
                    self.live_add(current);
                }
                Record::RaftEntry {
                    group,
                    index,
                    entry,
                } => {
                    let Some(live) = self
                        .raft
                        .get_mut(&group)
                        .and_then(|l| l.entries.get_mut(&index))
                    else {
                        continue;
                    };
                    if live.chunk != ChunkTag::of(chunk) {
                        continue;
                    }
                    live.chunk = ChunkTag::of(current);
                    let entry_bytes = entry
                        .of(bytes)
                        .ok_or_else(|| reader.damaged("record cut short"))?;
                    out.raft_entry(group, index, entry_bytes);
                    self.live_sub(chunk);
                    self.live_add(current);
                }
                Record::Remove { .. }
                | Record::Delivered { .. }
                | Record::Purge { .. }
                | Record::RaftCut { .. } => {}
            }
        }
        self.rewritten += 1;
        Ok(())
    }

    /// The head `chunk` was deleted.
    pub(super) fn deleted(&mut self, chunk: ChunkId) {
        if let Some(info) = self.chunks.remove(&chunk) {
            self.log_bytes = self.log_bytes.saturating_sub(info.bytes);
            if info.live > 0 {
                tracing::error!(
                    chunk,
                    live = info.live,
                    "store: a message log chunk was deleted with live records"
                );
            }
        }
    }

    /// Ends the commit: whether the current chunk must be stored (`bytes` long). It need
    /// not when it holds nothing live and no older chunk is left for its settlements to
    /// act on.
    pub(super) fn finish(&mut self, bytes: usize, written: bool) -> bool {
        let current = self.current;
        let alone = self.chunks.len() == 1;
        let live = self.chunks.get(&current).map_or(0, |info| info.live);
        if !written || (alone && live == 0) {
            self.chunks.remove(&current);
            return false;
        }
        if let Some(info) = self.chunks.get_mut(&current) {
            info.bytes = bytes as u64;
        }
        self.log_bytes += bytes as u64;
        true
    }
}

/// What [`Replay::finish`] found.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// The writer's state.
    pub(super) index: LiveIndex,
    /// Live entries per queue key, in offset order, whose message is stored; the blobs
    /// of those that come back whole are still to be read (see
    /// [`Replayed::whole_blobs`]).
    pub(super) queues: HashMap<String, RecoveredQueue>,
    /// Greater than every msg id in the log (0 when the log is empty).
    pub(super) next_msg_id: u64,
    /// Entries whose message is in no chunk: (queue key, offset).
    pub(super) dangling: Vec<(String, u64)>,
    /// Stored messages no entry names.
    pub(super) orphans: usize,
    /// Scratch queues (`SCRATCH_PREFIX`) that hold entries: not recovered, to be purged.
    pub(super) scratch: Vec<String>,
    /// Every Raft group's live log entries, by index.
    pub(super) raft: HashMap<u64, BTreeMap<u64, Vec<u8>>>,
}

impl Replayed {
    /// The blobs to read back whole, `(chunk holding it, msg id)`, sorted, each once.
    pub(super) fn whole_blobs(&self) -> Vec<(ChunkId, u64)> {
        let mut wanted: Vec<(ChunkId, u64)> = self
            .queues
            .values()
            .flat_map(|q| q.whole_ids())
            .filter_map(|&id| self.index.locate(id).map(|chunk| (chunk, id)))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        wanted
    }
}

/// While the entries are listed, the digests' room is given back every time this many
/// of them have been released (a deque keeps its room until a quarter full otherwise).
const HEADS_SHRINK_EVERY: usize = 1 << 20;

/// A stored message's head digest, kept while the log is read (see
/// [`crate::store::BlobTrim`]).
#[derive(Debug, Clone, Copy)]
struct ScannedHead {
    /// Never `u32::MAX`: that marks a vacant slot of a [`DenseMap`].
    head_len: u32,
    words: [u64; 2],
}

impl ScannedHead {
    /// `digest` of a blob `len` bytes long, when its head fits in it.
    fn new(digest: HeadDigest, len: usize) -> Option<ScannedHead> {
        let head_len = u32::try_from(digest.head_len)
            .ok()
            .filter(|&h| h != u32::MAX && h as usize <= len)?;
        Some(ScannedHead {
            head_len,
            words: digest.words,
        })
    }
}

impl DenseValue for ScannedHead {
    const VACANT: ScannedHead = ScannedHead {
        head_len: u32::MAX,
        words: [0; 2],
    };

    fn is_vacant(&self) -> bool {
        self.head_len == u32::MAX
    }
}

/// Rebuilds the live state from the chunks, read one at a time in increasing order
/// ([`Replay::scan`]), without keeping them: where every message's last `Put` is (a
/// rewrite moves it forward), and the entry records applied in order. Messages are
/// matched with entries at the end ([`Replay::finish`]): an entry whose message is in no
/// chunk is dangling and is dropped. Reference counts and the live records of each chunk
/// are computed from the result, which is exactly the writer's in-memory state before
/// the crash.
///
/// Memory: the writer's index (one record per live entry and per stored message, as
/// the running writer holds), plus, with a digest, a 24-byte digest per stored message,
/// given up as the entries are listed for the broker.
#[derive(Debug, Default)]
pub(super) struct Replay {
    /// Its `msgs` hold every message `Put` so far, referenced or not (`refs` 0), until
    /// [`Replay::finish`] counts the references.
    index: LiveIndex,
    /// The broker's digest of a blob's head, when it reads bodies back lazily.
    digest: Option<DigestFn>,
    /// The digest of every stored message's head that has one.
    heads: DenseMap<ScannedHead>,
    next_msg_id: u64,
    /// Copies of the live Raft entries met so far (the index holds where they are).
    raft: HashMap<u64, BTreeMap<u64, Vec<u8>>>,
}

impl Replay {
    /// A replay that keeps a digest of each message's head, as `digest` makes it.
    pub(super) fn new(digest: Option<DigestFn>) -> Replay {
        Replay {
            digest,
            ..Replay::default()
        }
    }

    /// Takes in the next chunk's records.
    pub(super) fn scan(&mut self, chunk: ChunkId, bytes: &[u8]) -> Result<(), DamagedChunk> {
        let index = &mut self.index;
        index.newest = chunk;
        index.chunks.insert(
            chunk,
            ChunkInfo {
                bytes: bytes.len() as u64,
                ..ChunkInfo::default()
            },
        );
        index.log_bytes += bytes.len() as u64;
        let mut reader = ChunkReader::new(chunk, bytes)?;
        let mut local: HashMap<u32, QueueId> = HashMap::new();
        let resolve = |local: &HashMap<u32, QueueId>, l: u32, reader: &ChunkReader<'_>| {
            local
                .get(&l)
                .copied()
                .ok_or_else(|| reader.damaged("record names an unnamed queue"))
        };
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Name { local: l, name } => {
                    let id = index.queue_id(name);
                    local.insert(l, id);
                }
                Record::Put { msg_id, head, body } => {
                    // The chunk's size counts its bodies row, which is not read.
                    if let Some(info) = index.chunks.get_mut(&chunk) {
                        info.bytes += body.len as u64;
                    }
                    index.log_bytes += body.len as u64;
                    let len = head.len + body.len;
                    let msg = LiveMsg {
                        chunk: ChunkTag::of(chunk),
                        refs: 0,
                        len: len as u32,
                    };
                    index.msgs.insert(msg_id, msg);
                    if let Some(digest) = self.digest {
                        let head_bytes = head
                            .of(bytes)
                            .ok_or_else(|| reader.damaged("record cut short"))?;
                        match digest(head_bytes).and_then(|d| ScannedHead::new(d, len)) {
                            Some(head) => {
                                self.heads.insert(msg_id, head);
                            }
                            None => {
                                self.heads.remove(msg_id);
                            }
                        }
                    }
                    self.next_msg_id = self.next_msg_id.max(msg_id.saturating_add(1));
                }
                Record::Enqueue {
                    local: l,
                    offset,
                    msg_id,
                    delivery_count,
                } => {
                    let queue = resolve(&local, l, &reader)?;
                    let entry = LiveEntry {
                        msg_id,
                        chunk: ChunkTag::of(chunk),
                        delivery_count,
                    };
                    index.queues[queue as usize].insert(offset, entry);
                }
                Record::Remove { local: l, offset } => {
                    let queue = resolve(&local, l, &reader)?;
                    index.queues[queue as usize].remove(offset);
                }
                Record::Delivered { local: l, offset } => {
                    let queue = resolve(&local, l, &reader)?;
                    if let Some(entry) = index.queues[queue as usize].get_mut(offset) {
                        entry.delivery_count = entry.delivery_count.saturating_add(1);
                    }
                }
                Record::Purge { local: l } => {
                    let queue = resolve(&local, l, &reader)?;
                    index.queues[queue as usize].clear();
                }
                Record::RaftEntry {
                    group,
                    index: at,
                    entry,
                } => {
                    let entry = entry
                        .of(bytes)
                        .ok_or_else(|| reader.damaged("record cut short"))?;
                    let live = LiveRaftEntry {
                        chunk: ChunkTag::of(chunk),
                        len: entry.len() as u32,
                    };
                    index
                        .raft
                        .entry(group)
                        .or_default()
                        .entries
                        .insert(at, live);
                    self.raft
                        .entry(group)
                        .or_default()
                        .insert(at, entry.to_vec());
                }
                Record::RaftCut { group, cut } => {
                    if let Some(log) = index.raft.get_mut(&group) {
                        cut.take(&mut log.entries);
                        if matches!(cut, RaftCut::UpTo(_)) {
                            log.last_purge = Some(chunk);
                        }
                    }
                    if let Some(log) = self.raft.get_mut(&group) {
                        cut.take(log);
                    }
                }
            }
        }
        Ok(())
    }

    /// The result: live entries listed per queue, reference counts, live records per
    /// chunk. Per queue, in offset order, entries come back whole until their blobs
    /// total at least `whole_per_queue` bytes (all of them without a limit, or without
    /// a digest), the others as their head's digest.
    pub(super) fn finish(self, whole_per_queue: Option<usize>) -> Replayed {
        let Replay {
            mut index,
            mut heads,
            next_msg_id,
            mut raft,
            ..
        } = self;
        // Live Raft entries keep their chunks.
        index.raft.retain(|_, log| !log.entries.is_empty());
        raft.retain(|_, log| !log.is_empty());
        for entry in index.raft.values().flat_map(|log| log.entries.values()) {
            index.live_bytes += u64::from(entry.len);
            if let Some(info) = index.chunks.get_mut(&entry.chunk.chunk(index.newest)) {
                info.live += 1;
            }
        }
        // Entries whose message is stored take a reference to it; the others dangle.
        let mut dangling = Vec::new();
        let mut scratch = Vec::new();
        for (queue, entries) in index.queues.iter_mut().enumerate() {
            let name = &index.names[queue];
            if name.starts_with(super::SCRATCH_PREFIX) && !entries.is_empty() {
                scratch.push(name.clone());
            }
            entries.retain(|offset, entry| {
                let Some(msg) = index.msgs.get_mut(entry.msg_id) else {
                    dangling.push((name.clone(), offset));
                    return false;
                };
                msg.refs = msg.refs.saturating_add(1);
                if let Some(info) = index.chunks.get_mut(&entry.chunk.chunk(index.newest)) {
                    info.live += 1;
                }
                true
            });
        }
        let stored = index.msgs.len();
        index.msgs.retain(|_, msg| msg.refs > 0);
        let orphans = stored - index.msgs.len();
        for (_, msg) in index.msgs.iter() {
            index.live_bytes += u64::from(msg.len);
            if let Some(info) = index.chunks.get_mut(&msg.chunk.chunk(index.newest)) {
                info.live += 1;
            }
        }

        let mut queues = HashMap::new();
        let mut released = 0usize;
        for (queue, entries) in index.queues.iter().enumerate() {
            let name = &index.names[queue];
            // A scratch queue's entries stay live until the purge that opening the
            // store writes.
            if entries.is_empty() || name.starts_with(super::SCRATCH_PREFIX) {
                continue;
            }
            let mut list = RecoveredQueue::default();
            let mut bytes = 0usize;
            for (offset, entry) in entries.iter_in_order() {
                let Some(msg) = index.msgs.get(entry.msg_id) else {
                    continue;
                };
                let within = whole_per_queue.is_none_or(|window| bytes < window);
                bytes = bytes.saturating_add(msg.len as usize);
                let head = heads.get(entry.msg_id).copied().filter(|_| !within);
                match head {
                    Some(head) => {
                        let digest = HeadDigest {
                            head_len: head.head_len as usize,
                            words: head.words,
                        };
                        let tail_len = msg.len.saturating_sub(head.head_len);
                        list.push_on_disk(
                            offset,
                            entry.msg_id,
                            digest,
                            tail_len,
                            entry.delivery_count,
                        );
                    }
                    None => list.push_whole(offset, entry.msg_id, entry.delivery_count),
                }
                // Its last entry listed: its digest is no longer needed, and the
                // digests' memory goes as the list's grows.
                if msg.refs == 1 && heads.remove(entry.msg_id).is_some() {
                    released += 1;
                    if released.is_multiple_of(HEADS_SHRINK_EVERY) {
                        heads.shrink_to_fit();
                    }
                }
            }
            queues.insert(name.clone(), list);
        }
        Replayed {
            index,
            queues,
            next_msg_id,
            dangling,
            orphans,
            scratch,
            raft,
        }
    }
}

/// [`Replay`] over chunks held in memory `(number, bytes)`, in increasing order, every
/// blob coming back whole.
#[cfg(test)]
pub(super) fn replay(chunks: Vec<(ChunkId, bytes::Bytes)>) -> Result<Replayed, DamagedChunk> {
    let mut replay = Replay::default();
    for (chunk, bytes) in &chunks {
        replay.scan(*chunk, bytes)?;
    }
    Ok(replay.finish(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_costs_28_bytes_per_paged_message() {
        assert_eq!(std::mem::size_of::<LiveEntry>(), 16);
        assert_eq!(std::mem::size_of::<LiveMsg>(), 12);
    }

    /// One commit writing chunk `chunk`: message `msg_id` stored and enqueued at `offset`.
    fn commit_one(index: &mut LiveIndex, queue: QueueId, chunk: ChunkId, msg_id: u64) {
        index.begin(chunk);
        index.put(msg_id, 10);
        assert!(index.enqueue(queue, msg_id, msg_id));
        index.end_ops();
        assert!(index.finish(100, true));
    }

    #[test]
    fn chunk_numbers_past_four_billion_keep_their_records_apart() {
        let mut index = LiveIndex::default();
        let q = index.queue_id("q");
        let first = (1u64 << 32) - 1;
        // The second chunk's low 32 bits are 0, the third's 1, as chunk 1's are.
        for (i, chunk) in (first..first + 3).enumerate() {
            commit_one(&mut index, q, chunk, i as u64);
        }
        for (i, chunk) in (first..first + 3).enumerate() {
            assert_eq!(index.locate(i as u64), Some(chunk));
        }
        index.begin(first + 3);
        assert!(index.remove(q, 1));
        index.end_ops();
        // Chunk `first` still holds a live entry; the one after it does not.
        assert_eq!(index.next_truncation(), None);
        assert!(index.remove(q, 0));
        index.end_ops();
        assert_eq!(index.next_truncation(), Some(Truncation::Delete(first)));
        index.deleted(first);
        assert_eq!(index.next_truncation(), Some(Truncation::Delete(first + 1)));
        index.deleted(first + 1);
        assert_eq!(index.next_truncation(), None);
        assert_eq!(index.locate(2), Some(first + 2));
    }

    #[test]
    fn a_live_raft_entry_of_a_rewritten_head_moves_and_a_cut_one_does_not() {
        let mut index = LiveIndex::default();
        let mut out = ChunkWriter::default();
        index.begin(1);
        for (at, entry) in [(1u64, &b"one"[..]), (2, b"two"), (3, b"three")] {
            index.raft_append(5, at, entry.len());
            out.raft_entry(5, at, entry);
        }
        index.end_ops();
        assert!(index.finish(out.bytes().len(), true));
        let head = out.bytes().to_vec();

        out.clear();
        index.begin(2);
        assert!(index.raft_cut(5, RaftCut::UpTo(1)));
        out.raft_cut(5, RaftCut::UpTo(1));
        assert!(!index.raft_cut(5, RaftCut::UpTo(1)), "nothing left to cut");
        index.end_ops();
        index.rewrite(1, &head, &[], &mut out).expect("rewrite");
        index.deleted(1);
        assert!(index.finish(out.bytes().len(), true));

        // The rewritten chunk alone holds the log: entries 2 and 3, with their bytes.
        let replayed = replay(vec![(2, bytes::Bytes::from(out.bytes().to_vec()))]).expect("replay");
        let log: Vec<(u64, Vec<u8>)> = replayed.raft[&5].clone().into_iter().collect();
        assert_eq!(log, vec![(2, b"two".to_vec()), (3, b"three".to_vec())]);
        assert_eq!(replayed.index.chunks[&2].live, 2);
        assert_eq!(replayed.index.live_bytes, 8);
        assert_eq!(index.live_bytes, 8);
    }

    #[test]
    fn a_head_kept_by_a_group_being_purged_waits_and_one_kept_by_an_idle_group_is_copied() {
        // Chunks of 40 MiB: two make the log worth shrinking against a few live bytes.
        let big = 40 << 20;
        let mut index = LiveIndex::default();
        index.begin(1);
        index.raft_append(0, 1, 10);
        index.raft_append(5, 1, 10);
        index.raft_append(5, 2, 10);
        index.end_ops();
        assert!(index.finish(big, true));
        index.begin(2);
        index.raft_append(5, 3, 10);
        assert!(index.raft_cut(5, RaftCut::UpTo(1)));
        index.end_ops();
        assert!(index.finish(big, true));

        // Chunk 1 holds entry 1 of group 0 (never purged) and entry 2 of group 5 (purged
        // in chunk 2): group 0's oldest entry is there, so it is copied forward.
        index.begin(3);
        assert_eq!(index.next_truncation(), Some(Truncation::Rewrite(1)));
        assert!(!index.finish(0, false));

        // Without group 0, only group 5, which its snapshots are truncating, keeps it.
        assert!(index.raft_cut(0, RaftCut::All));
        index.begin(3);
        assert_eq!(
            index.next_truncation(),
            None,
            "left for group 5's next purge"
        );
        assert!(!index.finish(0, false));
        // Group 5 stops being purged: past RAFT_ACTIVE_CHUNKS, it counts as idle.
        index.begin(3 + RAFT_ACTIVE_CHUNKS);
        assert_eq!(index.next_truncation(), Some(Truncation::Rewrite(1)));
    }

    #[test]
    fn a_head_far_behind_the_current_chunk_is_rewritten_however_small_the_log() {
        let mut index = LiveIndex::default();
        let q = index.queue_id("q");
        commit_one(&mut index, q, 1, 0);
        index.begin(MAX_CHUNK_SPAN);
        assert_eq!(index.next_truncation(), None, "a small log is left alone");
        assert!(!index.finish(0, false));
        index.begin(1 + MAX_CHUNK_SPAN);
        assert_eq!(index.next_truncation(), Some(Truncation::Rewrite(1)));
    }
}
