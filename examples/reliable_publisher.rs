//! A publisher that never loses a message: persistent messages to a durable queue, with
//! publisher confirms. A message counts as sent only once the broker acked it (for Warren:
//! once it is fsynced); a nack or a lost connection means "publish it again".
//!
//! Run a broker (`cargo run --release`), then `cargo run --example reliable_publisher`.

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

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
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    // Keep a window of outstanding publishes; wait for their confirms before reusing it.
    let mut window = Vec::new();
    for i in 0..1000u32 {
        let body = format!("order {i}");
        let props = BasicProperties::default().with_delivery_mode(2);
        window.push((
            i,
            ch.basic_publish(
                "".into(),
                "orders".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?,
        ));
        if window.len() == 100 {
            for (i, confirm) in window.drain(..) {
                if !confirm.await?.is_ack() {
                    eprintln!("order {i} was refused: publish it again");
                }
            }
        }
    }
    for (i, confirm) in window.drain(..) {
        if !confirm.await?.is_ack() {
            eprintln!("order {i} was refused: publish it again");
        }
    }
    println!("1000 orders confirmed");
    conn.close(200, "done".into()).await?;
    Ok(())
}
