//! Exchanges (pre-declared ones, declare/delete rules, exchange-to-exchange bindings,
//! alternate exchanges) and routing by direct, fanout, topic and headers exchanges.

mod common;
mod util;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use util::*;

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.declare");
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    bind_args(ch, queue, exchange, key, FieldTable::default()).await;
}

async fn bind_args(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    within(ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        args,
    ))
    .await
    .expect("queue.bind");
}

/// A channel with publisher confirms on, so that a confirmed publish has been routed.
async fn confirm_channel(t: &Target) -> (lapin::Connection, Channel) {
    let (conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    (conn, ch)
}

async fn publish_headers(ch: &Channel, exchange: &str, body: &str, headers: FieldTable) {
    let c = within(ch.basic_publish(
        exchange.into(),
        "".into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default().with_headers(headers),
    ))
    .await
    .unwrap();
    assert!(within(c).await.unwrap().is_ack());
}

fn strings(v: Vec<Vec<u8>>) -> Vec<String> {
    v.into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect()
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

fn passive() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Pre-declared exchanges and declare rules

#[tokio::test]
async fn standard_exchanges_are_predeclared() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        within(ch.exchange_declare(name.into(), kind, passive(), FieldTable::default()))
            .await
            .unwrap_or_else(|e| panic!("{name} should exist: {e}"));
    }
}

#[tokio::test]
async fn predeclared_exchanges_can_be_redeclared_with_equivalent_properties() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.exchange_declare(
        "amq.direct".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("equivalent redeclare of amq.direct");
}

#[tokio::test]
async fn default_exchange_routes_to_the_queue_named_by_the_routing_key() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let a = uniq("a");
    let b = uniq("b");
    declare_queue(&ch, &a).await;
    declare_queue(&ch, &b).await;
    publish_confirmed(&ch, "", &a, b"for a").await;
    publish_confirmed(&ch, "", &b, b"for b").await;
    publish_confirmed(&ch, "", &uniq("nobody"), b"dropped").await;
    assert_eq!(strings(drain(&ch, &a).await), ["for a"]);
    assert_eq!(strings(drain(&ch, &b).await), ["for b"]);
}

#[tokio::test]
async fn binding_a_queue_to_the_default_exchange_is_refused_with_403() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let r = ch
        .queue_bind(
            q.as_str().into(),
            "".into(),
            "key".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 403);
}

#[tokio::test]
async fn deleting_the_default_exchange_is_refused_with_403() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .exchange_delete("".into(), ExchangeDeleteOptions::default())
        .await;
    assert_code(r, 403);
}

#[tokio::test]
async fn declaring_the_default_exchange_even_passively_is_refused_with_403() {
    let t = Target::start().await;
    for options in [passive(), ExchangeDeclareOptions::default()] {
        let (_conn, ch) = t.channel().await;
        let r = within(ch.exchange_declare(
            "".into(),
            ExchangeKind::Direct,
            options,
            FieldTable::default(),
        ))
        .await;
        assert_code(r, 403);
    }
}

#[tokio::test]
async fn passive_declare_of_a_missing_exchange_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .exchange_declare(
            uniq("missing").as_str().into(),
            ExchangeKind::Direct,
            passive(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn declared_exchange_is_found_by_passive_declare() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Topic).await;
    assert!(exchange_exists(&conn, &x).await);
}

#[tokio::test]
async fn redeclaring_an_exchange_with_another_type_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    let r = ch
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn redeclaring_an_exchange_with_other_durability_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    let r = ch
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn redeclaring_a_predeclared_exchange_with_another_type_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .exchange_declare(
            "amq.direct".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn redeclaring_an_exchange_with_equivalent_properties_succeeds() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Headers).await;
    declare_exchange(&ch, &x, ExchangeKind::Headers).await;
}

#[tokio::test]
async fn declaring_a_new_amq_prefixed_exchange_is_refused_with_403() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let name = uniq("amq.custom");
    let r = ch
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 403);
    assert!(!exchange_exists(&conn, &name).await);
}

