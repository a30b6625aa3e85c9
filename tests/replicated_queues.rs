//! Replicated (quorum) queues on real `warren` processes in network namespaces: a
//! publisher's confirm means a majority of the queue's replicas have the message, so
//! killing the node that leads the queue loses no confirmed message; a new leader takes
//! over and serves them (those handed out before come back redelivered).

mod cluster;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cluster::Cluster;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

const ELECTION: Duration = Duration::from_secs(20);
const QUEUE: &str = "replicated";

fn quorum() -> (QueueDeclareOptions, FieldTable) {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    (
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
}

async fn confirming_channel(c: &Cluster, i: usize) -> Option<Channel> {
    let conn = c.try_connect(i, Duration::from_secs(5)).await?;
    let ch = conn.create_channel().await.ok()?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok()?;
    Some(ch)
}

/// Publishes `body` to the queue; whether it was confirmed (a nack or a lost channel is
/// not).
async fn publish(ch: &Channel, body: &str) -> bool {
    let Ok(confirm) = ch
        .basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
    else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(30), confirm).await,
        Ok(Ok(c)) if c.is_ack()
    )
}

/// Publishes `PREFIX:0` .. `PREFIX:{n-1}` through `ch`, each again until it is confirmed
/// (a group that is electing, or a node that routed to a deposed leader, nacks); their
/// bodies. Fails after a minute without all of them.
async fn publish_confirmed(ch: &Channel, prefix: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = Vec::with_capacity(n);
    while done.len() < n {
        let body = format!("{prefix}:{}", done.len());
        if publish(ch, &body).await {
            done.push(body);
        } else {
            assert!(
                Instant::now() < deadline,
                "{prefix}: {} of {n} confirmed",
                done.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    done
}

/// The node (of `nodes`) that leads the queue's group now: the one that most recently
/// logged taking its lead (a consume cannot tell: consumers work through any node).
async fn leader(c: &Cluster, nodes: &[usize], queue: &str) -> usize {
    let needles = [format!("queue={queue}"), format!("queue=\"{queue}\"")];
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
        assert!(Instant::now() < deadline, "no node leads the queue");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Consumes (and acks) through node `i` until nothing arrives for a while: the bodies,
/// and how many came flagged redelivered. Right after a leader is lost the consume may
/// be refused (the queue's leader is not known yet) and the first delivery may wait for
/// an election and a read from disk: both get a while on a loaded machine.
async fn drain(c: &Cluster, i: usize) -> (Vec<String>, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut consumer = loop {
        let ch = c.connect(i).await.create_channel().await.unwrap();
        match ch
            .basic_consume(
                QUEUE.into(),
                "drain".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(consumer) => break consumer,
            Err(err) => {
                assert!(Instant::now() < deadline, "consume refused: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let mut bodies = Vec::new();
    let mut redelivered = 0;
    let mut wait = Duration::from_secs(30);
    while let Ok(Some(Ok(d))) = tokio::time::timeout(wait, consumer.next()).await {
        bodies.push(String::from_utf8_lossy(&d.data).into_owned());
        redelivered += usize::from(d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
        wait = Duration::from_secs(3);
    }
    (bodies, redelivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_the_loss_of_the_queue_leader() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = c.connect(1).await.create_channel().await.unwrap();
    let (options, args) = quorum();
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();

    // Publish through every node (the others forward to the leader).
    let mut confirmed = BTreeSet::new();
    for node in [1, 2, 3] {
        let ch = confirming_channel(&c, node).await.expect("node up");
        confirmed.extend(publish_confirmed(&ch, &format!("node{node}"), 100).await);
    }

    // A consumer takes some without acking, then the leader dies.
    let first = leader(&c, &[1, 2, 3], QUEUE).await;
    let conn = c.connect(first).await;
    let held = conn.create_channel().await.unwrap();
    let mut consumer = held
        .basic_consume(
            QUEUE.into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
        assert!(matches!(d, Ok(Some(Ok(_)))), "a delivery from the leader");
    }
    // The log records a hand-out before the delivery leaves, without waiting for its
    // commit: a publish confirmed after the deliveries were seen is later in the log,
    // so its commit covers theirs.
    let marker = confirming_channel(&c, first).await.expect("leader up");
    assert!(publish(&marker, "marker").await, "the leader confirms");
    confirmed.insert("marker".to_string());
    c.kill(first);

    // The survivors elect a new leader and keep confirming.
    let rest: Vec<usize> = [1, 2, 3].into_iter().filter(|i| *i != first).collect();
    let ch = confirming_channel(&c, rest[0]).await.expect("survivor up");
    confirmed.extend(publish_confirmed(&ch, "after", 20).await);

    let second = leader(&c, &rest, QUEUE).await;
    let (got, redelivered) = drain(&c, second).await;
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    let lost: Vec<&String> = confirmed.difference(&got_set).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    assert_eq!(got.len(), got_set.len(), "no duplicates on one drain");
    assert!(
        redelivered >= 1,
        "messages handed out by the old leader come back redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_take_transactions_and_refuse_what_rabbitmq_refuses() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;

    // A transaction's publishes reach the queue at commit, and only then.
    let ch = c.connect(1).await.create_channel().await.unwrap();
    let (options, args) = quorum();
    ch.queue_declare("tx".into(), options, args).await.unwrap();
    let node = leader(&c, &[1, 2, 3], "tx").await;
    let ch = c.connect(node).await.create_channel().await.unwrap();
    ch.tx_select().await.unwrap();
    for body in ["a", "b", "c"] {
        ch.basic_publish(
            "".into(),
            "tx".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.tx_commit().await.unwrap();
    ch.basic_publish(
        "".into(),
        "tx".into(),
        BasicPublishOptions::default(),
        b"rolled back",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.tx_rollback().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("tx".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    assert_eq!(got, ["a", "b", "c"], "committed publishes only, in order");

    let conn = c.connect(2).await;
    for (flag, options) in [
        ("non-durable", QueueDeclareOptions::default()),
        (
            "exclusive-owner",
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
        ),
        (
            "auto-delete",
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
        ),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let (_, args) = quorum();
        let err = ch
            .queue_declare("bad".into(), options, args)
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("PRECONDITION_FAILED")
                && text.contains(&format!("invalid property '{flag}' for queue 'bad'")),
            "{flag}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_outside_the_queues_group_follows_its_leader() {
    let Some(mut c) = Cluster::start(4) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3, 4], None, ELECTION).await;
    // Declared on node 1 with 3 replicas: nodes 1, 2 and 3; node 4 holds none.
    let ch = c.connect(1).await.create_channel().await.unwrap();
    let (options, mut args) = quorum();
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(3));
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();
    let first = leader(&c, &[1, 2, 3], QUEUE).await;

    let mut confirmed = BTreeSet::new();
    let outside = confirming_channel(&c, 4).await.expect("node 4 up");
    confirmed.extend(publish_confirmed(&outside, "before", 50).await);
    // The leader dies: node 4 learns the new one and its publishes are confirmed again.
    c.kill(first);
    confirmed.extend(publish_confirmed(&outside, "after", 50).await);
    let rest: Vec<usize> = [1, 2, 3].into_iter().filter(|i| *i != first).collect();
    let second = leader(&c, &rest, QUEUE).await;
    // `warren ctl list_queues` through node 4 names the new leader and the members, as
    // `rabbitmqctl list_queues name type leader members` does.
    let listed = c.ctl(4, &["list_queues", "name", "type", "leader", "members"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with(QUEUE))
        .unwrap_or_else(|| panic!("{QUEUE} listed: {listed}"));
    assert!(row.contains("quorum"), "{row}");
    assert!(row.contains(&c.node(second).name), "the new leader: {row}");
    for i in 1..=3 {
        assert!(row.contains(&c.node(i).name), "member {i}: {row}");
    }
    let (got, _) = drain(&c, second).await;
    let got: BTreeSet<String> = got.into_iter().collect();
    let lost: Vec<&String> = confirmed.difference(&got).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_attached_at_declare_gets_every_pipelined_publish() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    // As a benchmark client does: declare, consume at once on the declaring node (its
    // group is still electing), then publish with many confirms outstanding.
    let conn = c.connect(1).await;
    let ch = conn.create_channel().await.unwrap();
    let (options, args) = quorum();
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            QUEUE.into(),
            "early".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publisher = confirming_channel(&c, 1).await.expect("node 1 up");
    let body = vec![b'x'; 1024];
    let mut confirms = Vec::new();
    for _ in 0..2000 {
        confirms.push(
            publisher
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
        );
    }
    let mut acked = 0;
    for confirm in confirms {
        acked += usize::from(confirm.await.unwrap().is_ack());
    }
    assert!(acked > 0, "some publishes confirmed");
    let mut got = 0;
    while got < acked {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(_))) => got += 1,
            other => panic!("{got} of {acked} confirmed messages delivered: {other:?}"),
        }
    }
}

/// The members `warren ctl list_queues` names for `queue` (through node `i`), and its
/// type: "" members for a queue kept on one node.
fn listed_members(c: &Cluster, i: usize, queue: &str) -> (String, String) {
    let listed = c.ctl(i, &["list_queues", "name", "type", "members"]);
    let row = listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} listed: {listed}"));
    let mut cells = row.split('\t');
    let (_, kind, members) = (cells.next(), cells.next(), cells.next());
    (
        kind.unwrap_or_default().trim().to_string(),
        members.unwrap_or_default().trim().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_matched_by_a_mirroring_policy_are_replicated() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    // RabbitMQ's classic mirroring policies, as users set them with rabbitmqctl.
    c.ctl(
        1,
        &[
            "set_policy",
            "ha-all",
            "^replicated$|^excl$",
            r#"{"ha-mode":"all"}"#,
            "--apply-to",
            "queues",
        ],
    );
    c.ctl(
        1,
        &[
            "set_policy",
            "ha-two",
            "^two$",
            r#"{"ha-mode":"exactly","ha-params":2,"ha-sync-mode":"automatic"}"#,
        ],
    );
    let pinned = format!(
        r#"{{"ha-mode":"nodes","ha-params":["{}","{}"]}}"#,
        c.node(2).name,
        c.node(3).name
    );
    c.ctl(1, &["set_policy", "ha-nodes", "^pinned$", &pinned]);
    // A bad mirroring setting gets RabbitMQ's text.
    let refused = c.ctl_output(1, &["set_policy", "bad", ".*", r#"{"ha-mode":"exactly"}"#]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("ha-mode=\"exactly\" takes an integer, none given"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Policies reach every node through the metadata group before the declarations.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let conn = c.connect(1).await;
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in [QUEUE, "two", "pinned", "single"] {
        ch.queue_declare(q.into(), durable, FieldTable::default())
            .await
            .unwrap();
    }
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..durable
    };
    ch.queue_declare("excl".into(), exclusive, FieldTable::default())
        .await
        .unwrap();

    let names: Vec<String> = (1..=3).map(|i| c.node(i).name.clone()).collect();
    let (kind, members) = listed_members(&c, 2, QUEUE);
    assert_eq!(kind, "classic", "a mirrored queue stays a classic queue");
    for n in &names {
        assert!(
            members.contains(n.as_str()),
            "ha-mode all: {n} in {members}"
        );
    }
    let (_, members) = listed_members(&c, 2, "two");
    assert_eq!(
        names
            .iter()
            .filter(|n| members.contains(n.as_str()))
            .count(),
        2,
        "ha-mode exactly 2: {members}"
    );
    let (_, members) = listed_members(&c, 2, "pinned");
    assert!(
        !members.contains(names[0].as_str()),
        "ha-mode nodes: {members}"
    );
    assert!(members.contains(names[1].as_str()) && members.contains(names[2].as_str()));
    for q in ["single", "excl"] {
        let (_, members) = listed_members(&c, 1, q);
        assert!(
            !names.iter().any(|n| members.contains(n.as_str())),
            "{q} is kept on one node: {members}"
        );
    }
    drop(conn);

    // The mirrored queue keeps every confirmed message when its leader dies.
    let mut confirmed = BTreeSet::new();
    let ch = confirming_channel(&c, 3).await.expect("node 3 up");
    confirmed.extend(publish_confirmed(&ch, "m", 100).await);
    let first = leader(&c, &[1, 2, 3], QUEUE).await;
    // Every node lists the leader's figures (as RabbitMQ lists a queue's leader's).
    for i in [1, 2, 3] {
        let listed = c.ctl(i, &["list_queues", "name", "messages", "messages_ready"]);
        let row = listed.lines().find(|l| l.split('\t').next() == Some(QUEUE));
        assert_eq!(
            row,
            Some(format!("{QUEUE}\t100\t100").as_str()),
            "through node {i}"
        );
    }
    c.kill(first);
    let rest: Vec<usize> = [1, 2, 3].into_iter().filter(|i| *i != first).collect();
    let ch = confirming_channel(&c, rest[0]).await.expect("survivor up");
    confirmed.extend(publish_confirmed(&ch, "after", 20).await);
    let second = leader(&c, &rest, QUEUE).await;
    let (got, _) = drain(&c, second).await;
    let got: BTreeSet<String> = got.into_iter().collect();
    let lost: Vec<&String> = confirmed.difference(&got).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
}

/// Waits (up to a minute) until `needle` appears in node `i`'s log at least `times` times.
async fn wait_logged(c: &Cluster, nodes: &[usize], needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen: usize = nodes
            .iter()
            .map(|&i| c.log(i).matches(needle).count())
            .sum();
        if seen >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} logged {seen} of {times} times"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Declares the quorum queue on three of a four-node cluster's nodes (not node 4)
/// once its metadata group agrees on a leader; the nodes' names.
async fn declare_on_three_of_four(c: &Cluster) -> Vec<String> {
    c.wait_agreed_leader(&[1, 2, 3, 4], None, ELECTION).await;
    let ch = c.connect(1).await.create_channel().await.unwrap();
    let (options, mut args) = quorum();
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(3));
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();
    let names: Vec<String> = (1..=4).map(|i| c.node(i).name.clone()).collect();
    let (_, members) = listed_members(c, 4, QUEUE);
    assert!(
        !members.contains(names[3].as_str()),
        "declared on nodes 1-3: {members}"
    );
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warren_ctl_adds_and_removes_a_replicated_queues_members() {
    let Some(mut c) = Cluster::start(4) else {
        return;
    };
    let names = declare_on_three_of_four(&c).await;

    // (The group may still be electing its first leader: nacks are tried again.)
    let mut confirmed = BTreeSet::new();
    let ch = confirming_channel(&c, 1).await.expect("node 1 up");
    confirmed.extend(publish_confirmed(&ch, "before", 100).await);

    // Node 4 joins the queue's group: it copies the log and becomes a voter.
    c.ctl(2, &["add_member", QUEUE, &names[3]]);
    let (_, members) = listed_members(&c, 3, QUEUE);
    assert!(
        members.contains(names[3].as_str()),
        "node 4 listed: {members}"
    );
    wait_logged(&c, &[1, 2, 3], "replicated queue: members changed", 1).await;
    // Node 1 leaves it (maybe its leader: it then hands over to another member).
    c.ctl(3, &["delete_member", QUEUE, &names[0]]);
    wait_logged(&c, &[1], "this node no longer holds a replica", 1).await;
    let (_, members) = listed_members(&c, 1, QUEUE);
    assert!(
        !members.contains(names[0].as_str()),
        "node 1 gone: {members}"
    );
    // What cannot be done is refused with a reason.
    let refused = c.ctl_output(1, &["delete_member", QUEUE, &names[0]]);
    assert!(!refused.status.success(), "node 1 is no member any more");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("holds no replica"));
    let refused = c.ctl_output(1, &["add_member", QUEUE, "n9@10.0.0.9"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not a cluster member"));

    // Of the members 2, 3 and 4, node 2 dies: 3 and 4 are a majority, so node 4 must
    // have every confirmed message for the queue to go on.
    c.kill(2);
    let ch = confirming_channel(&c, 3).await.expect("node 3 up");
    confirmed.extend(publish_confirmed(&ch, "after", 20).await);
    let second = leader(&c, &[3, 4], QUEUE).await;
    let (got, _) = drain(&c, second).await;
    let got: BTreeSet<String> = got.into_iter().collect();
    let lost: Vec<&String> = confirmed.difference(&got).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");

    // `grow` puts node 1 back (as rabbitmq-queues grow NODE all).
    let report = c.ctl(3, &["grow", &names[0], "all"]);
    assert!(report.contains(QUEUE) && report.contains("ok"), "{report}");
    let (_, members) = listed_members(&c, 4, QUEUE);
    assert!(
        members.contains(names[0].as_str()),
        "node 1 back: {members}"
    );
}

/// Packets per second the whole cluster sends over `window` (no client connected).
async fn cluster_packet_rate(c: &Cluster, window: Duration) -> f64 {
    let count = |c: &Cluster| (1..=c.len()).map(|i| c.packets_sent(i)).sum::<u64>();
    let before = count(c);
    tokio::time::sleep(window).await;
    (count(c) - before) as f64 / window.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_replicated_queues_send_nothing_between_nodes() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    const QUEUES: usize = 40;
    const WINDOW: Duration = Duration::from_secs(6);
    // The cluster's own chatter: link pings and the metadata group.
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let baseline = cluster_packet_rate(&c, WINDOW).await;
    {
        let conn = c.connect(1).await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let (options, args) = quorum();
        for q in 0..QUEUES {
            let name = format!("idle-{q}");
            ch.queue_declare(name.as_str().into(), options, args.clone())
                .await
                .unwrap();
            // (Each group commits an entry: a leader exists and has replicated.)
            let deadline = Instant::now() + ELECTION;
            loop {
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        name.as_str().into(),
                        BasicPublishOptions::default(),
                        b"kept",
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                if confirm.is_ack() {
                    break;
                }
                assert!(Instant::now() < deadline, "{name}: never confirmed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        conn.close(200, "done".into()).await.unwrap();
    }
    // Settled: the last commits have reached every follower.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = cluster_packet_rate(&c, WINDOW).await;
    // Per-group heartbeats (4 a second to each of 2 followers, and their answers) would
    // add some 16 packets a second per queue; allow well under one.
    assert!(
        idle - baseline < QUEUES as f64 * 0.5,
        "{QUEUES} idle replicated queues: {idle:.0} packets/s against {baseline:.0} without them"
    );
    // And they still work: every message is there.
    let ch = c.connect(2).await.create_channel().await.unwrap();
    for q in 0..QUEUES {
        let name = format!("idle-{q}");
        let got = ch
            .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        assert!(got.is_some(), "{name} lost its message");
    }
}

/// The timestamp that starts the last line of node `i`'s log containing `needle`.
fn logged_at(c: &Cluster, i: usize, needle: &str) -> Option<String> {
    let log = c.log(i);
    let line = log.lines().rev().find(|l| l.contains(needle))?;
    Some(line.split_whitespace().next()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_hands_its_leaderships_over_first() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = c.connect(1).await.create_channel().await.unwrap();
    let (options, args) = quorum();
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();
    let first = leader(&c, &[1, 2, 3], QUEUE).await;
    let other = if first == 1 { 2 } else { 1 };
    let through = confirming_channel(&c, other).await.expect("node up");
    let mut confirmed: BTreeSet<String> = publish_confirmed(&through, "before", 200)
        .await
        .into_iter()
        .collect();

    c.stop(first);
    let handed = c.log(first);
    assert!(
        handed
            .lines()
            .any(|l| l.contains("leaderships handed over") && l.contains("handed_over=1")),
        "node {first} handed its queue over:\n{}",
        c.log_tail(first)
    );
    // Another member led the queue before the stopping node was gone.
    let rest: Vec<usize> = [1, 2, 3].into_iter().filter(|i| *i != first).collect();
    let second = leader(&c, &rest, QUEUE).await;
    let took = logged_at(&c, second, "this node leads it now").expect("new leader logged");
    let stopped = logged_at(&c, first, "stopped: connections closed").expect("stop logged");
    assert!(
        took < stopped,
        "node {second} took over at {took}, node {first} stopped at {stopped}"
    );

    let through = confirming_channel(&c, other).await.expect("node up");
    confirmed.extend(publish_confirmed(&through, "after", 20).await);
    let (got, _) = drain(&c, second).await;
    let got: BTreeSet<String> = got.into_iter().collect();
    let lost: Vec<&String> = confirmed.difference(&got).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
}

/// Publishes `PREFIX:0`, `PREFIX:1`, ... through `ch` in windows of 20, each window's
/// confirms awaited, until `stop` is set: the bodies confirmed, and those nacked.
async fn publish_until(
    ch: Channel,
    prefix: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<String>, Vec<String>) {
    let (mut confirmed, mut nacked) = (Vec::new(), Vec::new());
    let mut next = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut confirms = Vec::new();
        for _ in 0..20 {
            let body = format!("{prefix}:{next}");
            next += 1;
            let confirm = ch
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("published");
            confirms.push((body, confirm));
        }
        for (body, confirm) in confirms {
            let answer = tokio::time::timeout(Duration::from_secs(40), confirm).await;
            match answer {
                Ok(Ok(c)) if c.is_ack() => confirmed.push(body),
                _ => nacked.push(body),
            }
        }
    }
    (confirmed, nacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_made_while_the_leadership_moves_are_confirmed_by_the_new_leader() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = confirming_channel(&c, 1).await.expect("node up");
    let (options, args) = quorum();
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();
    let mut leads = leader(&c, &[1, 2, 3], QUEUE).await;
    publish_confirmed(&ch, "first", 1).await;

    // One publisher on the node that leads first (its member proposes), one on another
    // node (which forwards to the leader it knows).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let elsewhere = if leads == 3 { 2 } else { 3 };
    let at_leader = confirming_channel(&c, leads).await.expect("node up");
    let forwarded = confirming_channel(&c, elsewhere).await.expect("node up");
    let running = [(at_leader, "at-leader"), (forwarded, "forwarded")]
        .map(|(ch, prefix)| tokio::spawn(publish_until(ch, prefix, stop.clone())));

    // The leadership goes round the three nodes, twice, while both publish.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let to = leads % 3 + 1;
        let name = c.node(to).name.clone();
        let out = tokio::task::block_in_place(|| c.ctl(2, &["transfer_leadership", QUEUE, &name]));
        assert!(out.contains("Transferring"), "{out}");
        leads = to;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut confirmed: BTreeSet<String> = BTreeSet::from(["first:0".to_string()]);
    for publisher in running {
        let (acked, nacked) = publisher.await.expect("publisher ran");
        assert!(
            nacked.is_empty(),
            "{} of {} nacked while the leadership moved: {:?}",
            nacked.len(),
            acked.len() + nacked.len(),
            &nacked[..nacked.len().min(10)]
        );
        assert!(acked.len() > 100, "only {} published", acked.len());
        confirmed.extend(acked);
    }

    let (got, _) = drain(&c, leads).await;
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    let lost: Vec<&String> = confirmed.difference(&unique).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    assert_eq!(got.len(), unique.len(), "a message delivered twice");
}

/// How many of the `rebal-*` queues each node leads, as `warren ctl list_queues name
/// leader` through node `via` shows them.
fn listed_leaders(c: &Cluster, via: usize) -> Vec<usize> {
    let listed = c.ctl(via, &["list_queues", "name", "leader"]);
    (1..=c.len())
        .map(|i| {
            listed
                .lines()
                .filter(|l| l.starts_with("rebal-") && l.contains(&c.node(i).name))
                .count()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warren_ctl_rebalance_spreads_leaders_over_the_nodes() {
    let Some(c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = confirming_channel(&c, 1).await.expect("node up");
    let (options, args) = quorum();
    for q in 0..6 {
        let name = format!("rebal-{q}");
        ch.queue_declare(name.as_str().into(), options, args.clone())
            .await
            .unwrap();
        let confirm = ch
            .basic_publish(
                "".into(),
                name.as_str().into(),
                BasicPublishOptions::default(),
                name.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{name} confirmed");
    }
    // Declared on node 1, every queue is led there.
    let deadline = Instant::now() + ELECTION;
    while listed_leaders(&c, 1) != [6, 0, 0] {
        assert!(Instant::now() < deadline, "{:?}", listed_leaders(&c, 1));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Through node 2: the leaders on node 1 are moved by node 1 on node 2's request.
    let report = c.ctl(2, &["rebalance", "quorum"]);
    for i in 1..=3 {
        let row = report
            .lines()
            .find(|l| l.contains(&c.node(i).name))
            .unwrap_or_else(|| panic!("node {i} in the report: {report}"));
        assert!(row.trim_end().ends_with('2'), "node {i} leads 2: {report}");
    }
    assert_eq!(listed_leaders(&c, 3), [2, 2, 2]);

    // One queue's leadership moved to a member of its choosing, through any node.
    let listed = c.ctl(1, &["list_queues", "name", "leader"]);
    let led_by_1 = listed
        .lines()
        .find(|l| l.starts_with("rebal-") && l.contains(&c.node(1).name))
        .and_then(|l| l.split('\t').next())
        .expect("a queue led by node 1")
        .to_string();
    let out = c.ctl(2, &["transfer_leadership", &led_by_1, &c.node(3).name]);
    assert!(out.contains("Transferring"), "{out}");
    assert_eq!(listed_leaders(&c, 2), [1, 2, 3]);
    let refused = c.ctl_output(2, &["transfer_leadership", &led_by_1, "n9@10.0.0.9"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("holds no replica"));

    // Every queue still serves its message, through any node.
    let ch = c.connect(3).await.create_channel().await.unwrap();
    for q in 0..6 {
        let name = format!("rebal-{q}");
        let got = ch
            .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name} lost its message"));
        assert_eq!(got.data, name.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_serves_no_clients_and_leads_no_queue_until_revived() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = confirming_channel(&c, 1).await.expect("node up");
    let (options, args) = quorum();
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();
    let mut confirmed: BTreeSet<String> = publish_confirmed(&ch, "before", 50)
        .await
        .into_iter()
        .collect();
    assert_eq!(leader(&c, &[1, 2, 3], QUEUE).await, 1);
    let client = c.connect(1).await;

    let out = c.ctl(1, &["drain"]);
    assert!(out.contains("maintenance mode"), "{out}");
    // Its clients are closed, as RabbitMQ closes them, and new ones refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.status().connected() {
        assert!(Instant::now() < deadline, "the client was not closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.try_connect(1, Duration::from_secs(2)).await.is_none(),
        "a drained node refuses clients"
    );
    // The queue is led elsewhere, and stays so when that leader dies: the drained node
    // votes but does not stand.
    let second = leader(&c, &[2, 3], QUEUE).await;
    let third = if second == 2 { 3 } else { 2 };
    c.kill(second);
    let ch = confirming_channel(&c, third).await.expect("node up");
    confirmed.extend(publish_confirmed(&ch, "after", 20).await);
    assert_eq!(leader(&c, &[1, third], QUEUE).await, third);
    assert_eq!(
        c.log(1).matches("this node leads it now").count(),
        1,
        "the drained node led the queue again:\n{}",
        c.log_tail(1)
    );

    let out = c.ctl(1, &["revive"]);
    assert!(out.contains("out of maintenance mode"), "{out}");
    assert!(
        c.try_connect(1, Duration::from_secs(5)).await.is_some(),
        "a revived node takes clients"
    );
    let (got, _) = drain(&c, third).await;
    let got: BTreeSet<String> = got.into_iter().collect();
    let lost: Vec<&String> = confirmed.difference(&got).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
}

/// Publishes `PREFIX:0:` .. `PREFIX:{n-1}:` (each padded to 2 KiB) through node `i`,
/// persistent, in windows of 100 awaiting their confirms; their ids (`PREFIX:k`), every
/// one confirmed (a nacked window fails the test).
async fn publish_padded(c: &Cluster, i: usize, prefix: &str, n: usize) -> Vec<String> {
    publish_padded_with(c, i, prefix, n, 0).await
}

/// [`publish_padded`], publishing a nacked message again, as a publisher that uses
/// confirms does, up to `resends` times in all (a nack says the broker did not take
/// it: a message nacked because its queue's leadership was moving is then taken).
async fn publish_padded_with(
    c: &Cluster,
    i: usize,
    prefix: &str,
    n: usize,
    resends: usize,
) -> Vec<String> {
    publish_sized(c, i, prefix, n, resends, 2048).await
}

/// [`publish_padded_with`], each body padded with `pad` bytes.
async fn publish_sized(
    c: &Cluster,
    i: usize,
    prefix: &str,
    n: usize,
    mut resends: usize,
    pad: usize,
) -> Vec<String> {
    let ch = confirming_channel(c, i).await.expect("node up");
    let pad = "x".repeat(pad);
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(100) {
        let mut window: Vec<usize> = (start..(start + 100).min(n)).collect();
        while !window.is_empty() {
            let mut confirms = Vec::new();
            for k in window.drain(..) {
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        QUEUE.into(),
                        BasicPublishOptions::default(),
                        format!("{prefix}:{k}:{pad}").as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("published");
                confirms.push((k, confirm));
            }
            for (k, confirm) in confirms {
                let id = format!("{prefix}:{k}");
                if confirm.await.expect("confirmed").is_ack() {
                    ids.push(id);
                } else {
                    assert!(resends > 0, "{id} nacked");
                    resends -= 1;
                    window.push(k);
                }
            }
            if !window.is_empty() {
                eprintln!("{} of {prefix} nacked: published again", window.len());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    ids
}

/// The id (`PREFIX:k`) of a body `publish_padded` made.
fn padded_id(body: &str) -> String {
    body.splitn(3, ':').take(2).collect::<Vec<_>>().join(":")
}

/// Waits (up to a minute) until node `i` lists exactly `n` of the cluster's nodes as the
/// queue's members.
async fn wait_members(c: &Cluster, i: usize, n: usize) -> String {
    let names: Vec<String> = (1..=c.len()).map(|k| c.node(k).name.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // (A node that just started may not answer yet.)
        let out = c.ctl_output(i, &["list_queues", "name", "members"]);
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        let members = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(QUEUE))
            .unwrap_or_default()
            .to_string();
        if out.status.success()
            && names
                .iter()
                .filter(|m| members.contains(m.as_str()))
                .count()
                == n
        {
            return members;
        }
        assert!(
            Instant::now() < deadline,
            "{n} members wanted, listed: {members}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirroring_policy_set_changed_or_cleared_applies_to_queues_declared_before() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let conn = c.connect(1).await;
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(QUEUE.into(), durable, FieldTable::default())
        .await
        .unwrap();
    // Past the queue's body window (4 MiB): most of them wait on disk only.
    let mut confirmed = publish_padded(&c, 1, "before", 3000).await;
    // Five handed out and never acked: they come back, redelivered.
    let getter = conn.create_channel().await.unwrap();
    for _ in 0..5 {
        let got = getter
            .basic_get(QUEUE.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap();
        assert!(got.is_some(), "a message to get");
    }
    assert_eq!(listed_members(&c, 2, QUEUE).1, "", "kept on node 1");

    // A policy that mirrors it on every node: node 1's messages seed the queue's group.
    c.ctl(
        2,
        &[
            "set_policy",
            "mirror",
            &format!("^{QUEUE}$"),
            r#"{"ha-mode":"all"}"#,
            "--apply-to",
            "queues",
        ],
    );
    wait_members(&c, 3, 3).await;
    wait_logged(&c, &[1], "its messages now in its group", 1).await;
    wait_logged(&c, &[1], "replicated queue: members changed", 1).await;
    assert_eq!(listed_members(&c, 2, QUEUE).0, "classic");
    confirmed.extend(publish_padded(&c, 2, "during", 100).await);

    // Node 1, which held the queue alone before, dies: the others have everything.
    c.kill(1);
    let second = leader(&c, &[2, 3], QUEUE).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = c.ctl(second, &["list_queues", "name", "messages"]);
        if listed.contains(&format!("{QUEUE}\t3100")) {
            break;
        }
        assert!(Instant::now() < deadline, "3100 messages wanted: {listed}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.start_node(1);

    // Fewer mirrors, then none: the queue keeps its messages on its leader alone.
    c.ctl(
        3,
        &[
            "set_policy",
            "mirror",
            &format!("^{QUEUE}$"),
            r#"{"ha-mode":"exactly","ha-params":2}"#,
        ],
    );
    wait_members(&c, 2, 2).await;
    c.ctl(3, &["clear_policy", "mirror"]);
    wait_members(&c, 1, 1).await;
    confirmed.extend(publish_padded(&c, 3, "after", 50).await);

    let (got, redelivered) = drain(&c, 2).await;
    let ids: Vec<String> = got.iter().map(|b| padded_id(b)).collect();
    let have: BTreeSet<&String> = ids.iter().collect();
    let lost: Vec<&String> = confirmed.iter().filter(|m| !have.contains(m)).collect();
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost: {lost:.20?}",
        lost.len()
    );
    assert_eq!(ids.len(), confirmed.len(), "no duplicates");
    assert!(
        redelivered >= 5,
        "the five handed out come back redelivered"
    );
    // Those published before the policy, in their order.
    let before: Vec<&String> = ids.iter().filter(|m| m.starts_with("before:")).collect();
    let mut sorted = before.clone();
    sorted.sort_by_key(|m| m[7..].parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(before, sorted, "in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_its_queue_becomes_mirrored_loses_no_confirmed_message() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = c.connect(1).await.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(QUEUE.into(), durable, FieldTable::default())
        .await
        .unwrap();
    let mut confirmed = publish_padded(&c, 1, "before", 20_000).await;
    c.ctl(
        2,
        &[
            "set_policy",
            "mirror",
            &format!("^{QUEUE}$"),
            r#"{"ha-mode":"all"}"#,
        ],
    );
    // Killed once its queue's new placement is agreed, while its messages go into the
    // queue's group (or soon after).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.log(1).contains("Replicate") {
        assert!(
            Instant::now() < deadline,
            "the queue's placement never changed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.kill(1);
    let cut_short = !c.log(1).contains("its messages now in its group");
    eprintln!("node 1 killed with its queue's seeding cut short: {cut_short}");
    c.start_node(1);
    wait_members(&c, 2, 3).await;
    if cut_short {
        // (Seeded again from the start, over what the group held, if anything.)
        wait_logged(&c, &[1], "its messages now in its group", 1).await;
        eprintln!(
            "a seeding under way was dropped: {}",
            c.log(1)
                .contains("its seeding did not finish: seeded again")
        );
    }
    // Right after the restart the queue's leadership may still move, and a publish
    // that reaches a node as it stops leading is nacked: the publisher sends it again.
    confirmed.extend(publish_padded_with(&c, 3, "after", 100, 1000).await);
    let (got, _) = drain(&c, 2).await;
    let ids: BTreeSet<String> = got.iter().map(|b| padded_id(b)).collect();
    let lost: Vec<&String> = confirmed.iter().filter(|m| !ids.contains(*m)).collect();
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost: {lost:.20?}",
        lost.len()
    );
    assert_eq!(got.len(), confirmed.len(), "no duplicates");
}

/// Node `i`'s listing of the queue: (messages, messages_paged_out, message_bytes_ram);
/// `None` while it cannot tell (starting, or the queue has no leader it knows).
fn paging_figures(c: &Cluster, i: usize) -> Option<(u64, u64, u64)> {
    let out = c.ctl_output(
        i,
        &[
            "list_queues",
            "name",
            "messages",
            "messages_paged_out",
            "message_bytes_ram",
        ],
    );
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(QUEUE))?;
    let cells: Vec<u64> = row
        .split('\t')
        .skip(1)
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    match cells[..] {
        [messages, paged, ram] => Some((messages, paged, ram)),
        _ => None,
    }
}

/// Waits (up to a minute) until one of `nodes` (the queue's leader: the others do not
/// hold its bodies) lists all `n` messages, most of them on disk only and at most about
/// a window of bodies in memory; that node.
async fn wait_paged(c: &Cluster, nodes: &[usize], n: u64, window: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let figures: Vec<_> = nodes.iter().map(|&i| (i, paging_figures(c, i))).collect();
        for (i, f) in &figures {
            if let Some((messages, paged, ram)) = *f
                && messages == n
                && paged >= n * 9 / 10
            {
                // The window, and a read's batch on top of a nearly full one.
                assert!(ram <= window + 2 * 2100, "{ram} bytes of bodies in memory");
                return *i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{n} messages mostly paged wanted; (node, (messages, paged, ram)) = {figures:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_backlog_stays_on_disk_through_restarts_and_a_leader_loss() {
    const WINDOW: u64 = 64 << 10;
    let window = WINDOW.to_string();
    let Some(mut c) = Cluster::start_with(3, &[("WARREN_QUEUE_BODY_WINDOW", &window)]) else {
        return;
    };
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let ch = c.connect(1).await.create_channel().await.unwrap();
    let (options, args) = quorum();
    ch.queue_declare(QUEUE.into(), options, args).await.unwrap();
    // About a hundred windows of 2 KiB messages.
    let confirmed = publish_padded(&c, 1, "backlog", 3000).await;
    wait_paged(&c, &[1, 2, 3], 3000, WINDOW).await;

    // Every node killed and started again: the members read their messages back from
    // their stores (not their bodies), and the new leader pages them as before.
    for i in 1..=3 {
        c.kill(i);
    }
    for i in 1..=3 {
        c.start_node(i);
    }
    c.wait_agreed_leader(&[1, 2, 3], None, ELECTION).await;
    let second = wait_paged(&c, &[1, 2, 3], 3000, WINDOW).await;

    // Its leader lost too: another member serves the backlog, in order, whole.
    c.kill(second);
    let others: Vec<usize> = (1..=3).filter(|&i| i != second).collect();
    let third = leader(&c, &others, QUEUE).await;
    let (got, _) = drain(&c, third).await;
    let ids: Vec<String> = got.iter().map(|b| padded_id(b)).collect();
    assert_eq!(ids, confirmed, "every confirmed message, once, in order");
}

/// Resident bytes of process `pid` now (0 once it is gone).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// Samples the resident memory of `pids` every 20 ms until `stop` is set; the highest
/// of each.
fn sample_rss(
    pids: Vec<u32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut peaks = vec![0; pids.len()];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (peak, pid) in peaks.iter_mut().zip(&pids) {
                *peak = (*peak).max(rss_bytes(*pid));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peaks
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_to_a_large_backlog_catches_up_without_it_in_memory() {
    const MIB: u64 = 1 << 20;
    const MESSAGES: usize = 12_000;
    const PAD: usize = 20 << 10;
    let Some(c) = Cluster::start(4) else {
        return;
    };
    if c.backend != cluster::Backend::Warren {
        return; // (A claim about Warren's memory.)
    }
    let names = declare_on_three_of_four(&c).await;
    // A 240 MiB backlog: its log is snapshotted and truncated many times over.
    let confirmed = publish_sized(&c, 1, "big", MESSAGES, 0, PAD).await;
    let backlog = (MESSAGES * PAD) as u64;
    let first = leader(&c, &[1, 2, 3], QUEUE).await;

    // Node 4 joins: the leader sends it a snapshot of the backlog, then the log after.
    let pids: Vec<u32> = [first, 4].iter().map(|&i| c.pid(i).unwrap()).collect();
    let before: Vec<u64> = pids.iter().map(|&p| rss_bytes(p)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_rss(pids, stop.clone());
    c.ctl(2, &["add_member", QUEUE, &names[3]]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let installed = loop {
        let log = c.log(4);
        if let Some(line) = log.lines().find(|l| l.contains("snapshot installed")) {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "node 4 installed no snapshot:\n{}",
            c.log_tail(4)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    wait_logged(&c, &[1, 2, 3], "replicated queue: members changed", 1).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peaks = sampler.join().unwrap();
    let sent: usize = installed
        .split("messages=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        sent > MESSAGES / 2,
        "most of the backlog by snapshot: {installed}"
    );
    // Neither the leader nor the new member held the backlog in memory (before streams,
    // each held it twice: its bodies and their encoding). What they hold is the store's
    // page cache (64 MiB), the log entries after the snapshot and a batch or two.
    let grown: Vec<u64> = peaks
        .iter()
        .zip(&before)
        .map(|(p, b)| p.saturating_sub(*b))
        .collect();
    eprintln!("peak RSS {peaks:?}, before {before:?}");
    for (who, grew) in ["leader", "node 4"].iter().zip(grown) {
        assert!(
            grew < backlog,
            "{who} grew by {} MiB sending a {} MiB backlog",
            grew / MIB,
            backlog / MIB
        );
    }

    // Node 4 leads the queue and serves the whole backlog, in order, from its store.
    c.ctl(2, &["transfer_leadership", QUEUE, &names[3]]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while leader(&c, &[1, 2, 3, 4], QUEUE).await != 4 {
        assert!(Instant::now() < deadline, "node 4 did not take the lead");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (got, _) = drain(&c, 4).await;
    let ids: Vec<String> = got.iter().map(|b| padded_id(b)).collect();
    assert_eq!(ids.len(), confirmed.len());
    assert!(ids == confirmed, "every confirmed message, once, in order");
}
