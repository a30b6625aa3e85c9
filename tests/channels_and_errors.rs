//! Channels (open, close, flow), channel errors that close only their channel,
//! connection errors that close the connection, and malformed or hostile frames that
//! must neither bring the broker down nor disturb other connections.

mod common;
mod util;

use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{AMQPClass, BasicProperties as RawProps, basic, channel, queue};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use util::raw::{Raw, Read, encode, method};
use util::*;

/// Asserts that `ch` was closed by the server while `conn` and `other` still work.
async fn assert_only_channel_closed(conn: &Connection, ch: &Channel, other: &Channel) {
    // lapin marks the channel closed when channel.close arrives.
    for _ in 0..100 {
        if !ch.status().connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!ch.status().connected(), "channel should be closed");
    assert!(conn.status().connected(), "connection must stay open");
    assert_channel_works(other).await;
    // And new channels can be opened on the same connection.
    let fresh = conn.create_channel().await.expect("new channel");
    assert_channel_works(&fresh).await;
}

/// Asserts that `conn` was closed by the server.
async fn assert_connection_closed(conn: &Connection) {
    for _ in 0..100 {
        if !conn.status().connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!conn.status().connected(), "connection should be closed");
}

// ---------------------------------------------------------------------------------------
// Channels

#[tokio::test]
async fn channels_open_and_close_independently() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let a = conn.create_channel().await.unwrap();
    let b = conn.create_channel().await.unwrap();
    assert_ne!(a.id(), b.id());
    within(a.close(200, "done".into())).await.expect("close");
    assert!(!a.status().connected());
    assert!(
        a.queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default()
        )
        .await
        .is_err(),
        "a closed channel cannot be used"
    );
    assert_channel_works(&b).await;
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn many_channels_on_one_connection_work_concurrently() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let mut chans = Vec::new();
    for _ in 0..20 {
        chans.push(conn.create_channel().await.unwrap());
    }
    for ch in &chans {
        assert_channel_works(ch).await;
    }
}

#[tokio::test]
async fn closing_a_channel_cancels_its_consumers_and_requeues_unacked() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let a = conn.create_channel().await.unwrap();
    let b = conn.create_channel().await.unwrap();
    let q = uniq("q");
    declare_queue(&b, &q).await;
    let mut c = consume(&a, &q, "c1").await;
    publish(&b, "", &q, b"m1").await;
    let d = next(&mut c).await;
    assert!(!d.redelivered);
    within(a.close(200, "done".into())).await.unwrap();
    // The message is back, redelivered, and the queue has no consumer left.
    let m = within(b.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    assert_eq!(m.consumer_count(), 0);
    let got = get(&b, &q).await.expect("requeued message");
    assert_eq!(got.delivery.data, b"m1");
    assert!(got.delivery.redelivered);
}

#[tokio::test]
async fn channel_flow_active_true_is_confirmed() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let active = within(ch.channel_flow(ChannelFlowOptions { active: true }))
        .await
        .expect("flow-ok");
    assert!(active);
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn channel_flow_inactive_from_the_client_is_refused_with_540() {
    // RabbitMQ does not let clients stop deliveries with channel.flow: it answers
    // active=false with 540 NOT_IMPLEMENTED, a connection error.
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let r = within(ch.channel_flow(ChannelFlowOptions { active: false })).await;
    assert_code(r, 540);
    assert_connection_closed(&conn).await;
}

// ---------------------------------------------------------------------------------------
// Channel errors close the channel only

#[tokio::test]
async fn not_found_404_closes_only_the_channel() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let other = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            uniq("missing").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, 404);
    assert_only_channel_closed(&conn, &ch, &other).await;
}

#[tokio::test]
async fn access_refused_403_closes_only_the_channel() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let other = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_declare(
            uniq("amq.mine").as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 403);
    assert_only_channel_closed(&conn, &ch, &other).await;
}

#[tokio::test]
async fn resource_locked_405_closes_only_the_channel() {
    let t = Target::start().await;
    let (_owner, och) = t.channel().await;
    let q = uniq("excl");
    within(och.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let other = conn.create_channel().await.unwrap();
    let r = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 405);
    assert_only_channel_closed(&conn, &ch, &other).await;
}

#[tokio::test]
async fn precondition_failed_406_closes_only_the_channel() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let other = conn.create_channel().await.unwrap();
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let r = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, 406);
    assert_only_channel_closed(&conn, &ch, &other).await;
}

