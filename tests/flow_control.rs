//! Flow control. Memory: under the memory alarm, connections that publish are not read
//! (their publishes wait in the socket) while consumers keep draining; when the alarm
//! clears, the held publishes arrive; the disk alarm does the same. Queues: a queue whose consumer's connection falls
//! behind holds its publishers back once it has a backlog, so the backlog stays small.

mod common;
mod util;

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, connection};
use amq_protocol::types::AMQPValue;

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use util::raw::Raw;
use warren::connection::FLOW_MAX_HOLD;
use warren::queue::FLOW_READY_MESSAGES;
use warren::store::CONGESTED_OPS;

#[tokio::test]
async fn memory_alarm_holds_publishers_and_lets_consumers_drain() {
    let b = common::TestBroker::start_with(|c| c.memory_high_watermark = 0.0).await;
    let publisher = b.connect().await;
    let consumer_conn = b.connect().await;
    let pch = publisher.create_channel().await.unwrap();
    let cch = consumer_conn.create_channel().await.unwrap();
    pch.queue_declare(
        "flow".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    pch.basic_publish(
        "".into(),
        "flow".into(),
        BasicPublishOptions::default(),
        b"before",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut consumer = cch
        .basic_consume(
            "flow".into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(consumer.next().await.unwrap().unwrap().data, b"before");

    b.broker.as_ref().unwrap().set_memory_alarm(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // lapin honours connection.blocked: its publish waits until unblocked, so it runs
    // on its own task.
    let held = tokio::spawn(async move {
        pch.basic_publish(
            "".into(),
            "flow".into(),
            BasicPublishOptions::default(),
            b"held",
            BasicProperties::default(),
        )
        .await
        .map(|_| ())
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(400), consumer.next())
            .await
            .is_err(),
        "a publish made under the alarm is not read"
    );

    b.broker.as_ref().unwrap().set_memory_alarm(false);
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("released after the alarm")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"held");
    held.await.unwrap().unwrap();
}

const BODY: &[u8] = b"0123456789abcdef";

/// Publishes `n` small messages to `queue` on a new raw connection, as fast as the
/// broker reads them.
async fn flood(addr: &str, queue: &str, n: usize) -> tokio::task::JoinHandle<Raw> {
    flood_with(
        addr,
        util::raw::publish_frames(1, "", queue, false, false, BODY),
        n,
    )
    .await
}

/// Sends `one` (a publish on channel 1) `n` times on a new raw connection.
async fn flood_with(addr: &str, one: Vec<u8>, n: usize) -> tokio::task::JoinHandle<Raw> {
    let (mut raw, _) = Raw::open(addr, 0).await;
    raw.open_channel(1).await;
    let all = one.repeat(n);
    tokio::spawn(async move {
        raw.send(&all).await;
        raw
    })
}

#[tokio::test]
async fn a_consumer_that_falls_behind_holds_its_publisher_back() {
    const TOTAL: usize = 400_000;
    let b = common::TestBroker::start().await;
    let addr = b.broker.as_ref().unwrap().local_addr().to_string();
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    util::declare_queue(&ch, "backlog").await;

    // An auto-ack consumer whose client never reads its socket: deliveries pile up in
    // its connection, which is then behind.
    let (mut stalled, _) = Raw::open(&addr, 0).await;
    stalled.open_channel(1).await;
    stalled
        .send_method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "backlog".into(),
                consumer_tag: "stalled".into(),
                no_local: false,
                no_ack: true,
                exclusive: false,
                nowait: true,
                arguments: FieldTable::default(),
            })),
        )
        .await;

    let publishing = flood(&addr, "backlog", TOTAL).await;
    let mut backlog = 0;
    while backlog < FLOW_READY_MESSAGES as u32 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        backlog = util::message_count(&ch, "backlog").await;
    }
    // The queue is congested now. Unheld, the broker would read the rest of the flood
    // in about a second (a debug build here takes 100,000+ of these a second). Held, it
    // reads the publisher at most once per FLOW_MAX_HOLD, at most a buffer (64 KiB; 4x
    // allowed) each time: a slower machine reads less, never more.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = util::message_count(&ch, "backlog")
        .await
        .saturating_sub(backlog) as u128;
    let reads = started.elapsed().as_millis() / FLOW_MAX_HOLD.as_millis() + 1;
    let per_read = 4 * 64 * 1024
        / util::raw::publish_frames(1, "", "backlog", false, false, BODY).len() as u128;
    assert!(
        grown <= reads * per_read,
        "the backlog grew by {grown} in {:?}: the publisher was not held back",
        started.elapsed()
    );

    // Once the consumer goes, nothing holds the publisher.
    drop(stalled);
    tokio::time::timeout(Duration::from_secs(60), publishing)
        .await
        .expect("the publisher finishes")
        .unwrap();
}

#[tokio::test]
async fn a_publisher_that_outruns_the_disk_is_held_back() {
    const TOTAL: usize = 300_000;
    let b = common::TestBroker::start().await;
    let broker = b.broker.as_ref().unwrap();
    let addr = broker.local_addr().to_string();
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "disk".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Persistent messages to a durable queue, no confirms: every publish is store work.
    let one = util::raw::publish_frames(1, "", "disk", false, true, BODY);
    let per_read = 4 * 64 * 1024 / one.len() as u64;
    let publishing = flood_with(&addr, one, TOTAL).await;
    let mut most = 0;
    while !publishing.is_finished() {
        let queued = broker.store_stats().unwrap().queued_ops;
        most = most.max(queued);
        // Held until the writer catches up, the publisher adds at most one read's worth
        // (two ops per message) once the store is congested.
        assert!(
            queued <= CONGESTED_OPS + 2 * per_read,
            "{queued} store ops queued: the publisher was not held back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    publishing.await.unwrap();
    eprintln!("at most {most} store ops queued");
    // The broker may still be reading what the publisher wrote (held back while the
    // writer catches up): on a loaded machine that takes longer than
    // `wait_message_count`'s few seconds, so wait up to a minute for every message.
    let mut count = 0;
    for _ in 0..600 {
        count = util::message_count(&ch, "disk").await;
        if count == TOTAL as u32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count, TOTAL as u32);
}

#[tokio::test]
async fn the_disk_alarm_blocks_publishers_and_says_why() {
    // No file system has this much free space: the alarm is on from the first tick.
    let b = common::TestBroker::start_with(|c| c.disk_free_limit = u64::MAX).await;
    let addr = b.broker.as_ref().unwrap().local_addr().to_string();
    let observer = b.connect().await;
    let och = observer.create_channel().await.unwrap();
    util::declare_queue(&och, "disk-alarm").await;

    let mut capabilities = FieldTable::default();
    capabilities.insert("connection.blocked".into(), AMQPValue::Boolean(true));
    let mut properties = FieldTable::default();
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let mut raw = Raw::connect(&addr).await;
    raw.handshake_as(properties, |t| t).await;
    raw.open_channel(1).await;
    // The first publish is read (the connection is no publisher until then); then the
    // connection is blocked, told why, and what follows waits in the socket.
    let first = util::raw::publish_frames(1, "", "disk-alarm", false, false, b"first");
    raw.send(&first).await;
    match raw.recv_method().await {
        AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
            assert_eq!(b.reason.as_str(), "low on disk")
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    let second = util::raw::publish_frames(1, "", "disk-alarm", false, false, b"second");
    raw.send(&second).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        util::message_count(&och, "disk-alarm").await,
        1,
        "a publish went on under the disk alarm"
    );
}
