//! Topic permissions (RabbitMQ's topic authorisation): write and read patterns over
//! routing keys on a topic exchange, with `{username}` and `{vhost}` expanded, set
//! through the management API, enforced on publishes and binds with RabbitMQ's 403
//! texts (checked against the reference RabbitMQ 3.10), stored durably and carried by
//! definitions export and import.

mod common;
mod util;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use serde_json::json;
use util::http::{Response, request};
use util::within;
use warren::{Broker, Config};

async fn api(b: &Broker, method: &str, path: &str, body: Option<serde_json::Value>) -> Response {
    let addr = b.management_addr().expect("management listener");
    request(addr, method, path, Some(("guest", "guest")), body.as_ref()).await
}

/// (reply code, reply text) of a lapin protocol error.
fn reply(e: &lapin::Error) -> (u16, String) {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => (amqp.get_id(), amqp.get_message().to_string()),
        other => panic!("expected an AMQP error, got {other:?}"),
    }
}

fn refused(key: &str) -> (u16, String) {
    (
        403,
        format!(
            "ACCESS_REFUSED - access to topic '{key}' in exchange 'amq.topic' in vhost '/' \
             refused for user 'tp'"
        ),
    )
}

/// User `tp` (password `tp`) with every ordinary permission on `/`.
async fn add_user(b: &Broker) {
    let r = api(
        b,
        "PUT",
        "/api/users/tp",
        Some(json!({"password": "tp", "tags": ""})),
    )
    .await;
    assert_eq!(r.status, 201);
    let all = json!({"configure": ".*", "write": ".*", "read": ".*"});
    assert_eq!(
        api(b, "PUT", "/api/permissions/%2f/tp", Some(all))
            .await
            .status,
        201
    );
}

async fn channel_as_tp(b: &Broker) -> (Connection, Channel) {
    let url = format!("amqp://tp:tp@{}/%2f", b.local_addr());
    let conn = within(Connection::connect(&url, ConnectionProperties::default()))
        .await
        .expect("tp logs in");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (conn, ch)
}

/// Publishes with a confirm: Ok(acked) or the channel's error.
async fn publish(ch: &Channel, exchange: &str, key: &str) -> lapin::Result<bool> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await?;
    Ok(within(confirm).await?.is_ack())
}

const RULE: &str = r"^{username}\.";

