//! Consumers and acknowledgements: basic.consume (no-ack, exclusive, tags, priorities),
//! basic.cancel from either side, ack / nack / reject, prefetch, recover, requeue on
//! channel close or connection loss, FIFO and round-robin delivery.

mod common;
mod util;

use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use util::raw::{Raw, Read};
use util::*;

async fn confirm_channel(t: &Target) -> (lapin::Connection, Channel) {
    let (conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    (conn, ch)
}

/// A queue with messages "0".."n-1", published with confirms.
async fn queue_with(ch: &Channel, n: usize) -> String {
    let q = uniq("q");
    declare_queue(ch, &q).await;
    for i in 0..n {
        publish_confirmed(ch, "", &q, i.to_string().as_bytes()).await;
    }
    q
}

fn text(d: &lapin::message::Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

async fn consume_opts(ch: &Channel, q: &str, tag: &str, o: BasicConsumeOptions) -> Consumer {
    within(ch.basic_consume(q.into(), tag.into(), o, FieldTable::default()))
        .await
        .expect("basic.consume")
}

async fn consume_priority(ch: &Channel, q: &str, tag: &str, priority: i32) -> Consumer {
    let mut args = FieldTable::default();
    args.insert("x-priority".into(), AMQPValue::LongInt(priority));
    within(ch.basic_consume(q.into(), tag.into(), BasicConsumeOptions::default(), args))
        .await
        .expect("basic.consume")
}

/// Drains the queue through basic.get and returns (body, redelivered) pairs.
async fn drain_with_flags(ch: &Channel, q: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(m) = within(ch.basic_get(q.into(), BasicGetOptions { no_ack: true }))
        .await
        .unwrap()
    {
        out.push((
            String::from_utf8(m.delivery.data).unwrap(),
            m.delivery.redelivered,
        ));
    }
    out
}

fn pairs(v: &[(&str, bool)]) -> Vec<(String, bool)> {
    v.iter().map(|(s, b)| (s.to_string(), *b)).collect()
}

// ---------------------------------------------------------------------------------------
// basic.consume

#[tokio::test]
async fn server_generates_unique_amq_ctag_consumer_tags() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let a = consume(&ch, &q, "").await;
    let b = consume(&ch, &q, "").await;
    assert!(a.tag().as_str().starts_with("amq.ctag-"), "{}", a.tag());
    assert!(b.tag().as_str().starts_with("amq.ctag-"), "{}", b.tag());
    assert_ne!(a.tag(), b.tag());
}

#[tokio::test]
async fn client_chosen_consumer_tag_is_kept() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let c = consume(&ch, &q, "my-tag").await;
    assert_eq!(c.tag().as_str(), "my-tag");
}

#[tokio::test]
async fn reusing_a_consumer_tag_on_a_channel_is_a_530_error() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let _c = consume(&ch, &q, "dup").await;
    let r = ch
        .basic_consume(
            q.as_str().into(),
            "dup".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 530);
}

#[tokio::test]
async fn consuming_from_a_missing_queue_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .basic_consume(
            uniq("missing").as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn no_ack_consumer_gets_messages_that_are_gone_for_good() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 3).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume_opts(
        &cch,
        &q,
        "c",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    for i in 0..3 {
        assert_eq!(text(&next(&mut c).await), i.to_string());
    }
    // Closing the consuming channel does not bring them back.
    cch.close(200, "bye".into()).await.unwrap();
    assert_eq!(message_count(&ch, &q).await, 0);
}

#[tokio::test]
async fn a_second_consumer_on_an_exclusively_consumed_queue_is_refused_with_403() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let _c = consume_opts(
        &ch,
        &q,
        "only",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let (_conn2, ch2) = t.channel().await;
    let r = ch2
        .basic_consume(
            q.as_str().into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 403);
}

#[tokio::test]
async fn an_exclusive_consumer_is_refused_with_403_when_the_queue_has_consumers() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let _c = consume(&ch, &q, "first").await;
    let (_conn2, ch2) = t.channel().await;
    let r = ch2
        .basic_consume(
            q.as_str().into(),
            "exclusive".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, 403);
}

