//! Helpers shared by the core-broker integration tests: where the broker is, unique
//! names, reply codes out of lapin errors, small waits, and a raw AMQP client for the
//! cases no well-behaved client library can produce (bad headers, oversized or broken
//! frames, silent peers).
//!
//! Set `WARREN_TEST_REFERENCE_URL` (e.g. `amqp://guest:guest@127.0.0.1:5673/%2f`) to run
//! the same tests against another broker, such as a reference RabbitMQ, to check that a
//! test expects what RabbitMQ does. Settings passed to `start_with` then do not apply.

#![allow(dead_code)]

pub mod http;
pub mod raw;

use std::future::Future;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ErrorKind};
use warren::Config;

use crate::common::TestBroker;

/// A broker for one test: an in-process Warren, or the reference broker.
pub struct Target {
    pub url: String,
    broker: Option<TestBroker>,
}

/// The reference broker's URL when the tests run against one.
pub fn reference_url() -> Option<String> {
    std::env::var("WARREN_TEST_REFERENCE_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

impl Target {
    /// A broker with default settings.
    pub async fn start() -> Target {
        Self::start_with(|_| {}).await
    }

    /// A Warren with adjusted settings (ignored against a reference broker).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Target {
        if let Some(url) = reference_url() {
            return Target { url, broker: None };
        }
        let b = TestBroker::start_with(adjust).await;
        Target {
            url: b.url.clone(),
            broker: Some(b),
        }
    }

    /// The in-process Warren, to shut it down (None against a reference broker).
    pub fn take_broker(&mut self) -> Option<warren::Broker> {
        self.broker.as_mut()?.broker.take()
    }

    /// Whether this is a reference broker rather than Warren.
    pub fn is_reference(&self) -> bool {
        self.broker.is_none()
    }

    /// A new lapin connection.
    pub async fn connect(&self) -> Connection {
        self.connect_url(&self.url).await.expect("connects")
    }

    /// A new lapin connection to this URL (for query parameters, other credentials).
    pub async fn connect_url(&self, url: &str) -> lapin::Result<Connection> {
        within(Connection::connect(url, ConnectionProperties::default())).await
    }

    /// The URL with another user, password and vhost (already URL-encoded).
    pub fn url_with(&self, user: &str, pass: &str, vhost: &str) -> String {
        format!("amqp://{user}:{pass}@{}/{vhost}", self.addr())
    }

    /// `host:port` of the broker.
    pub fn addr(&self) -> String {
        let rest = self.url.split_once("://").map(|x| x.1).unwrap_or(&self.url);
        let rest = rest.rsplit_once('@').map(|x| x.1).unwrap_or(rest);
        rest.split('/').next().unwrap_or(rest).to_string()
    }

    /// A connection and a channel on it.
    pub async fn channel(&self) -> (Connection, Channel) {
        let conn = self.connect().await;
        let ch = conn.create_channel().await.expect("channel opens");
        (conn, ch)
    }
}

/// A name no other test uses (tests may share a reference broker).
pub fn uniq(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{:x}-{}",
        std::process::id(),
        t & 0xffff_ffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Awaits `f`, failing the test if it takes more than 10 s (a hang, not a measurement).
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("operation did not complete within 10s")
}

/// The AMQP reply code carried by a lapin error, if it is a protocol error.
pub fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Asserts that `r` failed with the AMQP reply code `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: lapin::Result<T>, code: u16) {
    match r {
        Ok(v) => panic!("expected AMQP error {code}, got success: {v:?}"),
        Err(e) => assert_eq!(
            reply_code(&e),
            Some(code),
            "expected AMQP error {code}, got: {e}"
        ),
    }
}

/// Declares a server-named, non-durable queue and returns its name.
pub async fn temp_queue(ch: &Channel) -> String {
    within(ch.queue_declare(
        "".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("queue.declare")
    .name()
    .to_string()
}

/// Declares a named queue with default options.
pub async fn declare_queue(ch: &Channel, name: &str) {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("queue.declare");
}

/// Publishes `body` with default properties.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    within(ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default(),
    ))
    .await
    .expect("basic.publish");
}

/// Publishes with confirms on, and waits until the broker has the message.
pub async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    let confirm = within(ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default(),
    ))
    .await
    .expect("basic.publish");
    let c = within(confirm).await.expect("confirm");
    assert!(c.is_ack(), "publish not acked: {c:?}");
}

/// Starts a consumer with default options (manual ack).
pub async fn consume(ch: &Channel, queue: &str, tag: &str) -> Consumer {
    within(ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("basic.consume")
}

/// The next delivery of a consumer (fails the test after 10 s or on an error or end).
pub async fn next(consumer: &mut Consumer) -> Delivery {
    within(consumer.next())
        .await
        .expect("consumer stream ended")
        .expect("delivery error")
}

/// `Some(delivery)` if one arrives within `ms`, `None` otherwise.
pub async fn next_within(consumer: &mut Consumer, ms: u64) -> Option<Delivery> {
    match tokio::time::timeout(Duration::from_millis(ms), consumer.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("delivery error: {e}"),
        Ok(None) => None,
        Err(_) => None,
    }
}

/// Asserts that no message arrives on `consumer` within 300 ms.
pub async fn assert_no_delivery(consumer: &mut Consumer) {
    if let Some(d) = next_within(consumer, 300).await {
        panic!(
            "unexpected delivery: {:?}",
            String::from_utf8_lossy(&d.data)
        );
    }
}

/// basic.get with manual ack; `None` for get-empty.
pub async fn get(ch: &Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    within(ch.basic_get(queue.into(), BasicGetOptions::default()))
        .await
        .expect("basic.get")
}

/// Drains a queue with basic.get (no-ack) and returns the bodies, in order.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(m) = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
    {
        out.push(m.delivery.data);
    }
    out
}

/// Current message count of a queue (passive declare).
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive queue.declare")
    .message_count()
}

/// Waits (up to 5 s) until `queue` holds `n` ready messages; returns the last count.
pub async fn wait_message_count(ch: &Channel, queue: &str, n: u32) -> u32 {
    let mut count = 0;
    for _ in 0..100 {
        count = message_count(ch, queue).await;
        if count == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    count
}

/// Whether a queue exists, checked on a fresh channel of `conn` (a 404 closes it).
pub async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = within(conn.create_channel()).await.expect("channel opens");
    let r = within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    match r {
        Ok(_) => {
            let _ = ch.close(200, "".into()).await;
            true
        }
        Err(e) if reply_code(&e) == Some(404) => false,
        // An exclusive queue of another connection.
        Err(e) if reply_code(&e) == Some(405) => true,
        Err(e) => panic!("passive declare of {queue}: {e}"),
    }
}

/// Waits (up to 5 s) until a queue no longer exists; returns whether it is gone.
pub async fn wait_queue_gone(conn: &Connection, queue: &str) -> bool {
    for _ in 0..100 {
        if !queue_exists(conn, queue).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether an exchange exists, checked on a fresh channel of `conn`.
pub async fn exchange_exists(conn: &Connection, exchange: &str) -> bool {
    let ch = within(conn.create_channel()).await.expect("channel opens");
    let r = within(ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    match r {
        Ok(()) => {
            let _ = ch.close(200, "".into()).await;
            true
        }
        Err(e) if reply_code(&e) == Some(404) => false,
        Err(e) => panic!("passive declare of exchange {exchange}: {e}"),
    }
}

/// Proves a channel still works: a round trip through a fresh server-named queue.
pub async fn assert_channel_works(ch: &Channel) {
    let q = temp_queue(ch).await;
    publish(ch, "", &q, b"still alive").await;
    let mut got = None;
    for _ in 0..100 {
        got = get(ch, &q).await;
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = got.expect("message published on a working channel arrives");
    assert_eq!(m.delivery.data, b"still alive");
    within(m.delivery.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
}

/// A bystander connection with a consumer, to prove that trouble on another connection
/// leaves it alone: `check` publishes a message and receives it.
pub struct Witness {
    pub conn: Connection,
    pub ch: Channel,
    pub queue: String,
    consumer: Consumer,
    n: u32,
}

impl Witness {
    /// Connects, declares a server-named queue and consumes from it (no-ack).
    pub async fn start(t: &Target) -> Witness {
        let (conn, ch) = t.channel().await;
        let queue = temp_queue(&ch).await;
        let consumer = within(ch.basic_consume(
            queue.as_str().into(),
            "witness".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("basic.consume");
        let mut w = Witness {
            conn,
            ch,
            queue,
            consumer,
            n: 0,
        };
        w.check().await;
        w
    }

    /// One message round trip on the bystander connection.
    pub async fn check(&mut self) {
        self.n += 1;
        let body = format!("witness {}", self.n);
        publish(&self.ch, "", &self.queue, body.as_bytes()).await;
        let d = next(&mut self.consumer).await;
        assert_eq!(d.data, body.as_bytes(), "bystander connection disturbed");
        assert!(self.conn.status().connected());
    }
}

/// A no-ack consumer on a fresh server-named queue of `ch`. When the server closes the
/// channel, lapin hands the close reason to the channel's consumers, so this reports
/// channel errors caused by methods that have no reply (basic.ack, basic.nack, ...).
pub async fn sentinel(ch: &Channel) -> Consumer {
    let q = temp_queue(ch).await;
    within(ch.basic_consume(
        q.as_str().into(),
        "sentinel".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("basic.consume")
}

/// The reply code the channel of `sentinel` was closed with (fails the test if it
/// is not closed within 10 s).
pub async fn channel_closed_with(sentinel: &mut Consumer) -> Option<u16> {
    match within(sentinel.next()).await {
        Some(Ok(d)) => panic!(
            "unexpected delivery to the sentinel: {:?}",
            String::from_utf8_lossy(&d.data)
        ),
        Some(Err(e)) => reply_code(&e),
        None => None,
    }
}