#[tokio::test]
async fn a_channel_error_on_one_connection_does_not_touch_another_connection() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .queue_declare(
            uniq("missing").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, 404);
    w.check().await;
}

#[tokio::test]
async fn channel_error_reply_names_the_offending_method() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: uniq("missing").as_str().into(),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    match raw.recv_method().await {
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
            assert_eq!(c.reply_code, 404);
            assert!(
                c.reply_text.as_str().starts_with("NOT_FOUND - "),
                "{:?}",
                c.reply_text
            );
            assert_eq!((c.class_id, c.method_id), (50, 10), "queue.declare");
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
    // Answer with close-ok; the channel number can be reused.
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
    .await;
    raw.open_channel(1).await;
}

#[tokio::test]
async fn methods_after_a_channel_error_are_ignored_until_close_ok() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    let missing = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: uniq("missing").as_str().into(),
        passive: true,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }));
    // Two in a row: only one channel.close comes back, and nothing for the second.
    raw.send_method(1, missing.clone()).await;
    raw.send_method(1, missing).await;
    match raw.recv_method().await {
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => assert_eq!(c.reply_code, 404),
        other => panic!("expected channel.close, got {other:?}"),
    }
    match raw.read_frame(Duration::from_millis(300)).await {
        Read::Timeout => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Connection errors close the connection

#[tokio::test]
async fn invalid_exchange_type_is_a_503_connection_error() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let other = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_declare(
            uniq("x").as_str().into(),
            ExchangeKind::Custom("foo".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 503);
    assert_connection_closed(&conn).await;
    assert!(
        other
            .queue_declare(
                "".into(),
                QueueDeclareOptions::default(),
                FieldTable::default()
            )
            .await
            .is_err(),
        "other channels go down with the connection"
    );
}

#[tokio::test]
async fn a_connection_error_does_not_touch_other_connections() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (conn, ch) = t.channel().await;
    let r = ch
        .exchange_declare(
            uniq("x").as_str().into(),
            ExchangeKind::Custom("foo".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 503);
    assert_connection_closed(&conn).await;
    w.check().await;
}

#[tokio::test]
async fn method_on_a_channel_that_was_never_opened_is_a_504_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.send_method(
        5,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 504, "{close:?}");
    assert_eq!(
        close.reply_text.as_str(),
        "CHANNEL_ERROR - expected 'channel.open'"
    );
    assert_eq!(
        (close.class_id, close.method_id),
        (50, 10),
        "names queue.declare"
    );
}

#[tokio::test]
async fn opening_an_open_channel_again_is_a_504_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 504, "{close:?}");
    assert_eq!(
        (close.class_id, close.method_id),
        (20, 10),
        "names channel.open"
    );
}

#[tokio::test]
async fn a_channel_method_on_channel_0_is_a_504_naming_it() {
    let t = Target::start().await;
    for m in [
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    ] {
        let ids = (m.get_amqp_class_id(), m.get_amqp_method_id());
        let (mut raw, _) = Raw::open(&t.addr(), 0).await;
        raw.send_method(0, m).await;
        let close = raw.expect_connection_close().await;
        assert_eq!(close.reply_code, 504, "{close:?}");
        assert_eq!(
            close.reply_text.as_str(),
            "CHANNEL_ERROR - unexpected method in connection state running"
        );
        assert_eq!((close.class_id, close.method_id), ids);
    }
}

#[tokio::test]
async fn a_connection_method_on_an_open_channel_is_a_503() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Close(
            amq_protocol::protocol::connection::Close {
                reply_code: 200,
                reply_text: "".into(),
                class_id: 0,
                method_id: 0,
            },
        )),
    )
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 503, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (10, 50));
}

#[tokio::test]
async fn a_content_frame_on_a_channel_never_opened_is_a_505() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.send(&encode(&AMQPFrame::Header(
        4,
        AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: RawProps::default(),
        },
    )))
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 505, "{close:?}");
}

#[tokio::test]
async fn a_heartbeat_on_a_channel_is_a_505() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&[8, 0, 1, 0, 0, 0, 0, 0xCE]).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 505, "{close:?}");
}

#[tokio::test]
async fn content_body_without_a_publish_is_a_505_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&encode(&AMQPFrame::Body(1, b"stray".to_vec())))
        .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 505, "{close:?}");
}

