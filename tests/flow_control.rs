//! Flow control. Memory: under the memory alarm, connections that publish are not read
//! (their publishes wait in the socket) while consumers keep draining; when the alarm
//! clears, the held publishes arrive. Queues: a queue whose consumer's connection falls
//! behind holds its publishers back once it has a backlog, so the backlog stays small.

mod common;
mod util;

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic};

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use util::raw::Raw;

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

/// Publishes `n` small messages to `queue` on a new raw connection, as fast as the
/// broker reads them.
async fn flood(addr: &str, queue: &str, n: usize) -> tokio::task::JoinHandle<Raw> {
    let (mut raw, _) = Raw::open(addr, 0).await;
    raw.open_channel(1).await;
    let one = util::raw::publish(1, queue, b"0123456789abcdef");
    let all = one.repeat(n);
    tokio::spawn(async move {
        raw.send(&all).await;
        raw
    })
}

#[tokio::test]
async fn a_consumer_that_falls_behind_holds_its_publisher_back() {
    const TOTAL: u32 = 400_000;
    let b = common::TestBroker::start().await;
    let addr = b.broker.as_ref().unwrap().local_addr().to_string();
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in ["alone", "backlog"] {
        util::declare_queue(&ch, q).await;
    }

    // How long this broker, on this machine, takes to read the flood unheld.
    let started = Instant::now();
    let first = flood(&addr, "alone", TOTAL as usize).await;
    while util::message_count(&ch, "alone").await < TOTAL {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unheld = started.elapsed();
    drop(first.await.unwrap());

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

    // Held, the publisher gets one read (at most 64 KiB, about a thousand of these
    // messages) per 100 ms; in twice the time it took unheld, the backlog stays far
    // below the whole flood (less what the stalled socket swallowed).
    let second = flood(&addr, "backlog", TOTAL as usize).await;
    tokio::time::sleep(unheld * 2).await;
    let backlog = util::message_count(&ch, "backlog").await;
    assert!(
        backlog < TOTAL / 2,
        "backlog {backlog} of {TOTAL} after {:?}: the publisher was not held back",
        unheld * 2
    );

    // Once the consumer goes, nothing holds the publisher.
    drop(stalled);
    tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the publisher finishes")
        .unwrap();
}
