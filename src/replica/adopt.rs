//! A classic queue that a mirroring policy matches after it was declared becomes
//! replicated: the node that homes it founds a group of itself alone, and the queue's
//! messages seed that group's log before anything else is proposed (publishes that come
//! meanwhile wait behind them, so the order holds); the group then grows to the members
//! the policy asks for, the new ones catching up from its log or a snapshot as any new
//! member does.
//!
//! The seed is done once its last entry is committed and, in one store commit, the
//! classic copies of the messages are dropped and the group is marked [`ADOPTED`]. A
//! node that stops before that finds, at start, the classic copies still there and no
//! mark: the group (of this node alone, which nobody else has heard of) is dropped and
//! seeded again from them. A node that finds the mark drops any classic copies left.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::{Raft, ServerState};

use super::machine::RECORD_BITS;
use super::{ENTRY_BYTES, QueueTypes, ReplicaRecord};
use crate::cluster::meta::NodeId;
use crate::cluster::wire::GroupId;
use crate::queue::state::{Queued, Slot};
use crate::store::{Store, StoreOp};

/// The group's durable value saying that its seed is complete.
pub const ADOPTED: &str = "adopted";

/// Records one seed entry carries at most (besides [`ENTRY_BYTES`]).
const RECORDS_PER_SEED_ENTRY: usize = 4096;

/// How long the founding node waits to lead its new group.
const LEAD_LIMIT: Duration = Duration::from_secs(30);

/// A classic queue's messages, handed to the group that replicates it from now on.
#[derive(Debug)]
pub struct Seed {
    /// The queue's key in the node's store, where the classic copies are.
    pub classic_key: Arc<str>,
    /// The key of its transient messages' scratch copies (parked while memory ran
    /// short), which go with the classic copies.
    pub scratch_key: Option<Arc<str>>,
    /// Its messages in place order (paged ones still in the store).
    pub entries: Vec<Queued>,
}

/// What to do with a seed, given what the store recovered of its group.
#[derive(Debug, PartialEq, Eq)]
pub enum SeedStart {
    /// Seed the group (new, or dropped first: `reset`).
    Seed {
        /// The group holds a seeding that did not finish: drop its log and state first.
        reset: bool,
    },
    /// The classic copies are leftovers (the seed was done before) to drop.
    DropCopies,
}

/// Decides how a seed starts: `adopted` (the group carries the mark), `has_state` (the
/// store holds some of the group's log or state), `alone` (this node is the group's
/// only member, founding and wanted: only then may it drop the group's log).
pub fn seed_start(adopted: bool, has_state: bool, alone: bool) -> SeedStart {
    match (adopted, has_state) {
        (true, _) => SeedStart::DropCopies,
        (false, false) => SeedStart::Seed { reset: false },
        (false, true) if alone => SeedStart::Seed { reset: true },
        // (Cannot happen: a group grows only once its seed is done.)
        (false, true) => {
            tracing::error!("mirrored queue: classic copies beside a grown group: dropped");
            SeedStart::DropCopies
        }
    }
}

/// Proposes the seed's messages (and, for those handed out before, a delivery each, so
/// they come back redelivered) as this node's group's first entries, then drops their
/// classic copies and marks the group adopted in one commit. Returns the messages seeded.
pub(super) async fn seed(
    raft: &Raft<QueueTypes>,
    store: &Store,
    group: GroupId,
    me: NodeId,
    seed: Seed,
) -> anyhow::Result<usize> {
    raft.wait(Some(LEAD_LIMIT))
        .metrics(
            |m| m.current_leader == Some(me) && m.state == ServerState::Leader,
            "this node leads its new group",
        )
        .await?;
    let mut seeded = 0;
    // Deliveries of the previous entry's messages (their keys are known once it is).
    let mut delivered: Vec<u64> = Vec::new();
    let mut rest = seed.entries.as_slice();
    while !rest.is_empty() {
        let take = batch_len(rest);
        let (batch, after) = rest.split_at(take);
        rest = after;
        let blobs = contents(store, batch).await?;
        let mut records: Vec<ReplicaRecord> =
            delivered.drain(..).map(ReplicaRecord::Delivered).collect();
        let mut redelivered = Vec::new();
        for (queued, blob) in batch.iter().zip(blobs) {
            let Some(blob) = blob else {
                tracing::error!(
                    offset = queued.offset,
                    "mirrored queue: a message cannot be read back: not carried over"
                );
                continue;
            };
            if queued.redelivered {
                redelivered.push(records.len() as u64);
            }
            records.push(ReplicaRecord::Enqueue(blob));
            seeded += 1;
        }
        let written = raft
            .client_write(records)
            .await
            .map_err(|e| anyhow::anyhow!("seed entry not committed: {e}"))?;
        let base = written.log_id.index << RECORD_BITS;
        delivered = redelivered.into_iter().map(|p| base | p).collect();
    }
    if !delivered.is_empty() {
        raft.client_write(
            delivered
                .into_iter()
                .map(ReplicaRecord::Delivered)
                .collect(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("seed deliveries not committed: {e}"))?;
    }
    let mut done = vec![
        StoreOp::PurgeQueue {
            queue: seed.classic_key,
        },
        StoreOp::RaftPutState {
            group,
            key: ADOPTED.into(),
            value: Bytes::from_static(b"1"),
        },
    ];
    if let Some(scratch) = seed.scratch_key {
        done.push(StoreOp::PurgeQueue { queue: scratch });
    }
    store.commit(done).await;
    Ok(seeded)
}

/// How many of `entries` the next seed entry takes.
fn batch_len(entries: &[Queued]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for e in entries.iter().take(RECORDS_PER_SEED_ENTRY) {
        // (The body, and a generous allowance for properties and routing.)
        bytes += e.slot.size() + 256;
        n += 1;
        if bytes >= ENTRY_BYTES {
            break;
        }
    }
    n.max(1)
}

/// The store encodings of `batch`'s messages: in memory, or read back from the store
/// (None: not found there).
async fn contents(store: &Store, batch: &[Queued]) -> anyhow::Result<Vec<Option<Bytes>>> {
    let paged: Vec<u64> = batch.iter().filter_map(|q| q.slot.paged_id()).collect();
    let mut read = if paged.is_empty() {
        Vec::new()
    } else {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.read_messages(
            paged,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        );
        rx.await
            .map_err(|_| anyhow::anyhow!("the store closed"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?
    }
    .into_iter();
    Ok(batch
        .iter()
        .map(|q| match &q.slot {
            Slot::Loaded(msg) => Some(msg.encode()),
            Slot::Paged { .. } => read.next().flatten(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_starts_again_unless_it_finished() {
        assert_eq!(
            seed_start(false, false, true),
            SeedStart::Seed { reset: false }
        );
        assert_eq!(
            seed_start(false, true, true),
            SeedStart::Seed { reset: true }
        );
        assert_eq!(seed_start(true, true, true), SeedStart::DropCopies);
        assert_eq!(seed_start(false, true, false), SeedStart::DropCopies);
    }
}
