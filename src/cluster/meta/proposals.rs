//! Definition changes this node's connections make, proposed to the metadata group one
//! batch at a time in the order they were made (a bind proposed after its exchange's
//! declare is committed after it), and the barrier a connection waits on before it
//! answers: as the store's commit barrier does for a single node, a connection notes the
//! ticket counter before and after a method and waits until every ticket in between is
//! settled. A failed proposal makes the node resync its vhosts from the definitions it
//! has applied, undoing whatever the connection changed locally in advance.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};

use super::{MetaCommand, MetaError, MetaGroup};

/// At most this many commands go into one log entry.
const MAX_BATCH: usize = 1024;

/// How many failed tickets are remembered (a connection waits on recent ones only).
const FAILED_KEPT: usize = 4096;

/// A submission: its ticket and commands.
type Submission = (u64, Vec<MetaCommand>);

#[derive(Debug, Default)]
struct Settled {
    /// Every ticket up to here has been answered.
    upto: u64,
    /// Recent tickets whose proposal failed.
    failed: BTreeSet<u64>,
}

/// This node's proposer of definition changes.
#[derive(Debug, Clone)]
pub struct Proposals {
    queue: Arc<std::sync::Mutex<mpsc::UnboundedSender<Submission>>>,
    submitted: Arc<AtomicU64>,
    settled: watch::Receiver<Settled>,
}

impl Proposals {
    /// Starts the proposer task for `group`.
    pub fn start(group: MetaGroup) -> Proposals {
        let (tx, rx) = mpsc::unbounded_channel();
        let (settled_tx, settled) = watch::channel(Settled::default());
        tokio::spawn(propose_in_order(group, rx, settled_tx));
        Proposals {
            queue: Arc::new(std::sync::Mutex::new(tx)),
            submitted: Arc::new(AtomicU64::new(0)),
            settled,
        }
    }

    /// Queues `commands` for the group; returns their ticket.
    pub fn submit(&self, commands: Vec<MetaCommand>) -> u64 {
        // Tickets must reach the task in ticket order: take them under the lock.
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = self.submitted.fetch_add(1, Ordering::SeqCst) + 1;
        if queue.send((ticket, commands)).is_err() {
            tracing::warn!("cluster: the metadata proposer has stopped");
        }
        ticket
    }

    /// The last ticket handed out (a connection's barrier starts and ends here).
    pub fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::SeqCst)
    }

    /// Waits until every ticket in `(after, upto]` is settled; an error if one failed.
    pub async fn wait(&self, after: u64, upto: u64) -> Result<(), MetaError> {
        let mut settled = self.settled.clone();
        let reached = settled.wait_for(|s| s.upto >= upto).await;
        match reached {
            Ok(s) if s.failed.range(after + 1..=upto).next().is_none() => Ok(()),
            Ok(_) => Err(MetaError::Unavailable),
            Err(_) => Err(MetaError::Stopped("the metadata proposer stopped".into())),
        }
    }
}

/// Proposes what was submitted, a batch at a time, and settles the tickets.
async fn propose_in_order(
    group: MetaGroup,
    mut rx: mpsc::UnboundedReceiver<Submission>,
    settled: watch::Sender<Settled>,
) {
    while let Some((first, mut commands)) = rx.recv().await {
        let mut last = first;
        while commands.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((ticket, more)) => {
                    last = ticket;
                    commands.extend(more);
                }
                Err(_) => break,
            }
        }
        let command = if commands.len() == 1 {
            commands.remove(0)
        } else {
            MetaCommand::Batch(commands)
        };
        let result = group.propose(command).await;
        if let Err(e) = &result {
            tracing::warn!("cluster: a definition change was not committed: {e}");
            group.machine().resync();
        }
        settled.send_modify(|s| {
            s.upto = last;
            if result.is_err() {
                s.failed.extend(first..=last);
                while s.failed.len() > FAILED_KEPT {
                    s.failed.pop_first();
                }
            }
        });
    }
}