#[tokio::test]
async fn a_refused_exclusive_consume_leaves_the_existing_consumer_alone() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let mut only = consume_opts(
        &ch,
        &q,
        "only",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let (_conn2, ch2) = t.channel().await;
    let r = ch2
        .basic_consume(
            q.as_str().into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 403);
    publish_confirmed(&ch, "", &q, b"still mine").await;
    assert_eq!(next(&mut only).await.data, b"still mine");
}

// ---------------------------------------------------------------------------------------
// basic.cancel

#[tokio::test]
async fn cancel_stops_deliveries_and_leaves_messages_in_the_queue() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let mut c = consume(&ch, &q, "c").await;
    publish_confirmed(&ch, "", &q, b"before").await;
    let d = next(&mut c).await;
    within(ch.basic_cancel("c".into(), BasicCancelOptions::default()))
        .await
        .unwrap();
    publish_confirmed(&ch, "", &q, b"after").await;
    // The stream ends, without the later message.
    match within(futures_lite::StreamExt::next(&mut c)).await {
        None => {}
        Some(Ok(d)) => panic!("delivery after cancel: {:?}", text(&d)),
        Some(Err(e)) => panic!("error after cancel: {e}"),
    }
    // The delivery from before the cancel can still be acked.
    within(d.ack(BasicAckOptions::default())).await.unwrap();
    assert_eq!(drain_with_flags(&ch, &q).await, pairs(&[("after", false)]));
}

#[tokio::test]
async fn cancelling_an_unknown_consumer_tag_is_harmless() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.basic_cancel("never-existed".into(), BasicCancelOptions::default()))
        .await
        .expect("cancel-ok");
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers_from_the_server() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let (_conn2, cch) = t.channel().await;
    let mut c = consume(&cch, &q, "c").await;
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
    // lapin ends the consumer's stream when basic.cancel arrives.
    match within(futures_lite::StreamExt::next(&mut c)).await {
        None => {}
        Some(Ok(d)) => panic!("unexpected delivery {:?}", text(&d)),
        Some(Err(e)) => panic!("error instead of a cancel: {e}"),
    }
    // The consuming channel stays open.
    assert!(cch.status().connected());
    assert_channel_works(&cch).await;
}

#[tokio::test]
async fn server_cancel_arrives_as_a_basic_cancel_frame() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    // A raw client that announces consumer_cancel_notify.
    let mut raw = Raw::connect(&t.addr()).await;
    raw.send(util::raw::HEADER).await;
    raw.recv_method().await;
    let mut caps = FieldTable::default();
    caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
    let mut client_props = FieldTable::default();
    client_props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    raw.send_method(
        0,
        AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::StartOk(
            amq_protocol::protocol::connection::StartOk {
                client_properties: client_props,
                mechanism: "PLAIN".into(),
                response: b"\0guest\0guest".to_vec().into(),
                locale: "en_US".into(),
            },
        )),
    )
    .await;
    let tune = match raw.recv_method().await {
        AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Tune(t)) => t,
        other => panic!("expected tune, got {other:?}"),
    };
    raw.send_method(
        0,
        AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::TuneOk(
            amq_protocol::protocol::connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: tune.frame_max,
                heartbeat: 0,
            },
        )),
    )
    .await;
    raw.send_method(
        0,
        AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Open(
            amq_protocol::protocol::connection::Open {
                virtual_host: "/".into(),
            },
        )),
    )
    .await;
    raw.recv_method().await; // open-ok
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.as_str().into(),
            consumer_tag: "raw-consumer".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    match raw.recv_method().await {
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)) => {
            assert_eq!(ok.consumer_tag.as_str(), "raw-consumer")
        }
        other => panic!("expected consume-ok, got {other:?}"),
    }
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
    match raw.recv_method().await {
        AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
            assert_eq!(c.consumer_tag.as_str(), "raw-consumer")
        }
        other => panic!("expected basic.cancel, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// ack, nack, reject

#[tokio::test]
async fn acked_messages_are_gone() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 2).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, &q, "c").await;
    for _ in 0..2 {
        let d = next(&mut c).await;
        within(d.ack(BasicAckOptions::default())).await.unwrap();
    }
    cch.close(200, "bye".into()).await.unwrap();
    assert_eq!(message_count(&ch, &q).await, 0);
}