#[tokio::test]
async fn exchange_delete_removes_the_exchange() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Fanout).await;
    within(ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()))
        .await
        .unwrap();
    assert!(!exchange_exists(&conn, &x).await);
}

#[tokio::test]
async fn deleting_a_missing_exchange_succeeds() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.exchange_delete(
        uniq("missing").as_str().into(),
        ExchangeDeleteOptions::default(),
    ))
    .await
    .expect("exchange.delete is idempotent");
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn exchange_delete_if_unused_fails_with_406_while_bound() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    let q = temp_queue(&ch).await;
    bind(&ch, &q, &x, "k").await;
    let r = ch
        .exchange_delete(
            x.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await;
    assert_code(r, 406);
    assert!(exchange_exists(&conn, &x).await, "exchange must survive");
}

#[tokio::test]
async fn exchange_delete_if_unused_succeeds_once_unbound() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    let q = temp_queue(&ch).await;
    bind(&ch, &q, &x, "k").await;
    within(ch.queue_unbind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    within(ch.exchange_delete(
        x.as_str().into(),
        ExchangeDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    ))
    .await
    .expect("unused exchange deleted");
    assert!(!exchange_exists(&conn, &x).await);
}

#[tokio::test]
async fn deleting_an_exchange_removes_its_bindings() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Fanout).await;
    let q = temp_queue(&ch).await;
    bind(&ch, &q, &x, "").await;
    within(ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()))
        .await
        .unwrap();
    // Same name again: a fresh exchange without the old binding.
    declare_exchange(&ch, &x, ExchangeKind::Fanout).await;
    publish_confirmed(&ch, &x, "", b"m").await;
    assert!(drain(&ch, &q).await.is_empty());
}

#[tokio::test]
async fn publishing_to_a_missing_exchange_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let r = async {
        let c = ch
            .basic_publish(
                uniq("missing").as_str().into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"m",
                BasicProperties::default(),
            )
            .await?;
        c.await
    };
    assert_code(within(r).await, 404);
}

#[tokio::test]
async fn publishing_to_an_internal_exchange_is_refused_with_403() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("internal");
    within(ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let r = async {
        let c = ch
            .basic_publish(
                x.as_str().into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"m",
                BasicProperties::default(),
            )
            .await?;
        c.await
    };
    assert_code(within(r).await, 403);
}

