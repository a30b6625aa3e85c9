//! Dead-lettering, TTLs, length limits, priorities, delivery limits and single active
//! consumer, driven through lapin as a RabbitMQ user would.

mod common;

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare(ch: &Channel, name: &str, a: FieldTable) {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), a)
        .await
        .unwrap();
}

async fn publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap();
}

async fn get(ch: &Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
}

/// Polls a queue until a message arrives (TTL work happens on the broker's timer).
async fn wait_get(ch: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    for _ in 0..100 {
        if let Some(m) = get(ch, queue).await {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing arrived in {queue}");
}

fn header<'a>(m: &'a lapin::message::BasicGetMessage, key: &str) -> Option<&'a AMQPValue> {
    m.delivery.properties.headers().as_ref()?.inner().get(key)
}

fn as_text(v: Option<&AMQPValue>) -> String {
    match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => format!("{other:?}"),
    }
}

fn deaths(m: &lapin::message::BasicGetMessage) -> Vec<FieldTable> {
    match header(m, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

async fn dlx_pair(ch: &Channel, source_args: &[(&str, AMQPValue)]) {
    ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(ch, "dead", FieldTable::default()).await;
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut a = vec![("x-dead-letter-exchange", text("dlx"))];
    a.extend(source_args.iter().cloned());
    declare(ch, "src", args(&a)).await;
}

#[tokio::test]
async fn rejected_message_is_dead_lettered_with_x_death() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_pair(&ch, &[]).await;
    publish(
        &ch,
        "src",
        b"poison",
        BasicProperties::default().with_expiration("60000".into()),
    )
    .await;
    let m = ch
        .basic_get("src".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let dead = wait_get(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"poison");
    let d = deaths(&dead);
    assert_eq!(d.len(), 1);
    let t = d[0].inner();
    assert_eq!(as_text(t.get("reason")), "rejected");
    assert_eq!(as_text(t.get("queue")), "src");
    assert_eq!(as_text(t.get("exchange")), "");
    assert_eq!(as_text(t.get("original-expiration")), "60000");
    assert!(matches!(t.get("count"), Some(AMQPValue::LongLongInt(1))));
    assert!(matches!(t.get("time"), Some(AMQPValue::Timestamp(_))));
    assert!(
        matches!(t.get("routing-keys"), Some(AMQPValue::FieldArray(a)) if a.as_slice().len() == 1)
    );
    assert_eq!(as_text(header(&dead, "x-first-death-reason")), "rejected");
    assert_eq!(as_text(header(&dead, "x-first-death-queue")), "src");
    assert_eq!(as_text(header(&dead, "x-last-death-reason")), "rejected");
    assert!(
        dead.delivery.properties.expiration().is_none(),
        "expiration is removed from the dead-lettered copy"
    );
}

#[tokio::test]
async fn nack_without_requeue_dead_letters_and_repeated_deaths_increment_count() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    // src dead-letters to dlx -> dead; dead dead-letters back to src via the default exchange.
    ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(
        &ch,
        "loop-b",
        args(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("loop-a")),
        ]),
    )
    .await;
    declare(
        &ch,
        "loop-a",
        args(&[("x-dead-letter-exchange", text("dlx"))]),
    )
    .await;
    ch.queue_bind(
        "loop-b".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "loop-a", b"m", BasicProperties::default()).await;
    for round in 1..=2i64 {
        let m = ch
            .basic_get("loop-a".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        m.delivery
            .nack(BasicNackOptions {
                requeue: false,
                multiple: false,
            })
            .await
            .unwrap();
        let m = (async {
            loop {
                if let Some(m) = ch
                    .basic_get("loop-b".into(), BasicGetOptions::default())
                    .await
                    .unwrap()
                {
                    return m;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let d = deaths(&m);
        assert_eq!(as_text(d[0].inner().get("queue")), "loop-a");
        assert!(
            matches!(d[0].inner().get("count"), Some(AMQPValue::LongLongInt(c)) if *c == round),
            "count increments: {d:?}"
        );
        m.delivery
            .reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_and_never_delivered() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_pair(&ch, &[("x-message-ttl", AMQPValue::LongInt(100))]).await;
    publish(&ch, "src", b"queue-ttl", BasicProperties::default()).await;
    publish(
        &ch,
        "src",
        b"msg-ttl",
        BasicProperties::default().with_expiration("50".into()),
    )
    .await;
    let first = wait_get(&ch, "dead").await;
    let second = wait_get(&ch, "dead").await;
    let bodies = [first.delivery.data.clone(), second.delivery.data.clone()];
    assert!(bodies.contains(&b"queue-ttl".to_vec()) && bodies.contains(&b"msg-ttl".to_vec()));
    assert_eq!(as_text(deaths(&first)[0].inner().get("reason")), "expired");
    assert!(
        get(&ch, "src").await.is_none(),
        "expired messages are not delivered"
    );
}

#[tokio::test]
async fn smaller_of_queue_and_message_ttl_wins() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "ttl",
        args(&[("x-message-ttl", AMQPValue::LongInt(60_000))]),
    )
    .await;
    publish(
        &ch,
        "ttl",
        b"short",
        BasicProperties::default().with_expiration("30".into()),
    )
    .await;
    publish(&ch, "ttl", b"long", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = get(&ch, "ttl").await.unwrap();
    assert_eq!(m.delivery.data, b"long");
    assert!(get(&ch, "ttl").await.is_none());
}

#[tokio::test]
async fn max_length_drop_head_dead_letters_the_oldest() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_pair(&ch, &[("x-max-length", AMQPValue::LongInt(2))]).await;
    for body in [b"1", b"2", b"3"] {
        publish(&ch, "src", body, BasicProperties::default()).await;
    }
    let dead = wait_get(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"1");
    assert_eq!(as_text(deaths(&dead)[0].inner().get("reason")), "maxlen");
    assert_eq!(get(&ch, "src").await.unwrap().delivery.data, b"2");
    assert_eq!(get(&ch, "src").await.unwrap().delivery.data, b"3");
}

#[tokio::test]
async fn max_length_bytes_limits_the_body_bytes() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "bytes",
        args(&[("x-max-length-bytes", AMQPValue::LongInt(10))]),
    )
    .await;
    for body in [&b"aaaaa"[..], b"bbbbb", b"ccccc"] {
        publish(&ch, "bytes", body, BasicProperties::default()).await;
    }
    assert_eq!(get(&ch, "bytes").await.unwrap().delivery.data, b"bbbbb");
    assert_eq!(get(&ch, "bytes").await.unwrap().delivery.data, b"ccccc");
    assert!(get(&ch, "bytes").await.is_none());
}

#[tokio::test]
async fn reject_publish_overflow_nacks_the_publisher() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "full",
        args(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let first = ch
        .basic_publish(
            "".into(),
            "full".into(),
            BasicPublishOptions::default(),
            b"in",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert!(first.await.unwrap().is_ack());
    let second = ch
        .basic_publish(
            "".into(),
            "full".into(),
            BasicPublishOptions::default(),
            b"out",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert!(
        second.await.unwrap().is_nack(),
        "a full reject-publish queue nacks"
    );
    let third = ch
        .basic_publish(
            "".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert!(
        third.await.unwrap().is_ack(),
        "later publishes are acked again"
    );
    assert_eq!(get(&ch, "full").await.unwrap().delivery.data, b"in");
    assert!(get(&ch, "full").await.is_none());
}

#[tokio::test]
async fn reject_publish_dlx_dead_letters_the_refused_message() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_pair(
        &ch,
        &[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", text("reject-publish-dlx")),
        ],
    )
    .await;
    publish(&ch, "src", b"kept", BasicProperties::default()).await;
    publish(&ch, "src", b"refused", BasicProperties::default()).await;
    let dead = wait_get(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"refused");
    assert_eq!(as_text(deaths(&dead)[0].inner().get("reason")), "maxlen");
    assert_eq!(get(&ch, "src").await.unwrap().delivery.data, b"kept");
}

#[tokio::test]
async fn delivery_limit_dead_letters_a_poison_message_and_counts_deliveries() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dlx_pair(&ch, &[("x-delivery-limit", AMQPValue::LongInt(2))]).await;
    publish(&ch, "src", b"poison", BasicProperties::default()).await;
    let mut counts = Vec::new();
    for _ in 0..3 {
        let m = ch
            .basic_get("src".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        counts.push(
            m.delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delivery-count").cloned()),
        );
        m.delivery
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
    }
    assert_eq!(counts[0], None);
    assert!(
        matches!(counts[1], Some(AMQPValue::LongLongInt(1))),
        "{counts:?}"
    );
    let dead = wait_get(&ch, "dead").await;
    assert_eq!(
        as_text(deaths(&dead)[0].inner().get("reason")),
        "delivery_limit"
    );
    assert!(get(&ch, "src").await.is_none());
}

#[tokio::test]
async fn a_quorum_queue_has_rabbitmqs_default_delivery_limit_of_20() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "qq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[("x-queue-type", text("quorum"))]),
    )
    .await
    .unwrap();
    publish(&ch, "qq", b"poison", BasicProperties::default()).await;
    // Delivered once, then returned 20 times: the 21st return drops it.
    for n in 0..=20 {
        let m = ch
            .basic_get("qq".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("delivery {} of the message", n + 1));
        m.delivery
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
    }
    assert!(
        get(&ch, "qq").await.is_none(),
        "dropped past the default delivery limit"
    );
}

#[tokio::test]
async fn priority_queue_delivers_highest_first_fifo_within_a_priority() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "prio",
        args(&[("x-max-priority", AMQPValue::ShortShortUInt(5))]),
    )
    .await;
    for (body, p) in [
        ("low-1", 1u8),
        ("high", 5),
        ("low-2", 1),
        ("capped", 200),
        ("none", 0),
    ] {
        let props = if p == 0 {
            BasicProperties::default()
        } else {
            BasicProperties::default().with_priority(p)
        };
        publish(&ch, "prio", body.as_bytes(), props).await;
    }
    let mut order = Vec::new();
    while let Some(m) = get(&ch, "prio").await {
        order.push(String::from_utf8(m.delivery.data).unwrap());
    }
    assert_eq!(order, ["high", "capped", "low-1", "low-2", "none"]);
}

