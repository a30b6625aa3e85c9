//! Retry with delay, built from TTL + dead-lettering: a failed message is parked in a
//! "wait" queue whose `x-message-ttl` is the delay and whose dead-letter exchange routes it
//! back to the work queue. After `MAX_ATTEMPTS` it goes to a parking-lot queue instead.
//! The `x-death` header counts the attempts.
//!
//! Run a broker (`cargo run --release`), then `cargo run --example retry_with_delay`.
//! AMQP_URL overrides the broker address.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const DELAY_MS: i32 = 1000;
const MAX_ATTEMPTS: i64 = 3;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// How many times this message already waited in the retry queue.
fn attempts(props: &BasicProperties) -> i64 {
    let Some(headers) = props.headers() else {
        return 0;
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return 0;
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => match (t.inner().get("queue"), t.inner().get("count")) {
                (Some(AMQPValue::LongString(q)), Some(AMQPValue::LongLongInt(n)))
                    if q.as_bytes() == b"work.wait" =>
                {
                    Some(*n)
                }
                _ => None,
            },
            _ => None,
        })
        .sum()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));

    // work: failures are rejected without requeue and dead-letter into work.wait.
    ch.queue_declare(
        "work".into(),
        durable,
        table(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("work.wait")),
        ]),
    )
    .await?;
    // work.wait: nobody consumes; after the delay the message dead-letters back to work.
    ch.queue_declare(
        "work.wait".into(),
        durable,
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(DELAY_MS)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .await?;
    ch.queue_declare("work.parked".into(), durable, FieldTable::default())
        .await?;

    let props = BasicProperties::default().with_delivery_mode(2);
    ch.basic_publish(
        "".into(),
        "work".into(),
        BasicPublishOptions::default(),
        b"flaky job",
        props,
    )
    .await?;

    let mut consumer = ch
        .basic_consume(
            "work".into(),
            "worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let n = attempts(&delivery.properties);
        println!(
            "attempt {} of {:?}",
            n + 1,
            String::from_utf8_lossy(&delivery.data)
        );
        if n + 1 >= MAX_ATTEMPTS {
            // Give up: park it for a human, then ack the original.
            ch.basic_publish(
                "".into(),
                "work.parked".into(),
                BasicPublishOptions::default(),
                &delivery.data,
                delivery.properties.clone(),
            )
            .await?;
            delivery.ack(BasicAckOptions::default()).await?;
            println!("parked after {MAX_ATTEMPTS} attempts");
            break;
        }
        // Simulate a failure: reject without requeue -> work.wait -> (delay) -> work.
        delivery
            .reject(BasicRejectOptions { requeue: false })
            .await?;
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}
