//! What [`super::Store::open`] reads back, in the shape the broker takes it: definitions,
//! access records, Raft groups, and every queue's live entries.
//!
//! A backlog of millions of messages is read back without its bodies (see [`BlobTrim`]):
//! each entry whose body stays on disk is a 40-byte record in the queue's list, kept in
//! blocks that are freed as the broker takes the entries, so that start-up needs about the
//! memory the backlog needs once running, not that of its bodies or of one
//! allocation per message.

use std::collections::HashMap;

use bytes::Bytes;

use super::writer::IdBuildHasher;

/// Everything read back by [`super::Store::open`]: what the broker needs to rebuild its
/// state.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every stored definition `(key, value)`, sorted by key.
    pub definitions: Vec<(String, Vec<u8>)>,
    /// Every stored access-control record `(key, value)`, sorted by key.
    pub access: Vec<(String, Vec<u8>)>,
    /// Entries per queue key, in ascending offset order. Queues without entries are
    /// absent.
    pub queues: HashMap<String, RecoveredQueue>,
    /// Greater than every msg id in the database: where the broker resumes allocating.
    pub next_msg_id: u64,
    /// What every Raft group stored, by group id (empty for a single node).
    pub raft: HashMap<u64, RecoveredRaftGroup>,
}

/// One Raft group's log and durable values, read back by [`super::Store::open`].
#[derive(Debug, Default)]
pub struct RecoveredRaftGroup {
    /// The log's entries in index order.
    pub log: Vec<(u64, Vec<u8>)>,
    /// Durable values by name.
    pub state: HashMap<String, Vec<u8>>,
    /// The entries of the group's own queue keys (see [`super::replica_queue_key`]):
    /// a replicated queue's committed messages, kept in the message log.
    pub queues: HashMap<String, RecoveredQueue>,
}

/// How much of each stored message [`super::Store::open_trimmed`] reads back: a queue's
/// first messages whole, the others only as a digest of their head (what the broker
/// needs to order and expire a message without its body), so that opening a store with
/// a backlog far larger than memory neither holds nor copies its bodies.
#[derive(Debug, Clone, Copy)]
pub struct BlobTrim {
    /// Per queue, in offset order, messages come back whole until their blobs total at
    /// least this many bytes.
    pub whole_per_queue: usize,
    /// What the broker keeps of a blob it does not read back whole (the broker's
    /// format), `None` to read that blob whole after all (a head it cannot make sense
    /// of is left to the broker's full decoding).
    pub digest: DigestFn,
    /// Where a blob's head ends (the broker's format; `None` when it cannot tell): the
    /// writer keeps heads with the log's records and bodies apart, so that a later
    /// start-up reads the heads and not the bodies.
    pub head_len: fn(&[u8]) -> Option<usize>,
}

/// The broker's digest of a blob's head (see [`BlobTrim::digest`]).
pub type DigestFn = fn(&[u8]) -> Option<HeadDigest>;

/// A blob's head as [`BlobTrim::digest`] sums it up: opaque to the store, which keeps
/// it per stored message while it reads the log and hands it back with each entry left
/// on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadDigest {
    /// Bytes of the blob before its body; the rest is the body, whose length the
    /// broker gets back ([`RecoveredBlob::OnDisk::tail_len`]).
    pub head_len: usize,
    /// Whatever the broker needs of the head, in two words.
    pub words: [u64; 2],
}

/// One queue entry read back by [`super::Store::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredEntry {
    /// The offset given to [`super::StoreOp::Enqueue`].
    pub offset: u64,
    /// The message's id; the same for every queue holding the same message.
    pub msg_id: u64,
    /// The message blob, or what was kept of it.
    pub blob: RecoveredBlob,
    /// True when [`super::StoreOp::MarkDelivered`] was recorded for the entry (AMQP
    /// `redelivered`).
    pub delivered: bool,
    /// How many times [`super::StoreOp::MarkDelivered`] was recorded (for
    /// `x-delivery-count`).
    pub delivery_count: u32,
}

/// What a [`RecoveredEntry`] brings of its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveredBlob {
    /// The whole blob. Entries of one message share one allocation.
    Whole(Bytes),
    /// The blob stayed on disk (read it with [`super::Store::read_messages`]).
    OnDisk {
        /// [`HeadDigest::words`] of its head.
        words: [u64; 2],
        /// Bytes of the blob after its head.
        tail_len: usize,
    },
}

/// Marks a [`Listed`] entry whose blob comes back whole.
const WHOLE: u32 = u32::MAX;

/// Entries per block of a [`RecoveredQueue`]: 40 MiB, above the size from which
/// allocators (glibc's dynamic threshold tops out at 32 MiB) map a block of its own, so
/// that a block taken by the broker goes back to the system at once instead of staying
/// in the heap beside the queue's own records growing elsewhere.
const BLOCK: usize = 1 << 20;