#[tokio::test]
async fn single_active_consumer_gets_everything_and_the_next_takes_over() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "sac",
        args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let mut first = ch
        .basic_consume(
            "sac".into(),
            "first".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let mut second = ch2
        .basic_consume(
            "sac".into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..4u8 {
        publish(&ch, "sac", &[i], BasicProperties::default()).await;
    }
    for i in 0..2u8 {
        let d = first.next().await.unwrap().unwrap();
        assert_eq!(d.data, vec![i]);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), second.next())
            .await
            .is_err(),
        "the second consumer is idle"
    );
    // The first goes away with messages 2 and 3 unacked (delivered to it, not acked).
    let _pending = first.next().await.unwrap().unwrap();
    ch.basic_cancel("first".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    ch.close(200, "bye".into()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = second.next().await.unwrap().unwrap();
        got.push(d.data[0]);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(got, vec![2, 3], "the next consumer takes over in order");
}

#[tokio::test]
async fn invalid_and_inequivalent_arguments_are_406_naming_the_argument() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    for (arg, value) in [
        ("x-message-ttl", AMQPValue::LongInt(-1)),
        ("x-max-length", text("ten")),
        ("x-max-priority", AMQPValue::LongInt(256)),
        ("x-overflow", text("explode")),
        ("x-expires", AMQPValue::LongInt(0)),
        ("x-delivery-limit", AMQPValue::LongInt(-5)),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let err = ch
            .queue_declare(
                "bad".into(),
                QueueDeclareOptions::default(),
                args(&[(arg, value)]),
            )
            .await
            .unwrap_err();
        let text = format!("{err}");
        assert!(
            text.contains("406") || text.contains("PRECONDITION_FAILED"),
            "{arg}: {text}"
        );
        assert!(text.contains(arg), "the error names {arg}: {text}");
    }
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "ttl-q",
        args(&[("x-message-ttl", AMQPValue::LongInt(1000))]),
    )
    .await;
    let err = ch
        .queue_declare(
            "ttl-q".into(),
            QueueDeclareOptions::default(),
            args(&[("x-message-ttl", AMQPValue::LongInt(2000))]),
        )
        .await
        .unwrap_err();
    let text = format!("{err}");
    assert!(
        text.contains("x-message-ttl")
            && (text.contains("406") || text.contains("PRECONDITION_FAILED")),
        "{text}"
    );
}

#[tokio::test]
async fn unused_queue_expires_with_x_expires() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(
        &ch,
        "short-lived",
        args(&[("x-expires", AMQPValue::LongInt(100))]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = ch
        .queue_declare(
            "short-lived".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(err.is_err(), "the queue was deleted after x-expires");
}

#[tokio::test]
async fn retry_through_a_ttl_wait_queue_comes_back_to_the_consumer() {
    let b = common::TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        "work".into(),
        durable,
        args(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("work.wait")),
        ]),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "work.wait".into(),
        durable,
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("work")),
        ]),
    )
    .await
    .unwrap();
    publish(
        &ch,
        "work",
        b"job",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
    let mut consumer = ch
        .basic_consume(
            "work".into(),
            "w".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for attempt in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("redelivered after the delay")
            .unwrap()
            .unwrap();
        assert_eq!(d.data, b"job", "attempt {attempt}");
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
}