#[tokio::test]
async fn ack_multiple_acks_everything_up_to_the_tag() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 5).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, &q, "c").await;
    let mut ds = Vec::new();
    for _ in 0..5 {
        ds.push(next(&mut c).await);
    }
    // Ack 0..=2 at once; 3 and 4 stay unacked and come back on close.
    within(ds[2].ack(BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    assert_eq!(
        drain_with_flags(&ch, &q).await,
        pairs(&[("3", true), ("4", true)])
    );
}

#[tokio::test]
async fn ack_multiple_with_tag_zero_acks_all_outstanding() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 3).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, &q, "c").await;
    for _ in 0..3 {
        next(&mut c).await;
    }
    within(cch.basic_ack(0, BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    assert_channel_works(&cch).await;
    cch.close(200, "bye".into()).await.unwrap();
    assert_eq!(message_count(&ch, &q).await, 0);
}

#[tokio::test]
async fn nack_with_requeue_puts_the_message_back_at_its_original_place() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 3).await;
    let first = get(&ch, &q).await.unwrap();
    assert_eq!(first.delivery.data, b"0");
    within(first.delivery.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(
        drain_with_flags(&ch, &q).await,
        pairs(&[("0", true), ("1", false), ("2", false)])
    );
}

#[tokio::test]
async fn requeued_messages_keep_their_relative_order_ahead_of_newer_ones() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 6).await;
    let cch = conn.create_channel().await.unwrap();
    within(cch.basic_qos(4, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c = consume(&cch, &q, "c").await;
    let mut ds = Vec::new();
    for _ in 0..4 {
        ds.push(next(&mut c).await);
    }
    within(cch.basic_cancel("c".into(), BasicCancelOptions::default()))
        .await
        .unwrap();
    // Requeue out of order: 2, then 0, then 3; ack 1.
    for i in [2, 0, 3] {
        within(ds[i].nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    within(ds[1].ack(BasicAckOptions::default())).await.unwrap();
    assert_eq!(wait_message_count(&ch, &q, 5).await, 5);
    assert_eq!(
        drain_with_flags(&ch, &q).await,
        pairs(&[
            ("0", true),
            ("2", true),
            ("3", true),
            ("4", false),
            ("5", false)
        ])
    );
}

#[tokio::test]
async fn nack_multiple_with_requeue_returns_all_up_to_the_tag() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 4).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, &q, "c").await;
    let mut ds = Vec::new();
    for _ in 0..4 {
        ds.push(next(&mut c).await);
    }
    within(cch.basic_cancel("c".into(), BasicCancelOptions::default()))
        .await
        .unwrap();
    within(ds[2].nack(BasicNackOptions {
        multiple: true,
        requeue: true,
    }))
    .await
    .unwrap();
    within(ds[3].ack(BasicAckOptions::default())).await.unwrap();
    assert_eq!(wait_message_count(&ch, &q, 3).await, 3);
    assert_eq!(
        drain_with_flags(&ch, &q).await,
        pairs(&[("0", true), ("1", true), ("2", true)])
    );
}

#[tokio::test]
async fn nack_without_requeue_drops_the_message() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 2).await;
    let m = get(&ch, &q).await.unwrap();
    within(m.delivery.nack(BasicNackOptions {
        requeue: false,
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(drain_with_flags(&ch, &q).await, pairs(&[("1", false)]));
}

#[tokio::test]
async fn nack_multiple_without_requeue_drops_them_all() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 4).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, &q, "c").await;
    let mut ds = Vec::new();
    for _ in 0..4 {
        ds.push(next(&mut c).await);
    }
    within(ds[2].nack(BasicNackOptions {
        multiple: true,
        requeue: false,
    }))
    .await
    .unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    assert_eq!(drain_with_flags(&ch, &q).await, pairs(&[("3", true)]));
}

