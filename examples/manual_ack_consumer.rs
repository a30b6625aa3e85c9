//! A consumer that never loses a message: manual acks after the work is done, and a
//! prefetch limit so that a crash leaves at most that many messages to be redelivered
//! (marked `redelivered`). Reject without requeue sends a message to the queue's
//! dead-letter exchange, if it has one.
//!
//! Run a broker and `cargo run --example reliable_publisher`, then
//! `cargo run --example manual_ack_consumer`.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        "orders".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.basic_qos(50, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            "orders".into(),
            "worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let text = String::from_utf8_lossy(&delivery.data).into_owned();
        if delivery.redelivered {
            println!("(again) {text}");
        } else {
            println!("{text}");
        }
        // Do the work first, then ack: a crash before this line means a redelivery.
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}
