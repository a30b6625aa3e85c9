//! The cluster harness itself: its nodes are separate hosts reachable at their own
//! addresses, its faults do what they say, and it leaves nothing behind.

mod cluster;

use std::time::Duration;

use cluster::{AMQP_PORT, Cluster};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

async fn declare(conn: &lapin::Connection, name: &str, passive: bool) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            passive,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_hosts_of_their_own_and_faults_apply() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    for i in 1..=3 {
        let conn = c.connect(i).await;
        assert!(conn.status().connected());
    }
    assert!(c.can_reach(1, 2, AMQP_PORT) && c.can_reach(3, 1, AMQP_PORT));

    c.partition(&[1], &[2, 3]);
    assert!(!c.can_reach(1, 2, AMQP_PORT), "partitioned both ways");
    assert!(!c.can_reach(3, 1, AMQP_PORT), "partitioned both ways");
    assert!(
        c.can_reach(2, 3, AMQP_PORT),
        "the majority side stays connected"
    );
    assert!(
        c.try_connect(1, Duration::from_secs(2)).await.is_some(),
        "tests still reach node 1"
    );
    c.heal();
    assert!(c.can_reach(1, 2, AMQP_PORT));

    c.drop_one_way(1, 3);
    assert!(!c.can_reach(1, 3, AMQP_PORT));
    assert!(
        c.can_reach(1, 2, AMQP_PORT),
        "only the named direction is cut"
    );
    c.heal();
    assert!(c.can_reach(1, 3, AMQP_PORT));

    c.link_down(2);
    assert!(
        c.try_connect(2, Duration::from_secs(1)).await.is_none(),
        "link down"
    );
    assert!(!c.can_reach(1, 2, AMQP_PORT));
    c.link_up(2);
    c.connect(2).await;

    c.pause(3);
    assert!(
        c.try_connect(3, Duration::from_secs(1)).await.is_none(),
        "paused"
    );
    c.resume(3);
    c.connect(3).await;

    let conn = c.connect(1).await;
    declare(&conn, "survives-kill", false)
        .await
        .expect("declare");
    // A confirmed persistent publish to it is stored after its definition: both are on
    // disk once the confirm arrives. (declare-ok alone does not wait for the disk.)
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "survives-kill".into(),
            Default::default(),
            b"kept",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    c.kill(1);
    assert!(!c.is_running(1));
    c.start_node(1);
    let conn = c.connect(1).await;
    declare(&conn, "survives-kill", true)
        .await
        .expect("a durable queue survives kill -9 and restart");
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get("survives-kill".into(), Default::default())
        .await
        .unwrap()
        .expect("the confirmed message survives too");
    assert_eq!(got.delivery.data, b"kept");

    let namespaces = c.namespaces();
    let bridge = format!("wc-{}-br", c.subnet);
    drop(c);
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for ns in namespaces {
        assert!(!listed.contains(&ns), "namespace {ns} removed");
    }
    let link = std::process::Command::new("ip")
        .args(["link", "show", &bridge])
        .output()
        .unwrap();
    assert!(!link.status.success(), "bridge {bridge} removed");
}

/// Waits up to 15 s for `needle` in node `i`'s log.
async fn wait_log(c: &Cluster, i: usize, needle: &str) -> bool {
    for _ in 0..300 {
        if c.log(i).contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nodes_link_to_every_peer_and_refuse_another_secret() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    let names = c.member_names();
    for i in 1..=3 {
        for (j, peer) in names.iter().enumerate() {
            if j + 1 != i {
                assert!(
                    wait_log(&c, i, &format!("link to {peer} up")).await,
                    "node {i} linked to {peer}:\n{}",
                    c.log_tail(i)
                );
            }
        }
    }
    c.kill(3);
    c.set_env("WARREN_CLUSTER_SECRET", "not-the-cluster-secret");
    c.start_node(3);
    assert!(
        wait_log(&c, 3, "cluster_secret differs").await,
        "node 3 says why it has no link:\n{}",
        c.log_tail(3)
    );
    assert!(
        wait_log(&c, 1, "could not prove the cluster secret").await,
        "node 1 refused node 3:\n{}",
        c.log_tail(1)
    );
}
