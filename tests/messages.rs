//! Messages: bodies larger than frame_max and empty ones, properties and headers passed
//! through unchanged, mandatory publishing and basic.return, basic.get.

mod common;
mod util;

use lapin::options::*;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use util::*;

async fn confirm_channel(t: &Target) -> (lapin::Connection, Channel) {
    let (conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    (conn, ch)
}

async fn publish_props(
    ch: &Channel,
    exchange: &str,
    key: &str,
    options: BasicPublishOptions,
    body: &[u8],
    props: BasicProperties,
) -> lapin::Result<Confirmation> {
    within(async {
        let c = ch
            .basic_publish(exchange.into(), key.into(), options, body, props)
            .await?;
        c.await
    })
    .await
}

/// A body where every position is distinguishable, so truncation or reordering of
/// body frames shows.
fn patterned(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ (i % 251) as u8)
        .collect()
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

// ---------------------------------------------------------------------------------------
// Bodies

#[tokio::test]
async fn a_one_mib_body_spanning_many_frames_arrives_intact() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let body = patterned(1024 * 1024);
    let c = publish_props(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        &body,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert!(c.is_ack());
    let mut consumer = consume(&ch, &q, "big").await;
    let d = next(&mut consumer).await;
    assert_eq!(d.data.len(), body.len());
    assert!(d.data == body, "body corrupted");
}

#[tokio::test]
async fn bodies_around_the_frame_size_boundary_arrive_intact() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    // The largest body payload per frame is frame_max - 8.
    let max = conn.configuration().frame_max() as usize - 8;
    let sizes = [max - 1, max, max + 1, 2 * max, 2 * max + 1, 3 * max - 1];
    for (i, n) in sizes.iter().enumerate() {
        let mut body = patterned(*n);
        body[0] = i as u8;
        let c = publish_props(
            &ch,
            "",
            &q,
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
        assert!(c.is_ack());
    }
    let mut consumer = consume(&ch, &q, "c").await;
    for (i, n) in sizes.iter().enumerate() {
        let d = next(&mut consumer).await;
        let mut body = patterned(*n);
        body[0] = i as u8;
        assert_eq!(d.data.len(), *n, "size {n}");
        assert!(d.data == body, "body of size {n} corrupted");
    }
}

#[tokio::test]
async fn deliveries_respect_a_smaller_frame_max_chosen_by_the_client() {
    let t = Target::start().await;
    let url = format!("{}?frame_max=8192", t.url);
    let conn = t.connect_url(&url).await.expect("connects");
    assert_eq!(conn.configuration().frame_max(), 8192);
    let ch = conn.create_channel().await.unwrap();
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let q = temp_queue(&ch).await;
    let body = patterned(100 * 1024 + 17);
    publish_confirmed(&ch, "", &q, &body).await;
    // lapin refuses frames above the frame_max it negotiated, so these only arrive if
    // the broker splits deliveries, get-ok and returns by the client's frame_max.
    let m = get(&ch, &q).await.expect("message");
    assert!(m.delivery.data == body, "get-ok body corrupted");
    within(m.delivery.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    }))
    .await
    .unwrap();
    let mut c = consume(&ch, &q, "c").await;
    assert!(next(&mut c).await.data == body, "delivered body corrupted");
    let r = publish_props(
        &ch,
        "amq.direct",
        &uniq("nowhere"),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        &body,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let returned = r.take_message().expect("basic.return");
    assert!(returned.delivery.data == body, "returned body corrupted");
    assert!(conn.status().connected());
}

#[tokio::test]
async fn a_large_body_is_intact_through_basic_get() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let body = patterned(700 * 1024 + 3);
    publish_confirmed(&ch, "", &q, &body).await;
    let m = get(&ch, &q).await.expect("message");
    assert!(m.delivery.data == body, "body corrupted");
}

#[tokio::test]
async fn a_large_body_is_intact_after_requeue_and_redelivery() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let body = patterned(300 * 1024);
    publish_confirmed(&ch, "", &q, &body).await;
    let mut c = consume(&ch, &q, "c").await;
    let d = next(&mut c).await;
    within(d.acker.reject(BasicRejectOptions { requeue: true }))
        .await
        .unwrap();
    let d = next(&mut c).await;
    assert!(d.redelivered);
    assert!(d.data == body, "body corrupted");
}

#[tokio::test]
async fn zero_length_bodies_are_delivered_empty() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let consumed = temp_queue(&ch).await;
    let got = temp_queue(&ch).await;
    for q in [&consumed, &got] {
        let c = publish_props(
            &ch,
            "",
            q,
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default().with_message_id("empty".into()),
        )
        .await
        .unwrap();
        assert!(c.is_ack());
        publish_confirmed(&ch, "", q, b"after").await;
    }
    let mut c = consume(&ch, &consumed, "c").await;
    let d = next(&mut c).await;
    assert!(d.data.is_empty());
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("empty")
    );
    assert_eq!(next(&mut c).await.data, b"after");
    // Through basic.get as well.
    let m = get(&ch, &got).await.expect("empty message");
    assert!(m.delivery.data.is_empty());
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("empty")
    );
    assert_eq!(
        get(&ch, &got).await.expect("second").delivery.data,
        b"after"
    );
}