#[tokio::test]
async fn auto_delete_exchange_goes_when_its_last_binding_is_removed() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let x = uniq("ad");
    within(ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let q1 = temp_queue(&ch).await;
    let q2 = temp_queue(&ch).await;
    bind(&ch, &q1, &x, "a").await;
    bind(&ch, &q2, &x, "b").await;
    within(ch.queue_unbind(
        q1.as_str().into(),
        x.as_str().into(),
        "a".into(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    assert!(exchange_exists(&conn, &x).await, "one binding left");
    within(ch.queue_unbind(
        q2.as_str().into(),
        x.as_str().into(),
        "b".into(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    assert!(!exchange_exists(&conn, &x).await, "last binding gone");
}

// ---------------------------------------------------------------------------------------
// Exchange-to-exchange bindings and alternate exchanges

#[tokio::test]
async fn exchange_to_exchange_binding_routes_end_to_end_until_unbound() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let src = uniq("src");
    let dst = uniq("dst");
    declare_exchange(&ch, &src, ExchangeKind::Direct).await;
    declare_exchange(&ch, &dst, ExchangeKind::Fanout).await;
    let q = temp_queue(&ch).await;
    bind(&ch, &q, &dst, "").await;
    within(ch.exchange_bind(
        dst.as_str().into(),
        src.as_str().into(),
        "k".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, &src, "k", b"through").await;
    publish_confirmed(&ch, &src, "other", b"not through").await;
    assert_eq!(strings(drain(&ch, &q).await), ["through"]);
    within(ch.exchange_unbind(
        dst.as_str().into(),
        src.as_str().into(),
        "k".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, &src, "k", b"after unbind").await;
    assert!(drain(&ch, &q).await.is_empty());
}

#[tokio::test]
async fn exchange_bindings_chain_and_deliver_one_copy_per_queue() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let a = uniq("a");
    let b = uniq("b");
    let c = uniq("c");
    declare_exchange(&ch, &a, ExchangeKind::Topic).await;
    declare_exchange(&ch, &b, ExchangeKind::Fanout).await;
    declare_exchange(&ch, &c, ExchangeKind::Fanout).await;
    for (dst, src, key) in [(&b, &a, "x.#"), (&c, &b, ""), (&c, &a, "#")] {
        within(ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .unwrap();
    }
    let q = temp_queue(&ch).await;
    bind(&ch, &q, &c, "").await;
    bind(&ch, &q, &a, "x.y").await;
    // Reaches q via a->b->c, a->c and directly: still one copy.
    publish_confirmed(&ch, &a, "x.y", b"once").await;
    assert_eq!(strings(drain(&ch, &q).await), ["once"]);
}

#[tokio::test]
async fn exchange_bind_to_a_missing_exchange_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let x = uniq("x");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    let r = ch
        .exchange_bind(
            x.as_str().into(),
            uniq("missing").as_str().into(),
            "k".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn unroutable_messages_go_to_the_alternate_exchange() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let ae = uniq("ae");
    let x = uniq("x");
    declare_exchange(&ch, &ae, ExchangeKind::Fanout).await;
    within(ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        table(&[("alternate-exchange", s(&ae))]),
    ))
    .await
    .unwrap();
    let routed = temp_queue(&ch).await;
    let unrouted = temp_queue(&ch).await;
    bind(&ch, &routed, &x, "known").await;
    bind(&ch, &unrouted, &ae, "").await;
    publish_confirmed(&ch, &x, "known", b"routed").await;
    publish_confirmed(&ch, &x, "unknown", b"unroutable").await;
    assert_eq!(strings(drain(&ch, &routed).await), ["routed"]);
    assert_eq!(strings(drain(&ch, &unrouted).await), ["unroutable"]);
}

#[tokio::test]
async fn a_message_taken_by_the_alternate_exchange_is_not_returned_as_unroutable() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let ae = uniq("ae");
    let x = uniq("x");
    declare_exchange(&ch, &ae, ExchangeKind::Fanout).await;
    within(ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        table(&[("alternate-exchange", s(&ae))]),
    ))
    .await
    .unwrap();
    let unrouted = temp_queue(&ch).await;
    bind(&ch, &unrouted, &ae, "").await;
    let c = within(ch.basic_publish(
        x.as_str().into(),
        "unknown".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"to ae",
        BasicProperties::default(),
    ))
    .await
    .unwrap();
    let confirmation = within(c).await.unwrap();
    assert!(confirmation.is_ack());
    assert!(
        confirmation.take_message().is_none(),
        "routed via the AE, so not returned"
    );
    assert_eq!(strings(drain(&ch, &unrouted).await), ["to ae"]);
}

// ---------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn direct_exchange_routes_by_exact_key_to_every_matching_queue() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("direct");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    let q1 = temp_queue(&ch).await;
    let q2 = temp_queue(&ch).await;
    let q3 = temp_queue(&ch).await;
    bind(&ch, &q1, &x, "red").await;
    bind(&ch, &q2, &x, "red").await;
    bind(&ch, &q3, &x, "green").await;
    bind(&ch, &q3, &x, "red").await;
    publish_confirmed(&ch, &x, "red", b"r").await;
    publish_confirmed(&ch, &x, "green", b"g").await;
    publish_confirmed(&ch, &x, "Red", b"case").await;
    publish_confirmed(&ch, &x, "red.x", b"prefix").await;
    assert_eq!(strings(drain(&ch, &q1).await), ["r"]);
    assert_eq!(strings(drain(&ch, &q2).await), ["r"]);
    // Two bindings that both match still give one copy.
    assert_eq!(strings(drain(&ch, &q3).await), ["r", "g"]);
}

#[tokio::test]
async fn amq_direct_routes_by_key() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let key = uniq("key");
    bind(&ch, &q, "amq.direct", &key).await;
    publish_confirmed(&ch, "amq.direct", &key, b"yes").await;
    publish_confirmed(&ch, "amq.direct", &uniq("other"), b"no").await;
    assert_eq!(strings(drain(&ch, &q).await), ["yes"]);
}

#[tokio::test]
async fn fanout_exchange_routes_to_every_bound_queue_whatever_the_key() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("fanout");
    declare_exchange(&ch, &x, ExchangeKind::Fanout).await;
    let q1 = temp_queue(&ch).await;
    let q2 = temp_queue(&ch).await;
    let unbound = temp_queue(&ch).await;
    bind(&ch, &q1, &x, "").await;
    bind(&ch, &q2, &x, "ignored").await;
    publish_confirmed(&ch, &x, "anything", b"1").await;
    publish_confirmed(&ch, &x, "", b"2").await;
    assert_eq!(strings(drain(&ch, &q1).await), ["1", "2"]);
    assert_eq!(strings(drain(&ch, &q2).await), ["1", "2"]);
    assert!(drain(&ch, &unbound).await.is_empty());
}

#[tokio::test]
async fn amq_fanout_routes_to_bound_queues() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    bind(&ch, &q, "amq.fanout", "").await;
    publish_confirmed(&ch, "amq.fanout", "whatever", b"fan").await;
    // Other tests may share amq.fanout on a reference broker: look for ours.
    assert!(strings(drain(&ch, &q).await).contains(&"fan".to_string()));
}

