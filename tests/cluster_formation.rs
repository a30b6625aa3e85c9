//! Real `warren` processes, each a host in its own network namespace, form one cluster
//! from `cluster_nodes` alone: in any start order they agree on one metadata leader, and
//! they elect another when it is killed or cut off, without the nodes that lost it.

mod cluster;

use std::time::Duration;

use cluster::Cluster;

const ELECTION: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_started_in_any_order_form_one_cluster() {
    let Some(mut c) = Cluster::create(3, &[]) else {
        return;
    };
    c.start_node(3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.logged_leader(3), None, "a node alone elects no leader");
    c.start_node(1);
    c.start_node(2);
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    for i in 1..=3 {
        c.connect(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_cut_off_leader_is_replaced_and_rejoins_as_a_follower() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    let first = c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;

    c.kill(first);
    let rest: Vec<usize> = (1..=3).filter(|i| *i != first).collect();
    let second = c.wait_agreed_leader(&rest, Some(first), ELECTION).await;
    assert_ne!(second, first, "the two survivors elected one of themselves");

    c.start_node(first);
    let again = c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    assert_ne!(
        again, first,
        "the restarted node lacks the new term's entries, so it follows"
    );

    // Cut the leader off from both others (it keeps running): they elect a new one.
    let others: Vec<usize> = (1..=3).filter(|i| *i != second).collect();
    c.partition(&[second], &others);
    let third = c.wait_agreed_leader(&others, Some(second), ELECTION).await;
    assert_ne!(third, second, "the majority side elected a new leader");
    c.heal();
    let healed = c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    assert_ne!(
        healed, second,
        "the cut-off node lacks the majority's entries, so it follows after healing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_follows_when_it_resumes() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    let first = c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    // SIGSTOP past the election timeout and the transport's silence limit.
    c.pause(first);
    let rest: Vec<usize> = (1..=3).filter(|i| *i != first).collect();
    c.wait_agreed_leader(&rest, Some(first), ELECTION).await;
    c.resume(first);
    let after = c
        .wait_agreed_leader(&[1, 2, 3], Some(first), ELECTION)
        .await;
    assert!(
        rest.contains(&after),
        "leader {after} is one of the nodes that kept running"
    );
}
