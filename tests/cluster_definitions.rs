//! Definitions through the metadata group, over AMQP on real `warren` processes in network
//! namespaces: a durable exchange, queue or binding declared through one node is there on
//! every node; a declare on a node cut off from the majority is refused (541) and never
//! appears, while the majority's goes on and reaches the cut-off node once it is healed;
//! a node that was down catches up.

mod cluster;
#[path = "util/http.rs"]
#[allow(dead_code)]
mod http;

use std::time::{Duration, Instant};

use cluster::Cluster;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};

const ELECTION: Duration = Duration::from_secs(20);

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn passive_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    }
}

fn passive_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    }
}

async fn channel(c: &Cluster, i: usize) -> Channel {
    c.connect(i).await.create_channel().await.unwrap()
}

/// Whether queue `name` exists as seen through node `i` (a passive declare on a fresh
/// connection).
async fn queue_exists(c: &Cluster, i: usize, name: &str) -> bool {
    let ch = channel(c, i).await;
    ch.queue_declare(name.into(), passive_queue(), FieldTable::default())
        .await
        .is_ok()
}

/// Whether exchange `name` exists as seen through node `i`.
async fn exchange_exists(c: &Cluster, i: usize, name: &str) -> bool {
    let ch = channel(c, i).await;
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        passive_exchange(),
        FieldTable::default(),
    )
    .await
    .is_ok()
}