#[tokio::test]
async fn topic_exchange_matches_star_and_hash_wildcards() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("topic");
    declare_exchange(&ch, &x, ExchangeKind::Topic).await;
    let patterns = [
        "a.*.c", "a.#", "#", "*.b.*", "a.b.c", "#.c", "a.#.c", "*", "a.*", "*.*.*.*",
    ];
    let mut queues = Vec::new();
    for p in patterns {
        let q = temp_queue(&ch).await;
        bind(&ch, &q, &x, p).await;
        queues.push(q);
    }
    let keys = [
        "a.b.c", "a.x.c", "a", "a.b", "a.c", "b.b.b", "a.b.b.c", "x.y.c", "c",
    ];
    for k in keys {
        publish_confirmed(&ch, &x, k, k.as_bytes()).await;
    }
    let expected: [&[&str]; 10] = [
        // a.*.c
        &["a.b.c", "a.x.c"],
        // a.#
        &["a.b.c", "a.x.c", "a", "a.b", "a.c", "a.b.b.c"],
        // #
        &keys,
        // *.b.*
        &["a.b.c", "b.b.b"],
        // a.b.c
        &["a.b.c"],
        // #.c
        &["a.b.c", "a.x.c", "a.c", "a.b.b.c", "x.y.c", "c"],
        // a.#.c
        &["a.b.c", "a.x.c", "a.c", "a.b.b.c"],
        // *
        &["a", "c"],
        // a.*
        &["a.b", "a.c"],
        // *.*.*.*
        &["a.b.b.c"],
    ];
    for ((p, q), want) in patterns.iter().zip(&queues).zip(expected) {
        assert_eq!(strings(drain(&ch, q).await), want, "pattern {p:?}");
    }
}

