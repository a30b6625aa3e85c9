//! Memory flow control: under the memory alarm, connections that publish are not read
//! (their publishes wait in the socket) while consumers keep draining; when the alarm
//! clears, the held publishes arrive.

mod common;

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;

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
