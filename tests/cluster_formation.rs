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

/// `warren ctl cluster_status` against node `i`.
fn cluster_status(c: &Cluster, i: usize) -> String {
    c.ctl(i, &["cluster_status"])
}

/// The node names listed under `heading` in `cluster_status` output.
fn section(status: &str, heading: &str) -> Vec<String> {
    status
        .split(heading)
        .nth(1)
        .unwrap_or_default()
        .trim_start()
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_cluster_status_shows_members_reachability_and_the_leader() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    let leader = c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let names = c.member_names();
    let deadline = std::time::Instant::now() + ELECTION;
    let status = loop {
        let s = cluster_status(&c, 1);
        if section(&s, "Running Nodes").len() == 3 || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(section(&status, "Disk Nodes"), names, "{status}");
    assert_eq!(section(&status, "Running Nodes"), names, "{status}");
    let leader_name = &c.node(leader).name;
    assert!(
        status.contains(&format!("Metadata leader: {leader_name}")),
        "{status}"
    );

    // Node 3 cut off: it still lists every member, and runs with itself alone.
    c.partition(&[3], &[1, 2]);
    let deadline = std::time::Instant::now() + ELECTION;
    let status = loop {
        let s = cluster_status(&c, 3);
        if section(&s, "Running Nodes").len() == 1 || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(section(&status, "Disk Nodes"), names, "{status}");
    assert_eq!(
        section(&status, "Running Nodes"),
        vec![c.node(3).name.clone()],
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_node_leaves_the_membership_and_joins_again() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    let leader = c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let names = c.member_names();
    // The leader cannot be forgotten while it runs (RabbitMQ wants the node stopped).
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "ctl",
            "--url",
            &format!("http://{}:15672", c.node(leader).ip),
        ])
        .args(["-u", cluster::USER, "--password", cluster::USER])
        .args(["forget_cluster_node", &names[leader - 1]])
        .output()
        .expect("warren ctl runs");
    assert!(
        !refused.status.success(),
        "forgetting the running leader is refused"
    );
    // Forget a follower (asked through another member), then bring it back.
    let gone = (1..=3).find(|i| *i != leader).unwrap_or(1);
    let asker = (1..=3).find(|i| *i != gone).unwrap_or(1);
    let stay: Vec<String> = (1..=3)
        .filter(|i| *i != gone)
        .map(|i| names[i - 1].clone())
        .collect();
    c.ctl(asker, &["forget_cluster_node", &names[gone - 1]]);
    let deadline = std::time::Instant::now() + ELECTION;
    loop {
        let s = cluster_status(&c, asker);
        if section(&s, "Disk Nodes") == stay {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two voters left: both are the majority, and they go on without the forgotten one.
    let ch = c.connect(asker).await.create_channel().await.unwrap();
    ch.queue_declare(
        "while-forgotten".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();

    c.ctl(gone, &["join_cluster", &names[asker - 1]]);
    let s = cluster_status(&c, asker);
    assert_eq!(section(&s, "Disk Nodes"), names, "{s}");
    let ch = c.connect(gone).await.create_channel().await.unwrap();
    let deadline = std::time::Instant::now() + ELECTION;
    while ch
        .queue_declare(
            "while-forgotten".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "node 3 caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
