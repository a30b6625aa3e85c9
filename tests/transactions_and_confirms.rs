//! Producer-side guarantees: publisher confirms (one ack or nack per publish, in order,
//! coalesced with `multiple`, basic.return before the ack of an unroutable mandatory
//! message), transactions (nothing visible or acked before tx.commit, rollback discards,
//! commit-ok only once the messages are in their queues, 406 for mode mix-ups), and that
//! what was confirmed or committed survives a restart, in both flush modes.
//!
//! Tests that restart the broker run only against Warren; the others also run against a
//! reference broker (see `WARREN_TEST_REFERENCE_URL` in tests/util).

mod common;
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic, confirm, queue, tx};
use amq_protocol::types::FieldTable as RawTable;
use common::TestBroker;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use util::raw::{Raw, method, publish_frames};
use util::*;
use warren::{Broker, Config, FlushMode};

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

// ---------------------------------------------------------------------------------------
// A Warren node that can be restarted on the same data directory.

struct Node {
    broker: Option<Broker>,
    dir: std::path::PathBuf,
    adjust: fn(&mut Config),
    url: String,
}

impl Node {
    async fn start() -> Node {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: fn(&mut Config)) -> Node {
        let mut tb = TestBroker::start_with(adjust).await;
        let broker = tb.broker.take();
        // The TestBroker would remove the directory when dropped; the node owns it now.
        let dir = std::mem::take(&mut tb.dir);
        drop(tb);
        let url = broker.as_ref().expect("started").amqp_url();
        Node {
            broker,
            dir,
            adjust,
            url,
        }
    }

    /// Clean shutdown, then a new broker on the same directory with the same settings.
    async fn restart(&mut self) {
        let b = self.broker.take().expect("node is running");
        within_long(b.shutdown()).await;
        let mut config = Config::for_tests(&self.dir);
        (self.adjust)(&mut config);
        let b = within_long(Broker::start(config))
            .await
            .expect("broker restarts");
        self.url = b.amqp_url();
        self.broker = Some(b);
    }

    async fn connect(&self) -> Connection {
        within(Connection::connect(
            &self.url,
            ConnectionProperties::default(),
        ))
        .await
        .expect("connects")
    }

    async fn channel(&self) -> (Connection, Channel) {
        let conn = self.connect().await;
        let ch = within(conn.create_channel()).await.expect("channel opens");
        (conn, ch)
    }