#[tokio::test]
async fn topic_empty_routing_key_has_no_words() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("topic");
    declare_exchange(&ch, &x, ExchangeKind::Topic).await;
    let patterns = ["#", "*", "", "#.#", "*.#"];
    let mut queues = Vec::new();
    for p in patterns {
        let q = temp_queue(&ch).await;
        bind(&ch, &q, &x, p).await;
        queues.push(q);
    }
    publish_confirmed(&ch, &x, "", b"empty").await;
    // RabbitMQ splits "" into zero words: `#` and "" match it, `*` needs one word.
    let expected: [&[&str]; 5] = [&["empty"], &[], &["empty"], &["empty"], &[]];
    for ((p, q), want) in patterns.iter().zip(&queues).zip(expected) {
        assert_eq!(strings(drain(&ch, q).await), want, "pattern {p:?}");
    }
}

#[tokio::test]
async fn amq_topic_routes_by_pattern() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let q = temp_queue(&ch).await;
    let word = uniq("w").replace('-', "_");
    bind(&ch, &q, "amq.topic", &format!("{word}.*")).await;
    publish_confirmed(&ch, "amq.topic", &format!("{word}.x"), b"yes").await;
    publish_confirmed(&ch, "amq.topic", &format!("{word}.x.y"), b"no").await;
    assert_eq!(strings(drain(&ch, &q).await), ["yes"]);
}

