//! Backlogs larger than a queue's body window: a durable queue keeps the bodies of a small
//! window at its head in memory (here 64 KiB) and the rest in the store only, and still
//! delivers in order, by priority, with requeues at their place, TTL expiry and
//! dead-lettering, basic.get, and across a restart. Memory is read from the management
//! API's `message_bytes_ram` (the ready bodies the queue holds in memory).

mod common;
mod util;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use util::http::request;
use util::within;
use warren::{Broker, Config};

/// The window the tests set, and the size of their messages: 40 messages fill it.
const WINDOW: u64 = 64 << 10;
const BODY: usize = 1600;
/// Messages per test: about fifty windows.
const COUNT: u32 = 2000;

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::for_tests(dir);
    c.queue_body_window = WINDOW;
    c
}

fn data_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-paging-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn connect(b: &Broker) -> Connection {
    Connection::connect(&b.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects")
}

/// Message `i`: its number, then filler up to `BODY` bytes.
fn body(i: u32) -> Vec<u8> {
    let mut b = i.to_be_bytes().to_vec();
    b.resize(BODY, b'.');
    b
}

fn number(data: &[u8]) -> u32 {
    u32::from_be_bytes([data[0], data[1], data[2], data[3]])
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn declare(ch: &Channel, name: &str, args: FieldTable) {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), durable, args)
        .await
        .expect("declared");
}

/// Publishes messages `numbers` to `queue` with `props(i)`, and waits for every confirm.
async fn publish(
    ch: &Channel,
    queue: &str,
    numbers: impl Iterator<Item = u32>,
    props: impl Fn(u32) -> BasicProperties,
) {
    let mut confirms = Vec::new();
    for i in numbers {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(i),
                props(i),
            )
            .await
            .expect("published");
        confirms.push(confirm);
    }
    for c in confirms {
        assert!(c.await.expect("confirmed").is_ack());
    }
}

async fn confirming_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch
}

/// The queue as the management API lists it.
async fn listing(b: &Broker, queue: &str) -> Value {
    let addr = b.management_addr().expect("management listener");
    let path = format!("/api/queues/%2F/{queue}");
    request(addr, "GET", &path, Some(("guest", "guest")), None)
        .await
        .json()
}

/// Checks that the queue holds at most about a window of ready bodies in memory, and
/// returns how many of its messages are paged out.
async fn check_bounded(b: &Broker, queue: &str) -> u64 {
    let q = listing(b, queue).await;
    let ram = q["message_bytes_ram"].as_u64().expect("message_bytes_ram");
    // The window, plus the batch that a read may add to a nearly full window.
    assert!(
        ram <= WINDOW + BODY as u64 * 2,
        "{queue}: {ram} bytes of ready bodies in memory, window {WINDOW}: {q}"
    );
    let paged = q["messages_paged_out"]
        .as_u64()
        .expect("messages_paged_out");
    let ready = q["messages_ready"].as_u64().expect("messages_ready");
    let paged_bytes = q["message_bytes_paged_out"].as_u64().expect("paged bytes");
    assert_eq!(paged_bytes, paged * BODY as u64, "{q}");
    assert!(paged <= ready);
    paged
}

