//! Quorum-queue arguments on real `warren` processes in network namespaces, as RabbitMQ's
//! quorum queues take them: length limits with drop-head and reject-publish, message
//! TTLs, the delivery limit (default 20) with `x-delivery-count`, single active consumer;
//! and what a queue counted survives a change of leader.

mod cluster;

use std::time::{Duration, Instant};

use cluster::Cluster;
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

const ELECTION: Duration = Duration::from_secs(20);

/// Declares quorum queue `name` with `extra` arguments through `ch`.
async fn declare(ch: &Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (k, v) in extra {
        args.insert(ShortString::from(*k), v.clone());
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), options, args)
        .await
        .unwrap_or_else(|e| panic!("declare {name}: {e}"));
}

/// Publishes `body` to `queue` (persistent, `props` on top); whether it was confirmed.
async fn publish(ch: &Channel, queue: &str, body: &str, props: BasicProperties) -> bool {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        props.with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap()
    .is_ack()
}

/// Messages ready in `queue` (passive declare).
async fn depth(ch: &Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

/// basic.get's body, if any.
async fn get(ch: &Channel, queue: &str) -> Option<String> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
}

fn int(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

async fn confirming(c: &Cluster, i: usize) -> Channel {
    let ch = c.connect(i).await.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

/// A 3-node cluster with its metadata leader agreed, and a confirming channel on node 1.
async fn three_nodes() -> Option<(Cluster, Channel)> {
    let c = Cluster::start(3)?;
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = confirming(&c, 1).await;
    Some((c, ch))
}

/// basic.nack with requeue.
async fn requeue(m: &lapin::message::BasicGetMessage) {
    m.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_limits_and_ttls_hold_on_quorum_queues() {
    let Some((c, ch)) = three_nodes().await else {
        return;
    };

    // reject-publish: the third publish is nacked, the two first stay.
    declare(
        &ch,
        "limit-reject",
        &[
            ("x-max-length", int(2)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    // drop-head (the default): the oldest goes.
    declare(&ch, "limit-drop", &[("x-max-length", int(2))]).await;
    for body in ["a", "b"] {
        assert!(publish(&ch, "limit-reject", body, BasicProperties::default()).await);
    }
    assert!(
        !publish(&ch, "limit-reject", "c", BasicProperties::default()).await,
        "over x-max-length with reject-publish: nacked"
    );
    for body in ["a", "b", "c"] {
        assert!(publish(&ch, "limit-drop", body, BasicProperties::default()).await);
    }
    // Through another node: the counts are the leader's.
    let other = c.connect(3).await.create_channel().await.unwrap();
    assert_eq!(depth(&other, "limit-reject").await, 2);
    assert_eq!(depth(&other, "limit-drop").await, 2);
    assert_eq!(get(&other, "limit-drop").await.as_deref(), Some("b"));
    assert_eq!(get(&other, "limit-reject").await.as_deref(), Some("a"));

    // x-message-ttl and per-message expiration.
    declare(&ch, "ttl-queue", &[("x-message-ttl", int(200))]).await;
    declare(&ch, "ttl-message", &[]).await;
    assert!(publish(&ch, "ttl-queue", "old", BasicProperties::default()).await);
    assert!(
        publish(
            &ch,
            "ttl-message",
            "short",
            BasicProperties::default().with_expiration("200".into())
        )
        .await
    );
    assert!(publish(&ch, "ttl-message", "long", BasicProperties::default()).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    while depth(&other, "ttl-queue").await > 0 || depth(&other, "ttl-message").await > 1 {
        assert!(Instant::now() < deadline, "expired messages are removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&other, "ttl-message").await.as_deref(), Some("long"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_limit_counts_returns_across_a_change_of_leader() {
    let Some((mut c, ch)) = three_nodes().await else {
        return;
    };
    // (No dead-letter exchange: past the limit the message is dropped. Dead-lettering
    // from a quorum queue is tests/replicated_dead_letters' matter.)
    declare(&ch, "poison", &[("x-delivery-limit", int(2))]).await;
    assert!(publish(&ch, "poison", "p", BasicProperties::default()).await);

    // Returned once: x-delivery-count 1 on the next delivery.
    let consumer_ch = c.connect(2).await.create_channel().await.unwrap();
    let first = consumer_ch
        .basic_get("poison".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the message");
    requeue(&first).await;
    let second = consumer_ch
        .basic_get("poison".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the message again");
    let count = |m: &lapin::message::BasicGetMessage| {
        m.delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned())
    };
    assert!(second.delivery.redelivered);
    assert_eq!(count(&second), Some(AMQPValue::LongLongInt(1)));
    requeue(&second).await;

    // (A publish confirmed now is later in the log than the hand-outs: its commit
    // covers theirs.)
    assert!(publish(&ch, "poison", "marker", BasicProperties::default()).await);
    // The leader dies: the count lives in the log, so the new leader knows it.
    let leader = (1..=3)
        .find(|i| {
            c.log(*i)
                .lines()
                .any(|l| l.contains("this node leads it now") && l.contains("poison"))
        })
        .expect("a leader logged");
    c.kill(leader);
    let survivor = if leader == 1 { 2 } else { 1 };
    let conn = c.connect(survivor).await;
    let deadline = Instant::now() + ELECTION;
    let (ch, third) = loop {
        // (A get while no leader is known closes the channel with 404: a new one.)
        let ch = conn.create_channel().await.unwrap();
        match ch
            .basic_get("poison".into(), BasicGetOptions::default())
            .await
        {
            Ok(Some(m)) => break (ch, m),
            _ => {
                assert!(Instant::now() < deadline, "the new leader serves the queue");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    // Hand-outs are in the log (returns are not: the count restored is the hand-outs
    // but the last, which may not have been returned before the leader died), so the
    // count goes on from where it was, never from zero.
    let Some(AMQPValue::LongLongInt(restored)) = count(&third) else {
        panic!(
            "x-delivery-count after the change of leader: {:?}",
            count(&third)
        );
    };
    assert!((1..=2).contains(&restored), "x-delivery-count {restored}");
    // Returned until past the limit: dead-lettered, after at most one extra delivery.
    let mut returned = third;
    let mut deliveries = 3;
    loop {
        requeue(&returned).await;
        let next = ch
            .basic_get("poison".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("the marker at least");
        if next.delivery.data != b"p" {
            assert_eq!(next.delivery.data, b"marker");
            break;
        }
        returned = next;
        deliveries += 1;
        assert!(deliveries <= 4, "delivered {deliveries} times with limit 2");
    }
    // Past the limit the message left the queue: the marker is what came next.
    assert_eq!(
        depth(&ch, "poison").await,
        0,
        "only the marker was left, and it is held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_gets_everything_until_it_goes() {
    let Some((c, ch)) = three_nodes().await else {
        return;
    };
    declare(
        &ch,
        "sac",
        &[("x-single-active-consumer", AMQPValue::Boolean(true))],
    )
    .await;
    let a_conn = c.connect(2).await;
    let a = a_conn.create_channel().await.unwrap();
    let mut first = a
        .basic_consume(
            "sac".into(),
            "first".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let b = c.connect(3).await.create_channel().await.unwrap();
    let mut second = b
        .basic_consume(
            "sac".into(),
            "second".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..5 {
        assert!(publish(&ch, "sac", &format!("m{i}"), BasicProperties::default()).await);
    }
    for i in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(10), first.next())
            .await
            .expect("the active consumer gets it")
            .expect("a delivery")
            .expect("no error");
        assert_eq!(d.data, format!("m{i}").as_bytes());
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), second.next())
            .await
            .is_err(),
        "the waiting consumer gets nothing"
    );
    // The active one goes: the next takes over.
    a_conn.close(200, "done".into()).await.unwrap();
    assert!(publish(&ch, "sac", "after", BasicProperties::default()).await);
    let d = tokio::time::timeout(Duration::from_secs(10), second.next())
        .await
        .expect("the second consumer is active now")
        .expect("a delivery")
        .expect("no error");
    assert_eq!(d.data, b"after");
}