#[tokio::test]
async fn topic_binding_removed_by_unbind_stops_routing() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("topic");
    declare_exchange(&ch, &x, ExchangeKind::Topic).await;
    let q = temp_queue(&ch).await;
    bind(&ch, &q, &x, "a.#").await;
    bind(&ch, &q, &x, "*.b").await;
    within(ch.queue_unbind(
        q.as_str().into(),
        x.as_str().into(),
        "a.#".into(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, &x, "a.c", b"gone").await;
    publish_confirmed(&ch, &x, "a.b", b"kept").await;
    assert_eq!(strings(drain(&ch, &q).await), ["kept"]);
}

/// Binds one queue per argument table to a fresh headers exchange, publishes one
/// message per header table, and returns which messages each queue got.
async fn headers_routing(
    exchange_kind_name: Option<&str>,
    bindings: &[FieldTable],
    messages: &[(&str, FieldTable)],
) -> Vec<Vec<String>> {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = match exchange_kind_name {
        Some(name) => name.to_string(),
        None => {
            let x = uniq("headers");
            declare_exchange(&ch, &x, ExchangeKind::Headers).await;
            x
        }
    };
    let mut queues = Vec::new();
    for args in bindings {
        let q = temp_queue(&ch).await;
        bind_args(&ch, &q, &x, "", args.clone()).await;
        queues.push(q);
    }
    for (body, headers) in messages {
        publish_headers(&ch, &x, body, headers.clone()).await;
    }
    let mut out = Vec::new();
    for q in &queues {
        out.push(strings(drain(&ch, q).await));
    }
    out
}

#[tokio::test]
async fn headers_exchange_x_match_all_and_any() {
    let got = headers_routing(
        None,
        &[
            table(&[
                ("x-match", s("all")),
                ("fmt", s("pdf")),
                ("type", s("report")),
            ]),
            table(&[
                ("x-match", s("any")),
                ("fmt", s("pdf")),
                ("type", s("report")),
            ]),
            // x-match defaults to all.
            table(&[("fmt", s("pdf"))]),
        ],
        &[
            ("both", table(&[("fmt", s("pdf")), ("type", s("report"))])),
            (
                "both+extra",
                table(&[("fmt", s("pdf")), ("type", s("report")), ("lang", s("en"))]),
            ),
            ("fmt only", table(&[("fmt", s("pdf"))])),
            ("type only", table(&[("type", s("report"))])),
            (
                "wrong value",
                table(&[("fmt", s("doc")), ("type", s("log"))]),
            ),
            ("none", FieldTable::default()),
        ],
    )
    .await;
    assert_eq!(got[0], ["both", "both+extra"], "x-match all");
    assert_eq!(
        got[1],
        ["both", "both+extra", "fmt only", "type only"],
        "x-match any"
    );
    assert_eq!(got[2], ["both", "both+extra", "fmt only"], "default all");
}

#[tokio::test]
async fn headers_exchange_ignores_x_headers_unless_x_match_is_with_x() {
    let got = headers_routing(
        None,
        &[
            table(&[("x-match", s("all")), ("x-tag", s("t1")), ("k", s("v"))]),
            table(&[("x-match", s("any")), ("x-tag", s("t1"))]),
            table(&[
                ("x-match", s("all-with-x")),
                ("x-tag", s("t1")),
                ("k", s("v")),
            ]),
            table(&[
                ("x-match", s("any-with-x")),
                ("x-tag", s("t1")),
                ("k", s("nope")),
            ]),
        ],
        &[
            ("k only", table(&[("k", s("v"))])),
            ("k and tag", table(&[("k", s("v")), ("x-tag", s("t1"))])),
            ("tag only", table(&[("x-tag", s("t1"))])),
        ],
    )
    .await;
    // all: x-tag in the binding is ignored, so "k" alone decides.
    assert_eq!(got[0], ["k only", "k and tag"], "all");
    // any with only x- keys in the binding: nothing to match.
    assert!(got[1].is_empty(), "any: {:?}", got[1]);
    assert_eq!(got[2], ["k and tag"], "all-with-x");
    assert_eq!(got[3], ["k and tag", "tag only"], "any-with-x");
}

#[tokio::test]
async fn headers_exchange_matches_typed_values() {
    let got = headers_routing(
        None,
        &[
            table(&[("x-match", s("all")), ("n", AMQPValue::LongInt(42))]),
            table(&[("x-match", s("all")), ("flag", AMQPValue::Boolean(true))]),
        ],
        &[
            ("42", table(&[("n", AMQPValue::LongInt(42))])),
            ("43", table(&[("n", AMQPValue::LongInt(43))])),
            ("str 42", table(&[("n", s("42"))])),
            ("true", table(&[("flag", AMQPValue::Boolean(true))])),
            ("false", table(&[("flag", AMQPValue::Boolean(false))])),
        ],
    )
    .await;
    assert_eq!(got[0], ["42"]);
    assert_eq!(got[1], ["true"]);
}

#[tokio::test]
async fn amq_match_and_amq_headers_route_by_headers() {
    let tag = uniq("tag");
    for x in ["amq.match", "amq.headers"] {
        let got = headers_routing(
            Some(x),
            &[table(&[("x-match", s("any")), ("tag", s(&tag))])],
            &[
                ("mine", table(&[("tag", s(&tag))])),
                ("other", table(&[("tag", s("other"))])),
            ],
        )
        .await;
        assert_eq!(got[0], ["mine"], "{x}");
    }
}

#[tokio::test]
async fn an_empty_all_headers_binding_matches_every_message() {
    let got = headers_routing(
        None,
        &[table(&[("x-match", s("all"))])],
        &[
            ("plain", FieldTable::default()),
            ("with headers", table(&[("a", s("b"))])),
        ],
    )
    .await;
    assert_eq!(got[0], ["plain", "with headers"]);
}

// ---------------------------------------------------------------------------------------
// Sender-selected distribution (CC and BCC headers)

fn keys(xs: &[&str]) -> AMQPValue {
    AMQPValue::FieldArray(xs.iter().map(|x| s(x)).collect::<Vec<_>>().into())
}

/// Publishes (confirmed) with these headers; returns the confirmation.
async fn publish_with(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &str,
    headers: FieldTable,
    mandatory: bool,
) -> lapin::Confirmation {
    let c = within(ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions {
            mandatory,
            ..Default::default()
        },
        body.as_bytes(),
        BasicProperties::default().with_headers(headers),
    ))
    .await
    .expect("basic.publish");
    within(c).await.expect("confirm")
}

