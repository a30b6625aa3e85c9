//! The management HTTP API over plain HTTP against a real node: authentication and the
//! tags' rights, queues and exchanges declared, published to, read and purged through
//! the API and seen over AMQP, connections listed and closed, definitions exported from
//! RabbitMQ 3.10 imported (at runtime and at boot), and Debian's rabbitmqadmin driving
//! a node.

mod common;
mod util;

use std::net::SocketAddr;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use util::http::{Response, request};
use util::within;
use warren::{Broker, Config};

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

fn api(b: &Broker) -> SocketAddr {
    b.management_addr().expect("management listener")
}

async fn get(b: &Broker, path: &str) -> Response {
    request(api(b), "GET", path, GUEST, None).await
}

async fn put(b: &Broker, path: &str, body: Value) -> Response {
    request(api(b), "PUT", path, GUEST, Some(&body)).await
}

async fn post(b: &Broker, path: &str, body: Value) -> Response {
    request(api(b), "POST", path, GUEST, Some(&body)).await
}

async fn delete(b: &Broker, path: &str) -> Response {
    request(api(b), "DELETE", path, GUEST, None).await
}

fn broker(t: &common::TestBroker) -> &Broker {
    t.broker.as_ref().expect("broker")
}

#[tokio::test]
async fn logins_and_tags_decide_what_a_caller_may_do_with_rabbitmqs_json_errors() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    let r = request(
        api(b),
        "GET",
        "/api/overview",
        Some(("guest", "nope")),
        None,
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"error": "not_authorized", "reason": "Login failed"})
    );
    assert!(
        r.header("www-authenticate")
            .is_some_and(|h| h.starts_with("Basic"))
    );
    let r = request(api(b), "GET", "/api/overview", None, None).await;
    assert_eq!(r.status, 401);

    assert_eq!(
        put(b, "/api/users/plain", json!({"password": "pw", "tags": ""}))
            .await
            .status,
        201
    );
    let r = request(api(b), "GET", "/api/overview", Some(("plain", "pw")), None).await;
    assert_eq!(
        (r.status, r.json()),
        (
            401,
            json!({"error": "not_authorised", "reason": "Not management user"})
        )
    );
    assert_eq!(
        put(
            b,
            "/api/users/watcher",
            json!({"password": "pw", "tags": "monitoring"})
        )
        .await
        .status,
        201
    );
    let watcher = Some(("watcher", "pw"));
    let r = request(api(b), "GET", "/api/overview", watcher, None).await;
    assert_eq!(r.status, 200);
    let r = request(api(b), "GET", "/api/users", watcher, None).await;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (401, json!("Not administrator user"))
    );
    let r = request(api(b), "GET", "/api/whoami", watcher, None).await;
    assert_eq!(r.json(), json!({"name": "watcher", "tags": ["monitoring"]}));

    let r = get(b, "/api/queues/%2f/missing").await;
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"error": "Object Not Found", "reason": "Not Found"})
        )
    );
    let r = put(b, "/api/queues/%2f/q", json!({"durable": "x"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_request");
}

#[tokio::test]
async fn a_queue_declared_published_to_and_read_through_the_api_is_the_one_amqp_sees() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    assert_eq!(
        put(b, "/api/queues/%2f/jobs", json!({"durable": true}))
            .await
            .status,
        201
    );
    assert_eq!(
        put(b, "/api/queues/%2f/jobs", json!({"durable": true}))
            .await
            .status,
        204
    );
    assert_eq!(
        put(b, "/api/exchanges/%2f/work", json!({"type": "topic"}))
            .await
            .status,
        201
    );
    let r = post(
        b,
        "/api/bindings/%2f/e/work/q/jobs",
        json!({"routing_key": "job.*", "arguments": {}}),
    )
    .await;
    assert_eq!(r.status, 201);
    for i in 0..3 {
        let r = post(
            b,
            "/api/exchanges/%2f/work/publish",
            json!({"routing_key": "job.a", "payload": format!("m{i}"),
                   "payload_encoding": "string", "properties": {"delivery_mode": 2}}),
        )
        .await;
        assert_eq!(r.json(), json!({"routed": true}));
    }
    let r = post(
        b,
        "/api/exchanges/%2f/work/publish",
        json!({"routing_key": "other", "payload": "x", "payload_encoding": "string", "properties": {}}),
    )
    .await;
    assert_eq!(r.json(), json!({"routed": false}));

    let q = get(b, "/api/queues/%2f/jobs").await.json();
    assert_eq!(q["messages"], 3);
    assert_eq!(q["messages_ready"], 3);
    assert_eq!(q["messages_unacknowledged"], 0);
    assert_eq!(q["durable"], true);
    assert_eq!(q["message_stats"]["publish"], 3);

    // A peek that requeues, then one that takes the head for good.
    let got = post(
        b,
        "/api/queues/%2f/jobs/get",
        json!({"count": 2, "ackmode": "ack_requeue_true", "encoding": "auto"}),
    )
    .await
    .json();
    assert_eq!(got.as_array().map(Vec::len), Some(2));
    assert_eq!(got[0]["payload"], "m0");
    assert_eq!(got[0]["properties"]["delivery_mode"], 2);
    let got = post(
        b,
        "/api/queues/%2f/jobs/get",
        json!({"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"}),
    )
    .await
    .json();
    assert_eq!(
        (got[0]["payload"].clone(), got[0]["redelivered"].clone()),
        (json!("m0"), json!(true))
    );

    let conn = Connection::connect(&t.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            "jobs".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let d = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(&d.data[..], b"m1");
    d.ack(BasicAckOptions::default()).await.expect("ack");
    let d = within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");
    assert_eq!(&d.data[..], b"m2");

    let q = get(b, "/api/queues/%2f/jobs").await.json();
    assert_eq!(
        (q["consumers"].clone(), q["messages_unacknowledged"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(q["message_stats"]["ack"], 2);
    let listed = get(b, "/api/queues?columns=name,messages").await.json();
    assert_eq!(listed, json!([{"name": "jobs", "messages": 1}]));
    let bindings = get(b, "/api/bindings/%2f").await.json();
    assert!(
        bindings
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["source"] == "work"
                && x["destination"] == "jobs"
                && x["routing_key"] == "job.*")),
        "{bindings}"
    );
    drop(conn);

    assert_eq!(delete(b, "/api/queues/%2f/jobs/contents").await.status, 204);
    assert_eq!(delete(b, "/api/queues/%2f/jobs").await.status, 204);
    assert_eq!(get(b, "/api/queues/%2f/jobs").await.status, 404);
    assert_eq!(delete(b, "/api/exchanges/%2f/work").await.status, 204);
}

#[tokio::test]
async fn connections_are_listed_and_closed_by_name() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    let conn = Connection::connect(&t.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    for _ in 0..2 {
        ch.basic_publish(
            "amq.fanout".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"x",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    // The overview counts publishes per channel, once each, as RabbitMQ does.
    let stats = within(async {
        loop {
            let o = get(b, "/api/overview").await.json();
            if o["message_stats"]["publish"] == 2 {
                return o["message_stats"].clone();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(stats["drop_unroutable"], 2);
    let list = get(b, "/api/connections").await.json();
    let c = &list[0];
    assert_eq!(
        (c["user"].clone(), c["vhost"].clone(), c["channels"].clone()),
        (json!("guest"), json!("/"), json!(1))
    );
    let name = c["name"].as_str().expect("a name").to_string();
    assert!(name.contains(" -> "), "{name}");
    let overview = get(b, "/api/overview").await.json();
    assert_eq!(overview["object_totals"]["connections"], 1);
    let path = format!(
        "/api/connections/{}",
        name.replace(' ', "%20").replace('>', "%3E")
    );
    assert_eq!(delete(b, &path).await.status, 204);
    within(async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    within(async {
        while !get(b, "/api/connections")
            .await
            .json()
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_definitions_file_exported_from_rabbitmq_loads_and_exports_again() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    let file: Value = serde_json::from_str(include_str!("fixtures/rabbitmq-3.10-definitions.json"))
        .expect("fixture");
    assert_eq!(post(b, "/api/definitions", file).await.status, 204);
    // bob's hash was made by RabbitMQ: his password works unchanged.
    let url = format!("amqp://bob:pw@{}/v1", b.local_addr());
    let bob = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("bob logs in with the password set in RabbitMQ");
    let ch = bob.create_channel().await.expect("channel");
    ch.queue_declare(
        "bob-1".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bob's ^bob- permissions came along");
    let q = get(b, "/api/queues/%2f/tq").await.json();
    assert_eq!(q["arguments"], json!({"x-message-ttl": 5000}));
    let out = get(b, "/api/definitions").await.json();
    let names = |key: &str| -> Vec<String> {
        out[key]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|x| x["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(names("users").contains(&"carol".to_string()));
    assert!(names("vhosts").contains(&"v1".to_string()));
    assert!(names("queues").contains(&"q1".to_string()));
    assert_eq!(names("exchanges"), vec!["dx", "tx"]);
    assert_eq!(out["bindings"][0]["routing_key"], "a.#");
    let bob_hash = out["users"]
        .as_array()
        .and_then(|l| l.iter().find(|u| u["name"] == "bob"))
        .map(|u| u["password_hash"].clone());
    assert_eq!(
        bob_hash,
        Some(json!("LlEPgM1NARUs8BqNfme2D12lZvxRozoWot/cEeEk2rKFonzB"))
    );
}

#[tokio::test]
async fn load_definitions_applies_a_file_at_boot() {
    let dir = std::env::temp_dir().join(util::uniq("warren-load-defs"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("defs.json");
    std::fs::write(
        &file,
        include_str!("fixtures/rabbitmq-3.10-definitions.json"),
    )
    .expect("write");
    let mut config = Config::for_tests(dir.join("data"));
    config.load_definitions = file.display().to_string();
    let b = Broker::start(config).await.expect("starts with the file");
    assert_eq!(get(&b, "/api/queues/%2f/q1").await.status, 200);
    let url = format!("amqp://carol:pw@{}/v1", b.local_addr());
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("carol exists");
    b.shutdown().await;

    let mut bad = Config::for_tests(dir.join("data2"));
    bad.load_definitions = dir.join("missing.json").display().to_string();
    assert!(
        Broker::start(bad).await.is_err(),
        "a missing file stops the start"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn api_operations_follow_the_callers_amqp_permissions() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    put(
        b,
        "/api/users/dev",
        json!({"password": "pw", "tags": "management"}),
    )
    .await;
    let r = put(
        b,
        "/api/permissions/%2f/dev",
        json!({"configure": "^dev-", "write": "^dev-", "read": "^dev-"}),
    )
    .await;
    assert_eq!(r.status, 201);
    let dev = Some(("dev", "pw"));
    let r = request(
        api(b),
        "PUT",
        "/api/queues/%2f/dev-q",
        dev,
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 201);
    let r = request(
        api(b),
        "PUT",
        "/api/queues/%2f/ops-q",
        dev,
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json()["reason"],
        "ACCESS_REFUSED - access to queue 'ops-q' in vhost '/' refused for user 'dev'"
    );
    put(b, "/api/vhosts/hidden", json!({})).await;
    let vhosts = request(api(b), "GET", "/api/vhosts", dev, None)
        .await
        .json();
    let names: Vec<&str> = vhosts
        .as_array()
        .map(|l| l.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["/"], "a management user sees only its vhosts");
    assert_eq!(delete(b, "/api/vhosts/hidden").await.status, 204);
    assert_eq!(delete(b, "/api/vhosts/hidden").await.status, 404);
}

/// Debian's rabbitmqadmin (from the rabbitmq-server package): found on PATH or at
/// `WARREN_RABBITMQADMIN`. Without it the test is skipped, unless
/// `WARREN_REQUIRE_RABBITMQADMIN=1` (CI) makes that a failure.
fn rabbitmqadmin() -> Option<std::path::PathBuf> {
    let explicit = std::env::var_os("WARREN_RABBITMQADMIN").map(std::path::PathBuf::from);
    let found = explicit.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("rabbitmqadmin"))
                .find(|p| p.is_file())
        })
    });
    if found.is_none() {
        assert!(
            std::env::var("WARREN_REQUIRE_RABBITMQADMIN").as_deref() != Ok("1"),
            "rabbitmqadmin is required (apt-get install rabbitmq-server, or set WARREN_RABBITMQADMIN)"
        );
        eprintln!("rabbitmqadmin not found: skipping");
    }
    found
}

#[tokio::test]
async fn rabbitmqadmin_declares_publishes_gets_lists_and_deletes() {
    let Some(admin) = rabbitmqadmin() else {
        return;
    };
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    let addr = api(b);
    let run = |args: Vec<String>| {
        let admin = admin.clone();
        async move {
            let out = tokio::process::Command::new(&admin)
                .args(["-H", &addr.ip().to_string(), "-P", &addr.port().to_string()])
                .args(["-u", "guest", "-p", "guest", "-f", "tsv"])
                .args(&args)
                .output()
                .await
                .expect("rabbitmqadmin runs");
            assert!(
                out.status.success(),
                "rabbitmqadmin {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    };
    let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    run(args("declare queue name=orders durable=true")).await;
    run(args("declare exchange name=shop type=direct")).await;
    run(args(
        "declare binding source=shop destination=orders routing_key=new",
    ))
    .await;
    run(args("publish exchange=shop routing_key=new payload=first")).await;
    run(args("publish exchange=shop routing_key=new payload=second")).await;
    let listed = run(args("list queues name messages")).await;
    assert!(listed.lines().any(|l| l == "orders\t2"), "{listed}");
    let got = run(args("get queue=orders ackmode=ack_requeue_false")).await;
    assert!(got.contains("first"), "{got}");
    let listed = run(args("list bindings source destination routing_key")).await;
    assert!(listed.lines().any(|l| l == "shop\torders\tnew"), "{listed}");
    run(args("declare user name=ci password=pw tags=monitoring")).await;
    run(args(
        "declare permission vhost=/ user=ci configure=.* write=.* read=.*",
    ))
    .await;
    let users = run(args("list users name tags")).await;
    assert!(users.lines().any(|l| l == "ci\tmonitoring"), "{users}");
    let overview = run(args("show overview")).await;
    assert!(overview.contains("3.10.8"), "{overview}");
    run(args("purge queue name=orders")).await;
    let listed = run(args("list queues name messages")).await;
    assert!(listed.lines().any(|l| l == "orders\t0"), "{listed}");
    run(args("delete queue name=orders")).await;
    run(args("delete user name=ci")).await;
    let listed = run(args("list queues name")).await;
    assert!(!listed.contains("orders"), "{listed}");
}

/// An address of this machine that is not loopback (the source address of its default
/// route), if it has one.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // Connecting a UDP socket sends nothing; it only picks the route.
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn guest_may_use_the_api_and_amqp_only_from_loopback() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address: skipping");
        return;
    };
    let t = common::TestBroker::start_with(|c| c.listen_addresses = vec!["0.0.0.0".into()]).await;
    let b = broker(&t);
    let remote = SocketAddr::new(ip, api(b).port());
    let r = request(remote, "GET", "/api/whoami", GUEST, None).await;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (401, json!("Login failed"))
    );
    let local = SocketAddr::new("127.0.0.1".parse().expect("ip"), api(b).port());
    assert_eq!(
        request(local, "GET", "/api/whoami", GUEST, None)
            .await
            .status,
        200
    );
    let url = format!("amqp://guest:guest@{}:{}/%2f", ip, b.local_addr().port());
    assert!(
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .is_err(),
        "guest over AMQP from a non-loopback address is refused"
    );
}

#[tokio::test]
async fn publishes_and_gets_through_the_api_count_in_the_overview_and_metrics_as_rabbitmq() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    assert_eq!(
        put(b, "/api/queues/%2f/counted", json!({})).await.status,
        201
    );
    let publish = |key: &'static str| {
        json!({"routing_key": key, "payload": "x", "payload_encoding": "string",
               "properties": {}})
    };
    for key in ["counted", "counted", "nowhere"] {
        let r = post(b, "/api/exchanges/%2f/amq.default/publish", publish(key)).await;
        assert_eq!(r.status, 200);
    }
    let get_one =
        |ackmode: &'static str| json!({"count": 1, "ackmode": ackmode, "encoding": "auto"});
    // Taken and requeued, taken again (now redelivered) and dropped.
    for ackmode in ["ack_requeue_true", "ack_requeue_false"] {
        let r = post(b, "/api/queues/%2f/counted/get", get_one(ackmode)).await;
        assert_eq!(r.json().as_array().map(Vec::len), Some(1));
    }
    // What the reference RabbitMQ 3.10 shows after the same calls.
    let s = get(b, "/api/overview").await.json()["message_stats"].clone();
    let counts: Vec<_> = [
        "publish",
        "confirm",
        "return_unroutable",
        "drop_unroutable",
        "get",
        "get_no_ack",
        "redeliver",
        "deliver_get",
    ]
    .iter()
    .map(|k| (k.to_string(), s[k].clone()))
    .collect();
    let expected: Vec<_> = [
        ("publish", 3),
        ("confirm", 3),
        ("return_unroutable", 1),
        ("drop_unroutable", 0),
        ("get", 1),
        ("get_no_ack", 1),
        ("redeliver", 1),
        ("deliver_get", 2),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), json!(v)))
    .collect();
    assert_eq!(counts, expected, "{s}");

    let metrics = b.prometheus_addr().expect("metrics listener");
    let r = request(metrics, "GET", "/metrics", None, None).await;
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.lines()
            .any(|l| l == "rabbitmq_channel_messages_published_total 3"),
        "{text}"
    );
}

#[tokio::test]
async fn an_md5_password_hash_from_an_old_rabbitmq_definitions_file_loads_and_authenticates() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    // Salt 01020304 and MD5(salt ++ "md5pw"), as RabbitMQ before 3.6 stored it; the
    // reference RabbitMQ 3.10 imports this file and accepts "md5pw".
    let defs = json!({
        "users": [{"name": "olduser", "password_hash": "AQIDBI3Ab4iH1xcn+PIEm5vk1JM=",
                   "hashing_algorithm": "rabbit_password_hashing_md5",
                   "tags": "administrator", "limits": {}}],
        "vhosts": [{"name": "/"}],
        "permissions": [{"user": "olduser", "vhost": "/", "configure": ".*",
                         "write": ".*", "read": ".*"}],
    });
    let r = post(b, "/api/definitions", defs).await;
    assert!(r.status == 204 || r.status == 201, "{}", r.status);
    let api = api(b);
    let me = request(api, "GET", "/api/whoami", Some(("olduser", "md5pw")), None).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["name"], "olduser");
    let wrong = request(api, "GET", "/api/whoami", Some(("olduser", "md5pW")), None).await;
    assert_eq!(wrong.status, 401);
    let url = t.url.replace("guest:guest", "olduser:md5pw");
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("AMQP login with the MD5-hashed password");
    let _ = conn.close(200, "bye".into()).await;
    let bad = t.url.replace("guest:guest", "olduser:nope");
    assert!(
        Connection::connect(&bad, ConnectionProperties::default())
            .await
            .is_err()
    );
    // Exported as it came in.
    let user = get(b, "/api/users/olduser").await.json();
    assert_eq!(user["hashing_algorithm"], "rabbit_password_hashing_md5");
    assert_eq!(user["password_hash"], "AQIDBI3Ab4iH1xcn+PIEm5vk1JM=");
}