#[tokio::test]
async fn publishes_and_binds_on_a_topic_exchange_follow_the_users_topic_permission() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    add_user(b).await;
    let path = "/api/topic-permissions/%2f/tp";
    let rule = json!({"exchange": "amq.topic", "write": RULE, "read": r"^{vhost}-r\."});
    assert_eq!(api(b, "PUT", path, Some(rule.clone())).await.status, 201);
    assert_eq!(api(b, "PUT", path, Some(rule)).await.status, 204);
    let r = api(b, "PUT", path, Some(json!({"write": "x"}))).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["reason"],
        "[{key_missing,exchange},{key_missing,read}]"
    );
    let r = api(
        b,
        "PUT",
        "/api/topic-permissions/%2f/nobody",
        Some(json!({"exchange": "amq.topic", "write": "x", "read": "y"})),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (400, json!("vhost_or_user_not_found"))
    );
    let listed = api(b, "GET", "/api/topic-permissions", None).await.json();
    assert_eq!(
        listed,
        json!([{"user": "tp", "vhost": "/", "exchange": "amq.topic",
                "write": RULE, "read": r"^{vhost}-r\."}])
    );
    assert_eq!(
        api(b, "GET", "/api/users/tp/topic-permissions", None)
            .await
            .json(),
        listed
    );

    let (_conn, ch) = channel_as_tp(b).await;
    ch.queue_declare("tp-q".into(), Default::default(), FieldTable::default())
        .await
        .expect("queue");
    // {vhost} is "/": the binding key "/-r.#" matches ^/-r\.
    ch.queue_bind(
        "tp-q".into(),
        "amq.topic".into(),
        "/-r.#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("read pattern allows the binding key");
    let e = ch
        .queue_bind(
            "tp-q".into(),
            "amq.topic".into(),
            "tp.#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("read pattern refuses tp.#");
    assert_eq!(reply(&e), refused("tp.#"));
    let (_conn, ch) = channel_as_tp(b).await;
    // The same allowed key again and again (the channel's cache), and a key on a
    // direct exchange, which topic permissions do not cover.
    for _ in 0..3 {
        assert!(
            publish(&ch, "amq.topic", "tp.orders")
                .await
                .expect("allowed")
        );
    }
    assert!(
        publish(&ch, "amq.direct", "other.x")
            .await
            .expect("not topic")
    );
    let e = publish(&ch, "amq.topic", "other.x")
        .await
        .expect_err("write pattern refuses other.x");
    assert_eq!(reply(&e), refused("other.x"));

    let (_conn, ch) = channel_as_tp(b).await;
    let e = ch
        .queue_unbind(
            "tp-q".into(),
            "amq.topic".into(),
            "x.a".into(),
            FieldTable::default(),
        )
        .await
        .expect_err("unbind needs read on the key too");
    assert_eq!(reply(&e), refused("x.a"));
    let (_conn, ch) = channel_as_tp(b).await;
    ch.exchange_declare(
        "tp-fan".into(),
        lapin::ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let e = ch
        .exchange_bind(
            "tp-fan".into(),
            "amq.topic".into(),
            "x.a".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("an exchange bound from amq.topic needs read on the key");
    assert_eq!(reply(&e), refused("x.a"));

    // A channel that published already sees a changed permission at once.
    let (_conn, ch) = channel_as_tp(b).await;
    assert!(publish(&ch, "amq.topic", "tp.a").await.expect("allowed"));
    let open = json!({"exchange": "amq.topic", "write": ".*", "read": ".*"});
    assert_eq!(api(b, "PUT", path, Some(open)).await.status, 204);
    assert!(
        publish(&ch, "amq.topic", "other.x")
            .await
            .expect("now allowed")
    );
    let strict = json!({"exchange": "amq.topic", "write": "^tp\\.", "read": ".*"});
    assert_eq!(api(b, "PUT", path, Some(strict)).await.status, 204);
    let e = publish(&ch, "amq.topic", "other.y")
        .await
        .expect_err("refused again");
    assert_eq!(reply(&e), refused("other.y"));

    // The management API's publish is authorised as RabbitMQ's direct channel is.
    let addr = b.management_addr().expect("api");
    let body = json!({"routing_key": "other.z", "payload": "x", "payload_encoding": "string",
                      "properties": {}});
    let r = request(
        addr,
        "POST",
        "/api/exchanges/%2f/amq.topic/publish",
        Some(("tp", "tp")),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 401, "{:?}", String::from_utf8_lossy(&r.body));

    assert_eq!(api(b, "DELETE", path, None).await.status, 204);
    assert_eq!(api(b, "DELETE", path, None).await.status, 404);
    assert_eq!(api(b, "GET", path, None).await.status, 404);
}

#[tokio::test]
async fn topic_permissions_survive_a_restart_and_travel_in_definitions() {
    let dir = std::env::temp_dir().join(util::uniq("warren-topic-perms"));
    let config = Config::for_tests(&dir);
    let exported = {
        let b = Broker::start(config.clone()).await.expect("start");
        add_user(&b).await;
        for x in ["amq.topic", "logs"] {
            let rule = json!({"exchange": x, "write": RULE, "read": ".*"});
            let r = api(&b, "PUT", "/api/topic-permissions/%2f/tp", Some(rule)).await;
            assert!(r.status == 201 || r.status == 204);
        }
        // Clearing one exchange's permission keeps the other.
        let r = api(
            &b,
            "DELETE",
            "/api/topic-permissions/%2f/tp?exchange=logs",
            None,
        )
        .await;
        assert_eq!(r.status, 204);
        let defs = api(&b, "GET", "/api/definitions", None).await.json();
        b.shutdown().await;
        defs
    };
    let expected = json!([{"user": "tp", "vhost": "/", "exchange": "amq.topic",
                           "write": RULE, "read": ".*"}]);
    assert_eq!(exported["topic_permissions"], expected);

    let b = Broker::start(config).await.expect("restart");
    let listed = api(&b, "GET", "/api/topic-permissions", None).await.json();
    assert_eq!(listed, expected, "stored durably");
    let (_conn, ch) = channel_as_tp(&b).await;
    let e = publish(&ch, "amq.topic", "other.x")
        .await
        .expect_err("enforced after the restart");
    assert_eq!(reply(&e), refused("other.x"));
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let fresh = common::TestBroker::start().await;
    let fb = fresh.broker.as_ref().expect("broker");
    let r = api(fb, "POST", "/api/definitions", Some(exported)).await;
    assert!(r.status == 201 || r.status == 204, "{}", r.status);
    let listed = api(fb, "GET", "/api/topic-permissions", None).await.json();
    assert_eq!(listed, expected, "imported");
}