#[tokio::test]
async fn cc_and_bcc_headers_add_routing_keys_and_bcc_is_removed_before_delivery() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("direct");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    let (qa, qb, qc, qd) = (
        temp_queue(&ch).await,
        temp_queue(&ch).await,
        temp_queue(&ch).await,
        temp_queue(&ch).await,
    );
    bind(&ch, &qa, &x, "a").await;
    bind(&ch, &qb, &x, "b").await;
    bind(&ch, &qc, &x, "c").await;
    bind(&ch, &qd, &x, "d").await;
    let headers = table(&[
        ("CC", keys(&["b", "a"])),
        ("BCC", keys(&["c"])),
        ("other", s("kept")),
    ]);
    publish_with(&ch, &x, "a", "m", headers, false).await;
    for q in [&qa, &qb, &qc] {
        let m = get(&ch, q).await.expect("one copy in each CC/BCC queue");
        assert_eq!(m.delivery.data, b"m");
        assert_eq!(
            m.delivery.routing_key.as_str(),
            "a",
            "the publish's routing key"
        );
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        assert!(h.inner().contains_key("CC"), "CC stays");
        assert!(!h.inner().contains_key("BCC"), "BCC is removed: {h:?}");
        assert_eq!(h.inner().get("other"), Some(&s("kept")));
        assert!(get(&ch, q).await.is_none(), "one copy per queue");
    }
    assert!(get(&ch, &qd).await.is_none());
    // A BCC key alone makes a mandatory message routable.
    let c = publish_with(
        &ch,
        &x,
        "nowhere",
        "bcc only",
        table(&[("BCC", keys(&["d"]))]),
        true,
    )
    .await;
    assert!(c.take_message().is_none(), "routed by its BCC key");
    assert_eq!(strings(drain(&ch, &qd).await), ["bcc only"]);
}

#[tokio::test]
async fn cc_routes_on_topic_and_default_exchanges() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let x = uniq("topic");
    declare_exchange(&ch, &x, ExchangeKind::Topic).await;
    let (q1, q2) = (temp_queue(&ch).await, temp_queue(&ch).await);
    bind(&ch, &q1, &x, "orders.#").await;
    publish_with(
        &ch,
        &x,
        "invoices.eu",
        "topic",
        table(&[("CC", keys(&["orders.eu.new"]))]),
        false,
    )
    .await;
    assert_eq!(strings(drain(&ch, &q1).await), ["topic"]);
    // The default exchange: each key names a queue.
    publish_with(
        &ch,
        "",
        &q1,
        "default",
        table(&[("CC", keys(&[&q2])), ("BCC", keys(&[&q1]))]),
        false,
    )
    .await;
    assert_eq!(strings(drain(&ch, &q1).await), ["default"]);
    assert_eq!(strings(drain(&ch, &q2).await), ["default"]);
}

#[tokio::test]
async fn a_cc_or_bcc_header_that_is_not_an_array_fails_with_406() {
    let t = Target::start().await;
    for (name, value) in [
        ("CC", s("a")),
        ("BCC", AMQPValue::LongInt(5)),
        ("CC", AMQPValue::FieldTable(FieldTable::default())),
    ] {
        let (_conn, ch) = t.channel().await;
        let mut closed = sentinel(&ch).await;
        let _ = within(ch.basic_publish(
            "amq.direct".into(),
            "a".into(),
            BasicPublishOptions::default(),
            b"bad",
            BasicProperties::default().with_headers(table(&[(name, value.clone())])),
        ))
        .await;
        assert_eq!(
            channel_closed_with(&mut closed).await,
            Some(406),
            "{name} = {value:?}"
        );
    }
}