/// Consumes `n` messages from `queue` (prefetch 50, acked one by one), checking memory
/// stays bounded every 100; returns (number, redelivered) in delivery order.
async fn drain(b: &Broker, ch: &Channel, queue: &str, n: u32) -> Vec<(u32, bool)> {
    ch.basic_qos(50, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut seen = Vec::new();
    for k in 0..n {
        let d = within(consumer.next())
            .await
            .expect("a delivery")
            .expect("delivered");
        seen.push((number(&d.data), d.redelivered));
        assert_eq!(d.data.len(), BODY, "the whole body comes back");
        d.ack(BasicAckOptions::default()).await.expect("acked");
        if k % 100 == 0 {
            check_bounded(b, queue).await;
        }
    }
    ch.basic_cancel("drain".into(), BasicCancelOptions::default())
        .await
        .expect("cancelled");
    seen
}

fn in_order(seen: &[(u32, bool)]) -> Vec<u32> {
    seen.iter().map(|&(i, _)| i).collect()
}

#[tokio::test]
async fn a_backlog_far_past_the_window_is_delivered_in_order_with_bounded_memory() {
    let dir = data_dir("order");
    let b = Broker::start(config(&dir)).await.expect("starts");
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    declare(&ch, "backlog", FieldTable::default()).await;
    publish(&ch, "backlog", 0..COUNT, |_| persistent()).await;
    let paged = check_bounded(&b, "backlog").await;
    assert!(
        paged >= u64::from(COUNT) * 9 / 10,
        "most of the backlog is on disk only: {paged} paged of {COUNT}"
    );
    // Transient messages keep their bodies.
    publish(&ch, "backlog", COUNT..COUNT + 10, |_| {
        BasicProperties::default()
    })
    .await;
    let seen = drain(&b, &ch, "backlog", COUNT + 10).await;
    assert_eq!(in_order(&seen), (0..COUNT + 10).collect::<Vec<_>>());
    assert!(seen.iter().all(|&(_, redelivered)| !redelivered));
    let q = listing(&b, "backlog").await;
    assert_eq!(q["messages"], 0, "{q}");
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn priorities_order_a_paged_backlog_highest_first_fifo_within() {
    let dir = data_dir("priorities");
    let b = Broker::start(config(&dir)).await.expect("starts");
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(3));
    declare(&ch, "prio", args).await;
    let priority = |i: u32| (i % 4) as u8;
    publish(&ch, "prio", 0..COUNT, |i| {
        persistent().with_priority(priority(i))
    })
    .await;
    assert!(check_bounded(&b, "prio").await > 0);
    let seen = drain(&b, &ch, "prio", COUNT).await;
    let mut want: Vec<u32> = (0..COUNT).collect();
    want.sort_by_key(|&i| (std::cmp::Reverse(priority(i)), i));
    assert_eq!(in_order(&seen), want);
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn requeued_messages_go_back_to_their_place_ahead_of_the_paged_backlog() {
    let dir = data_dir("requeue");
    let b = Broker::start(config(&dir)).await.expect("starts");
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    declare(&ch, "rq", FieldTable::default()).await;
    publish(&ch, "rq", 0..COUNT, |_| persistent()).await;
    // A consumer takes 100 (past the window), stops consuming, acks the odd ones, and
    // goes away.
    {
        let taker = conn.create_channel().await.expect("channel");
        taker
            .basic_qos(100, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = taker
            .basic_consume(
                "rq".into(),
                "taker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut taken = Vec::new();
        for _ in 0..100 {
            let d = within(consumer.next()).await.expect("one").expect("ok");
            assert!(d.data.len() == BODY);
            taken.push(d);
        }
        taker
            .basic_cancel("taker".into(), BasicCancelOptions::default())
            .await
            .expect("cancelled");
        for d in taken.into_iter().filter(|d| number(&d.data) % 2 == 1) {
            d.ack(BasicAckOptions::default()).await.expect("acked");
        }
        taker.close(200, "bye".into()).await.expect("closed");
    }
    let seen = drain(&b, &ch, "rq", COUNT - 50).await;
    let want: Vec<(u32, bool)> = (0..100)
        .filter(|i| i % 2 == 0)
        .map(|i| (i, true))
        .chain((100..COUNT).map(|i| (i, false)))
        .collect();
    assert_eq!(seen, want);
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn expired_paged_messages_are_dead_lettered_in_order_with_their_bodies() {
    let dir = data_dir("ttl-dlx");
    let b = Broker::start(config(&dir)).await.expect("starts");
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    declare(&ch, "dlq", FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(300));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dlq".into()),
    );
    declare(&ch, "ttl", args).await;
    publish(&ch, "ttl", 0..COUNT, |_| persistent()).await;
    within(async {
        loop {
            let q = listing(&b, "dlq").await;
            if q["messages"] == COUNT {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let q = listing(&b, "ttl").await;
    assert_eq!(q["messages"], 0, "{q}");
    // The dead letters form a backlog of their own, paged too.
    assert!(check_bounded(&b, "dlq").await > 0);
    let mut numbers = Vec::new();
    for _ in 0..COUNT {
        let got = ch
            .basic_get("dlq".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a dead letter");
        assert_eq!(got.delivery.data.len(), BODY);
        let headers = got.delivery.properties.headers().clone().expect("headers");
        let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
            panic!("no x-death: {headers:?}");
        };
        let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
            panic!("empty x-death");
        };
        assert_eq!(
            death.inner().get("reason"),
            Some(&AMQPValue::LongString("expired".into()))
        );
        numbers.push(number(&got.delivery.data));
    }
    assert_eq!(numbers, (0..COUNT).collect::<Vec<_>>());
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_length_limit_drops_paged_heads_to_the_dead_letter_queue_in_order() {
    let dir = data_dir("maxlen");
    let b = Broker::start(config(&dir)).await.expect("starts");
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    declare(&ch, "dropped", FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dropped".into()),
    );
    declare(&ch, "capped", args.clone()).await;
    publish(&ch, "capped", 0..COUNT, |_| persistent()).await;
    // A policy caps it at a quarter: three quarters leave from the head at once, most of
    // them paged.
    let addr = b.management_addr().expect("management");
    let policy = serde_json::json!({
        "pattern": "^capped$", "apply-to": "queues",
        "definition": {"max-length": COUNT / 4}
    });
    let r = request(
        addr,
        "PUT",
        "/api/policies/%2F/cap",
        Some(("guest", "guest")),
        Some(&policy),
    )
    .await;
    assert!(r.status < 300, "policy set: {}", r.status);
    within(async {
        loop {
            if listing(&b, "dropped").await["messages"] == COUNT * 3 / 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let dropped = drain(&b, &ch, "dropped", COUNT * 3 / 4).await;
    assert_eq!(in_order(&dropped), (0..COUNT * 3 / 4).collect::<Vec<_>>());
    let kept = drain(&b, &ch, "capped", COUNT / 4).await;
    assert_eq!(in_order(&kept), (COUNT * 3 / 4..COUNT).collect::<Vec<_>>());
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn basic_get_reads_paged_heads_in_order() {
    let dir = data_dir("get");
    let b = Broker::start(config(&dir)).await.expect("starts");
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    declare(&ch, "got", FieldTable::default()).await;
    publish(&ch, "got", 0..COUNT, |_| persistent()).await;
    for i in 0..COUNT {
        let got = ch
            .basic_get("got".into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(number(&got.delivery.data), i);
        assert_eq!(got.message_count, COUNT - i - 1);
        got.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("acked");
    }
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_recovered_backlog_stays_on_disk_and_comes_back_in_order() {
    let dir = data_dir("restart");
    {
        let b = Broker::start(config(&dir)).await.expect("starts");
        let conn = connect(&b).await;
        let ch = confirming_channel(&conn).await;
        declare(&ch, "kept", FieldTable::default()).await;
        publish(&ch, "kept", 0..COUNT, |_| persistent()).await;
        // Five delivered and not acked: they come back redelivered.
        ch.basic_qos(5, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = ch
            .basic_consume(
                "kept".into(),
                "c".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        for _ in 0..5 {
            within(consumer.next()).await.expect("one").expect("ok");
        }
        drop(conn);
        b.shutdown().await;
    }
    let b = Broker::start(config(&dir)).await.expect("restarts");
    let paged = check_bounded(&b, "kept").await;
    assert!(paged >= u64::from(COUNT) * 9 / 10, "{paged} paged");
    let conn = connect(&b).await;
    let ch = conn.create_channel().await.expect("channel");
    let seen = drain(&b, &ch, "kept", COUNT).await;
    assert_eq!(in_order(&seen), (0..COUNT).collect::<Vec<_>>());
    let redelivered: Vec<u32> = seen.iter().filter(|s| s.1).map(|s| s.0).collect();
    assert_eq!(redelivered, (0..5).collect::<Vec<_>>());
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_recovered_backlog_keeps_its_priorities_and_ttls_without_reading_its_bodies() {
    let dir = data_dir("restart-prio-ttl");
    // Every fifth message expires one second after it is published, every fifth
    // after that in ten minutes, as does every message by the queue's TTL: what the
    // store hands back for a paged message must keep its publish time, its priority and
    // its own TTL, read past the properties before them.
    let priority = |i: u32| (i % 4) as u8;
    let expires_soon = |i: u32| i.is_multiple_of(5);
    let props = move |i: u32| {
        let mut headers = FieldTable::default();
        headers.insert(
            "n".into(),
            AMQPValue::LongString(format!("{i:0>200}").into()),
        );
        let p = persistent()
            .with_content_type("text/plain".into())
            .with_headers(headers)
            .with_priority(priority(i))
            .with_correlation_id(format!("c{i}").into());
        match i % 5 {
            0 => p.with_expiration("1000".into()),
            1 => p.with_expiration("600000".into()),
            _ => p,
        }
    };
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(3));
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(600_000));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("expired".into()),
    );
    {
        let b = Broker::start(config(&dir)).await.expect("starts");
        let conn = connect(&b).await;
        let ch = confirming_channel(&conn).await;
        declare(&ch, "expired", FieldTable::default()).await;
        declare(&ch, "prio-ttl", args.clone()).await;
        publish(&ch, "prio-ttl", 0..COUNT, props).await;
        drop(conn);
        b.shutdown().await;
    }
    // Past the short TTL before the node is back.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let b = Broker::start(config(&dir)).await.expect("restarts");
    let paged = check_bounded(&b, "prio-ttl").await;
    assert!(paged >= u64::from(COUNT) * 9 / 10, "{paged} paged");
    let conn = connect(&b).await;
    let ch = conn.create_channel().await.expect("channel");
    let kept = COUNT - COUNT / 5;
    let seen = drain(&b, &ch, "prio-ttl", kept).await;
    let mut want: Vec<u32> = (0..COUNT).filter(|&i| !expires_soon(i)).collect();
    want.sort_by_key(|&i| (std::cmp::Reverse(priority(i)), i));
    assert_eq!(in_order(&seen), want);
    within(async {
        loop {
            let q = listing(&b, "expired").await;
            if q["messages"] == COUNT / 5 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut dead = Vec::new();
    for _ in 0..COUNT / 5 {
        let got = ch
            .basic_get("expired".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a dead letter");
        assert_eq!(got.delivery.data.len(), BODY, "with its body");
        dead.push(number(&got.delivery.data));
    }
    dead.sort_unstable();
    let want_dead: Vec<u32> = (0..COUNT).filter(|&i| expires_soon(i)).collect();
    assert_eq!(dead, want_dead);
    let q = listing(&b, "prio-ttl").await;
    assert_eq!(q["messages"], 0, "{q}");
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

// Transient messages while memory runs short: their bodies past the window go to disk
// too (the broker's "memory runs short" flag is set by hand, as if its memory had
// passed half the watermark), come back in order, and never survive a restart.

fn transient() -> BasicProperties {
    BasicProperties::default()
}

/// Live messages in the node's store.
fn stored_messages(b: &Broker) -> u64 {
    b.store_stats().expect("a store").live_messages
}

#[tokio::test]
async fn a_transient_backlog_pages_to_disk_while_memory_runs_short() {
    let dir = data_dir("transient");
    let b = Broker::start(config(&dir)).await.expect("starts");
    b.set_memory_short(true);
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    // A non-durable queue: no stored copy of anything.
    ch.queue_declare(
        "scratch".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declared");
    publish(&ch, "scratch", 0..COUNT, |i| {
        // Persistent ones too: a non-durable queue keeps no copy of them.
        if i % 2 == 0 {
            transient()
        } else {
            persistent()
        }
    })
    .await;
    let paged = check_bounded(&b, "scratch").await;
    assert!(
        paged >= u64::from(COUNT) * 9 / 10,
        "most of the backlog is on disk only: {paged} paged of {COUNT}"
    );
    within(async {
        while stored_messages(&b) < paged {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let seen = drain(&b, &ch, "scratch", COUNT).await;
    assert_eq!(in_order(&seen), (0..COUNT).collect::<Vec<_>>());
    // Their scratch copies went as they came back.
    within(async {
        while stored_messages(&b) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_transient_backlog_loaded_before_memory_ran_short_goes_to_disk_from_its_tail() {
    let dir = data_dir("transient-shed");
    let b = Broker::start(config(&dir)).await.expect("starts");
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(3));
    declare(&ch, "shed", args).await;
    let priority = |i: u32| (i % 4) as u8;
    publish(&ch, "shed", 0..COUNT, |i| {
        transient().with_priority(priority(i))
    })
    .await;
    let q = listing(&b, "shed").await;
    assert_eq!(q["messages_paged_out"], 0, "memory is plentiful: {q}");
    b.set_memory_short(true);
    within(async {
        loop {
            let q = listing(&b, "shed").await;
            if q["message_bytes_ram"].as_u64() <= Some(WINDOW) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(check_bounded(&b, "shed").await >= u64::from(COUNT) * 9 / 10);
    let seen = drain(&b, &ch, "shed", COUNT).await;
    let mut want: Vec<u32> = (0..COUNT).collect();
    want.sort_by_key(|&i| (std::cmp::Reverse(priority(i)), i));
    assert_eq!(in_order(&seen), want);
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn paged_transient_messages_requeue_at_their_place_and_expire_to_the_dead_letter_queue() {
    let dir = data_dir("transient-rq-ttl");
    let b = Broker::start(config(&dir)).await.expect("starts");
    b.set_memory_short(true);
    let conn = connect(&b).await;
    let ch = confirming_channel(&conn).await;
    declare(&ch, "tdlq", FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("tdlq".into()),
    );
    declare(&ch, "trq", args).await;
    // Messages 0..COUNT/2 expire after 300 ms, the others never.
    let half = COUNT / 2;
    publish(&ch, "trq", 0..COUNT, |i| {
        if i < half {
            transient().with_expiration("300".into())
        } else {
            transient()
        }
    })
    .await;
    assert!(check_bounded(&b, "trq").await > 0);
    // The first half expires, in order, to the dead-letter queue, bodies whole.
    within(async {
        loop {
            let q = listing(&b, "tdlq").await;
            if q["messages"] == half {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut numbers = Vec::new();
    for _ in 0..half {
        let got = ch
            .basic_get("tdlq".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a dead letter");
        assert_eq!(got.delivery.data.len(), BODY);
        numbers.push(number(&got.delivery.data));
    }
    assert_eq!(numbers, (0..half).collect::<Vec<_>>());
    // A consumer takes 100 of the rest, acks the odd ones, and goes away: the even ones
    // come back at their place, ahead of the paged rest.
    {
        let taker = conn.create_channel().await.expect("channel");
        taker
            .basic_qos(100, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = taker
            .basic_consume(
                "trq".into(),
                "taker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut taken = Vec::new();
        for _ in 0..100 {
            let d = within(consumer.next()).await.expect("one").expect("ok");
            taken.push(d);
        }
        taker
            .basic_cancel("taker".into(), BasicCancelOptions::default())
            .await
            .expect("cancelled");
        for d in taken.into_iter().filter(|d| number(&d.data) % 2 == 1) {
            d.ack(BasicAckOptions::default()).await.expect("acked");
        }
        taker.close(200, "bye".into()).await.expect("closed");
    }
    let seen = drain(&b, &ch, "trq", half - 50).await;
    let want: Vec<(u32, bool)> = (half..half + 100)
        .filter(|i| i % 2 == 0)
        .map(|i| (i, true))
        .chain((half + 100..COUNT).map(|i| (i, false)))
        .collect();
    assert_eq!(seen, want);
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn transient_messages_paged_to_disk_do_not_survive_a_restart() {
    let dir = data_dir("transient-restart");
    {
        let b = Broker::start(config(&dir)).await.expect("starts");
        b.set_memory_short(true);
        let conn = connect(&b).await;
        let ch = confirming_channel(&conn).await;
        declare(&ch, "mixed", FieldTable::default()).await;
        publish(&ch, "mixed", 0..COUNT, |i| {
            if i % 2 == 0 {
                persistent()
            } else {
                transient()
            }
        })
        .await;
        let paged = check_bounded(&b, "mixed").await;
        assert!(paged >= u64::from(COUNT) * 9 / 10, "{paged} paged");
        // Every persistent message, and the transient ones past the window, are stored.
        within(async {
            while stored_messages(&b) < paged {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        drop(conn);
        b.shutdown().await;
    }
    let b = Broker::start(config(&dir)).await.expect("restarts");
    let q = listing(&b, "mixed").await;
    assert_eq!(q["messages"], COUNT / 2, "only the persistent half: {q}");
    // The scratch copies are gone from the store too.
    assert_eq!(stored_messages(&b), u64::from(COUNT / 2));
    let conn = connect(&b).await;
    let ch = conn.create_channel().await.expect("channel");
    let seen = drain(&b, &ch, "mixed", COUNT / 2).await;
    assert_eq!(
        in_order(&seen),
        (0..COUNT).filter(|i| i % 2 == 0).collect::<Vec<_>>()
    );
    drop(conn);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
