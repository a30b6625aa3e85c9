//! `warren ctl` (the real binary) against a running node's management API: rabbitmqctl's
//! commands and output shape (a header row, then tab-separated rows).

mod common;
mod util;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use util::within;
use warren::Broker;

/// Runs `warren ctl --url <node> args...`; returns (success, stdout, stderr).
async fn ctl(b: &Broker, args: &[&str]) -> (bool, String, String) {
    let url = format!(
        "http://{}",
        b.management_addr().expect("management listener")
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("ctl")
        .args(["--url", &url])
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

/// `ctl` that must succeed; its stdout.
async fn ok(b: &Broker, args: &[&str]) -> String {
    let (success, out, err) = ctl(b, args).await;
    assert!(success, "warren ctl {args:?} failed: {err}");
    out
}

fn broker(t: &common::TestBroker) -> &Broker {
    t.broker.as_ref().expect("broker")
}

#[tokio::test]
async fn users_vhosts_and_permissions_are_managed_as_with_rabbitmqctl() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    ok(b, &["add_vhost", "shop"]).await;
    ok(b, &["add_user", "ann", "first"]).await;
    ok(
        b,
        &["set_permissions", "-p", "shop", "ann", "^ann-", ".*", ".*"],
    )
    .await;
    ok(b, &["set_user_tags", "ann", "monitoring", "management"]).await;
    let users = ok(b, &["list_users"]).await;
    assert!(users.starts_with("user\ttags\n"), "{users}");
    assert!(
        users.contains("ann\t[\"monitoring\",\"management\"]"),
        "{users}"
    );
    let perms = ok(b, &["list_permissions", "-p", "shop"]).await;
    assert_eq!(perms, "user\tconfigure\twrite\tread\nann\t^ann-\t.*\t.*\n");
    let vhosts = ok(b, &["list_vhosts"]).await;
    assert_eq!(vhosts, "name\n/\nshop\n");

    ok(b, &["change_password", "ann", "second"]).await;
    let url = |pw: &str| format!("amqp://ann:{pw}@{}/shop", b.local_addr());
    assert!(
        Connection::connect(&url("first"), ConnectionProperties::default())
            .await
            .is_err()
    );
    let conn = Connection::connect(&url("second"), ConnectionProperties::default())
        .await
        .expect("the new password works");
    let tags = b.state().access.user("ann").expect("ann").tags;
    assert_eq!(
        tags,
        vec!["monitoring", "management"],
        "tags survive a password change"
    );

    ok(b, &["clear_permissions", "-p", "shop", "ann"]).await;
    assert_eq!(
        ok(b, &["list_permissions", "-p", "shop"]).await,
        "user\tconfigure\twrite\tread\n"
    );
    ok(b, &["delete_user", "ann"]).await;
    within(async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    ok(b, &["delete_vhost", "shop"]).await;
    assert_eq!(ok(b, &["list_vhosts"]).await, "name\n/\n");

    let (success, _, err) = ctl(b, &["delete_user", "nobody"]).await;
    assert!(!success);
    assert!(err.starts_with("Error: not found"), "{err}");
}

#[tokio::test]
async fn queues_exchanges_bindings_connections_channels_and_consumers_are_listed() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    let conn = Connection::connect(&t.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "orders".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    ch.exchange_declare(
        "shop".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    ch.queue_bind(
        "orders".into(),
        "shop".into(),
        "new".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    for body in [b"a", b"b", b"c"] {
        ch.basic_publish(
            "shop".into(),
            "new".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    let consumer_ch = conn.create_channel().await.expect("channel");
    consumer_ch
        .basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_ch
        .basic_consume(
            "orders".into(),
            "worker-1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    within(consumer.next())
        .await
        .expect("delivery")
        .expect("ok");

    let queues = ok(
        b,
        &[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ],
    )
    .await;
    assert_eq!(
        queues,
        "name\tmessages_ready\tmessages_unacknowledged\tconsumers\norders\t2\t1\t1\n"
    );
    let exchanges = ok(b, &["list_exchanges", "name", "type"]).await;
    assert!(
        exchanges.lines().any(|l| l == "shop\tdirect"),
        "{exchanges}"
    );
    let bindings = ok(b, &["list_bindings"]).await;
    assert!(
        bindings.starts_with(
            "source_name\tsource_kind\tdestination_name\tdestination_kind\trouting_key\targuments\n"
        ),
        "{bindings}"
    );
    assert!(
        bindings
            .lines()
            .any(|l| l == "shop\texchange\torders\tqueue\tnew\t{}"),
        "{bindings}"
    );
    let connections = ok(b, &["list_connections", "name", "user", "channels"]).await;
    let row = connections.lines().nth(1).expect("one connection");
    assert!(row.ends_with("\tguest\t2"), "{connections}");
    let name = row.split('\t').next().expect("name").to_string();
    let channels = ok(b, &["list_channels", "number", "user", "consumer_count"]).await;
    assert_eq!(
        channels,
        "number\tuser\tconsumer_count\n1\tguest\t0\n2\tguest\t1\n"
    );
    let consumers = ok(
        b,
        &[
            "list_consumers",
            "queue_name",
            "consumer_tag",
            "ack_required",
            "prefetch_count",
        ],
    )
    .await;
    assert_eq!(
        consumers,
        "queue_name\tconsumer_tag\tack_required\tprefetch_count\norders\tworker-1\ttrue\t1\n"
    );
    let status = ok(b, &["status"]).await;
    assert!(
        status.contains("Totals: connections 1, channels 2, queues 1"),
        "{status}"
    );
    assert!(
        status.contains("Messages: 3 (2 ready, 1 unacknowledged)"),
        "{status}"
    );

    ok(b, &["purge_queue", "orders"]).await;
    let queues = ok(b, &["list_queues", "name", "messages_ready"]).await;
    assert_eq!(queues, "name\tmessages_ready\norders\t0\n");
    ok(b, &["close_connection", &name, "maintenance"]).await;
    within(async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    ok(b, &["delete_queue", "orders"]).await;
    assert_eq!(ok(b, &["list_queues"]).await, "name\tmessages\n");
}

#[tokio::test]
async fn definitions_exported_from_one_node_import_into_another() {
    let one = common::TestBroker::start().await;
    let two = common::TestBroker::start().await;
    let (a, b) = (broker(&one), broker(&two));
    ok(a, &["add_vhost", "shop"]).await;
    ok(a, &["add_user", "ann", "pw"]).await;
    ok(
        a,
        &["set_permissions", "-p", "shop", "ann", ".*", ".*", ".*"],
    )
    .await;
    let conn = Connection::connect(
        &format!("amqp://ann:pw@{}/shop", a.local_addr()),
        ConnectionProperties::default(),
    )
    .await
    .expect("ann");
    let ch = conn.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("kept".into(), durable, FieldTable::default())
        .await
        .expect("queue");
    let dir = std::env::temp_dir().join(util::uniq("warren-ctl-defs"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("defs.json");
    let file = file.to_str().expect("utf-8 path");
    ok(a, &["export_definitions", file]).await;
    ok(b, &["import_definitions", file]).await;
    let conn = Connection::connect(
        &format!("amqp://ann:pw@{}/shop", b.local_addr()),
        ConnectionProperties::default(),
    )
    .await
    .expect("ann and her password came along");
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare("kept".into(), passive, FieldTable::default())
        .await
        .expect("the queue came along");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn topic_permissions_are_set_listed_and_cleared_as_with_rabbitmqctl() {
    let t = common::TestBroker::start().await;
    let b = broker(&t);
    ok(b, &["add_user", "tp", "pw"]).await;
    let out = ok(
        b,
        &[
            "set_topic_permissions",
            "tp",
            "amq.topic",
            "^{username}\\.",
            ".*",
        ],
    )
    .await;
    assert!(out.starts_with("Setting topic permissions"), "{out}");
    ok(b, &["set_topic_permissions", "tp", "logs", "^x", "^y"]).await;
    let list = ok(b, &["list_topic_permissions"]).await;
    assert_eq!(
        list,
        "user\texchange\twrite\tread\ntp\tamq.topic\t^{username}\\.\t.*\ntp\tlogs\t^x\t^y\n"
    );
    ok(b, &["clear_topic_permissions", "tp", "logs"]).await;
    let list = ok(b, &["list_topic_permissions"]).await;
    assert_eq!(
        list,
        "user\texchange\twrite\tread\ntp\tamq.topic\t^{username}\\.\t.*\n"
    );
    ok(b, &["clear_topic_permissions", "tp"]).await;
    assert_eq!(
        ok(b, &["list_topic_permissions"]).await,
        "user\texchange\twrite\tread\n"
    );
    let (success, _, err) = ctl(b, &["clear_topic_permissions", "tp"]).await;
    assert!(!success, "nothing left to clear");
    assert!(err.contains("not found"), "{err}");
}