#[tokio::test]
async fn content_header_without_a_publish_is_a_505_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&encode(&AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: RawProps::default(),
        },
    )))
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 505, "{close:?}");
}

#[tokio::test]
async fn a_method_where_a_content_header_is_expected_is_a_505_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "nowhere".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "nowhere".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 505, "{close:?}");
    assert_eq!(
        close.reply_text.as_str(),
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
    );
    assert_eq!(
        (close.class_id, close.method_id),
        (60, 40),
        "names basic.publish"
    );
}

/// basic.publish and a content header announcing `body_size`, on channel 1.
fn publish_and_header(key: &str, class_id: u16, body_size: u64) -> Vec<u8> {
    let mut out = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: key.into(),
            mandatory: false,
            immediate: false,
        })),
    );
    out.extend(encode(&AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id,
            body_size,
            properties: RawProps::default(),
        },
    )));
    out
}

#[tokio::test]
async fn a_method_where_a_content_body_is_expected_is_a_505_naming_basic_publish() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&publish_and_header("nowhere", 60, 10)).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    )
    .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 505, "{close:?}");
    assert_eq!(
        close.reply_text.as_str(),
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead"
    );
    assert_eq!((close.class_id, close.method_id), (60, 40));
}

#[tokio::test]
async fn a_content_header_of_another_class_is_a_505() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&publish_and_header("nowhere", 50, 3)).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 505, "{close:?}");
    assert_eq!((close.class_id, close.method_id), (60, 40));
}

#[tokio::test]
async fn a_body_frame_filling_frame_max_is_accepted_and_one_octet_more_is_a_501() {
    let t = Target::start().await;
    let (mut raw, tune) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    let q = uniq("full-frame");
    raw.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: q.as_str().into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: true,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    raw.recv_method().await; // declare-ok
    let full = tune.frame_max as usize;
    raw.send(&publish_and_header(&q, 60, full as u64)).await;
    raw.send(&encode(&AMQPFrame::Body(1, vec![b'x'; full])))
        .await;
    // Passive declares after it: the message reaches the queue, the connection lives.
    let mut count = 0;
    for _ in 0..100 {
        raw.send_method(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: q.as_str().into(),
                passive: true,
                durable: false,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await;
        count = match raw.recv_method().await {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => ok.message_count,
            other => panic!("expected declare-ok, got {other:?}"),
        };
        if count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count, 1, "the full-frame message arrived");
    raw.send(&publish_and_header(&q, 60, full as u64 + 1)).await;
    raw.try_send(&encode(&AMQPFrame::Body(1, vec![b'x'; full + 1])))
        .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 501, "{close:?}");
}

#[tokio::test]
async fn a_frame_larger_than_frame_max_is_a_501_connection_error() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (mut raw, tune) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: w.queue.as_str().into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    let body = vec![b'x'; tune.frame_max as usize + 100];
    raw.send(&encode(&AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: RawProps::default(),
        },
    )))
    .await;
    // One body frame bigger than frame_max (the server may close before reading it all).
    raw.try_send(&encode(&AMQPFrame::Body(1, body))).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 501, "{close:?}");
    w.check().await;
}

#[tokio::test]
async fn a_frame_announcing_4gib_is_a_501_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&[3, 0, 1, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 501, "{close:?}");
}

#[tokio::test]
async fn a_bad_frame_end_octet_is_a_501_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    let mut f = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    );
    let last = f.len() - 1;
    f[last] = 0x00;
    raw.send(&f).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 501, "{close:?}");
}

// ---------------------------------------------------------------------------------------
// Malformed and hostile input

/// A method frame on `channel` whose payload is cut after `keep` octets.
fn truncated_method(channel: u16, m: AMQPClass, keep: usize) -> Vec<u8> {
    let full = method(channel, m);
    let payload = &full[7..full.len() - 1];
    let keep = keep.min(payload.len() - 1);
    let mut f = vec![1];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(keep as u32).to_be_bytes());
    f.extend_from_slice(&payload[..keep]);
    f.push(0xCE);
    f
}

#[tokio::test]
async fn a_truncated_method_frame_closes_the_connection_with_a_frame_or_syntax_error() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&truncated_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "some-queue-name".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
        9,
    ))
    .await;
    let code = raw.ends_connection().await;
    assert!(
        matches!(code, Some(501) | Some(502)),
        "expected 501 or 502, got {code:?}"
    );
    w.check().await;
}