#[tokio::test]
async fn reject_with_requeue_redelivers_and_without_requeue_drops() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 2).await;
    let m = get(&ch, &q).await.unwrap();
    within(m.delivery.reject(BasicRejectOptions { requeue: true }))
        .await
        .unwrap();
    let m = get(&ch, &q).await.unwrap();
    assert_eq!(m.delivery.data, b"0");
    assert!(m.delivery.redelivered);
    within(m.delivery.reject(BasicRejectOptions { requeue: false }))
        .await
        .unwrap();
    assert_eq!(drain_with_flags(&ch, &q).await, pairs(&[("1", false)]));
}

#[tokio::test]
async fn a_requeued_message_is_redelivered_to_a_consumer_marked_redelivered() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 1).await;
    let mut c = consume(&ch, &q, "c").await;
    let d = next(&mut c).await;
    assert!(!d.redelivered);
    within(d.reject(BasicRejectOptions { requeue: true }))
        .await
        .unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.data, b"0");
    assert!(d.redelivered);
}

#[tokio::test]
async fn acking_an_unknown_delivery_tag_closes_the_channel_with_406() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let other = conn.create_channel().await.unwrap();
    let mut watch = sentinel(&ch).await;
    within(ch.basic_ack(999, BasicAckOptions::default()))
        .await
        .unwrap();
    // basic.ack has no reply: the error arrives as channel.close.
    assert_eq!(channel_closed_with(&mut watch).await, Some(406));
    assert!(conn.status().connected());
    assert_channel_works(&other).await;
}

#[tokio::test]
async fn acking_the_same_delivery_twice_closes_the_channel_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 1).await;
    let m = get(&ch, &q).await.unwrap();
    let tag = m.delivery.delivery_tag;
    let mut watch = sentinel(&ch).await;
    within(ch.basic_ack(tag, BasicAckOptions::default()))
        .await
        .unwrap();
    within(ch.basic_ack(tag, BasicAckOptions::default()))
        .await
        .unwrap();
    assert_eq!(channel_closed_with(&mut watch).await, Some(406));
}

#[tokio::test]
async fn nacking_an_unknown_delivery_tag_closes_the_channel_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let mut watch = sentinel(&ch).await;
    within(ch.basic_nack(
        77,
        BasicNackOptions {
            requeue: true,
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(channel_closed_with(&mut watch).await, Some(406));
}

#[tokio::test]
async fn acking_a_no_ack_delivery_closes_the_channel_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 1).await;
    let m = within(ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }))
        .await
        .unwrap()
        .unwrap();
    let mut watch = sentinel(&ch).await;
    within(ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .unwrap();
    assert_eq!(channel_closed_with(&mut watch).await, Some(406));
}

#[tokio::test]
async fn delivery_tags_are_per_channel_and_increase_from_one() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 3).await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, &q, "c").await;
    let tags: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(next(&mut c).await.delivery_tag);
        }
        v
    };
    assert_eq!(tags, [1, 2, 3]);
    // A get on another channel starts its own sequence.
    let q2 = queue_with(&ch, 1).await;
    let m = get(&ch, &q2).await.unwrap();
    assert_eq!(m.delivery.delivery_tag, 1);
}

// ---------------------------------------------------------------------------------------
// Prefetch (basic.qos)

