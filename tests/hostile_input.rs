//! Input meant to hurt the node: deeply nested field tables, unknown field types, and
//! topic patterns built to make matching explode. Each must cost the sender its own
//! connection at most, never the node or anyone else's traffic.

mod common;
mod util;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, queue};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use util::raw::{Raw, method};
use util::*;

/// Deepest nesting Warren accepts (protocol::fieldtable::MAX_DEPTH).
const MAX_DEPTH: usize = 32;

/// A field table `{k: [[[...V...]]]}` with `levels` arrays, encoded by hand (a recursive
/// encoder would itself overflow at the depths tried here).
fn nested_table(levels: usize) -> Vec<u8> {
    let mut v = b"V".to_vec();
    for _ in 0..levels {
        let mut outer = vec![b'A'];
        outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
        outer.extend_from_slice(&v);
        v = outer;
    }
    let mut entry = vec![1, b'k'];
    entry.extend_from_slice(&v);
    let mut t = (entry.len() as u32).to_be_bytes().to_vec();
    t.extend_from_slice(&entry);
    t
}

/// One frame around `payload`.
fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

/// basic.publish to the default exchange with raw `headers` (a whole encoded table), and
/// a short body.
fn publish_with_headers(queue: &str, headers: &[u8]) -> Vec<u8> {
    let mut out = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: queue.into(),
            mandatory: false,
            immediate: false,
        })),
    );
    let body = b"x";
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&(1u16 << 13).to_be_bytes());
    header.extend_from_slice(headers);
    out.extend(frame(2, 1, &header));
    out.extend(frame(3, 1, body));
    out
}

/// queue.declare with raw `arguments` (a whole encoded table).
fn declare_with_arguments(name: &str, arguments: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 50, 0, 10, 0, 0, name.len() as u8];
    p.extend_from_slice(name.as_bytes());
    p.push(0);
    p.extend_from_slice(arguments);
    frame(1, 1, &p)
}

async fn open_raw(t: &Target) -> Raw {
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    raw
}

#[tokio::test]
async fn deeply_nested_headers_close_only_the_senders_connection() {
    let t = Target::start().await;
    let (_conn, bystander) = t.channel().await;
    let q = temp_queue(&bystander).await;
    let mut attacker = open_raw(&t).await;
    attacker
        .send(&publish_with_headers(&q, &nested_table(5000)))
        .await;
    if !t.is_reference() {
        let close = attacker.expect_connection_close().await;
        assert_eq!(close.reply_code, 502, "{close:?}");
        assert!(
            close.reply_text.as_str().contains("nested deeper"),
            "{close:?}"
        );
    }
    // Everyone else goes on.
    publish(&bystander, "", &q, b"still here").await;
    assert_eq!(drain(&bystander, &q).await.last().unwrap(), b"still here");
}

#[tokio::test]
async fn deeply_nested_declare_arguments_are_a_syntax_error() {
    let t = Target::start().await;
    if t.is_reference() {
        return; // RabbitMQ accepts any depth that fits a frame.
    }
    let mut raw = open_raw(&t).await;
    raw.send(&declare_with_arguments(&uniq("deep"), &nested_table(3000)))
        .await;
    let close = raw.expect_connection_close().await;
    assert_eq!(close.reply_code, 502, "{close:?}");
    assert_eq!(close.class_id, 0);
    let (_c, ch) = t.channel().await;
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn unknown_field_type_ends_the_connection() {
    let t = Target::start().await;
    let mut raw = open_raw(&t).await;
    // {k: 'Z'}: no peer defines type Z.
    raw.send(&declare_with_arguments(
        &uniq("ztype"),
        &[0, 0, 0, 3, 1, b'k', b'Z'],
    ))
    .await;
    // RabbitMQ's parser fails and drops the socket; Warren says why first (502).
    let code = raw.ends_connection().await;
    if !t.is_reference() {
        assert_eq!(code, Some(502));
    }
    let (_c, ch) = t.channel().await;
    assert_channel_works(&ch).await;
}

/// The deepest accepted headers go through the broker and come back as they were sent.
#[tokio::test]
async fn headers_nested_to_the_limit_are_delivered_unchanged() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let mut value = AMQPValue::Void;
    for _ in 0..MAX_DEPTH - 1 {
        value = AMQPValue::FieldArray(FieldArray::from(vec![value]));
    }
    let mut headers = FieldTable::default();
    headers.insert("k".into(), value.clone());
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"deep",
        lapin::BasicProperties::default().with_headers(headers),
    )
    .await
    .expect("publish");
    let got = within(ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("a message");
    let back = got.properties.headers().clone().expect("headers");
    assert_eq!(back.inner().get("k"), Some(&value));
}

/// Pathological topic patterns cost polynomial time, and a message still goes to each
/// matching queue once.
#[tokio::test]
async fn pathological_topic_patterns_route_once() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let x = uniq("topic");
    ch.exchange_declare(
        x.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let q = temp_queue(&ch).await;
    for pattern in [vec!["#"; 100].join("."), vec!["#.a"; 60].join(".")] {
        ch.queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            pattern.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }
    let key = vec!["a"; 127].join(".");
    publish(&ch, &x, &key, b"once").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(drain(&ch, &q).await, vec![b"once".to_vec()]);
}

/// queue.declare arguments at the limit are stored and read back; the queue answers
/// a redeclare with the same arguments (equivalence check) after that.
#[tokio::test]
async fn declare_arguments_nested_to_the_limit_are_accepted() {
    let t = Target::start().await;
    let mut raw = open_raw(&t).await;
    let name = uniq("deep-ok");
    raw.send(&declare_with_arguments(&name, &nested_table(MAX_DEPTH - 1)))
        .await;
    match raw.recv_method().await {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => {
            assert_eq!(ok.queue.as_str(), name)
        }
        other => panic!("expected declare-ok, got {other:?}"),
    }
}