/// An entry as a [`RecoveredQueue`] holds it (40 bytes).
#[derive(Debug, Clone, Copy)]
struct Listed {
    offset: u64,
    msg_id: u64,
    words: [u64; 2],
    /// Bytes of the blob after its head, or [`WHOLE`].
    tail_len: u32,
    delivery_count: u32,
}

/// One queue's entries read back, in ascending offset order. Iterate it by value to
/// take them ([`IntoIterator`]: each block of entries is freed once passed) or by
/// reference ([`RecoveredQueue::iter`]).
#[derive(Debug, Default)]
pub struct RecoveredQueue {
    blocks: Vec<Vec<Listed>>,
    len: usize,
    /// Blobs of the entries that come back whole, by msg id.
    whole: HashMap<u64, Bytes, IdBuildHasher>,
    /// Msg ids of the entries that come back whole, until their blobs are attached.
    whole_ids: Vec<u64>,
}

impl RecoveredQueue {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, in offset order, without taking them.
    pub fn iter(&self) -> impl Iterator<Item = RecoveredEntry> + '_ {
        self.blocks
            .iter()
            .flatten()
            .filter_map(|listed| entry(listed, &self.whole))
    }

    fn push(&mut self, listed: Listed) {
        match self.blocks.last_mut() {
            Some(block) if block.len() < BLOCK => block.push(listed),
            // A block grows as a `Vec` does, so a short queue's list stays short.
            _ => self.blocks.push(vec![listed]),
        }
        self.len += 1;
    }

    /// Appends an entry whose blob stays on disk.
    pub(super) fn push_on_disk(
        &mut self,
        offset: u64,
        msg_id: u64,
        digest: HeadDigest,
        tail_len: u32,
        delivery_count: u32,
    ) {
        self.push(Listed {
            offset,
            msg_id,
            words: digest.words,
            tail_len,
            delivery_count,
        });
    }

    /// Appends an entry whose blob comes back whole (attached later, see
    /// [`RecoveredQueue::attach`]).
    pub(super) fn push_whole(&mut self, offset: u64, msg_id: u64, delivery_count: u32) {
        self.push(Listed {
            offset,
            msg_id,
            words: [0; 2],
            tail_len: WHOLE,
            delivery_count,
        });
        self.whole_ids.push(msg_id);
    }

    /// Msg ids of the entries that come back whole.
    pub(super) fn whole_ids(&self) -> &[u64] {
        &self.whole_ids
    }

    /// Takes the blobs of the entries that come back whole from `blobs`. An entry whose
    /// blob is not there is left out (logged).
    pub(super) fn attach(&mut self, blobs: &HashMap<u64, Bytes, IdBuildHasher>) {
        for id in std::mem::take(&mut self.whole_ids) {
            match blobs.get(&id) {
                Some(blob) => {
                    self.whole.insert(id, blob.clone());
                }
                None => tracing::error!(
                    msg_id = id,
                    "store: a live message's blob was not found where the log says it is"
                ),
            }
        }
        let missing = self
            .blocks
            .iter()
            .flatten()
            .filter(|l| l.tail_len == WHOLE && !self.whole.contains_key(&l.msg_id))
            .count();
        self.len -= missing;
        if missing > 0 {
            for block in &mut self.blocks {
                block.retain(|l| l.tail_len != WHOLE || self.whole.contains_key(&l.msg_id));
            }
        }
    }
}

/// The entry `listed` stands for, with its blob from `whole` when it comes back whole.
fn entry(listed: &Listed, whole: &HashMap<u64, Bytes, IdBuildHasher>) -> Option<RecoveredEntry> {
    let blob = if listed.tail_len == WHOLE {
        RecoveredBlob::Whole(whole.get(&listed.msg_id)?.clone())
    } else {
        RecoveredBlob::OnDisk {
            words: listed.words,
            tail_len: listed.tail_len as usize,
        }
    };
    Some(RecoveredEntry {
        offset: listed.offset,
        msg_id: listed.msg_id,
        blob,
        delivered: listed.delivery_count > 0,
        delivery_count: listed.delivery_count,
    })
}

/// Takes the entries of a [`RecoveredQueue`] in offset order, freeing each block of
/// them once passed.
pub struct RecoveredEntries {
    blocks: std::vec::IntoIter<Vec<Listed>>,
    current: std::vec::IntoIter<Listed>,
    whole: HashMap<u64, Bytes, IdBuildHasher>,
}

impl Iterator for RecoveredEntries {
    type Item = RecoveredEntry;

    fn next(&mut self) -> Option<RecoveredEntry> {
        loop {
            if let Some(listed) = self.current.next() {
                if let Some(entry) = entry(&listed, &self.whole) {
                    return Some(entry);
                }
                continue;
            }
            self.current = self.blocks.next()?.into_iter();
        }
    }
}

impl IntoIterator for RecoveredQueue {
    type Item = RecoveredEntry;
    type IntoIter = RecoveredEntries;

    fn into_iter(self) -> RecoveredEntries {
        RecoveredEntries {
            blocks: self.blocks.into_iter(),
            current: Vec::new().into_iter(),
            whole: self.whole,
        }
    }
}
