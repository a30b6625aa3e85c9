//! Spreading replicated queues' leaders over the cluster (`rabbitmq-queues rebalance`,
//! `POST /api/rebalance/queues`): after restarts the leaders gather on the nodes that
//! stayed up; each queue whose leader's node leads more than its share is handed to a
//! member that leads fewer.

use std::collections::BTreeMap;

use super::cluster_defs::{ClusterLink, LedQueue};

/// One planned move: queue `name` of `vhost`, from its leader `from` to member `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The queue's vhost.
    pub vhost: String,
    /// The queue.
    pub name: String,
    /// Its leader now.
    pub from: String,
    /// The member that should lead it.
    pub to: String,
}

/// The moves that leave every node leading at most its share (the number of queues
/// over the number of nodes that hold replicas, rounded up), where members allow.
pub fn plan(queues: &[LedQueue]) -> Vec<Move> {
    let mut leading: BTreeMap<&str, usize> = BTreeMap::new();
    for q in queues {
        for m in &q.members {
            leading.entry(m.as_str()).or_default();
        }
    }
    let led: Vec<&LedQueue> = queues.iter().filter(|q| q.leader.is_some()).collect();
    for q in &led {
        if let Some(l) = &q.leader {
            *leading.entry(l.as_str()).or_default() += 1;
        }
    }
    if leading.is_empty() {
        return Vec::new();
    }
    let share = led.len().div_ceil(leading.len());
    let mut moves = Vec::new();
    for q in led {
        let Some(from) = q.leader.as_deref() else {
            continue;
        };
        if leading.get(from).copied().unwrap_or(0) <= share {
            continue;
        }
        let to = q
            .members
            .iter()
            .filter(|m| m.as_str() != from)
            .map(|m| (leading.get(m.as_str()).copied().unwrap_or(0), m))
            .filter(|(n, _)| *n < share)
            .min();
        if let Some((_, to)) = to {
            *leading.entry(from).or_default() -= 1;
            *leading.entry(to.as_str()).or_default() += 1;
            moves.push(Move {
                vhost: q.vhost.clone(),
                name: q.name.clone(),
                from: from.to_string(),
                to: to.clone(),
            });
        }
    }
    moves
}

/// Moves carried out at once (each pauses its queue's publishes for a moment).
const MOVES_AT_ONCE: usize = 16;

/// Plans and carries out the moves for the queues `wanted` selects; the number of
/// queues each node leads afterwards, as the metadata group knows it.
pub async fn rebalance(
    link: &ClusterLink,
    wanted: impl Fn(&LedQueue) -> bool,
) -> BTreeMap<String, usize> {
    let queues: Vec<LedQueue> = link.led_queues().into_iter().filter(&wanted).collect();
    let moves = plan(&queues);
    for batch in moves.chunks(MOVES_AT_ONCE) {
        futures_util::future::join_all(batch.iter().map(|m| carry_out(link, m))).await;
    }
    // (Each new leader announces itself through the metadata group.)
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let queues: Vec<LedQueue> = link.led_queues().into_iter().filter(&wanted).collect();
    leaders_per_node(&queues)
}

async fn carry_out(link: &ClusterLink, m: &Move) {
    {
        match link.hand_over(&m.vhost, &m.name, &m.to).await {
            Ok(Some(now)) => tracing::info!(
                vhost = m.vhost,
                queue = m.name,
                from = m.from,
                to = now,
                "rebalance: leader moved"
            ),
            Ok(None) => tracing::info!(
                vhost = m.vhost,
                queue = m.name,
                to = m.to,
                "rebalance: leader not moved"
            ),
            Err(e) => tracing::warn!(vhost = m.vhost, queue = m.name, "rebalance: {e}"),
        }
    }
}

/// How many queues each node (holding a replica of any) leads.
pub fn leaders_per_node(queues: &[LedQueue]) -> BTreeMap<String, usize> {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for q in queues {
        for m in &q.members {
            count.entry(m.clone()).or_default();
        }
        if let Some(l) = &q.leader {
            *count.entry(l.clone()).or_default() += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str, members: &[&str], leader: &str) -> LedQueue {
        LedQueue {
            vhost: "/".into(),
            name: name.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            leader: Some(leader.into()),
        }
    }

    #[test]
    fn leaders_gathered_on_one_node_are_spread_over_the_members() {
        let all = ["a", "b", "c"];
        let queues: Vec<LedQueue> = (0..6).map(|i| q(&format!("q{i}"), &all, "a")).collect();
        let moves = plan(&queues);
        assert_eq!(moves.len(), 4);
        let mut after = leaders_per_node(&queues);
        for m in &moves {
            *after.get_mut(&m.from).unwrap() -= 1;
            *after.get_mut(&m.to).unwrap() += 1;
        }
        assert_eq!(after.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    }

    #[test]
    fn a_balanced_cluster_moves_nothing_and_moves_stay_within_members() {
        let balanced = vec![
            q("q0", &["a", "b", "c"], "a"),
            q("q1", &["a", "b", "c"], "b"),
            q("q2", &["a", "b", "c"], "c"),
        ];
        assert!(plan(&balanced).is_empty());
        // Only a and b hold q0..q3: c cannot take any of them.
        let pinned: Vec<LedQueue> = (0..4)
            .map(|i| q(&format!("q{i}"), &["a", "b"], "a"))
            .chain(std::iter::once(q("q9", &["c"], "c")))
            .collect();
        let moves = plan(&pinned);
        assert!(moves.iter().all(|m| m.to == "b"), "{moves:?}");
        assert_eq!(moves.len(), 2);
    }
}
