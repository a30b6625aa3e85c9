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
