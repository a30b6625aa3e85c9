//! Durable state survives a restart: exchanges, queues, bindings and persistent
//! messages (in order, delivered-but-unacked ones marked redelivered); transient ones
//! do not.

mod common;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren::{Broker, Config};

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn connect(b: &Broker) -> Connection {
    Connection::connect(&b.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn durable_definitions_and_persistent_messages_survive_restart() {
    let dir = std::env::temp_dir().join(format!("warren-durability-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config::for_tests(&dir);
    {
        let b = Broker::start(config.clone()).await.unwrap();
        let conn = connect(&b).await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            "dx".into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare("dq".into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch.queue_declare(
            "tq".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "dq".into(),
            "dx".into(),
            "a.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        for i in 0..5u8 {
            let props = if i == 2 {
                BasicProperties::default()
            } else {
                persistent()
            };
            ch.basic_publish(
                "dx".into(),
                "a.b".into(),
                BasicPublishOptions::default(),
                &[i],
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        ch.basic_publish(
            "".into(),
            "tq".into(),
            BasicPublishOptions::default(),
            b"t",
            persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        // Deliver the first one without acking it: it must come back redelivered.
        let got = ch
            .basic_get("dq".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.delivery.data, vec![0]);
        drop(conn);
        b.shutdown().await;
    }
    let b = Broker::start(config).await.unwrap();
    let conn = connect(&b).await;
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare("dq".into(), passive, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(
        q.message_count(),
        4,
        "persistent messages come back, the transient one does not"
    );
    assert!(
        ch.queue_declare("tq".into(), passive, FieldTable::default())
            .await
            .is_err(),
        "non-durable queue is gone"
    );
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "dx".into(),
        "a.c".into(),
        BasicPublishOptions::default(),
        &[9],
        persistent(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "dq".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let d = consumer.next().await.unwrap().unwrap();
        seen.push((d.data[0], d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(
        seen,
        vec![(0, true), (1, false), (3, false), (4, false), (9, false)],
        "binding survived too"
    );
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