#[tokio::test]
async fn prefetch_count_limits_unacked_deliveries_per_consumer() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 5).await;
    let cch = conn.create_channel().await.unwrap();
    within(cch.basic_qos(2, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c = consume(&cch, &q, "c").await;
    let a = next(&mut c).await;
    let b = next(&mut c).await;
    assert_eq!((text(&a), text(&b)), ("0".into(), "1".into()));
    assert_no_delivery(&mut c).await;
    // Each ack makes room for exactly one more.
    within(a.ack(BasicAckOptions::default())).await.unwrap();
    assert_eq!(text(&next(&mut c).await), "2");
    assert_no_delivery(&mut c).await;
    within(b.ack(BasicAckOptions::default())).await.unwrap();
    assert_eq!(text(&next(&mut c).await), "3");
    assert_no_delivery(&mut c).await;
}

#[tokio::test]
async fn per_consumer_prefetch_applies_to_each_consumer_separately() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q1 = queue_with(&ch, 5).await;
    let q2 = queue_with(&ch, 5).await;
    let cch = conn.create_channel().await.unwrap();
    within(cch.basic_qos(2, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c1 = consume(&cch, &q1, "c1").await;
    let mut c2 = consume(&cch, &q2, "c2").await;
    for c in [&mut c1, &mut c2] {
        next(c).await;
        next(c).await;
    }
    assert_no_delivery(&mut c1).await;
    assert_no_delivery(&mut c2).await;
}

#[tokio::test]
async fn global_prefetch_limits_unacked_deliveries_across_the_channel() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q1 = queue_with(&ch, 5).await;
    let q2 = queue_with(&ch, 5).await;
    let cch = conn.create_channel().await.unwrap();
    within(cch.basic_qos(3, BasicQosOptions { global: true }))
        .await
        .unwrap();
    let mut c1 = consume(&cch, &q1, "c1").await;
    let mut c2 = consume(&cch, &q2, "c2").await;
    // Exactly three deliveries in total over both consumers.
    let mut got = Vec::new();
    for _ in 0..3 {
        tokio::select! {
            d = futures_lite::StreamExt::next(&mut c1) => got.push(d.unwrap().unwrap()),
            d = futures_lite::StreamExt::next(&mut c2) => got.push(d.unwrap().unwrap()),
            _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("only {} deliveries", got.len()),
        }
    }
    assert_no_delivery(&mut c1).await;
    assert_no_delivery(&mut c2).await;
    // One ack makes room for one more, on either consumer.
    within(got[0].ack(BasicAckOptions::default()))
        .await
        .unwrap();
    let more = tokio::select! {
        d = futures_lite::StreamExt::next(&mut c1) => d,
        d = futures_lite::StreamExt::next(&mut c2) => d,
        _ = tokio::time::sleep(Duration::from_secs(10)) => None,
    };
    assert!(more.is_some(), "ack did not free a slot");
    assert_no_delivery(&mut c1).await;
    assert_no_delivery(&mut c2).await;
}

#[tokio::test]
async fn no_ack_consumers_are_not_limited_by_prefetch() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 5).await;
    let cch = conn.create_channel().await.unwrap();
    within(cch.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c = consume_opts(
        &cch,
        &q,
        "c",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    for i in 0..5 {
        assert_eq!(text(&next(&mut c).await), i.to_string());
    }
}

// ---------------------------------------------------------------------------------------
// Recover, and unacked messages of closed channels and dropped connections

#[tokio::test]
async fn basic_recover_redelivers_unacked_messages_marked_redelivered() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 2).await;
    let mut c = consume(&ch, &q, "c").await;
    let a = next(&mut c).await;
    let b = next(&mut c).await;
    assert!(!a.redelivered && !b.redelivered);
    within(ch.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .unwrap();
    let a2 = next(&mut c).await;
    let b2 = next(&mut c).await;
    assert_eq!((text(&a2), text(&b2)), ("0".into(), "1".into()));
    assert!(a2.redelivered && b2.redelivered);
    within(b2.ack(BasicAckOptions { multiple: true }))
        .await
        .unwrap();
}

