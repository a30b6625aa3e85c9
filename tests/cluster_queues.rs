//! Using a queue through a node other than its home, on real `warren` processes in network
//! namespaces: publishes through any node reach the queue on its home, in each
//! publisher's order, and are confirmed only once the home has them; a publish whose home
//! is down is nacked, never confirmed and lost. Consumers, gets, purges and passive
//! declares through any node are proxied to the home: deliveries in queue order within
//! the consumer's prefetch, settlements applied there, and what a consumer held goes back
//! (redelivered) when its connection or node goes; a consumer whose home goes down is
//! cancelled.

mod cluster;

use std::time::{Duration, Instant};

use cluster::Cluster;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};

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

/// The next delivery of `consumer`, which must come within a few seconds.
async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is not cancelled")
        .expect("a delivery, not an error")
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..durable()
    }
}

/// A consumer with manual acks of `queue` on a new channel of `conn` with `prefetch`.
async fn consumer(
    conn: &lapin::Connection,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> (Channel, Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (ch, consumer)
}

/// Waits until `queue` has `ready` messages ready, asked through node `i`.
async fn wait_ready(c: &Cluster, i: usize, queue: &str, ready: u32) {
    let ch = c.connect(i).await.create_channel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = ch
            .queue_declare(queue.into(), passive(), FieldTable::default())
            .await
            .unwrap();
        if ok.message_count() == ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} has {} ready, not {ready}",
            ok.message_count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Declares `queue` through node 1 (its home) and publishes `n` messages `m0`.. to it
/// through node `through`, each confirmed.
async fn home_on_node_1(c: &Cluster, queue: &str, through: usize, n: usize) {
    let home = c.connect(1).await.create_channel().await.unwrap();
    home.queue_declare(queue.into(), durable(), FieldTable::default())
        .await
        .unwrap();
    for i in 2..=c.len() {
        wait_visible(c, i, queue).await;
    }
    let ch = confirming_channel(c, through).await;
    for i in 0..n {
        assert!(publish(&ch, queue, format!("m{i}").as_bytes()).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_getting_and_purging_through_another_node_use_the_home() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    const N: usize = 30;
    home_on_node_1(&c, "tasks", 2, N).await;

    // Counts through node 3 are the home's.
    let conn3 = c.connect(3).await;
    let ch3 = conn3.create_channel().await.unwrap();
    let ok = ch3
        .queue_declare("tasks".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(ok.message_count(), N as u32, "the home's message count");

    // basic.get through node 3, then a nack with requeue: it goes back to its place.
    let got = ch3
        .basic_get("tasks".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(body(&got.delivery), "m0");
    assert!(!got.delivery.redelivered);
    assert_eq!(got.message_count, N as u32 - 1);
    got.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();

    // A consumer through node 3 with prefetch 5 and manual acks.
    let (cons_ch, mut cons) = consumer(&conn3, "tasks", "c3", 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(next(&mut cons).await);
    }
    let bodies: Vec<String> = held.iter().map(body).collect();
    assert_eq!(bodies, ["m0", "m1", "m2", "m3", "m4"], "in queue order");
    assert!(held[0].redelivered, "m0 was got and requeued");
    assert!(held[1..].iter().all(|d| !d.redelivered));
    assert!(
        tokio::time::timeout(Duration::from_millis(700), cons.next())
            .await
            .is_err(),
        "no sixth delivery while five are unacknowledged (prefetch 5)"
    );
    // m4 goes back to its place and comes again (the one credit it freed), then the
    // multiple ack frees four more.
    held[4]
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    held[3]
        .ack(BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let mut rest = Vec::new();
    while rest.len() < N - 4 {
        let d = next(&mut cons).await;
        rest.push((body(&d), d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(
        rest[0],
        ("m4".to_string(), true),
        "the rejected one comes back first"
    );
    let order: Vec<String> = rest.iter().map(|(b, _)| b.clone()).collect();
    let expected: Vec<String> = (4..N).map(|i| format!("m{i}")).collect();
    assert_eq!(order, expected, "everything else in queue order");
    assert!(rest[1..].iter().all(|(_, r)| !r));

    // Everything acked through node 3 is gone from the home.
    let home = c.connect(1).await.create_channel().await.unwrap();
    let ok = home
        .queue_declare("tasks".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!((ok.message_count(), ok.consumer_count()), (0, 1));
    cons_ch
        .basic_cancel("c3".into(), BasicCancelOptions::default())
        .await
        .unwrap();

    // Get without acks and purge through node 2.
    let ch2 = confirming_channel(&c, 2).await;
    for b in ["g", "p0", "p1", "p2"] {
        assert!(publish(&ch2, "tasks", b.as_bytes()).await);
    }
    let got = ch2
        .basic_get("tasks".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!((body(&got.delivery), got.message_count), ("g".into(), 3));
    let purged = ch2
        .queue_purge("tasks".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 3, "purged on the home");
    let ok = ch3
        .queue_declare("tasks".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!((ok.message_count(), ok.consumer_count()), (0, 0));

    // A channel-wide prefetch (basic.qos global) holds through node 3 too.
    for b in ["q0", "q1", "q2"] {
        assert!(publish(&ch2, "tasks", b.as_bytes()).await);
    }
    let gch = conn3.create_channel().await.unwrap();
    gch.basic_qos(2, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut global = gch
        .basic_consume(
            "tasks".into(),
            "g3".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let q0 = next(&mut global).await;
    assert_eq!(body(&q0), "q0");
    assert_eq!(body(&next(&mut global).await), "q1");
    assert!(
        tokio::time::timeout(Duration::from_millis(700), global.next())
            .await
            .is_err(),
        "no third delivery while two are unacknowledged (global prefetch 2)"
    );
    q0.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(body(&next(&mut global).await), "q2", "the ack freed one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_consumer_held_goes_to_another_when_its_connection_or_node_goes() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    home_on_node_1(&c, "jobs", 1, 6).await;

    // Through node 2 with prefetch 3: m0 acked, m1..m3 held when the connection closes.
    let conn2 = c.connect(2).await;
    let (_first_ch, mut first) = consumer(&conn2, "jobs", "first", 3).await;
    let m0 = next(&mut first).await;
    assert_eq!(body(&m0), "m0");
    m0.ack(BasicAckOptions::default()).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(body(&next(&mut first).await));
    }
    assert_eq!(held, ["m1", "m2", "m3"]);
    conn2.close(200, "bye".into()).await.unwrap();
    wait_ready(&c, 1, "jobs", 5).await;

    // Through node 3: they come back redelivered, in their places.
    let conn3 = c.connect(3).await;
    let (_second_ch, mut second) = consumer(&conn3, "jobs", "second", 3).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut second).await;
        got.push((body(&d), d.redelivered));
    }
    assert_eq!(
        got,
        [
            ("m1".into(), true),
            ("m2".into(), true),
            ("m3".into(), true)
        ],
        "what the closed connection held comes back first, redelivered"
    );

    // Node 3 dies (kill -9) holding m1..m3: a consumer through node 2 gets them.
    c.kill(3);
    wait_ready(&c, 2, "jobs", 5).await;
    let conn2 = c.connect(2).await;
    let (_third_ch, mut third) = consumer(&conn2, "jobs", "third", 10).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = next(&mut third).await;
        got.push((body(&d), d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(
        got,
        [
            ("m1".into(), true),
            ("m2".into(), true),
            ("m3".into(), true),
            ("m4".into(), false),
            ("m5".into(), false)
        ],
        "what the dead node's consumer held is redelivered, nothing lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_through_another_node_is_cancelled_when_the_home_goes_down() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    home_on_node_1(&c, "events", 1, 2).await;
    let conn2 = c.connect(2).await;
    let (cons_ch, mut cons) = consumer(&conn2, "events", "watcher", 1).await;
    let m0 = next(&mut cons).await;
    assert_eq!(body(&m0), "m0");

    c.kill(1);
    // lapin announces consumer_cancel_notify: basic.cancel ends the consumer's stream.
    let end = tokio::time::timeout(Duration::from_secs(15), cons.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "basic.cancel when the home went down, got {end:?}"
    );
    // The delivery held from the lost home is unknown now (the home requeues it): its
    // ack closes the channel (406 unknown delivery tag), which a known tag would not.
    assert!(cons_ch.status().connected());
    m0.ack(BasicAckOptions::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cons_ch.status().connected() {
        assert!(
            Instant::now() < deadline,
            "the ack of a lost delivery closes the channel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Consuming again through node 2 while the home is down fails as RabbitMQ fails it.
    let ch = conn2.create_channel().await.unwrap();
    let refused = ch
        .basic_consume(
            "events".into(),
            "again".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("no consumer while the home is down");
    assert!(
        refused.to_string().contains("down or inaccessible"),
        "404 naming the home: {refused}"
    );
}
