//! Mirroring policies applied to classic queues that already exist, as RabbitMQ applies
//! them: a queue is mirrored as soon as a policy matches it, gains or loses mirrors when
//! the policy changes, and keeps its messages on one node when the policy goes.
//!
//! - A classic queue homed on this node that a policy now mirrors becomes replicated:
//!   its messages seed a group of this node alone (see `crate::replica::adopt`), which
//!   then grows to the members the policy asks for.
//! - A mirrored classic queue led by this node gets the members its policy asks for now;
//!   when no policy mirrors it any more, its leader alone keeps it (a group of one
//!   member serves it as a queue on one node).
//!
//! Only the node that homes or leads a queue acts on it, one change at a time per queue;
//! changes are decided on the queue's agreed value and committed only if it still holds
//! (`MetaCommand::PutIfEqual`), so they never overwrite another.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::cluster_defs::ClusterLink;
use super::vhost::VHost;
use crate::replica::Replication;

/// The queues (vhost, name) whose mirroring is being changed now.
#[derive(Debug, Default)]
pub struct MirroringChanges {
    busy: Mutex<HashSet<(String, String)>>,
    /// When the queues were last looked at for their policies' sake (ms).
    looked_at: AtomicU64,
}

/// How often the queues are looked at besides policy changes (ms).
const LOOK_EVERY_MS: u64 = 2000;

