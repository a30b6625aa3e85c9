//! Using a queue through a node other than its home, on real `warren` processes in network
//! namespaces: publishes through any node reach the queue on its home, in each
//! publisher's order, and are confirmed only once the home has them; a publish whose home
//! is down is nacked, never confirmed and lost.

mod cluster;

use std::time::{Duration, Instant};

use cluster::Cluster;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

const ELECTION: Duration = Duration::from_secs(20);

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

async fn confirming_channel(c: &Cluster, i: usize) -> Channel {
    let ch = c.connect(i).await.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

/// Publishes `body` persistently to `queue` through the default exchange; whether it was
/// confirmed (acked) rather than nacked.
async fn publish(ch: &Channel, queue: &str, body: &[u8]) -> bool {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish sent");
    confirm.await.expect("answered").is_ack()
}

/// Waits until `queue` is visible through node `i`.
async fn wait_visible(c: &Cluster, i: usize, queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ch = c.connect(i).await.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..durable()
        };
        if ch
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{queue} not visible on node {i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Consumes (and acks) messages of `queue` through node `i` until none arrives for a
/// while; their bodies in order.
async fn drain(c: &Cluster, i: usize, queue: &str) -> Vec<String> {
    let ch = c.connect(i).await.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut bodies = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        bodies.push(String::from_utf8_lossy(&d.data).into_owned());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_through_other_nodes_reach_the_home_in_order_and_are_confirmed() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let home = c.connect(1).await.create_channel().await.unwrap();
    home.queue_declare("work".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    wait_visible(&c, 2, "work").await;
    wait_visible(&c, 3, "work").await;

    const N: usize = 300;
    let mut publishers = Vec::new();
    for node in [2, 3] {
        let ch = confirming_channel(&c, node).await;
        publishers.push(tokio::spawn(async move {
            for n in 0..N {
                let body = format!("{node}:{n}");
                assert!(publish(&ch, "work", body.as_bytes()).await, "{body} acked");
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // Confirmed means on the home: consume there.
    let got = drain(&c, 1, "work").await;
    assert_eq!(got.len(), 2 * N, "every confirmed message is on the home");
    for node in [2, 3] {
        let seq: Vec<usize> = got
            .iter()
            .filter_map(|b| b.strip_prefix(&format!("{node}:")))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(
            seq,
            (0..N).collect::<Vec<_>>(),
            "node {node}'s publishes in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_home_is_down_is_nacked_and_the_confirmed_ones_survive() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let home = c.connect(1).await.create_channel().await.unwrap();
    home.queue_declare("orders".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    wait_visible(&c, 2, "orders").await;
    let ch = confirming_channel(&c, 2).await;
    assert!(publish(&ch, "orders", b"before").await);

    c.kill(1);
    // The home is gone: a publish through node 2 is nacked, never acked and dropped.
    let mut acked = vec!["before".to_string()];
    let deadline = Instant::now() + Duration::from_secs(40);
    for n in 0.. {
        let body = format!("while-down-{n}");
        if publish(&ch, "orders", body.as_bytes()).await {
            acked.push(body);
        } else {
            break;
        }
        assert!(Instant::now() < deadline, "no nack while the home is down");
    }

    c.start_node(1);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !publish(&ch, "orders", b"after").await {
        assert!(Instant::now() < deadline, "the home took publishes again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acked.push("after".into());
    let got = drain(&c, 1, "orders").await;
    for body in &acked {
        assert!(
            got.contains(body),
            "confirmed {body} is on the home: {got:?}"
        );
    }
}