#[tokio::test]
async fn unacked_messages_of_a_closed_channel_return_to_their_place_marked_redelivered() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 6).await;
    let cch = conn.create_channel().await.unwrap();
    within(cch.basic_qos(3, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c = consume(&cch, &q, "c").await;
    let mut ds = Vec::new();
    for _ in 0..3 {
        ds.push(next(&mut c).await);
    }
    // Cancel first, so that the ack does not make room for another delivery.
    within(cch.basic_cancel("c".into(), BasicCancelOptions::default()))
        .await
        .unwrap();
    within(ds[1].ack(BasicAckOptions::default())).await.unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    assert_eq!(
        drain_with_flags(&ch, &q).await,
        pairs(&[
            ("0", true),
            ("2", true),
            ("3", false),
            ("4", false),
            ("5", false)
        ])
    );
}

#[tokio::test]
async fn unacked_messages_of_a_closed_connection_return_to_their_place_marked_redelivered() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 4).await;
    let (cconn, cch) = t.channel().await;
    within(cch.basic_qos(2, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c = consume(&cch, &q, "c").await;
    next(&mut c).await;
    next(&mut c).await;
    cconn.close(200, "bye".into()).await.unwrap();
    assert_eq!(wait_message_count(&ch, &q, 4).await, 4);
    assert_eq!(
        drain_with_flags(&ch, &q).await,
        pairs(&[("0", true), ("1", true), ("2", false), ("3", false)])
    );
}

#[tokio::test]
async fn unacked_messages_of_a_dropped_connection_return_to_their_place_marked_redelivered() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 5).await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 3,
            global: false,
        })),
    )
    .await;
    raw.recv_method().await; // qos-ok
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: q.as_str().into(),
            consumer_tag: "raw".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    // consume-ok, then three deliveries (deliver + header + body each).
    let mut delivers = 0;
    while delivers < 3 {
        match raw.read_frame(Duration::from_secs(10)).await {
            Read::Frame(AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(_)))) => {
                delivers += 1
            }
            Read::Frame(_) => {}
            other => panic!("expected deliveries, got {other:?}"),
        }
    }
    drop(raw); // gone without closing
    assert_eq!(wait_message_count(&ch, &q, 5).await, 5);
    assert_eq!(
        drain_with_flags(&ch, &q).await,
        pairs(&[
            ("0", true),
            ("1", true),
            ("2", true),
            ("3", false),
            ("4", false)
        ])
    );
}

// ---------------------------------------------------------------------------------------
// Ordering and distribution

#[tokio::test]
async fn a_queue_delivers_in_publish_order() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = queue_with(&ch, 200).await;
    let mut c = consume(&ch, &q, "c").await;
    for i in 0..200 {
        let d = next(&mut c).await;
        assert_eq!(text(&d), i.to_string());
        within(d.ack(BasicAckOptions::default())).await.unwrap();
    }
}

#[tokio::test]
async fn messages_are_distributed_round_robin_over_consumers() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let (_c1, ch1) = t.channel().await;
    let (_c2, ch2) = t.channel().await;
    let mut a = consume(&ch1, &q, "a").await;
    let mut b = consume(&ch2, &q, "b").await;
    for i in 0..10 {
        publish_confirmed(&ch, "", &q, i.to_string().as_bytes()).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..5 {
        got_a.push(text(&next(&mut a).await));
        got_b.push(text(&next(&mut b).await));
    }
    assert_no_delivery(&mut a).await;
    assert_no_delivery(&mut b).await;
    // Strict alternation: one consumer gets the even messages, the other the odd ones.
    let evens: Vec<String> = (0..10).step_by(2).map(|i: i32| i.to_string()).collect();
    let odds: Vec<String> = (1..10).step_by(2).map(|i: i32| i.to_string()).collect();
    assert!(
        (got_a == evens && got_b == odds) || (got_a == odds && got_b == evens),
        "a: {got_a:?}, b: {got_b:?}"
    );
}

#[tokio::test]
async fn a_higher_priority_consumer_gets_messages_first() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let (_cl, chl) = t.channel().await;
    let (_ch, chh) = t.channel().await;
    let mut low = consume_priority(&chl, &q, "low", 1).await;
    let mut high = consume_priority(&chh, &q, "high", 10).await;
    for i in 0..6 {
        publish_confirmed(&ch, "", &q, i.to_string().as_bytes()).await;
    }
    for i in 0..6 {
        assert_eq!(text(&next(&mut high).await), i.to_string());
    }
    assert_no_delivery(&mut low).await;
}