/// Waits up to `limit` for `check` to hold.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_made_through_any_node_are_there_on_every_node() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;

    // Node 1: a topic exchange, a queue (homed on node 1) and a binding.
    let ch1 = channel(&c, 1).await;
    ch1.exchange_declare(
        "orders".into(),
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch1.queue_declare("orders.eu".into(), durable_queue(), FieldTable::default())
        .await
        .unwrap();
    ch1.queue_bind(
        "orders.eu".into(),
        "orders".into(),
        "eu.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Answered only once committed on a majority and applied on node 1: node 3 has it
    // as soon as it has applied the entry too.
    eventually(Duration::from_secs(10), "queue visible on node 3", || {
        queue_exists(&c, 3, "orders.eu")
    })
    .await;
    for i in [2, 3] {
        eventually(Duration::from_secs(10), "exchange on every node", || {
            exchange_exists(&c, i, "orders")
        })
        .await;
    }

    // Node 2: an exchange bound to node 1's exchange. Publishing through node 1 to it
    // reaches the queue: node 1 routes with the binding node 2 made.
    let ch2 = channel(&c, 2).await;
    ch2.exchange_declare(
        "intake".into(),
        ExchangeKind::Fanout,
        durable_exchange(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch2.exchange_bind(
        "orders".into(),
        "intake".into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "node 2's exchange on node 1",
        || exchange_exists(&c, 1, "intake"),
    )
    .await;
    ch1.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch1, "orders", "eu.de", b"direct").await;
    eventually(
        Duration::from_secs(10),
        "the e2e binding on node 1",
        || async {
            let ch = channel(&c, 1).await;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            publish(&ch, "intake", "eu.fr", b"via intake").await;
            let q = ch
                .queue_declare("orders.eu".into(), passive_queue(), FieldTable::default())
                .await
                .unwrap();
            q.message_count() >= 2
        },
    )
    .await;
    let got = ch1
        .basic_get("orders.eu".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"direct");

    // Node 3 reaches the messages of node 1's queue too: its consumer is proxied to the
    // home (tests/cluster_queues.rs covers what it gets).
    let ch3 = channel(&c, 3).await;
    ch3.basic_consume(
        "orders.eu".into(),
        "c".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("consuming through another node works");
    ch3.basic_cancel("c".into(), BasicCancelOptions::default())
        .await
        .unwrap();

    // Deleted through node 3: gone everywhere, bindings included.
    let ch3 = channel(&c, 3).await;
    ch3.queue_delete("orders.eu".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    for i in 1..=3 {
        eventually(
            Duration::from_secs(10),
            "queue deleted everywhere",
            || async { !queue_exists(&c, i, "orders.eu").await },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_refuses_definition_changes_and_catches_up_after_healing() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let before = channel(&c, 1).await;
    before
        .exchange_declare(
            "before".into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    c.partition(&[1], &[2, 3]);
    c.wait_agreed_leader(&[2, 3], None, ELECTION).await;

    // The cut-off node keeps serving what it has, and refuses changes.
    assert!(exchange_exists(&c, 1, "before").await);
    let started = Instant::now();
    let err = channel(&c, 1)
        .await
        .exchange_declare(
            "minority".into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .expect_err("a declare without a majority is refused");
    let text = err.to_string();
    assert!(
        text.contains("541") || text.contains("INTERNAL_ERROR"),
        "RabbitMQ's metadata-store timeout error: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused within the proposal limit, not hung"
    );
    assert!(
        !exchange_exists(&c, 1, "minority").await,
        "what the minority refused is not left behind on it"
    );

    // The majority goes on.
    channel(&c, 2)
        .await
        .queue_declare("majority".into(), durable_queue(), FieldTable::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "node 3 has the majority's queue",
        || queue_exists(&c, 3, "majority"),
    )
    .await;

    c.heal();
    eventually(Duration::from_secs(30), "node 1 catches up", || {
        queue_exists(&c, 1, "majority")
    })
    .await;
    for i in 1..=3 {
        assert!(
            !exchange_exists(&c, i, "minority").await,
            "node {i} agrees the refused exchange does not exist"
        );
        assert!(exchange_exists(&c, i, "before").await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_has_what_was_agreed_while_it_was_down() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = channel(&c, 1).await;
    ch.queue_declare("kept".into(), durable_queue(), FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, "", "kept", b"survives").await;
    eventually(Duration::from_secs(10), "node 3 has the queue", || {
        queue_exists(&c, 3, "kept")
    })
    .await;

    c.kill(3);
    channel(&c, 2)
        .await
        .queue_declare("while-down".into(), durable_queue(), FieldTable::default())
        .await
        .unwrap();
    channel(&c, 2)
        .await
        .queue_delete("kept".into(), QueueDeleteOptions::default())
        .await
        .unwrap_or(0);
    // Node 1 is the home of "kept": a delete through node 2 removes it there too.
    eventually(
        Duration::from_secs(10),
        "kept deleted on its home",
        || async { !queue_exists(&c, 1, "kept").await },
    )
    .await;

    c.start_node(3);
    eventually(Duration::from_secs(30), "node 3 catches up", || {
        queue_exists(&c, 3, "while-down")
    })
    .await;
    assert!(
        !queue_exists(&c, 3, "kept").await,
        "the deletion agreed while node 3 was down reached it"
    );

    // And node 1, restarted, restores what it agreed to (its own queue with messages).
    let ch = channel(&c, 1).await;
    ch.queue_declare("home1".into(), durable_queue(), FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch, "", "home1", b"persisted").await;
    c.restart(1);
    let ch = channel(&c, 1).await;
    let q = ch
        .queue_declare("home1".into(), passive_queue(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(
        q.message_count(),
        1,
        "the home node kept its queue's message"
    );
    eventually(Duration::from_secs(10), "node 2 has home1", || {
        queue_exists(&c, 2, "home1")
    })
    .await;
}

/// A management API request to node `i` as the harness user; returns the status.
async fn api(c: &Cluster, i: usize, method: &str, path: &str, body: serde_json::Value) -> u16 {
    let addr = std::net::SocketAddr::from((c.node(i).ip, 15672));
    let body = (!body.is_null()).then_some(&body);
    let auth = Some((cluster::USER, cluster::USER));
    http::request(addr, method, path, auth, body).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_and_permissions_made_on_one_node_hold_on_every_node() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let created = api(
        &c,
        1,
        "PUT",
        "/api/users/bob",
        serde_json::json!({"password": "secret", "tags": ""}),
    )
    .await;
    assert!(created == 201 || created == 204, "user created: {created}");
    let vhost = api(&c, 2, "PUT", "/api/vhosts/shop", serde_json::Value::Null).await;
    assert!(vhost == 201 || vhost == 204, "vhost created: {vhost}");
    let perms = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let set = api(&c, 3, "PUT", "/api/permissions/shop/bob", perms).await;
    assert!(set == 201 || set == 204, "permissions set: {set}");

    // Bob, made on node 1, uses vhost shop, made on node 2, through node 3 with the
    // permissions set there; what he declares is visible through node 1.
    let url = |i: usize| format!("amqp://bob:secret@{}:5672/shop", c.node(i).ip);
    let conn = lapin::Connection::connect(&url(3), lapin::ConnectionProperties::default())
        .await
        .expect("bob logs in to vhost shop on node 3");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("carts".into(), durable_queue(), FieldTable::default())
        .await
        .unwrap();
    let conn1 = lapin::Connection::connect(&url(1), lapin::ConnectionProperties::default())
        .await
        .expect("bob logs in to vhost shop on node 1");
    let ch1 = conn1.create_channel().await.unwrap();
    ch1.queue_declare("carts".into(), passive_queue(), FieldTable::default())
        .await
        .expect("bob's queue is visible through node 1");

    // Deleting the vhost through node 2 removes it, and its queue, everywhere.
    let deleted = api(&c, 2, "DELETE", "/api/vhosts/shop", serde_json::Value::Null).await;
    assert_eq!(deleted, 204, "vhost deleted");
    // Answered once node 2 applied it; the others apply it as they learn it committed.
    for i in 1..=3 {
        eventually(
            Duration::from_secs(10),
            "vhost shop gone everywhere",
            || async {
                lapin::Connection::connect(&url(i), lapin::ConnectionProperties::default())
                    .await
                    .is_err()
            },
        )
        .await;
    }
    let again = api(&c, 1, "PUT", "/api/vhosts/shop", serde_json::Value::Null).await;
    assert!(again == 201 || again == 204);
    let perms = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    api(&c, 1, "PUT", "/api/permissions/shop/bob", perms).await;
    eventually(
        Duration::from_secs(10),
        "recreated vhost on node 3",
        || async {
            lapin::Connection::connect(&url(3), lapin::ConnectionProperties::default())
                .await
                .is_ok()
        },
    )
    .await;
    let conn = lapin::Connection::connect(&url(3), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert!(
        ch.queue_declare("carts".into(), passive_queue(), FieldTable::default())
            .await
            .is_err(),
        "the deleted vhost's queue did not come back with the new vhost"
    );
}