#[tokio::test]
async fn an_unknown_method_id_closes_the_connection() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    // class 60 (basic), method 999.
    raw.send(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0x03, 0xe7, 0xCE])
        .await;
    // RabbitMQ cannot parse it and drops the socket without a connection.close.
    assert_eq!(raw.ends_connection().await, None);
    // An unknown class too.
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send(&[1, 0, 1, 0, 0, 0, 4, 0, 99, 0, 10, 0xCE]).await;
    assert_eq!(raw.ends_connection().await, None);
    w.check().await;
}

#[tokio::test]
async fn an_unknown_frame_type_closes_the_connection() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.send(&[42, 0, 0, 0, 0, 0, 2, 1, 2, 0xCE]).await;
    let code = raw.ends_connection().await;
    assert!(
        matches!(code, None | Some(501) | Some(505)),
        "expected 501, got {code:?}"
    );
    w.check().await;
}

#[tokio::test]
async fn garbage_after_the_handshake_never_disturbs_other_connections() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    // A few deterministic pseudo-random byte strings, each on its own connection.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..12 {
        let (mut raw, _) = Raw::open(&t.addr(), 0).await;
        if round % 2 == 0 {
            raw.open_channel(1).await;
        }
        let len = 16 + (round * 97) % 600;
        let mut junk = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            junk.push(seed as u8);
        }
        raw.try_send(&junk).await;
        // Whatever the server makes of it, it must end or keep the connection in a
        // bounded time; we only need it not to take the broker down.
        let _ = raw.read_frame(Duration::from_millis(200)).await;
        drop(raw);
        w.check().await;
    }
    // The broker still accepts new connections.
    let (_c, ch) = t.channel().await;
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn garbage_instead_of_start_ok_never_disturbs_other_connections() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let mut raw = Raw::connect(&t.addr()).await;
    raw.send(util::raw::HEADER).await;
    raw.recv_method().await; // connection.start
    raw.try_send(&[1, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xCE])
        .await;
    let _ = raw.ends_connection().await;
    w.check().await;
}

#[tokio::test]
async fn a_connection_dropped_mid_frame_never_disturbs_other_connections() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: w.queue.as_str().into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    raw.send(&encode(&AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: 1000,
            properties: RawProps::default(),
        },
    )))
    .await;
    // Half a body frame, then gone.
    let body = encode(&AMQPFrame::Body(1, vec![b'x'; 1000]));
    raw.send(&body[..500]).await;
    drop(raw);
    // The partial message is never delivered; the witness sees only its own.
    w.check().await;
    w.check().await;
}

#[tokio::test]
async fn a_body_longer_than_its_header_announced_closes_the_connection() {
    let t = Target::start().await;
    let mut w = Witness::start(&t).await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: w.queue.as_str().into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    raw.send(&encode(&AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: 4,
            properties: RawProps::default(),
        },
    )))
    .await;
    raw.send(&encode(&AMQPFrame::Body(1, b"too long".to_vec())))
        .await;
    // RabbitMQ 3.10 does not notice (it waits for more body forever); Warren closes
    // the connection with a frame error. Either way nothing reaches the queue.
    if !t.is_reference() {
        let code = raw.ends_connection().await;
        assert_eq!(code, Some(501));
    }
    w.check().await;
    w.check().await;
}

#[tokio::test]
async fn basic_qos_with_a_prefetch_size_is_a_540_connection_error() {
    let t = Target::start().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    // basic.qos: prefetch_size 1000, prefetch_count 10, global false (amq-protocol
    // cannot write a prefetch_size, so the frame is built by hand).
    let mut f = vec![1, 0, 1, 0, 0, 0, 11, 0, 60, 0, 10];
    f.extend_from_slice(&1000u32.to_be_bytes());
    f.extend_from_slice(&10u16.to_be_bytes());
    f.extend_from_slice(&[0, 0xCE]);
    raw.send(&f).await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 540, "{close:?}");
    assert_eq!(
        close.reply_text.as_str(),
        "NOT_IMPLEMENTED - prefetch_size!=0 (1000)"
    );
    assert_eq!((close.class_id, close.method_id), (60, 10));
}