#[tokio::test]
async fn headers_exchange_compares_numbers_by_value_across_types() {
    use lapin::types::DecimalValue;
    let bindings = [
        AMQPValue::LongInt(42),
        AMQPValue::LongLongInt(42),
        AMQPValue::Double(42.0),
        AMQPValue::ShortShortInt(42),
    ];
    let headers = [
        ("byte", AMQPValue::ShortShortInt(42)),
        ("ubyte", AMQPValue::ShortShortUInt(42)),
        ("short", AMQPValue::ShortInt(42)),
        ("ushort", AMQPValue::ShortUInt(42)),
        ("int", AMQPValue::LongInt(42)),
        ("uint", AMQPValue::LongUInt(42)),
        ("long", AMQPValue::LongLongInt(42)),
        ("float", AMQPValue::Float(42.0)),
        ("double", AMQPValue::Double(42.0)),
        ("timestamp", AMQPValue::Timestamp(42)),
        // Not numbers, or other values: no match.
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 0,
                value: 42,
            }),
        ),
        ("string", s("42")),
        ("43", AMQPValue::LongInt(43)),
        ("42.5", AMQPValue::Double(42.5)),
        ("true", AMQPValue::Boolean(true)),
    ];
    let got = headers_routing(
        None,
        &bindings
            .iter()
            .map(|v| table(&[("n", v.clone())]))
            .collect::<Vec<_>>(),
        &headers
            .iter()
            .map(|(name, v)| (*name, table(&[("n", v.clone())])))
            .collect::<Vec<_>>(),
    )
    .await;
    let numbers = [
        "byte",
        "ubyte",
        "short",
        "ushort",
        "int",
        "uint",
        "long",
        "float",
        "double",
        "timestamp",
    ];
    for (b, g) in bindings.iter().zip(got) {
        assert_eq!(g, numbers, "binding {b:?}");
    }
}

#[tokio::test]
async fn binding_with_an_invalid_x_match_fails_with_406() {
    let t = Target::start().await;
    for value in [s("bogus"), s("ALL"), AMQPValue::LongInt(5)] {
        let (_conn, ch) = t.channel().await;
        let q = temp_queue(&ch).await;
        let r = within(ch.queue_bind(
            q.as_str().into(),
            "amq.headers".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", value.clone())]),
        ))
        .await;
        assert_code(r, 406);
    }
    // The four valid values bind.
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    for value in ["all", "any", "all-with-x", "any-with-x"] {
        bind_args(&ch, &q, "amq.headers", "", table(&[("x-match", s(value))])).await;
    }
}

#[tokio::test]
async fn dead_lettering_routes_with_the_cc_keys_too_and_lists_them_in_x_death() {
    let t = Target::start().await;
    let (_conn, ch) = confirm_channel(&t).await;
    let dlx = uniq("dlx");
    declare_exchange(&ch, &dlx, ExchangeKind::Direct).await;
    let (by_key, by_cc) = (temp_queue(&ch).await, temp_queue(&ch).await);
    bind(&ch, &by_key, &dlx, "rk").await;
    bind(&ch, &by_cc, &dlx, "cc1").await;
    let src = uniq("cc-source");
    within(ch.queue_declare(
        src.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        table(&[("x-dead-letter-exchange", s(&dlx))]),
    ))
    .await
    .expect("queue.declare");
    let x = uniq("cc-direct");
    declare_exchange(&ch, &x, ExchangeKind::Direct).await;
    bind(&ch, &src, &x, "rk").await;
    publish_with(&ch, &x, "rk", "m", table(&[("CC", keys(&["cc1"]))]), false).await;
    let m = get(&ch, &src).await.expect("the message");
    within(m.delivery.reject(BasicRejectOptions { requeue: false }))
        .await
        .unwrap();
    for q in [&by_key, &by_cc] {
        let mut got = None;
        for _ in 0..100 {
            got = get(&ch, q).await;
            if got.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let m = got.expect("dead-lettered by its routing key and by its CC key");
        let h = m.delivery.properties.headers().clone().unwrap_or_default();
        let Some(AMQPValue::FieldArray(deaths)) = h.inner().get("x-death") else {
            panic!("no x-death: {h:?}");
        };
        let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
            panic!("empty x-death");
        };
        assert_eq!(
            death.inner().get("routing-keys"),
            Some(&keys(&["rk", "cc1"])),
            "x-death routing-keys"
        );
    }
}
