//! Limits as RabbitMQ has them: message size, handshake time, consumer ack time,
//! connection count, and peers that stop reading.

mod common;
mod util;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};
use lapin::options::*;
use lapin::types::FieldTable;
use util::raw::{HEADER, Raw};
use util::*;

#[tokio::test]
async fn a_message_over_max_message_size_is_a_406_on_its_channel() {
    let t = Target::start_with(|c| c.max_message_size = 1000).await;
    if t.is_reference() {
        return; // The reference runs with RabbitMQ's default (128 MiB).
    }
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    publish(&ch, "", &q, &[1u8; 1000]).await;
    let r = ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            &[1u8; 1001],
            lapin::BasicProperties::default(),
        )
        .await;
    // The error arrives as channel.close; the next call on the channel sees it.
    let r = match r {
        Ok(_) => within(ch.basic_qos(1, BasicQosOptions::default())).await,
        Err(e) => Err(e),
    };
    assert_code(r, 406);
    let (_c2, ch2) = t.channel().await;
    assert_eq!(drain(&ch2, &q).await.len(), 1);
}

#[tokio::test]
async fn a_connection_that_never_completes_the_handshake_is_dropped() {
    let t = Target::start_with(|c| c.handshake_timeout = 300).await;
    if t.is_reference() {
        return;
    }
    // Sends the protocol header, then nothing (a slow-loris peer).
    let mut raw = Raw::connect(&t.addr()).await;
    raw.send(HEADER).await;
    assert!(raw.closed_within(Duration::from_secs(5)).await);
    // And one that sends nothing at all.
    let mut silent = Raw::connect(&t.addr()).await;
    assert!(silent.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn an_unacked_delivery_past_consumer_timeout_closes_the_channel_and_returns() {
    let t = Target::start_with(|c| c.consumer_timeout = 500).await;
    if t.is_reference() {
        return;
    }
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    publish(&ch, "", &q, b"slow").await;
    let mut consumer = consume(&ch, &q, "slowpoke").await;
    let first = next(&mut consumer).await;
    assert!(!first.redelivered);
    // Never acked: the channel is closed with 406 after the timeout (checked each second).
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !ch.status().connected() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the channel was closed");
    let (_c2, ch2) = t.channel().await;
    let back = get(&ch2, &q).await.expect("the message is back");
    assert!(back.delivery.redelivered);
}

#[tokio::test]
async fn connections_past_connection_max_are_closed() {
    let t = Target::start_with(|c| c.connection_max = 2).await;
    if t.is_reference() {
        return;
    }
    let a = t.connect().await;
    let b = t.connect().await;
    let mut third = Raw::connect(&t.addr()).await;
    assert!(third.closed_within(Duration::from_secs(5)).await);
    drop(a);
    drop(b);
    // Slots come back when connections close.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if t.connect_url(&t.url).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "a new connection is served once others closed");
}

/// A consumer that stops reading its socket is dropped after two heartbeat intervals
/// without a byte written, and its unacked messages go back to the queue.
#[tokio::test]
async fn a_consumer_that_stops_reading_is_dropped_and_its_messages_return() {
    let t = Target::start_with(|c| c.heartbeat = 1).await;
    if t.is_reference() {
        return;
    }
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let body = vec![9u8; 512 * 1024];
    let total = 64u32;
    for _ in 0..total {
        publish(&ch, "", &q, &body).await;
    }
    wait_message_count(&ch, &q, total).await;
    let (mut raw, _) = Raw::open(&t.addr(), 1).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.as_str().into(),
            consumer_tag: "stuck".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: true,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    // Read nothing, keep the socket open. Deliveries fill the socket buffers and the
    // broker's write stalls; after 2 s without progress the connection is dropped.
    let mut back = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        back = message_count(&ch, &q).await;
        if back == total {
            break;
        }
    }
    assert_eq!(back, total, "every unacked message came back");
    drop(raw);
}