// ---------------------------------------------------------------------------------------
// Properties

fn all_properties() -> BasicProperties {
    let mut inner = FieldTable::default();
    inner.insert("deep".into(), s("value"));
    inner.insert(
        "deeper".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(-1),
            AMQPValue::FieldTable({
                let mut t = FieldTable::default();
                t.insert("x".into(), AMQPValue::Boolean(false));
                t
            }),
        ])),
    );
    let mut headers = FieldTable::default();
    headers.insert("string".into(), s("héllo wörld"));
    headers.insert("bool".into(), AMQPValue::Boolean(true));
    headers.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    headers.insert("i16".into(), AMQPValue::ShortInt(-16_000));
    headers.insert("i32".into(), AMQPValue::LongInt(-2_000_000_000));
    headers.insert("i64".into(), AMQPValue::LongLongInt(-9_000_000_000_000));
    headers.insert("f32".into(), AMQPValue::Float(1.5));
    headers.insert("f64".into(), AMQPValue::Double(-2.25));
    headers.insert(
        "decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    headers.insert("timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
    headers.insert("void".into(), AMQPValue::Void);
    headers.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])),
    );
    headers.insert(
        "array".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            s("a"),
            AMQPValue::LongInt(2),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
        ])),
    );
    headers.insert("table".into(), AMQPValue::FieldTable(inner));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-1".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_600_000_000)
        .with_type("kind-of-message".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
}

#[tokio::test]
async fn all_basic_properties_and_nested_headers_reach_the_consumer_unchanged() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let props = all_properties();
    let c = publish_props(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        b"with properties",
        props.clone(),
    )
    .await
    .unwrap();
    assert!(c.is_ack());
    let mut consumer = consume(&ch, &q, "c").await;
    let d = next(&mut consumer).await;
    assert_eq!(d.data, b"with properties");
    assert_eq!(d.properties, props);
}

#[tokio::test]
async fn properties_reach_basic_get_unchanged() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let props = all_properties();
    publish_props(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        b"p",
        props.clone(),
    )
    .await
    .unwrap();
    let m = get(&ch, &q).await.expect("message");
    assert_eq!(m.delivery.properties, props);
}

#[tokio::test]
async fn properties_reach_every_queue_of_a_fanout_unchanged() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q1 = temp_queue(&ch).await;
    let q2 = temp_queue(&ch).await;
    let x = uniq("fan");
    within(ch.exchange_declare(
        x.as_str().into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    for q in [&q1, &q2] {
        within(ch.queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .unwrap();
    }
    let props = all_properties();
    publish_props(
        &ch,
        &x,
        "rk",
        BasicPublishOptions::default(),
        b"p",
        props.clone(),
    )
    .await
    .unwrap();
    for q in [&q1, &q2] {
        let m = get(&ch, q).await.expect("message");
        assert_eq!(m.delivery.properties, props);
        assert_eq!(m.delivery.exchange.as_str(), x);
        assert_eq!(m.delivery.routing_key.as_str(), "rk");
    }
}

#[tokio::test]
async fn a_user_id_other_than_the_authenticated_user_is_refused_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let r = publish_props(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default().with_user_id("mallory".into()),
    )
    .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn delivery_carries_the_exchange_and_routing_key_it_was_published_with() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let key = uniq("key");
    within(ch.queue_bind(
        q.as_str().into(),
        "amq.direct".into(),
        key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, "amq.direct", &key, b"via amq.direct").await;
    publish_confirmed(&ch, "", &q, b"via default").await;
    let mut c = consume(&ch, &q, "c").await;
    let d = next(&mut c).await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        ("amq.direct", key.as_str())
    );
    let d = next(&mut c).await;
    assert_eq!(
        (d.exchange.as_str(), d.routing_key.as_str()),
        ("", q.as_str())
    );
}

// ---------------------------------------------------------------------------------------
// Mandatory and basic.return

#[tokio::test]
async fn unroutable_mandatory_message_is_returned_with_312_no_route() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("x");
    within(ch.exchange_declare(
        x.as_str().into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let props = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_content_type("text/plain".into());
    let c = publish_props(
        &ch,
        &x,
        "nowhere",
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"come back",
        props.clone(),
    )
    .await
    .unwrap();
    assert!(c.is_ack(), "an unroutable message is still confirmed");
    let returned = c.take_message().expect("basic.return");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.exchange.as_str(), x);
    assert_eq!(returned.delivery.routing_key.as_str(), "nowhere");
    assert_eq!(returned.delivery.data, b"come back");
    assert_eq!(returned.delivery.properties, props);
}

#[tokio::test]
async fn unroutable_mandatory_message_to_the_default_exchange_is_returned() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let c = publish_props(
        &ch,
        "",
        &uniq("no-such-queue"),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"nobody",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let returned = c.take_message().expect("basic.return");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.delivery.data, b"nobody");
}

