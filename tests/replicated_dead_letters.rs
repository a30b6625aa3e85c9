//! At-least-once dead-lettering of quorum queues (`x-dead-letter-strategy:
//! at-least-once`, with `x-overflow: reject-publish`) on real `warren` processes in
//! network namespaces: the source keeps each dead letter (RabbitMQ's `messages_dlx`)
//! until every queue it was routed to took it, publishes again those that had nowhere to
//! go, and a new leader publishes again what its group still holds. The default
//! strategy (at-most-once) still drops what has nowhere to go.

mod cluster;
#[path = "util/http.rs"]
#[allow(dead_code)]
mod http;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cluster::Cluster;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};

const ELECTION: Duration = Duration::from_secs(20);

/// The names one case uses: its source queue, dead-letter exchange and target queue.
struct Names {
    source: String,
    dlx: String,
    target: String,
}

impl Names {
    fn new(case: &str) -> Names {
        Names {
            source: format!("{case}-source"),
            dlx: format!("{case}-dlx"),
            target: format!("{case}-target"),
        }
    }
}

/// A consumer tag no other consumer of the test uses.
fn tag(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// A quorum queue's arguments with a dead-letter exchange, this strategy (none: the
/// default) and this overflow mode.
fn source_args(n: &Names, strategy: Option<&str>, overflow: &str) -> FieldTable {
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-dead-letter-exchange".into(), text(&n.dlx));
    args.insert("x-overflow".into(), text(overflow));
    if let Some(s) = strategy {
        args.insert("x-dead-letter-strategy".into(), text(s));
    }
    args
}

/// Declares the dead-letter exchange and the source queue through node 1.
async fn declare_source(c: &Cluster, n: &Names, args: FieldTable) -> Channel {
    let ch = c.connect(1).await.create_channel().await.unwrap();
    ch.exchange_declare(
        n.dlx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(n.source.as_str().into(), durable(), args)
        .await
        .unwrap();
    ch
}

/// Publishes `PREFIX:0` .. `PREFIX:{n-1}` to the source through node `i`, each again
/// until confirmed (a group still electing nacks); their bodies.
async fn publish_confirmed(
    c: &Cluster,
    i: usize,
    names: &Names,
    prefix: &str,
    n: usize,
) -> BTreeSet<String> {
    let ch = c.connect(i).await.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = BTreeSet::new();
    while done.len() < n {
        let body = format!("{prefix}:{}", done.len());
        let confirm = ch
            .basic_publish(
                "".into(),
                names.source.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        if matches!(confirm.await, Ok(c) if c.is_ack()) {
            done.insert(body);
        } else {
            assert!(Instant::now() < deadline, "{prefix}: not all confirmed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    done
}

/// Consumes `n` messages from the source through node `i` and rejects each
/// (requeue=false): they die.
async fn reject_all(c: &Cluster, i: usize, names: &Names, n: usize) {
    let conn = c.connect(i).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            names.source.as_str().into(),
            tag("rejecter").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("a delivery to reject")
            .expect("consumer open")
            .expect("a delivery");
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    // (Rejections are sent before the channel closes.)
    ch.close(200, "done".into()).await.unwrap();
}

/// The source's `messages` and `messages_dlx` as node `i`'s management API lists them.
async fn source_figures(c: &Cluster, i: usize, n: &Names) -> Option<(u64, u64)> {
    let addr = std::net::SocketAddr::from((c.node(i).ip, 15672));
    let auth = Some((cluster::USER, cluster::USER));
    let path = format!("/api/queues/%2F/{}", n.source);
    let r = http::request(addr, "GET", &path, auth, None).await;
    let v = r.json();
    Some((v["messages"].as_u64()?, v["messages_dlx"].as_u64()?))
}

/// Waits until node `i` lists the source with these figures.
async fn wait_figures(c: &Cluster, i: usize, n: &Names, want: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = source_figures(c, i, n).await;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "source (messages, messages_dlx) through node {i}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Declares the target queue (a classic one, homed on node `i`) through node `i` and
/// binds it to the dead-letter exchange.
async fn declare_target(c: &Cluster, i: usize, n: &Names) -> Channel {
    declare_bound(c, i, n, &n.target, FieldTable::default()).await
}

/// Declares queue `name` with `args` through node `i` and binds it to the dead-letter
/// exchange.
async fn declare_bound(c: &Cluster, i: usize, n: &Names, name: &str, args: FieldTable) -> Channel {
    let ch = c.connect(i).await.create_channel().await.unwrap();
    ch.queue_declare(name.into(), durable(), args)
        .await
        .unwrap();
    ch.queue_bind(
        name.into(),
        n.dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch
}

/// Consumes (and acks) the target through `ch` until nothing arrives for `quiet`, then
/// cancels: the bodies (with repeats).
async fn drain_target(ch: &Channel, n: &Names, quiet: Duration) -> Vec<String> {
    drain(ch, &n.target, quiet).await
}

/// Consumes (and acks) queue `name` through `ch` until nothing arrives for `quiet`,
/// then cancels: the bodies (with repeats).
async fn drain(ch: &Channel, name: &str, quiet: Duration) -> Vec<String> {
    let tag = tag("drain");
    let mut consumer = ch
        .basic_consume(
            name.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut bodies = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, consumer.next()).await {
        bodies.push(String::from_utf8_lossy(&d.data).into_owned());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    ch.basic_cancel(tag.as_str().into(), Default::default())
        .await
        .unwrap();
    bodies
}

/// The node (of `nodes`) that most recently logged taking the lead of the source.
async fn source_leader(c: &Cluster, nodes: &[usize], n: &Names) -> usize {
    let s = &n.source;
    let needles = [format!("queue={s} "), format!("queue=\"{s}\"")];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let latest = nodes
            .iter()
            .filter_map(|&i| {
                let log = c.log(i);
                let line = log.lines().rev().find(|l| {
                    l.contains("this node leads it now") && needles.iter().any(|n| l.contains(n))
                })?;
                Some((line.split_whitespace().next()?.to_string(), i))
            })
            .max();
        if let Some((_, i)) = latest {
            return i;
        }
        assert!(Instant::now() < deadline, "no node leads the source");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_without_a_target_wait_in_the_source_until_one_is_bound() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let n = Names::new("wait");
    declare_source(
        &c,
        &n,
        source_args(&n, Some("at-least-once"), "reject-publish"),
    )
    .await;
    let sent = publish_confirmed(&c, 2, &n, "m", 20).await;
    wait_figures(&c, 3, &n, (20, 0)).await;

    // Rejected while the dead-letter exchange leads nowhere: the source keeps them, as
    // dead letters (not ready, not counted in `messages`), listed on every node.
    reject_all(&c, 3, &n, 20).await;
    for i in [1, 2, 3] {
        wait_figures(&c, i, &n, (0, 20)).await;
    }

    // Once queues are bound, they arrive (published again) in each, and leave the
    // source: a classic queue homed on a node that does not lead the source (reached
    // through the forwarder) and a quorum queue.
    let leader = source_leader(&c, &[1, 2, 3], &n).await;
    let elsewhere = if leader == 1 { 2 } else { 1 };
    let quorum_target = format!("{}-quorum", n.target);
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    declare_bound(&c, leader, &n, &quorum_target, quorum).await;
    let ch = declare_target(&c, elsewhere, &n).await;
    let got = drain_target(&ch, &n, Duration::from_secs(8)).await;
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(
        got_set, sent,
        "every dead letter arrives in the classic target"
    );
    let got: BTreeSet<String> = drain(&ch, &quorum_target, Duration::from_secs(5))
        .await
        .into_iter()
        .collect();
    assert_eq!(got, sent, "every dead letter arrives in the quorum target");
    wait_figures(&c, 1, &n, (0, 0)).await;

    // A new dead letter goes at once, with its history, as an at-most-once one does.
    let late = publish_confirmed(&c, 1, &n, "late", 1).await;
    reject_all(&c, 1, &n, 1).await;
    let mut consumer = ch
        .basic_consume(
            n.target.as_str().into(),
            tag("history").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a bound target gets a new dead letter")
        .expect("consumer open")
        .expect("a delivery");
    assert!(late.contains(&*String::from_utf8_lossy(&d.data)));
    let headers = d.properties.headers().clone().unwrap_or_default();
    let reason = headers.inner().get("x-first-death-reason");
    assert_eq!(
        reason,
        Some(&AMQPValue::LongString("rejected".into())),
        "{headers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_dead_letters_again_what_the_old_one_had_not_handed_on() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let n = Names::new("failover");
    declare_source(
        &c,
        &n,
        source_args(&n, Some("at-least-once"), "reject-publish"),
    )
    .await;
    let sent = publish_confirmed(&c, 1, &n, "m", 30).await;
    let first = source_leader(&c, &[1, 2, 3], &n).await;
    reject_all(&c, first, &n, 30).await;
    wait_figures(&c, first, &n, (0, 30)).await;

    // The leader dies holding them; a survivor leads, and delivers them once a target
    // is bound (maybe twice, never not).
    c.kill(first);
    let rest: Vec<usize> = [1, 2, 3].into_iter().filter(|i| *i != first).collect();
    let ch = declare_target(&c, rest[0], &n).await;
    let got = drain_target(&ch, &n, Duration::from_secs(10)).await;
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    let lost: Vec<&String> = sent.difference(&got_set).collect();
    assert!(lost.is_empty(), "dead letters lost: {lost:?}");
    assert!(got_set.is_subset(&sent), "only what was sent: {got:?}");
    wait_figures(&c, rest[1], &n, (0, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_and_drop_head_still_drop_dead_letters_with_nowhere_to_go() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    for (case, strategy, overflow) in [
        ("default", None, "reject-publish"),
        ("most", Some("at-most-once"), "reject-publish"),
        // At-least-once needs reject-publish: with drop-head it is at-most-once.
        ("drophead", Some("at-least-once"), "drop-head"),
    ] {
        let n = Names::new(case);
        declare_source(&c, &n, source_args(&n, strategy, overflow)).await;
        publish_confirmed(&c, 1, &n, "m", 5).await;
        reject_all(&c, 2, &n, 5).await;
        wait_figures(&c, 3, &n, (0, 0)).await;
        let target = declare_target(&c, 1, &n).await;
        let got = drain_target(&target, &n, Duration::from_secs(5)).await;
        assert!(got.is_empty(), "{case}: dropped, yet {got:?} arrived");
        // With a target bound, they arrive.
        let sent = publish_confirmed(&c, 1, &n, "bound", 5).await;
        reject_all(&c, 2, &n, 5).await;
        let got: BTreeSet<String> = drain_target(&target, &n, Duration::from_secs(5))
            .await
            .into_iter()
            .collect();
        assert_eq!(got, sent, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_can_ask_for_at_least_once() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let n = Names::new("policy");
    let policy = serde_json::json!({
        "pattern": format!("^{}$", n.source),
        "apply-to": "queues",
        "definition": {
            "dead-letter-strategy": "at-least-once",
            "overflow": "reject-publish",
            "dead-letter-exchange": n.dlx,
        },
    });
    let addr = std::net::SocketAddr::from((c.node(2).ip, 15672));
    let auth = Some((cluster::USER, cluster::USER));
    let put = http::request(addr, "PUT", "/api/policies/%2F/dlx", auth, Some(&policy)).await;
    assert!(
        put.status == 201 || put.status == 204,
        "policy put: {}",
        put.status
    );
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    declare_source(&c, &n, quorum).await;
    let sent = publish_confirmed(&c, 1, &n, "m", 10).await;
    reject_all(&c, 3, &n, 10).await;
    wait_figures(&c, 1, &n, (0, 10)).await;
    let ch = declare_target(&c, 3, &n).await;
    let got: BTreeSet<String> = drain_target(&ch, &n, Duration::from_secs(8))
        .await
        .into_iter()
        .collect();
    assert_eq!(got, sent);
    wait_figures(&c, 2, &n, (0, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_source_leader_while_it_hands_dead_letters_on_loses_none() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let n = Names::new("inflight");
    declare_source(
        &c,
        &n,
        source_args(&n, Some("at-least-once"), "reject-publish"),
    )
    .await;
    let sent = publish_confirmed(&c, 1, &n, "m", 300).await;
    let first = source_leader(&c, &[1, 2, 3], &n).await;
    let rest: Vec<usize> = [1, 2, 3].into_iter().filter(|i| *i != first).collect();
    // The target lives on a node that survives.
    let target = declare_target(&c, rest[0], &n).await;

    // A consumer on the leader rejects as fast as it can; the leader dies meanwhile.
    let conn = c.connect(first).await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            n.source.as_str().into(),
            tag("rejecter").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..150 {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("a delivery to reject")
            .expect("consumer open")
            .expect("a delivery");
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    c.kill(first);

    // What the dead leader had not dead-lettered comes back to the source; reject it
    // through a survivor too. Then every message is in the target, some maybe twice.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got: Vec<String> = Vec::new();
    loop {
        let reject_ch = c.connect(rest[1]).await.create_channel().await.unwrap();
        let mut left = reject_ch
            .basic_consume(
                n.source.as_str().into(),
                tag("rejecter").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .ok();
        if let Some(left) = left.as_mut() {
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(2), left.next()).await
            {
                d.reject(BasicRejectOptions { requeue: false })
                    .await
                    .unwrap();
            }
        }
        got.extend(drain_target(&target, &n, Duration::from_secs(3)).await);
        let got_set: BTreeSet<String> = got.iter().cloned().collect();
        if got_set == sent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters lost: {:?}",
            sent.difference(&got_set).collect::<Vec<_>>()
        );
    }
    wait_figures(&c, rest[0], &n, (0, 0)).await;
}
