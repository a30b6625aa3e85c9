mod common;

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;

#[tokio::test]
async fn publish_consume_ack_round_trip() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10u8 {
        ch.basic_publish(
            "".into(),
            q.name().clone(),
            BasicPublishOptions::default(),
            &[i; 3],
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10u8 {
        let d = consumer.next().await.unwrap().unwrap();
        assert_eq!(d.data, vec![i; 3]);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    conn.close(200, "bye".into()).await.unwrap();
}