#[tokio::test]
async fn returned_large_message_arrives_intact() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let body = patterned(400 * 1024);
    let c = publish_props(
        &ch,
        "amq.direct",
        &uniq("nowhere"),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        &body,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let returned = c.take_message().expect("basic.return");
    assert!(returned.delivery.data == body, "returned body corrupted");
}

#[tokio::test]
async fn routable_mandatory_message_is_delivered_not_returned() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let c = publish_props(
        &ch,
        "",
        &q,
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"routed",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(c, Confirmation::Ack(None));
    assert_eq!(get(&ch, &q).await.unwrap().delivery.data, b"routed");
}

#[tokio::test]
async fn unroutable_message_without_mandatory_is_dropped_silently() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let c = publish_props(
        &ch,
        "amq.direct",
        &uniq("nowhere"),
        BasicPublishOptions::default(),
        b"lost",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(c, Confirmation::Ack(None));
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn returns_are_reported_without_publisher_confirms_too() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.basic_publish(
        "amq.direct".into(),
        uniq("nowhere").as_str().into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"back",
        BasicProperties::default(),
    ))
    .await
    .unwrap();
    // A round trip after the publish: the return (sent before it) has arrived.
    assert_channel_works(&ch).await;
    let returned = within(ch.wait_for_confirms()).await.unwrap();
    assert_eq!(returned.len(), 1, "{returned:?}");
    assert_eq!(returned[0].reply_code, 312);
    assert_eq!(returned[0].delivery.data, b"back");
}

#[tokio::test]
async fn immediate_publish_is_refused_with_540() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let r = publish_props(
        &ch,
        "",
        &q,
        BasicPublishOptions {
            immediate: true,
            ..Default::default()
        },
        b"now",
        BasicProperties::default(),
    )
    .await;
    assert_code(r, 540);
    // NOT_IMPLEMENTED is a connection error.
    for _ in 0..100 {
        if !conn.status().connected() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!conn.status().connected());
}

// ---------------------------------------------------------------------------------------
// basic.get

#[tokio::test]
async fn basic_get_on_an_empty_queue_answers_get_empty() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    assert!(get(&ch, &q).await.is_none());
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn basic_get_returns_messages_in_order_with_the_remaining_count() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    for i in 0..3u8 {
        publish_confirmed(&ch, "", &q, &[i]).await;
    }
    for i in 0..3u8 {
        let m = get(&ch, &q).await.expect("message");
        assert_eq!(m.delivery.data, [i]);
        assert_eq!(m.message_count, 2 - i as u32);
        assert!(!m.delivery.redelivered);
        assert_eq!(m.delivery.routing_key.as_str(), q);
        within(m.delivery.ack(BasicAckOptions::default()))
            .await
            .unwrap();
    }
    assert!(get(&ch, &q).await.is_none());
}

#[tokio::test]
async fn basic_get_no_ack_removes_the_message_at_once() {
    let t = Target::start().await;
    let (conn, ch) = confirm_channel(&t).await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    publish_confirmed(&ch, "", &q, b"gone").await;
    let m = within(ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }))
        .await
        .unwrap()
        .expect("message");
    assert_eq!(m.delivery.data, b"gone");
    // Closing the channel does not bring it back.
    ch.close(200, "bye".into()).await.unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    assert!(get(&ch2, &q).await.is_none());
}

#[tokio::test]
async fn basic_get_of_a_missing_queue_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .basic_get(uniq("missing").as_str().into(), BasicGetOptions::default())
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn basic_get_marks_requeued_messages_redelivered() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    publish_confirmed(&ch, "", &q, b"again").await;
    let m = get(&ch, &q).await.expect("message");
    assert!(!m.delivery.redelivered);
    within(m.delivery.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    }))
    .await
    .unwrap();
    let m = get(&ch, &q).await.expect("requeued message");
    assert_eq!(m.delivery.data, b"again");
    assert!(m.delivery.redelivered);
}

#[tokio::test]
async fn message_counts_leave_out_messages_already_expired_at_the_head() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    for (body, ttl) in [
        ("first", None),
        ("short", Some("50")),
        ("short2", Some("50")),
        ("last", None),
    ] {
        let mut props = BasicProperties::default();
        if let Some(ttl) = ttl {
            props = props.with_expiration(ttl.into());
        }
        within(ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        ))
        .await
        .unwrap();
    }
    wait_message_count(&ch, &q, 4).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Taking "first" puts the two expired messages at the head: they do not count.
    let m = get(&ch, &q).await.expect("first");
    assert_eq!(m.delivery.data, b"first");
    assert_eq!(m.message_count, 1, "get-ok counts only 'last'");
    assert_eq!(message_count(&ch, &q).await, 1, "declare-ok too");
    assert_eq!(drain(&ch, &q).await, [b"last".to_vec()]);
}