#[tokio::test]
async fn a_non_integer_x_priority_is_refused_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-priority".into(),
        AMQPValue::LongString(b"high".to_vec().into()),
    );
    let r = within(ch.basic_consume(
        q.as_str().into(),
        "".into(),
        BasicConsumeOptions::default(),
        args,
    ))
    .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn a_lower_priority_consumer_gets_messages_when_higher_ones_are_full() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let (_cl, chl) = t.channel().await;
    let (_ch, chh) = t.channel().await;
    within(chh.basic_qos(2, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut low = consume_priority(&chl, &q, "low", 0).await;
    let mut high = consume_priority(&chh, &q, "high", 5).await;
    for i in 0..5 {
        publish_confirmed(&ch, "", &q, i.to_string().as_bytes()).await;
    }
    let h1 = next(&mut high).await;
    let h2 = next(&mut high).await;
    assert_eq!((text(&h1), text(&h2)), ("0".into(), "1".into()));
    for i in 2..5 {
        assert_eq!(text(&next(&mut low).await), i.to_string());
    }
    // Once the high-priority consumer has room again, new messages go to it.
    within(h2.ack(BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    publish_confirmed(&ch, "", &q, b"5").await;
    assert_eq!(text(&next(&mut high).await), "5");
    assert_no_delivery(&mut low).await;
}

#[tokio::test]
async fn ack_or_nack_multiple_of_a_tag_never_delivered_is_406_even_with_earlier_tags_outstanding() {
    let t = Target::start().await;
    for nack in [false, true] {
        let (_conn, ch) = t.channel().await;
        let q = temp_queue(&ch).await;
        for body in [b"a", b"b"] {
            publish(&ch, "", &q, body).await;
        }
        let mut c = consume(&ch, &q, "c").await;
        let first = next(&mut c).await;
        let _second = next(&mut c).await;
        assert_eq!(first.delivery_tag, 1);
        let mut closed = sentinel(&ch).await;
        if nack {
            let _ = ch
                .basic_nack(
                    99,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await;
        } else {
            let _ = ch.basic_ack(99, BasicAckOptions { multiple: true }).await;
        }
        assert_eq!(
            channel_closed_with(&mut closed).await,
            Some(406),
            "nack={nack}"
        );
        // Nothing was settled: both messages are back in the queue.
        let (_c2, other) = t.channel().await;
        assert_eq!(wait_message_count(&other, &q, 2).await, 2, "nack={nack}");
    }
}

#[tokio::test]
async fn a_per_consumer_qos_after_a_global_one_lifts_the_channel_limit_as_rabbitmq() {
    let t = Target::start().await;
    // (qos calls in order: prefetch_count, global) -> unacked deliveries to consumers
    // A then B, both on one queue of 10 messages and started after the qos calls.
    type QosCalls = &'static [(u16, bool)];
    let cases: [(QosCalls, (u32, u32)); 5] = [
        (&[(2, false), (3, true)], (2, 1)),
        (&[(3, true), (2, false)], (2, 2)),
        (&[(3, true), (0, false)], (10, 0)),
        (&[(3, true), (2, false), (3, true)], (2, 1)),
        (&[(3, true)], (3, 0)),
    ];
    for (calls, expected) in cases {
        let (_conn, ch) = t.channel().await;
        let q = temp_queue(&ch).await;
        for i in 0..10 {
            publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
        }
        wait_message_count(&ch, &q, 10).await;
        for (count, global) in calls {
            within(ch.basic_qos(*count, BasicQosOptions { global: *global }))
                .await
                .expect("basic.qos");
        }
        let mut a = consume(&ch, &q, "A").await;
        let mut b = consume(&ch, &q, "B").await;
        let (mut na, mut nb) = (0, 0);
        while next_within(&mut a, 300).await.is_some() {
            na += 1;
        }
        while next_within(&mut b, 300).await.is_some() {
            nb += 1;
        }
        assert_eq!((na, nb), expected, "qos calls {calls:?}");
    }
}