    fn addr(&self) -> String {
        self.broker
            .as_ref()
            .expect("running")
            .local_addr()
            .to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Like `within`, with room for work that legitimately takes a while (thousands of
/// fsyncs on a shared machine). Only to turn a hang into a failure.
async fn within_long<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("operation did not complete within 120s")
}

async fn declare_durable(ch: &Channel, name: &str) {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("durable queue.declare");
}

/// Deletes queues a test declared (they outlive the test on a reference broker).
async fn cleanup(ch: &Channel, queues: &[&str]) {
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Waits for a publisher confirm and asserts it is an ack without a returned message.
async fn acked(confirm: lapin::PublisherConfirm) {
    let c = within(confirm).await.expect("confirm");
    assert!(
        matches!(c, lapin::Confirmation::Ack(None)),
        "expected a plain ack, got {c:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Raw frames: publishing and reading confirms, returns and replies.

/// One frame from `r`; None when the socket closes.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<AMQPFrame> {
    let mut head = [0u8; 7];
    r.read_exact(&mut head).await.ok()?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut frame = head.to_vec();
    frame.resize(7 + size + 1, 0);
    r.read_exact(&mut frame[7..]).await.ok()?;
    match parse_frame(&frame[..]) {
        Ok((_, f)) => Some(f),
        Err(e) => panic!("server sent an unparsable frame {frame:?}: {e:?}"),
    }
}

/// What the server sent on the publishing channel, with content already assembled.
#[derive(Debug)]
enum Event {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
    Return { ret: basic::Return, body: Vec<u8> },
    Method(AMQPClass),
}

/// The next event on channel `ch` (heartbeats skipped); panics on anything on another
/// channel, a stray content frame, EOF or after 10 s of silence.
async fn next_event<R: AsyncRead + Unpin>(r: &mut R, ch: u16) -> Event {
    loop {
        let f = within(read_frame(r))
            .await
            .expect("server closed the connection");
        match f {
            AMQPFrame::Heartbeat => continue,
            AMQPFrame::Method(c, m) => {
                assert_eq!(c, ch, "method on an unexpected channel: {m:?}");
                return match m {
                    AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => Event::Ack {
                        tag: a.delivery_tag,
                        multiple: a.multiple,
                    },
                    AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => Event::Nack {
                        tag: n.delivery_tag,
                        multiple: n.multiple,
                    },
                    AMQPClass::Basic(basic::AMQPMethod::Return(ret)) => {
                        let size = match within(read_frame(r)).await {
                            Some(AMQPFrame::Header(c, h)) if c == ch => h.body_size as usize,
                            other => panic!("expected the returned message's header: {other:?}"),
                        };
                        let mut body = Vec::new();
                        while body.len() < size {
                            match within(read_frame(r)).await {
                                Some(AMQPFrame::Body(c, b)) if c == ch => body.extend(b),
                                other => panic!("expected the returned message's body: {other:?}"),
                            }
                        }
                        Event::Return { ret, body }
                    }
                    other => Event::Method(other),
                };
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Bookkeeping of publisher confirms as they arrive, checking the frame-level rules:
/// every frame confirms at least its own tag, which must be published and not yet
/// confirmed (no tag confirmed twice), and `multiple` covers exactly the tags still
/// outstanding up to it (as clients read it). With `in_order`, delivery tags must also
/// strictly increase from frame to frame: a stream of publishes that all take the same
/// path (persistent, one durable queue) is confirmed in publish order.
///
/// Without `in_order`, a later publish may be confirmed before an earlier one: RabbitMQ
/// acks a transient or unroutable message at once, with `multiple = false`, while earlier
/// persistent ones still wait for the disk (`rabbit_channel:coalesce_and_send`), and
/// its documentation tells publishers not to depend on the order of confirms.
struct ConfirmLog {
    in_order: bool,
    published: u64,
    outstanding: BTreeSet<u64>,
    last_tag: u64,
    frames: u64,
    multiple_frames: u64,
    acked: BTreeSet<u64>,
    nacked: BTreeSet<u64>,
}

impl ConfirmLog {
    fn new(published: u64, in_order: bool) -> ConfirmLog {
        ConfirmLog {
            in_order,
            published,
            outstanding: (1..=published).collect(),
            last_tag: 0,
            frames: 0,
            multiple_frames: 0,
            acked: BTreeSet::new(),
            nacked: BTreeSet::new(),
        }
    }

    /// Records one basic.ack or basic.nack frame; returns the sequence numbers it
    /// confirmed.
    #[track_caller]
    fn record(&mut self, tag: u64, multiple: bool, ack: bool) -> Vec<u64> {
        self.frames += 1;
        if self.in_order {
            assert!(
                tag > self.last_tag,
                "confirm tags must strictly increase: {tag} after {}",
                self.last_tag
            );
        }
        assert!(
            (1..=self.published).contains(&tag),
            "confirm of tag {tag}, but only 1..={} were published",
            self.published
        );
        assert!(self.outstanding.contains(&tag), "tag {tag} confirmed twice");
        self.last_tag = tag;
        let confirmed: Vec<u64> = if multiple {
            self.multiple_frames += 1;
            self.outstanding.range(..=tag).copied().collect()
        } else {
            vec![tag]
        };
        for s in &confirmed {
            self.outstanding.remove(s);
            if ack {
                self.acked.insert(*s);
            } else {
                self.nacked.insert(*s);
            }
        }
        confirmed
    }

    fn done(&self) -> bool {
        self.outstanding.is_empty()
    }
}

/// A raw connection with channel 1 in confirm mode, split into halves.
async fn raw_confirm_channel(
    addr: &str,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let (mut raw, _) = Raw::open(addr, 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
    .await;
    match raw.recv_method().await {
        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => {}
        other => panic!("expected confirm.select-ok, got {other:?}"),
    }
    let Raw { stream } = raw;
    stream.into_split()
}

/// Writes `bytes` from a task of its own (so that the server's confirms never wait on a
/// writer that is not reading); the write half is handed back when done.
fn write_in_background(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    bytes: Vec<u8>,
) -> tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf> {
    tokio::spawn(async move {
        wr.write_all(&bytes).await.expect("write publishes");
        wr
    })
}

fn seq_of(body: &[u8]) -> u64 {
    std::str::from_utf8(body)
        .expect("utf-8 body")
        .split(':')
        .next_back()
        .expect("body")
        .parse()
        .expect("sequence number in body")
}

// ---------------------------------------------------------------------------------------
// Publisher confirms, seen frame by frame.

#[tokio::test]
async fn five_thousand_persistent_publishes_are_each_confirmed_once_in_order() {
    const N: u64 = 5000;
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("confirm-5000");
    declare_durable(&ch, &q).await;

    let (mut rd, wr) = raw_confirm_channel(&t.addr()).await;
    let mut bytes = Vec::new();
    for i in 1..=N {
        bytes.extend(publish_frames(
            1,
            "",
            &q,
            false,
            true,
            format!("m:{i}").as_bytes(),
        ));
    }
    let writer = write_in_background(wr, bytes);

    let mut log = ConfirmLog::new(N, true);
    while !log.done() {
        match next_event(&mut rd, 1).await {
            Event::Ack { tag, multiple } => {
                log.record(tag, multiple, true);
            }
            Event::Nack { tag, multiple } => {
                log.record(tag, multiple, false);
            }
            other => panic!("unexpected {other:?} while waiting for confirms"),
        }
    }
    let _wr = within(writer).await.expect("writer task");
    assert!(log.nacked.is_empty(), "nacked: {:?}", log.nacked);
    assert_eq!(log.acked.len() as u64, N, "every sequence number acked");
    assert!(
        log.multiple_frames > 0,
        "{N} pipelined publishes were confirmed in {} frames, none with multiple=true",
        log.frames
    );

    // Every acked message is in the queue, in publish order.
    assert_eq!(message_count(&ch, &q).await, N as u32);
    let bodies = drain(&ch, &q).await;
    let seqs: Vec<u64> = bodies.iter().map(|b| seq_of(b)).collect();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    cleanup(&ch, &[&q]).await;
}

#[tokio::test]
async fn mixed_transient_persistent_routable_unroutable_publishes_are_all_confirmed() {
    const N: u64 = 3000;
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let dq = uniq("confirm-mixed-durable");
    let tq = uniq("confirm-mixed-transient");
    let fan = uniq("confirm-mixed-fanout");
    let nowhere = uniq("confirm-mixed-unbound");
    declare_durable(&ch, &dq).await;
    declare_queue(&ch, &tq).await;
    for (x, kind) in [
        (&fan, ExchangeKind::Fanout),
        (&nowhere, ExchangeKind::Direct),
    ] {
        within(ch.exchange_declare(
            x.as_str().into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ))
        .await
        .expect("exchange.declare");
    }
    for q in [&dq, &tq] {
        within(ch.queue_bind(
            q.as_str().into(),
            fan.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .expect("queue.bind");
    }

    // Seven kinds of publish, interleaved.
    let missing_queue = uniq("no-such-queue");
    let mut to_dq = Vec::new();
    let mut to_tq = Vec::new();
    let mut bytes = Vec::new();
    for i in 1..=N {
        let body = format!("m:{i}");
        let (exchange, key, persistent): (&str, &str, bool) = match i % 7 {
            0 => ("", &dq, true),
            1 => ("", &dq, false),
            2 => ("", &tq, true),
            3 => ("", &tq, false),
            4 => ("", &missing_queue, true),
            5 => (&nowhere, "k", false),
            _ => (&fan, "", true),
        };
        match i % 7 {
            0 | 1 => to_dq.push(i),
            2 | 3 => to_tq.push(i),
            6 => {
                to_dq.push(i);
                to_tq.push(i);
            }
            _ => {}
        }
        bytes.extend(publish_frames(
            1,
            exchange,
            key,
            false,
            persistent,
            body.as_bytes(),
        ));
    }

    let (mut rd, wr) = raw_confirm_channel(&t.addr()).await;
    let writer = write_in_background(wr, bytes);
    let mut log = ConfirmLog::new(N, false);
    while !log.done() {
        match next_event(&mut rd, 1).await {
            Event::Ack { tag, multiple } => {
                log.record(tag, multiple, true);
            }
            Event::Nack { tag, multiple } => {
                log.record(tag, multiple, false);
            }
            other => panic!("unexpected {other:?} while waiting for confirms"),
        }
    }
    let _wr = within(writer).await.expect("writer task");
    assert!(
        log.nacked.is_empty(),
        "nothing here may be nacked: {:?}",
        log.nacked
    );
    assert_eq!(log.acked.len() as u64, N);

    let got: Vec<u64> = drain(&ch, &dq).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(got, to_dq, "durable queue holds its messages, in order");
    let got: Vec<u64> = drain(&ch, &tq).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(got, to_tq, "non-durable queue holds its messages, in order");
    cleanup(&ch, &[&dq, &tq]).await;
    let _ = ch
        .exchange_delete(fan.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(nowhere.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}

#[tokio::test]
async fn basic_return_of_an_unroutable_mandatory_message_comes_before_its_ack() {
    const N: u64 = 300;
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let dq = uniq("confirm-mandatory");
    declare_durable(&ch, &dq).await;
    let missing = uniq("no-such-queue");

    let mut unroutable = BTreeSet::new();
    let mut bytes = Vec::new();
    for i in 1..=N {
        let body = format!("m:{i}");
        let b = match i % 3 {
            0 => {
                unroutable.insert(i);
                publish_frames(1, "", &missing, true, i % 2 == 0, body.as_bytes())
            }
            1 => publish_frames(1, "", &dq, true, true, body.as_bytes()),
            _ => publish_frames(1, "", &dq, false, false, body.as_bytes()),
        };
        bytes.extend(b);
    }

    let (mut rd, wr) = raw_confirm_channel(&t.addr()).await;
    let writer = write_in_background(wr, bytes);
    let mut log = ConfirmLog::new(N, false);
    let mut returned = BTreeSet::new();
    while !log.done() {
        match next_event(&mut rd, 1).await {
            Event::Return { ret, body } => {
                let seq = seq_of(&body);
                assert_eq!(ret.reply_code, 312, "NO_ROUTE: {ret:?}");
                assert_eq!(ret.exchange.as_str(), "");
                assert_eq!(ret.routing_key.as_str(), missing);
                assert!(unroutable.contains(&seq), "message {seq} was routable");
                assert!(
                    log.outstanding.contains(&seq),
                    "basic.return of message {seq} after its confirm"
                );
                assert!(returned.insert(seq), "message {seq} returned twice");
            }
            Event::Ack { tag, multiple } => {
                for s in log.record(tag, multiple, true) {
                    if unroutable.contains(&s) {
                        assert!(
                            returned.contains(&s),
                            "message {s} acked before its basic.return"
                        );
                    }
                }
            }
            Event::Nack { tag, multiple } => {
                log.record(tag, multiple, false);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let _wr = within(writer).await.expect("writer task");
    assert!(log.nacked.is_empty(), "nacked: {:?}", log.nacked);
    assert_eq!(
        returned, unroutable,
        "each unroutable message returned once"
    );
    let expected: Vec<u64> = (1..=N).filter(|i| i % 3 != 0).collect();
    let got: Vec<u64> = drain(&ch, &dq).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(got, expected);
    cleanup(&ch, &[&dq]).await;
}

#[tokio::test]
async fn publishes_refused_by_a_full_queue_are_nacked_once_and_the_rest_acked() {
    const N: u64 = 50;
    const MAX: u64 = 10;
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("confirm-reject-publish");
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongInt(MAX as i32),
    );
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    within(ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    ))
    .await
    .expect("queue.declare");

    let mut bytes = Vec::new();
    for i in 1..=N {
        bytes.extend(publish_frames(
            1,
            "",
            &q,
            false,
            true,
            format!("m:{i}").as_bytes(),
        ));
    }
    let (mut rd, wr) = raw_confirm_channel(&t.addr()).await;
    let writer = write_in_background(wr, bytes);
    let mut log = ConfirmLog::new(N, false);
    while !log.done() {
        match next_event(&mut rd, 1).await {
            Event::Ack { tag, multiple } => {
                log.record(tag, multiple, true);
            }
            Event::Nack { tag, multiple } => {
                log.record(tag, multiple, false);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let _wr = within(writer).await.expect("writer task");
    assert_eq!(
        log.acked,
        (1..=MAX).collect(),
        "the first {MAX} fit and are acked"
    );
    assert_eq!(log.nacked, (MAX + 1..=N).collect(), "the rest are nacked");
    let got: Vec<u64> = drain(&ch, &q).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(
        got,
        (1..=MAX).collect::<Vec<_>>(),
        "exactly the acked ones are in the queue"
    );
    cleanup(&ch, &[&q]).await;
}

#[tokio::test]
async fn lapin_sees_an_ack_carrying_the_returned_message() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let q = temp_queue(&ch).await;
    let missing = uniq("no-such-queue");
    let c1 = within(ch.basic_publish(
        "".into(),
        missing.as_str().into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"lost",
        persistent(),
    ))
    .await
    .expect("publish");
    // lapin hands a returned message to the first confirm it resolves, in no particular
    // order within a `multiple` ack: settle the first publish before the second.
    match within(c1).await.expect("confirm") {
        lapin::Confirmation::Ack(Some(ret)) => {
            assert_eq!(ret.reply_code, 312);
            assert_eq!(ret.delivery.data, b"lost");
        }
        other => panic!("expected an ack with the returned message, got {other:?}"),
    }
    let c2 = within(ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"kept",
        persistent(),
    ))
    .await
    .expect("publish");
    acked(c2).await;
    assert_eq!(drain(&ch, &q).await, vec![b"kept".to_vec()]);
}

// ---------------------------------------------------------------------------------------
// Confirmed means stored: restarts.

#[tokio::test]
async fn confirmed_persistent_messages_on_a_durable_queue_survive_a_restart() {
    const N: u32 = 1000;
    let mut node = Node::start().await;
    let dq = "confirmed-durable";
    let tq = "confirmed-transient-queue";
    {
        let (conn, ch) = node.channel().await;
        within(ch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .expect("confirm.select");
        declare_durable(&ch, dq).await;
        declare_queue(&ch, tq).await;
        let mut confirms = Vec::new();
        for i in 0..N {
            let body = format!("m:{i}");
            confirms.push(
                within(ch.basic_publish(
                    "".into(),
                    dq.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    persistent(),
                ))
                .await
                .expect("publish"),
            );
        }
        // A transient message on the durable queue, and a persistent one on a
        // non-durable queue: confirmed too, but neither promises to outlive the node.
        confirms.push(
            within(ch.basic_publish(
                "".into(),
                dq.into(),
                BasicPublishOptions::default(),
                b"transient",
                BasicProperties::default(),
            ))
            .await
            .expect("publish"),
        );
        confirms.push(
            within(ch.basic_publish(
                "".into(),
                tq.into(),
                BasicPublishOptions::default(),
                b"on a non-durable queue",
                persistent(),
            ))
            .await
            .expect("publish"),
        );
        for c in confirms {
            acked(c).await;
        }
        assert_eq!(message_count(&ch, tq).await, 1);
        drop(conn);
    }
    // Right after the last confirm, no further waiting.
    node.restart().await;

    let (conn, ch) = node.channel().await;
    let bodies = drain(&ch, dq).await;
    let expected: Vec<Vec<u8>> = (0..N).map(|i| format!("m:{i}").into_bytes()).collect();
    assert_eq!(
        bodies, expected,
        "every confirmed persistent message is back, in order, and the transient one is not"
    );
    assert!(
        !queue_exists(&conn, tq).await,
        "the non-durable queue (and its confirmed message) is gone after a restart"
    );
}

// ---------------------------------------------------------------------------------------
// Transactions

/// Publishes `body` on `ch` without confirms (a transactional channel).
async fn tx_publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    within(ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    ))
    .await
    .expect("basic.publish");
}

#[tokio::test]
async fn transactional_publishes_are_invisible_until_commit() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let (_other_conn, other) = t.channel().await;
    let q = uniq("tx-invisible");
    declare_queue(&ch, &q).await;
    within(ch.tx_select()).await.expect("tx.select");
    for i in 0..3 {
        tx_publish(&ch, &q, format!("m:{i}").as_bytes(), persistent()).await;
    }
    // A synchronous round trip on the same channel: the publishes were processed.
    assert_eq!(message_count(&ch, &q).await, 0, "seen from the tx channel");
    assert_eq!(message_count(&other, &q).await, 0, "seen from elsewhere");
    assert!(get(&other, &q).await.is_none(), "basic.get finds nothing");

    within(ch.tx_commit()).await.expect("tx.commit");
    // commit-ok means the messages are in the queue: no waiting here.
    assert_eq!(message_count(&other, &q).await, 3);
    let bodies = drain(&other, &q).await;
    assert_eq!(
        bodies,
        vec![b"m:0".to_vec(), b"m:1".to_vec(), b"m:2".to_vec()]
    );

    // The channel stays transactional after a commit.
    tx_publish(&ch, &q, b"next", BasicProperties::default()).await;
    assert_eq!(message_count(&ch, &q).await, 0);
    within(ch.tx_commit()).await.expect("tx.commit");
    assert_eq!(message_count(&other, &q).await, 1);
    cleanup(&other, &[&q]).await;
}

#[tokio::test]
async fn commit_ok_comes_after_the_messages_reached_every_queue() {
    const N: u32 = 200;
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let (_other_conn, other) = t.channel().await;
    let dq = uniq("tx-commit-durable");
    let tq = uniq("tx-commit-transient");
    let fan = uniq("tx-commit-fanout");
    declare_durable(&ch, &dq).await;
    declare_queue(&ch, &tq).await;
    within(ch.exchange_declare(
        fan.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.declare");
    for q in [&dq, &tq] {
        within(ch.queue_bind(
            q.as_str().into(),
            fan.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .expect("queue.bind");
    }
    within(ch.tx_select()).await.expect("tx.select");
    for i in 0..N {
        let props = if i % 2 == 0 {
            persistent()
        } else {
            BasicProperties::default()
        };
        within(ch.basic_publish(
            fan.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            format!("m:{i}").as_bytes(),
            props,
        ))
        .await
        .expect("publish");
    }
    within(ch.tx_commit()).await.expect("tx.commit");
    // Asked from another connection right after commit-ok, without waiting.
    assert_eq!(message_count(&other, &dq).await, N);
    assert_eq!(message_count(&other, &tq).await, N);
    let expected: Vec<u64> = (0..N as u64).collect();
    let got: Vec<u64> = drain(&other, &dq).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(got, expected);
    let got: Vec<u64> = drain(&other, &tq).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(got, expected);
    cleanup(&other, &[&dq, &tq]).await;
    let _ = other
        .exchange_delete(fan.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}

#[tokio::test]
async fn rollback_discards_publishes_and_the_channel_stays_transactional() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("tx-rollback");
    declare_queue(&ch, &q).await;
    within(ch.tx_select()).await.expect("tx.select");
    tx_publish(&ch, &q, b"discarded 1", persistent()).await;
    tx_publish(&ch, &q, b"discarded 2", BasicProperties::default()).await;
    within(ch.tx_rollback()).await.expect("tx.rollback");
    within(ch.tx_commit()).await.expect("empty tx.commit");
    assert_eq!(
        message_count(&ch, &q).await,
        0,
        "rolled-back publishes are gone"
    );

    tx_publish(&ch, &q, b"kept", BasicProperties::default()).await;
    assert_eq!(message_count(&ch, &q).await, 0, "still transactional");
    within(ch.tx_commit()).await.expect("tx.commit");
    assert_eq!(drain(&ch, &q).await, vec![b"kept".to_vec()]);
    cleanup(&ch, &[&q]).await;
}

/// Fills `q` with `bodies` (confirmed, so they are there) from a separate channel.
async fn fill(t: &Target, q: &str, bodies: &[&str]) {
    let (conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    for b in bodies {
        publish_confirmed(&ch, "", q, b.as_bytes()).await;
    }
    let _ = conn.close(200, "".into()).await;
}

#[tokio::test]
async fn transactional_acks_take_effect_only_at_commit() {
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-acks");
    declare_queue(&setup, &q).await;
    fill(&t, &q, &["a", "b"]).await;

    // Acked inside a transaction that is never committed: the message comes back.
    let conn = t.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.tx_select()).await.expect("tx.select");
    let m = get(&ch, &q).await.expect("message a");
    assert_eq!(m.delivery.data, b"a");
    within(ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("basic.ack");
    assert_eq!(message_count(&ch, &q).await, 1, "b still ready, a unacked");
    within(ch.close(200, "".into())).await.expect("close");
    wait_message_count(&setup, &q, 2).await;
    let m = get(&setup, &q).await.expect("a came back");
    assert_eq!(m.delivery.data, b"a");
    assert!(m.delivery.redelivered, "a returns marked redelivered");
    within(setup.basic_reject(
        m.delivery.delivery_tag,
        BasicRejectOptions { requeue: true },
    ))
    .await
    .expect("requeue a");

    // Acked and committed: gone for good, even when the channel closes.
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.tx_select()).await.expect("tx.select");
    let m = get(&ch, &q).await.expect("a message");
    within(ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("basic.ack");
    within(ch.tx_commit()).await.expect("tx.commit");
    within(ch.close(200, "".into())).await.expect("close");
    assert_eq!(
        drain(&setup, &q).await,
        vec![b"b".to_vec()],
        "the committed ack removed a for good"
    );
    cleanup(&setup, &[&q]).await;
}

#[tokio::test]
async fn rollback_discards_acks_and_the_message_can_be_acked_again() {
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-rollback-acks");
    declare_queue(&setup, &q).await;
    fill(&t, &q, &["a", "b"]).await;

    let conn = t.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.tx_select()).await.expect("tx.select");
    let a = get(&ch, &q).await.expect("a");
    let b = get(&ch, &q).await.expect("b");
    assert_eq!(
        (&a.delivery.data[..], &b.delivery.data[..]),
        (&b"a"[..], &b"b"[..])
    );
    within(ch.basic_ack(a.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack a");
    within(ch.basic_ack(b.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack b");
    within(ch.tx_rollback()).await.expect("tx.rollback");
    // Both are unacked again: ack only b, commit, close; a comes back.
    within(ch.basic_ack(b.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack b again");
    within(ch.tx_commit()).await.expect("tx.commit");
    assert!(ch.status().connected(), "re-acking after rollback is valid");
    within(ch.close(200, "".into())).await.expect("close");

    wait_message_count(&setup, &q, 1).await;
    let back = drain(&setup, &q).await;
    assert_eq!(back, vec![b"a".to_vec()], "a requeued, b acked");
    cleanup(&setup, &[&q]).await;
}

#[tokio::test]
async fn rollback_then_channel_close_redelivers_a_tx_acked_message_to_a_consumer() {
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-consumer-acks");
    declare_queue(&setup, &q).await;
    fill(&t, &q, &["x"]).await;

    let conn = t.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.tx_select()).await.expect("tx.select");
    let mut c = consume(&ch, &q, "tx-consumer").await;
    let d = next(&mut c).await;
    assert_eq!(d.data, b"x");
    assert!(!d.redelivered);
    within(ch.basic_ack(d.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack");
    within(ch.tx_rollback()).await.expect("tx.rollback");
    within(ch.close(200, "".into())).await.expect("close");

    let (_c2, ch2) = t.channel().await;
    let mut c = consume(&ch2, &q, "after").await;
    let d = next(&mut c).await;
    assert_eq!(d.data, b"x");
    assert!(
        d.redelivered,
        "the rolled-back ack left it unacked: redelivered"
    );
    within(d.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    cleanup(&setup, &[&q]).await;
}

#[tokio::test]
async fn transactional_rejects_take_effect_only_at_commit() {
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-rejects");
    declare_queue(&setup, &q).await;
    fill(&t, &q, &["a", "b"]).await;

    let conn = t.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.tx_select()).await.expect("tx.select");
    let a = get(&ch, &q).await.expect("a");
    let b = get(&ch, &q).await.expect("b");
    // Dropping a, rolled back: a stays unacked on the channel.
    within(ch.basic_reject(
        a.delivery.delivery_tag,
        BasicRejectOptions { requeue: false },
    ))
    .await
    .expect("basic.reject");
    within(ch.tx_rollback()).await.expect("tx.rollback");
    // Requeueing b (nack), not yet committed: b is not ready yet.
    within(ch.basic_nack(
        b.delivery.delivery_tag,
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    ))
    .await
    .expect("basic.nack");
    assert_eq!(
        message_count(&ch, &q).await,
        0,
        "the nack waits for the commit"
    );
    within(ch.tx_commit()).await.expect("tx.commit");
    wait_message_count(&setup, &q, 1).await;
    let m = get(&setup, &q).await.expect("b requeued by the commit");
    assert_eq!(m.delivery.data, b"b");
    assert!(m.delivery.redelivered);
    within(setup.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack b");
    // a was never rejected for good: closing the channel brings it back.
    within(ch.close(200, "".into())).await.expect("close");
    wait_message_count(&setup, &q, 1).await;
    let m = get(&setup, &q).await.expect("a back after close");
    assert_eq!(m.delivery.data, b"a");
    assert!(m.delivery.redelivered);
    within(setup.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack a");
    cleanup(&setup, &[&q]).await;
}

#[tokio::test]
async fn a_failed_commit_applies_none_of_the_transaction() {
    // An ack of an unknown delivery tag inside a transaction is a 406; whether the
    // broker rejects it at the ack (RabbitMQ) or at the commit, nothing of the
    // transaction may take effect: its publish is not delivered, its valid ack not
    // applied (the message comes back when the channel closes).
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-failed-commit");
    declare_queue(&setup, &q).await;
    fill(&t, &q, &["a"]).await;

    let conn = t.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    let mut s = sentinel(&ch).await;
    within(ch.tx_select()).await.expect("tx.select");
    let a = get(&ch, &q).await.expect("a");
    tx_publish(&ch, &q, b"new", persistent()).await;
    within(ch.basic_ack(a.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack a");
    let _ = ch
        .basic_ack(a.delivery.delivery_tag + 1000, BasicAckOptions::default())
        .await;
    let _ = within(ch.tx_commit()).await;
    assert_eq!(channel_closed_with(&mut s).await, Some(406));

    wait_message_count(&setup, &q, 1).await;
    let back = drain(&setup, &q).await;
    assert_eq!(
        back,
        vec![b"a".to_vec()],
        "a is back (its ack was not committed) and the publish was discarded"
    );
    cleanup(&setup, &[&q]).await;
}

#[tokio::test]
async fn a_second_ack_of_a_tag_in_one_transaction_is_406_and_nothing_is_applied() {
    // RabbitMQ takes a tag out of the channel's unacked set at the (transactional) ack,
    // so acking it again in the same transaction is "406 unknown delivery tag" at once,
    // and the channel closes with the transaction uncommitted: its publish is dropped,
    // and both messages fetched return to the queue.
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-double-ack");
    declare_queue(&setup, &q).await;
    fill(&t, &q, &["a", "b"]).await;

    let conn = t.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    let mut s = sentinel(&ch).await;
    within(ch.tx_select()).await.expect("tx.select");
    let a = get(&ch, &q).await.expect("a");
    let _b = get(&ch, &q).await.expect("b");
    tx_publish(&ch, &q, b"new", persistent()).await;
    let _ = ch
        .basic_ack(a.delivery.delivery_tag, BasicAckOptions::default())
        .await;
    let _ = ch
        .basic_ack(a.delivery.delivery_tag, BasicAckOptions::default())
        .await;
    let _ = within(ch.tx_commit()).await;
    assert_eq!(channel_closed_with(&mut s).await, Some(406));

    wait_message_count(&setup, &q, 2).await;
    let back = drain(&setup, &q).await;
    assert_eq!(
        back,
        vec![b"a".to_vec(), b"b".to_vec()],
        "no ack of the failed transaction took effect and its publish was dropped"
    );
    cleanup(&setup, &[&q]).await;
}

#[tokio::test]
async fn basic_recover_leaves_a_tx_acked_message_to_the_commit() {
    // RabbitMQ: a message acked inside a transaction is no longer unacked on the
    // channel, so basic.recover does not requeue it and tx.commit then acks it.
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-recover");
    declare_queue(&setup, &q).await;
    fill(&t, &q, &["a", "b"]).await;

    let conn = t.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.tx_select()).await.expect("tx.select");
    let a = get(&ch, &q).await.expect("a");
    let b = get(&ch, &q).await.expect("b");
    assert_eq!(b.delivery.data, b"b");
    within(ch.basic_ack(a.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack a");
    within(ch.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .expect("basic.recover");
    within(ch.tx_commit())
        .await
        .expect("tx.commit after recover succeeds");
    within(ch.close(200, "".into())).await.expect("close");

    wait_message_count(&setup, &q, 1).await;
    let back = drain(&setup, &q).await;
    assert_eq!(
        back,
        vec![b"b".to_vec()],
        "b was recovered, a acked by the commit"
    );
    cleanup(&setup, &[&q]).await;
}

#[tokio::test]
async fn committed_persistent_publishes_and_acks_survive_a_restart() {
    let mut node = Node::start().await;
    let q = "tx-durable";
    {
        let (_conn, ch) = node.channel().await;
        declare_durable(&ch, q).await;
        within(ch.tx_select()).await.expect("tx.select");
        for i in 0..10 {
            tx_publish(&ch, q, format!("m:{i}").as_bytes(), persistent()).await;
        }
        within(ch.tx_commit()).await.expect("tx.commit");
        // Consume two and ack them in a second transaction.
        let m0 = get(&ch, q).await.expect("m:0");
        let m1 = get(&ch, q).await.expect("m:1");
        assert_eq!(m0.delivery.data, b"m:0");
        within(ch.basic_ack(m1.delivery.delivery_tag, BasicAckOptions { multiple: true }))
            .await
            .expect("ack");
        within(ch.tx_commit()).await.expect("tx.commit");
        // An uncommitted persistent publish is not stored.
        tx_publish(&ch, q, b"uncommitted", persistent()).await;
        assert_eq!(message_count(&ch, q).await, 8);
    }
    node.restart().await;
    let (_conn, ch) = node.channel().await;
    let bodies = drain(&ch, q).await;
    let expected: Vec<Vec<u8>> = (2..10).map(|i| format!("m:{i}").into_bytes()).collect();
    assert_eq!(
        bodies, expected,
        "committed publishes are back, committed acks stay acked, the rest is gone"
    );
}

#[tokio::test]
async fn mandatory_return_in_a_transaction_comes_at_commit_before_commit_ok() {
    let t = Target::start().await;
    let (_conn, setup) = t.channel().await;
    let q = uniq("tx-mandatory");
    declare_queue(&setup, &q).await;
    let missing = uniq("no-such-queue");

    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(1, AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})))
        .await;
    match raw.recv_method().await {
        AMQPClass::Tx(tx::AMQPMethod::SelectOk(_)) => {}
        other => panic!("expected tx.select-ok, got {other:?}"),
    }
    let mut bytes = publish_frames(1, "", &missing, true, true, b"m:1");
    bytes.extend(publish_frames(1, "", &q, true, true, b"m:2"));
    // A synchronous method after the publishes: its reply must be the next frame.
    bytes.extend(method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: q.as_str().into(),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: RawTable::default(),
        })),
    ));
    raw.send(&bytes).await;
    let Raw { stream } = raw;
    let (mut rd, mut wr) = stream.into_split();
    match next_event(&mut rd, 1).await {
        Event::Method(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => {
            assert_eq!(ok.message_count, 0, "nothing enqueued before commit");
        }
        other => panic!("expected queue.declare-ok before any return, got {other:?}"),
    }
    wr.write_all(&method(
        1,
        AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
    ))
    .await
    .expect("write");
    match next_event(&mut rd, 1).await {
        Event::Return { ret, body } => {
            assert_eq!(ret.reply_code, 312);
            assert_eq!(body, b"m:1");
        }
        other => panic!("expected basic.return before tx.commit-ok, got {other:?}"),
    }
    match next_event(&mut rd, 1).await {
        Event::Method(AMQPClass::Tx(tx::AMQPMethod::CommitOk(_))) => {}
        other => panic!("expected tx.commit-ok, got {other:?}"),
    }
    assert_eq!(drain(&setup, &q).await, vec![b"m:2".to_vec()]);
    cleanup(&setup, &[&q]).await;
}

// ---------------------------------------------------------------------------------------
// Mode mix-ups: 406 PRECONDITION_FAILED, channel closed.

#[tokio::test]
async fn tx_commit_without_tx_select_is_406() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    assert_code(within(ch.tx_commit()).await, 406);
    assert!(conn.status().connected(), "a channel error only");
    let ch = within(conn.create_channel()).await.expect("channel");
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn tx_rollback_without_tx_select_is_406() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    assert_code(within(ch.tx_rollback()).await, 406);
    assert!(conn.status().connected(), "a channel error only");
    let ch = within(conn.create_channel()).await.expect("channel");
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn confirm_select_on_a_transactional_channel_is_406() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    within(ch.tx_select()).await.expect("tx.select");
    assert_code(
        within(ch.confirm_select(ConfirmSelectOptions::default())).await,
        406,
    );
    assert!(conn.status().connected(), "a channel error only");
}

#[tokio::test]
async fn tx_select_on_a_confirm_channel_is_406() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    assert_code(within(ch.tx_select()).await, 406);
    assert!(conn.status().connected(), "a channel error only");
}

#[tokio::test]
async fn selecting_the_same_mode_twice_is_fine() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.tx_select()).await.expect("tx.select");
    within(ch.tx_select()).await.expect("tx.select again");
    let (_conn2, ch2) = t.channel().await;
    within(ch2.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    within(ch2.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select again");
    let q = temp_queue(&ch2).await;
    publish_confirmed(&ch2, "", &q, b"x").await;
}

// ---------------------------------------------------------------------------------------
// flush = "interval"

fn interval_flush(c: &mut Config) {
    c.flush = FlushMode::Interval;
    c.flush_interval_ms = 50;
}

#[tokio::test]
async fn interval_flush_confirms_and_commits_and_survives_a_clean_restart() {
    const N: u64 = 2000;
    let mut node = Node::start_with(interval_flush).await;
    let q = "interval-durable";
    let txq = "interval-tx";
    {
        let (_conn, ch) = node.channel().await;
        declare_durable(&ch, q).await;
        declare_durable(&ch, txq).await;
    }

    // Confirms, checked frame by frame.
    let (mut rd, wr) = raw_confirm_channel(&node.addr()).await;
    let mut bytes = Vec::new();
    for i in 1..=N {
        bytes.extend(publish_frames(
            1,
            "",
            q,
            false,
            true,
            format!("m:{i}").as_bytes(),
        ));
    }
    let writer = write_in_background(wr, bytes);
    let mut log = ConfirmLog::new(N, true);
    while !log.done() {
        match next_event(&mut rd, 1).await {
            Event::Ack { tag, multiple } => {
                log.record(tag, multiple, true);
            }
            Event::Nack { tag, multiple } => {
                log.record(tag, multiple, false);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let wr_back = within(writer).await.expect("writer task");
    assert!(log.nacked.is_empty(), "nacked: {:?}", log.nacked);

    // And a transaction.
    {
        let (_conn, ch) = node.channel().await;
        within(ch.tx_select()).await.expect("tx.select");
        for i in 0..5 {
            tx_publish(&ch, txq, format!("t:{i}").as_bytes(), persistent()).await;
        }
        within(ch.tx_commit()).await.expect("tx.commit");
    }
    drop(rd);
    drop(wr_back);

    node.restart().await;
    let (_conn, ch) = node.channel().await;
    let got: Vec<u64> = drain(&ch, q).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(got, (1..=N).collect::<Vec<_>>());
    let got: Vec<u64> = drain(&ch, txq).await.iter().map(|b| seq_of(b)).collect();
    assert_eq!(got, (0..5).collect::<Vec<_>>());
}

#[tokio::test]
async fn interval_flush_lapin_confirms_on_mixed_queues() {
    let t = Target::start_with(interval_flush).await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let dq = uniq("interval-mixed-durable");
    declare_durable(&ch, &dq).await;
    let tq = temp_queue(&ch).await;
    let mut expected: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut confirms = Vec::new();
    for i in 0..500u64 {
        let (q, props) = match i % 3 {
            0 => (dq.as_str(), persistent()),
            1 => (tq.as_str(), persistent()),
            _ => (dq.as_str(), BasicProperties::default()),
        };
        expected.entry(q).or_default().push(i);
        confirms.push(
            within(ch.basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                format!("m:{i}").as_bytes(),
                props,
            ))
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        acked(c).await;
    }
    for (q, want) in expected {
        let got: Vec<u64> = drain(&ch, q).await.iter().map(|b| seq_of(b)).collect();
        assert_eq!(got, want, "queue {q}");
    }
    cleanup(&ch, &[&dq]).await;
}

// ---------------------------------------------------------------------------------------
// The confirm checker itself must be able to fail.

#[test]
fn confirm_log_accepts_single_and_multiple_acks_covering_every_tag() {
    let mut log = ConfirmLog::new(5, true);
    assert_eq!(log.record(2, true, true), vec![1, 2]);
    assert_eq!(log.record(3, false, true), vec![3]);
    assert!(!log.done(), "4 and 5 are missing");
    assert_eq!(log.record(5, true, false), vec![4, 5]);
    assert!(log.done());
    assert_eq!(log.acked, [1, 2, 3].into());
    assert_eq!(log.nacked, [4, 5].into());
}

#[test]
fn confirm_log_out_of_order_mode_skips_already_confirmed_tags_in_a_multiple() {
    let mut log = ConfirmLog::new(4, false);
    assert_eq!(log.record(3, false, true), vec![3]);
    assert_eq!(log.record(4, true, true), vec![1, 2, 4]);
    assert!(log.done());
}

#[test]
#[should_panic(expected = "confirmed twice")]
fn confirm_log_rejects_a_tag_confirmed_twice() {
    let mut log = ConfirmLog::new(5, false);
    log.record(3, true, true);
    log.record(2, false, true);
}

#[test]
#[should_panic(expected = "strictly increase")]
fn confirm_log_rejects_decreasing_tags_in_order_mode() {
    let mut log = ConfirmLog::new(5, true);
    log.record(3, false, true);
    log.record(2, false, true);
}

#[test]
#[should_panic(expected = "only 1..=5 were published")]
fn confirm_log_rejects_a_tag_never_published() {
    let mut log = ConfirmLog::new(5, true);
    log.record(6, true, true);
}

#[tokio::test]
async fn a_publish_refused_by_a_reject_publish_dlx_queue_is_nacked_and_dead_lettered() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let dead = temp_queue(&ch).await;
    let q = uniq("reject-publish-dlx");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish-dlx".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        lapin::types::AMQPValue::LongString(dead.as_str().into()),
    );
    within(ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        args,
    ))
    .await
    .expect("queue.declare");
    let mut answers = Vec::new();
    for body in [&b"kept"[..], b"refused"] {
        let c = within(ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default(),
        ))
        .await
        .unwrap();
        answers.push(within(c).await.unwrap().is_ack());
    }
    assert_eq!(answers, [true, false], "the refused publish is nacked");
    assert_eq!(
        wait_message_count(&ch, &dead, 1).await,
        1,
        "and dead-lettered"
    );
    assert_eq!(drain(&ch, &dead).await, [b"refused".to_vec()]);
}
