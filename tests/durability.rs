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

#[tokio::test]
async fn message_ttl_keeps_counting_across_a_restart() {
    let dir = std::env::temp_dir().join(format!("warren-durability-ttl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config::for_tests(&dir);
    let mut args = FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        lapin::types::AMQPValue::LongInt(400),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        lapin::types::AMQPValue::LongString("expired".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let b = Broker::start(config.clone()).await.unwrap();
        let conn = connect(&b).await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare("expired".into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch.queue_declare("short".into(), durable, args.clone())
            .await
            .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.basic_publish(
            "".into(),
            "short".into(),
            BasicPublishOptions::default(),
            b"tick",
            persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        drop(conn);
        b.shutdown().await;
    }
    let b = Broker::start(config).await.unwrap();
    let conn = connect(&b).await;
    let ch = conn.create_channel().await.unwrap();
    let mut got = None;
    for _ in 0..100 {
        if let Some(m) = ch
            .basic_get("expired".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got = Some(m);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let m = got.expect("the message expired after the restart and was dead-lettered");
    assert_eq!(m.delivery.data, b"tick");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    assert_eq!(
        ch.queue_declare("short".into(), passive, FieldTable::default())
            .await
            .unwrap()
            .message_count(),
        0
    );
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