impl MirroringChanges {
    /// Whether the periodic look is due at `now` (ms); if so, it counts as done.
    fn due(&self, now: u64) -> bool {
        let last = self.looked_at.load(Ordering::Relaxed);
        now.saturating_sub(last) >= LOOK_EVERY_MS
            && self
                .looked_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Claims queue `name` of `vhost` for one change; false when one runs.
    fn claim(&self, vhost: &str, name: &str) -> bool {
        lock(&self.busy).insert((vhost.to_string(), name.to_string()))
    }

    fn release(&self, vhost: &str, name: &str) {
        lock(&self.busy).remove(&(vhost.to_string(), name.to_string()));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What this node should do for one queue.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// Replicate the queue homed here.
    Replicate,
    /// Give the queue led here these members.
    Members(Vec<String>),
}

impl VHost {
    /// [`VHost::apply_mirroring`] every [`LOOK_EVERY_MS`] (the node's ticker).
    pub fn apply_mirroring_now_and_then(&self, now: u64) {
        if let Some(link) = self.cluster_link()
            && link.mirroring.due(now)
        {
            self.apply_mirroring();
        }
    }

    /// Brings this node's classic queues in line with the mirroring policies in force
    /// (after a policy change, and now and then: a change refused by a cluster without
    /// a majority is tried again). Changes run in the background.
    pub fn apply_mirroring(&self) {
        let Some(link) = self.cluster_link() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cluster = link.cluster.status().members;
        for q in self.queues() {
            let Some(change) = self.mirroring_change(link, &q.def, &cluster) else {
                continue;
            };
            let (vhost, name) = (self.name.clone(), q.name().to_string());
            if !link.mirroring.claim(&vhost, &name) {
                continue;
            }
            let link = link.clone();
            runtime.spawn(async move {
                let done = match &change {
                    Change::Replicate => link.replicate_homed(&vhost, &name).await.map(|_| ()),
                    Change::Members(members) => {
                        link.set_members(&vhost, &name, members.clone()).await
                    }
                };
                match done {
                    Ok(()) => tracing::info!(
                        vhost,
                        queue = name,
                        ?change,
                        "mirroring policy applied to an existing queue"
                    ),
                    Err(e) => tracing::warn!(
                        vhost,
                        queue = name,
                        "mirroring policy not applied yet: {e:?}"
                    ),
                }
                link.mirroring.release(&vhost, &name);
            });
        }
    }

    /// The change the mirroring policy in force asks of this node for queue `def`.
    fn mirroring_change(
        &self,
        link: &ClusterLink,
        def: &crate::queue::QueueDef,
        cluster: &[String],
    ) -> Option<Change> {
        if !def.durable || def.exclusive_owner.is_some() || !super::vhost::is_classic(def) {
            return None;
        }
        let wanted = self.replication(def);
        match link.placement(&self.name, &def.name)? {
            Ok(home) => (home == link.node && wanted.is_some()).then_some(Change::Replicate),
            Err(members) => {
                let (leader, _) = link.announced_leader(&self.name, &def.name)?;
                if leader != link.node || !members.contains(&leader) {
                    return None;
                }
                let next = wanted_members(&members, wanted.as_ref(), cluster, &leader);
                let same = next.len() == members.len() && next.iter().all(|m| members.contains(m));
                (!same).then_some(Change::Members(next))
            }
        }
    }
}

/// The members a mirrored queue led by `leader`, now on `current`, should have under
/// `wanted` (None: no policy mirrors it) in a cluster of `cluster`: its members stay as
/// far as the policy allows (the leader first of all), new ones are taken in name order
/// after the leader (as a new queue's are).
fn wanted_members(
    current: &[String],
    wanted: Option<&Replication>,
    cluster: &[String],
    leader: &str,
) -> Vec<String> {
    match wanted {
        None => vec![leader.to_string()],
        Some(Replication::Nodes(named)) => {
            let members: Vec<String> =
                named
                    .iter()
                    .filter(|n| cluster.contains(n))
                    .fold(Vec::new(), |mut out, n| {
                        if !out.contains(n) {
                            out.push(n.clone());
                        }
                        out
                    });
            if members.is_empty() {
                current.to_vec()
            } else {
                members
            }
        }
        Some(Replication::Count(n)) => {
            let target = (*n).clamp(1, cluster.len().max(1));
            let mut members = vec![leader.to_string()];
            members.extend(
                current
                    .iter()
                    .filter(|m| *m != leader && cluster.contains(m))
                    .cloned(),
            );
            members.truncate(target);
            let mut sorted: Vec<&String> = cluster.iter().collect();
            sorted.sort();
            let start = sorted.iter().position(|m| *m == leader).unwrap_or(0);
            for i in 0..sorted.len() {
                if members.len() >= target {
                    break;
                }
                let candidate = sorted[(start + i) % sorted.len()];
                if !members.contains(candidate) {
                    members.push(candidate.clone());
                }
            }
            members
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_policy_change_moves_as_few_members_as_it_can() {
        let cluster = names(&["a", "b", "c", "d"]);
        let three = Replication::Count(3);
        // Grows after the leader, in name order.
        assert_eq!(
            wanted_members(&names(&["c"]), Some(&three), &cluster, "c"),
            names(&["c", "d", "a"])
        );
        // Shrinks keeping the leader and the earliest others.
        assert_eq!(
            wanted_members(
                &names(&["a", "b", "c", "d"]),
                Some(&Replication::Count(2)),
                &cluster,
                "b"
            ),
            names(&["b", "a"])
        );
        // All: every node; more than the cluster: every node.
        assert_eq!(
            wanted_members(
                &names(&["b"]),
                Some(&Replication::Count(usize::MAX)),
                &cluster,
                "b"
            )
            .len(),
            4
        );
        // A member that left the cluster is replaced.
        assert_eq!(
            wanted_members(
                &names(&["a", "x"]),
                Some(&Replication::Count(2)),
                &cluster,
                "a"
            ),
            names(&["a", "b"])
        );
        // Named nodes, those of the cluster; none of them: as it is.
        let named = Replication::Nodes(names(&["d", "x", "b"]));
        assert_eq!(
            wanted_members(&names(&["a"]), Some(&named), &cluster, "a"),
            names(&["d", "b"])
        );
        let absent = Replication::Nodes(names(&["x"]));
        assert_eq!(
            wanted_members(&names(&["a", "b"]), Some(&absent), &cluster, "a"),
            names(&["a", "b"])
        );
        // No policy: the leader alone.
        assert_eq!(
            wanted_members(&names(&["a", "b", "c"]), None, &cluster, "b"),
            names(&["b"])
        );
    }
}
