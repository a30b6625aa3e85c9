//! Policies through the management API and `warren ctl`, in RabbitMQ's JSON and with
//! its validation texts (checked against the reference RabbitMQ 3.10), stored durably
//! and carried by definitions export and import.

mod common;
mod util;

use serde_json::{Value, json};
use util::http::{Response, request};
use warren::{Broker, Config};

async fn api(b: &Broker, method: &str, path: &str, body: Option<Value>) -> Response {
    let addr = b.management_addr().expect("management listener");
    request(addr, method, path, Some(("guest", "guest")), body.as_ref()).await
}

async fn ctl(b: &Broker, args: &[&str]) -> (bool, String, String) {
    let url = format!("http://{}", b.management_addr().expect("api"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["ctl", "--url", &url])
        .args(args)
        .output()
        .await
        .expect("warren ctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn reason(r: &Response) -> (u16, String) {
    (
        r.status,
        r.json()["reason"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn policies_are_put_listed_validated_and_deleted_as_in_rabbitmq() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let p = "/api/policies/%2f/limits";
    let body = json!({"pattern": "^q", "definition": {"max-length": 10},
                      "priority": 1, "apply-to": "queues"});
    assert_eq!(api(b, "PUT", p, Some(body)).await.status, 201);
    // Replaced; priority and apply-to default to 0 and "all".
    let body = json!({"pattern": "^q", "definition": {"max-length": 10}});
    assert_eq!(api(b, "PUT", p, Some(body)).await.status, 204);
    let expected = json!({"vhost": "/", "name": "limits", "pattern": "^q", "apply-to": "all",
                          "definition": {"max-length": 10}, "priority": 0});
    assert_eq!(
        api(b, "GET", "/api/policies", None).await.json(),
        json!([expected])
    );
    assert_eq!(
        api(b, "GET", "/api/policies/%2f", None).await.json(),
        json!([expected])
    );
    assert_eq!(api(b, "GET", p, None).await.json(), expected);

    let bad = "/api/policies/%2f/bad";
    let cases = [
        (
            json!({"pattern": "^q", "definition": {"foo": 1}}),
            "Validation failed\n\n[{<<\"foo\">>,1}] are not recognised policy settings\n",
        ),
        (
            json!({"pattern": "x", "definition": {"max-length": 1}, "apply-to": "bogus"}),
            "Validation failed\n\napply-to 'bogus' unrecognised; should be 'queues', 'exchanges' or 'all'\n",
        ),
        (
            json!({"pattern": "x", "definition": {}}),
            "Validation failed\n\nno policy provided\n",
        ),
        (
            json!({"definition": {"max-length": 1}}),
            "[{key_missing,pattern}]",
        ),
    ];
    for (body, text) in cases {
        let r = api(b, "PUT", bad, Some(body)).await;
        assert_eq!(reason(&r), (400, text.to_string()));
    }
    let r = api(
        b,
        "PUT",
        bad,
        Some(json!({"pattern": "^q", "definition": {"max-length": "x"}})),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        reason(&r).1.contains("is not a valid maximum length"),
        "{:?}",
        reason(&r)
    );
    let r = api(
        b,
        "PUT",
        bad,
        Some(json!({"pattern": "^q", "definition": {"dead-letter-strategy": "bogus"}})),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        reason(&r).1.contains("is not a valid dead letter strategy"),
        "{:?}",
        reason(&r)
    );
    let r = api(
        b,
        "PUT",
        bad,
        Some(json!({"pattern": "(", "definition": {"max-length": 1}})),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        reason(&r).1.starts_with(
            "Validation failed\n\npattern should be regular expression but is invalid"
        )
    );
    // Settings Warren keeps but does not act on (from RabbitMQ definitions) load.
    let ha = json!({"pattern": ".*", "definition": {"ha-mode": "all", "queue-mode": "lazy"}});
    assert_eq!(
        api(b, "PUT", "/api/policies/%2f/ha", Some(ha)).await.status,
        201
    );
    assert_eq!(api(b, "GET", bad, None).await.status, 404);
    assert_eq!(api(b, "DELETE", p, None).await.status, 204);
    assert_eq!(api(b, "DELETE", p, None).await.status, 404);
    assert_eq!(
        api(
            b,
            "PUT",
            "/api/policies/nowhere/x",
            Some(json!({"pattern": "x", "definition": {"max-length": 1}}))
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn policies_are_set_listed_and_cleared_with_warren_ctl() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let (ok, out, err) = ctl(
        b,
        &[
            "set_policy",
            "ttl",
            "^orders\\.",
            r#"{"message-ttl":60000,"dead-letter-exchange":"dlx"}"#,
            "--priority",
            "5",
            "--apply-to",
            "queues",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("Setting policy \"ttl\""), "{out}");
    let (ok, out, _) = ctl(b, &["list_policies"]).await;
    assert!(ok);
    assert_eq!(
        out,
        "vhost\tname\tpattern\tapply-to\tdefinition\tpriority\n\
         /\tttl\t^orders\\.\tqueues\t{\"dead-letter-exchange\":\"dlx\",\"message-ttl\":60000}\t5\n"
    );
    let (ok, _, err) = ctl(b, &["set_policy", "bad", ".*", r#"{"nope":1}"#]).await;
    assert!(!ok);
    assert!(err.contains("are not recognised policy settings"), "{err}");
    let (ok, _, err) = ctl(b, &["clear_policy", "ttl"]).await;
    assert!(ok, "{err}");
    let (_, out, _) = ctl(b, &["list_policies"]).await;
    assert_eq!(
        out,
        "vhost\tname\tpattern\tapply-to\tdefinition\tpriority\n"
    );
    let (ok, _, _) = ctl(b, &["clear_policy", "ttl"]).await;
    assert!(!ok, "nothing left to clear");
}

#[tokio::test]
async fn policies_survive_a_restart_and_travel_in_definitions() {
    let dir = std::env::temp_dir().join(util::uniq("warren-policies"));
    let config = Config::for_tests(&dir);
    let policy = json!({"vhost": "/", "name": "cap", "pattern": "^cap", "apply-to": "queues",
                        "definition": {"max-length": 3, "overflow": "reject-publish"},
                        "priority": 2});
    let exported = {
        let b = Broker::start(config.clone()).await.expect("start");
        let r = api(&b, "PUT", "/api/policies/%2f/cap", Some(policy.clone())).await;
        assert_eq!(r.status, 201);
        let defs = api(&b, "GET", "/api/definitions", None).await.json();
        b.shutdown().await;
        defs
    };
    assert_eq!(exported["policies"], json!([policy]));
    let b = Broker::start(config).await.expect("restart");
    assert_eq!(
        api(&b, "GET", "/api/policies", None).await.json(),
        json!([policy])
    );
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let fresh = common::TestBroker::start().await;
    let fb = fresh.broker.as_ref().expect("broker");
    let r = api(fb, "POST", "/api/definitions", Some(exported)).await;
    assert!(r.status == 201 || r.status == 204, "{}", r.status);
    assert_eq!(
        api(fb, "GET", "/api/policies", None).await.json(),
        json!([policy])
    );
}

/// Publishes `n` persistent messages to `queue` through the default exchange, confirmed.
async fn fill(ch: &lapin::Channel, queue: &str, n: usize) {
    for i in 0..n {
        ch.basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

/// Ready messages of `queue` (a passive declare).
async fn depth(ch: &lapin::Channel, queue: &str) -> u32 {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

#[tokio::test]
async fn a_policy_in_force_limits_existing_and_new_queues_and_clearing_it_lifts_the_limit() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let plain = lapin::options::QueueDeclareOptions::default();
    let none = lapin::types::FieldTable::default;
    ch.queue_declare("lim.old".into(), plain, none())
        .await
        .unwrap();
    fill(&ch, "lim.old", 5).await;

    // max-length 2 (drop-head): the existing queue drops from its head at once.
    let body = json!({"pattern": "^lim\\.", "definition": {"max-length": 2},
                      "apply-to": "queues"});
    assert_eq!(
        api(b, "PUT", "/api/policies/%2f/lim", Some(body))
            .await
            .status,
        201
    );
    assert_eq!(
        depth(&ch, "lim.old").await,
        2,
        "trimmed to the policy's limit"
    );
    fill(&ch, "lim.old", 3).await;
    assert_eq!(depth(&ch, "lim.old").await, 2);
    // A queue declared afterwards has it too; one that does not match does not.
    ch.queue_declare("lim.new".into(), plain, none())
        .await
        .unwrap();
    fill(&ch, "lim.new", 4).await;
    assert_eq!(depth(&ch, "lim.new").await, 2);
    ch.queue_declare("other".into(), plain, none())
        .await
        .unwrap();
    fill(&ch, "other", 4).await;
    assert_eq!(depth(&ch, "other").await, 4, "the pattern does not match");

    // The queue's own x-max-length wins when lower; the policy's when the policy's is.
    let mut one = lapin::types::FieldTable::default();
    one.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    ch.queue_declare("lim.own".into(), plain, one)
        .await
        .unwrap();
    fill(&ch, "lim.own", 3).await;
    assert_eq!(depth(&ch, "lim.own").await, 1, "the lower of the two");

    // reject-publish through the policy: the publisher gets nacks.
    let body = json!({"pattern": "^lim\\.", "definition": {"max-length": 2,
                      "overflow": "reject-publish"}, "apply-to": "queues"});
    assert_eq!(
        api(b, "PUT", "/api/policies/%2f/lim", Some(body))
            .await
            .status,
        204
    );
    let confirm = ch
        .basic_publish(
            "".into(),
            "lim.new".into(),
            lapin::options::BasicPublishOptions::default(),
            b"refused",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_nack(), "reject-publish from the policy nacks");

    // Cleared: the limit is gone.
    assert_eq!(
        api(b, "DELETE", "/api/policies/%2f/lim", None).await.status,
        204
    );
    fill(&ch, "lim.new", 3).await;
    assert_eq!(depth(&ch, "lim.new").await, 5);
}

#[tokio::test]
async fn a_policy_gives_exchanges_an_alternate_exchange_unless_they_name_one() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let none = lapin::types::FieldTable::default;
    ch.exchange_declare(
        "ae.in".into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions::default(),
        none(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "unrouted".into(),
        lapin::options::QueueDeclareOptions::default(),
        none(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "unrouted".into(),
        "amq.fanout".into(),
        "".into(),
        lapin::options::QueueBindOptions::default(),
        none(),
    )
    .await
    .unwrap();
    let body = json!({"pattern": "^ae\\.", "definition": {"alternate-exchange": "amq.fanout"},
                      "apply-to": "exchanges"});
    assert_eq!(
        api(b, "PUT", "/api/policies/%2f/ae", Some(body))
            .await
            .status,
        201
    );
    ch.basic_publish(
        "ae.in".into(),
        "nowhere".into(),
        lapin::options::BasicPublishOptions::default(),
        b"caught",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eq!(
        depth(&ch, "unrouted").await,
        1,
        "the policy's alternate exchange took it"
    );
    assert_eq!(
        api(b, "DELETE", "/api/policies/%2f/ae", None).await.status,
        204
    );
    ch.basic_publish(
        "ae.in".into(),
        "nowhere".into(),
        lapin::options::BasicPublishOptions::default(),
        b"dropped",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eq!(depth(&ch, "unrouted").await, 1, "no alternate once cleared");
}
