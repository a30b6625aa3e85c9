//! The fault checker (issue 12's proof): confirming producers and acking consumers run
//! against a cluster of the harness while a nemesis kills, pauses and partitions its nodes;
//! at the end every node is healed and restarted, every queue is drained through every
//! node, and the ledger of what was confirmed is held against what came out.
//!
//! The verdict: a confirmed message that never came out is lost (a hard failure); an
//! unconfirmed one (nacked, returned, or unanswered when its connection broke) is either
//! delivered or reported as lost-but-unconfirmed; deliveries of one message past the first
//! are duplicates. Producers stamp `producer:sequence` in the body and never re-publish:
//! an unconfirmed publish stays unconfirmed. Every client reconnects on error, to the next
//! node that may serve its queue (classic queues: their home only, the one node that serves
//! them today; quorum queues: any node).

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::cluster::{Backend, Cluster};

/// Type of the queues under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// A classic queue: one home node serves it.
    Classic,
    /// `x-queue-type: quorum`: replicated, served through any node.
    Quorum,
}

/// One kind of fault the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// kill -9 the node that leads a queue (a classic queue's home), restart it after the hold.
    KillLeader,
    /// kill -9 a random node, restart it after the hold.
    KillRandom,
    /// SIGSTOP a node past the election timeout, then SIGCONT.
    Pause,
    /// Cut the cluster in two halves (both ways).
    PartitionHalves,
    /// Cut one node off every other (both ways).
    PartitionAlone,
    /// Drop what one node sends to every other (one way).
    PartitionOneWay,
}

impl FaultKind {
    /// Every kind, in the order the nemesis takes them.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::PartitionHalves,
        FaultKind::KillRandom,
        FaultKind::PartitionAlone,
        FaultKind::PartitionOneWay,
    ];

    fn label(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill -9 leader",
            FaultKind::KillRandom => "kill -9 random",
            FaultKind::Pause => "pause (SIGSTOP)",
            FaultKind::PartitionHalves => "partition halves",
            FaultKind::PartitionAlone => "partition alone",
            FaultKind::PartitionOneWay => "partition one-way",
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long the nemesis keeps injecting faults (at least one of each kind is injected).
    pub run_for: Duration,
    /// Type of every queue.
    pub queue_type: QueueType,
    /// Whether queues are declared durable.
    pub durable_queues: bool,
    /// Whether messages are published persistent (delivery mode 2).
    pub persistent: bool,
    /// The faults, taken in turn.
    pub faults: Vec<FaultKind>,
    /// How long a fault is held before it is healed (a pause is held at least
    /// `pause_at_least`).
    pub hold: Duration,
    /// Pauses are held at least this long (past the election timeout).
    pub pause_at_least: Duration,
    /// Quiet time before each fault.
    pub quiet: Duration,
    /// Pause of every producer between two publishes.
    pub publish_interval: Duration,
    /// Seed of the nemesis's choices (printed, to replay a run).
    pub seed: u64,
}

impl Settings {
    /// Classic durable queues, persistent messages, every fault kind once (at least).
    pub fn short(queue_type: QueueType) -> Settings {
        Settings {
            run_for: Duration::from_secs(0),
            queue_type,
            durable_queues: true,
            persistent: true,
            faults: FaultKind::ALL.to_vec(),
            hold: Duration::from_secs(4),
            // Warren's metadata election timeout is 1-2 s; RabbitMQ's is longer.
            pause_at_least: Duration::from_secs(6),
            quiet: Duration::from_secs(3),
            publish_interval: Duration::from_millis(10),
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1,
        }
    }
}

/// One fault as it happened.
#[derive(Clone, Debug)]
pub struct FaultRecord {
    /// What was done.
    pub kind: FaultKind,
    /// To whom (`n2`, `n1 n3 | n2`, ...).
    pub target: String,
    /// When it was injected.
    pub started: Instant,
    /// When it was healed (the node restarted, resumed, the network healed).
    pub healed: Instant,
}

/// Per-fault figures of the report.
#[derive(Clone, Debug)]
pub struct FaultFigures {
    /// The fault.
    pub record: FaultRecord,
    /// Confirms between injection and heal.
    pub confirmed_during: usize,
    /// Publishes left unconfirmed between injection and the next fault.
    pub unconfirmed_after: usize,
    /// Time from the heal until every queue had a confirm again (`None`: some queue had
    /// none before the next fault or the end).
    pub recovered_in: Option<Duration>,
    /// Time from the injection to the first confirm on a queue whose serving node was hit,
    /// `None` when no queue's node was hit or none confirmed again before the next fault.
    pub first_confirm_after_fault: Option<Duration>,
}

/// The checker's verdict.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Backend, queue type and size of the run.
    pub setting: String,
    /// Messages published (confirmed or not).
    pub published: usize,
    /// Messages the broker confirmed (ack, not returned).
    pub confirmed: usize,
    /// Publishes nacked, returned or unanswered.
    pub unconfirmed: usize,
    /// Of those, nacked.
    pub nacked: usize,
    /// Of those, acked but returned (mandatory, no queue to route to).
    pub returned: usize,
    /// Of those, unanswered within 10 s or cut off by a broken channel or connection.
    pub unanswered: usize,
    /// Unconfirmed messages that came out all the same.
    pub unconfirmed_delivered: usize,
    /// Unconfirmed messages that never came out (reported, not a failure).
    pub unconfirmed_lost: usize,
    /// Confirmed messages that never came out: (producer, sequence). Must be empty.
    pub confirmed_lost: Vec<(u32, u64)>,
    /// Deliveries of a message past its first.
    pub duplicates: usize,
    /// Deliveries of something never published (must be 0).
    pub unexpected: usize,
    /// Messages taken while the faults ran, and by the final drain.
    pub delivered_live: usize,
    /// Messages the final drain took.
    pub delivered_drain: usize,
    /// Queues and nodes the final drain could not read, with the error.
    pub drain_refusals: Vec<String>,
    /// Queues that no node could drain.
    pub undrained_queues: Vec<String>,
    /// Figures of every fault.
    pub faults: Vec<FaultFigures>,
    /// Seed of the nemesis.
    pub seed: u64,
}

impl Report {
    /// Whether the run kept the promise: no confirmed message lost, nothing unexpected.
    pub fn passed(&self) -> bool {
        self.confirmed_lost.is_empty() && self.unexpected == 0 && self.undrained_queues.is_empty()
    }

    /// The summary table, as printed at the end of a run.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "== fault checker: {} (seed {})", self.setting, self.seed);
        let _ = writeln!(
            s,
            "{:>3}  {:<18} {:<17} {:>6} {:>10} {:>11} {:>13} {:>12}",
            "#",
            "fault",
            "target",
            "held",
            "confirmed",
            "unconfirmed",
            "first confirm",
            "recovered"
        );
        for (i, f) in self.faults.iter().enumerate() {
            let secs = |d: Option<Duration>| match d {
                Some(d) => format!("{:.2}s", d.as_secs_f64()),
                None => "-".to_string(),
            };
            let _ = writeln!(
                s,
                "{:>3}  {:<18} {:<17} {:>5.1}s {:>10} {:>11} {:>13} {:>12}",
                i + 1,
                f.record.kind.label(),
                f.record.target,
                f.record
                    .healed
                    .duration_since(f.record.started)
                    .as_secs_f64(),
                f.confirmed_during,
                f.unconfirmed_after,
                secs(f.first_confirm_after_fault),
                match f.recovered_in {
                    Some(d) => format!("{:.2}s", d.as_secs_f64()),
                    None => "not in window".to_string(),
                },
            );
        }
        let recoveries: Vec<f64> = self
            .faults
            .iter()
            .filter_map(|f| f.recovered_in.map(|d| d.as_secs_f64()))
            .collect();
        if !recoveries.is_empty() {
            let max = recoveries.iter().cloned().fold(0.0, f64::max);
            let mean = recoveries.iter().sum::<f64>() / recoveries.len() as f64;
            let _ = writeln!(s, "recovery after heal: mean {mean:.2}s, max {max:.2}s");
        }
        let _ = writeln!(
            s,
            "published {}  confirmed {}  unconfirmed {} (nacked {}, returned {}, unanswered {}; \
             delivered {}, lost {})",
            self.published,
            self.confirmed,
            self.unconfirmed,
            self.nacked,
            self.returned,
            self.unanswered,
            self.unconfirmed_delivered,
            self.unconfirmed_lost
        );
        let _ = writeln!(
            s,
            "delivered live {}  by final drain {}  duplicates {}  unexpected {}",
            self.delivered_live, self.delivered_drain, self.duplicates, self.unexpected
        );
        let _ = writeln!(s, "CONFIRMED LOST: {}", self.confirmed_lost.len());
        for (p, q) in self.confirmed_lost.iter().take(10) {
            let _ = writeln!(s, "  lost confirmed message {p}:{q}");
        }
        for q in &self.undrained_queues {
            let _ = writeln!(s, "  no node could drain {q}");
        }
        if !self.drain_refusals.is_empty() {
            // Expected for classic queues: only their home serves them.
            let _ = writeln!(s, "drain refusals: {}", self.drain_refusals.len());
            for r in self.drain_refusals.iter().take(2) {
                let _ = writeln!(s, "  e.g. {r}");
            }
        }
        let _ = writeln!(
            s,
            "verdict: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
        s
    }
}

/// A queue under test: its name, its home (where it was declared), whether a consumer
/// reads it while the faults run (the others build a backlog for the final drain).
#[derive(Clone, Debug)]
struct QueueUnderTest {
    name: String,
    home: usize,
    live_consumer: bool,
}

/// What one producer saw: per sequence number, confirmed or not, and when.
#[derive(Default)]
struct ProducerLedger {
    confirmed: Vec<(u64, Instant)>,
    unconfirmed: Vec<(u64, Instant)>,
    nacked: usize,
    returned: usize,
    unanswered: usize,
}

/// A small deterministic generator for the nemesis's choices (seeded and printed, so a
/// run can be replayed).
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// The nodes a client of `queue` may use, the first to try first.
fn serving_nodes(queue: &QueueUnderTest, nodes: usize, queue_type: QueueType) -> Vec<usize> {
    match queue_type {
        QueueType::Classic => vec![queue.home],
        QueueType::Quorum => (0..nodes)
            .map(|k| (queue.home - 1 + k) % nodes + 1)
            .collect(),
    }
}

fn declare_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// Connects to the first of `nodes` (in turn from `start`) that accepts, trying each for
/// up to 3 s; `None` when none does.
async fn connect_any(
    urls: &[String],
    nodes: &[usize],
    start: usize,
) -> Option<(usize, Connection)> {
    for k in 0..nodes.len() {
        let node = nodes[(start + k) % nodes.len()];
        let attempt = Connection::connect(&urls[node - 1], ConnectionProperties::default());
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
            return Some((node, c));
        }
    }
    None
}

/// Publishes to `queue` until `stop`, one message at a time, each awaited (for at most
/// 10 s) before the next; never re-publishes.
async fn produce(
    producer: u32,
    queue: QueueUnderTest,
    urls: Arc<Vec<String>>,
    settings: Settings,
    stop: Arc<AtomicBool>,
) -> ProducerLedger {
    let nodes = serving_nodes(&queue, urls.len(), settings.queue_type);
    let mut ledger = ProducerLedger::default();
    let mut seq = 0u64;
    let mut turn = 0;
    let properties = if settings.persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default().with_delivery_mode(1)
    };
    while !stop.load(Ordering::Relaxed) {
        let Some((_, conn)) = connect_any(&urls, &nodes, turn).await else {
            turn += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let channel = async {
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<Channel, lapin::Error>(ch)
        };
        let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(5), channel).await else {
            turn += 1;
            let _ = conn.close(0, "checker".into()).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let body = format!("{producer}:{seq}");
            let publish = async {
                ch.basic_publish(
                    "".into(),
                    queue.name.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body.as_bytes(),
                    properties.clone(),
                )
                .await?
                .await
            };
            let outcome = tokio::time::timeout(Duration::from_secs(10), publish).await;
            let now = Instant::now();
            match outcome {
                Ok(Ok(Confirmation::Ack(None))) => ledger.confirmed.push((seq, now)),
                // Acked but returned: no queue to route to.
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    ledger.returned += 1;
                    ledger.unconfirmed.push((seq, now));
                }
                Ok(Ok(_)) => {
                    ledger.nacked += 1;
                    ledger.unconfirmed.push((seq, now));
                }
                Ok(Err(_)) | Err(_) => {
                    ledger.unanswered += 1;
                    ledger.unconfirmed.push((seq, now));
                    break;
                }
            }
            tokio::time::sleep(settings.publish_interval).await;
        }
        turn += 1;
        // A dead connection's close may hang: bounded.
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(0, "checker".into())).await;
    }
    ledger
}

/// Parses a body the producers made.
fn stamp(body: &[u8]) -> Option<(u32, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let (p, s) = text.split_once(':')?;
    Some((p.parse().ok()?, s.parse().ok()?))
}

/// Consumes `queue` until `stop`, recording each message before acking it.
async fn consume(
    queue: QueueUnderTest,
    urls: Arc<Vec<String>>,
    queue_type: QueueType,
    stop: Arc<AtomicBool>,
) -> Vec<Option<(u32, u64)>> {
    let nodes = serving_nodes(&queue, urls.len(), queue_type);
    let mut got = Vec::new();
    let mut turn = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some((_, conn)) = connect_any(&urls, &nodes, turn).await else {
            turn += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let subscribe = async {
            let ch = conn.create_channel().await?;
            ch.basic_qos(50, BasicQosOptions::default()).await?;
            ch.basic_consume(
                queue.name.as_str().into(),
                "checker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        };
        let Ok(Ok(mut consumer)) = tokio::time::timeout(Duration::from_secs(5), subscribe).await
        else {
            turn += 1;
            let _ =
                tokio::time::timeout(Duration::from_secs(1), conn.close(0, "checker".into())).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut idle = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    idle = Duration::ZERO;
                    got.push(stamp(&delivery.data));
                    let ack = delivery.acker.ack(BasicAckOptions::default());
                    if !matches!(
                        tokio::time::timeout(Duration::from_secs(5), ack).await,
                        Ok(Ok(_))
                    ) {
                        break;
                    }
                }
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => {
                    // Quiet for long: the node may be gone without a word (partition).
                    idle += Duration::from_millis(500);
                    if idle >= Duration::from_secs(15) {
                        break;
                    }
                }
            }
        }
        turn += 1;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(0, "checker".into())).await;
    }
    got
}

/// Injects one fault of `kind`, holds it, heals it; returns the record.
async fn inject(
    cluster: &mut Cluster,
    kind: FaultKind,
    settings: &Settings,
    dice: &mut Dice,
    round: usize,
) -> FaultRecord {
    let n = cluster.len();
    // The node hit by a fault aimed at a queue's server: classic queues are homed on every
    // node in turn, so taking the nodes in turn hits every home; shifted by one every cycle
    // of the fault kinds, so that each kind hits every node over a long run.
    let aimed = (round + round / settings.faults.len().max(1)) % n + 1;
    let random = dice.below(n) + 1;
    // Finding the leader may take a while (rabbitmqctl): before the clock starts.
    let (chosen, how) = if kind == FaultKind::KillLeader {
        leader(cluster, settings, aimed)
    } else {
        (random, "")
    };
    let started = Instant::now();
    let target;
    match kind {
        FaultKind::KillLeader | FaultKind::KillRandom => {
            let victim = chosen;
            target = format!("n{victim} {how}").trim_end().to_string();
            cluster.kill(victim);
            tokio::time::sleep(settings.hold).await;
            cluster.start_node(victim);
        }
        FaultKind::Pause => {
            target = format!("n{aimed}");
            cluster.pause(aimed);
            tokio::time::sleep(settings.hold.max(settings.pause_at_least)).await;
            cluster.resume(aimed);
        }
        FaultKind::PartitionHalves | FaultKind::PartitionAlone | FaultKind::PartitionOneWay => {
            let mut others: Vec<usize> = (1..=n).filter(|&i| i != aimed).collect();
            let (a, b): (Vec<usize>, Vec<usize>) = if kind == FaultKind::PartitionHalves {
                // The aimed node and a random half of the rest, minus one: a minority.
                let mut side = vec![aimed];
                while side.len() < n / 2 {
                    let k = dice.below(others.len());
                    side.push(others.remove(k));
                }
                (side, others)
            } else {
                (vec![aimed], others)
            };
            let list = |v: &[usize]| {
                v.iter()
                    .map(|i| format!("n{i}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            if kind == FaultKind::PartitionOneWay {
                target = format!("{} -/> {}", list(&a), list(&b));
                for &to in &b {
                    cluster.drop_one_way(aimed, to);
                }
            } else {
                target = format!("{} | {}", list(&a), list(&b));
                cluster.partition(&a, &b);
            }
            tokio::time::sleep(settings.hold).await;
            cluster.heal();
        }
    }
    FaultRecord {
        kind,
        target,
        started,
        healed: Instant::now(),
    }
}

/// The node to kill as "the leader", and how it was found: a classic queue's home (taken in
/// turn); for quorum queues the leader of the live queue declared on the aimed node, as
/// RabbitMQ's `rabbitmqctl` reports it or as Warren's nodes logged taking its lead; else
/// the aimed node, where the queues of this turn were declared.
fn leader(cluster: &Cluster, settings: &Settings, aimed: usize) -> (usize, &'static str) {
    if settings.queue_type == QueueType::Classic {
        return (aimed, "home");
    }
    let index_of = |name: &str| {
        let short = name.rsplit_once('@').map_or(name, |(_, n)| n);
        let short = if cluster.backend == Backend::Warren {
            name.split('@').next().unwrap_or_default()
        } else {
            short
        };
        short.strip_prefix('n')?.parse::<usize>().ok()
    };
    match cluster.backend {
        Backend::RabbitMq => {
            let queue = format!("faults-n{aimed}-live");
            for i in (0..cluster.len()).map(|k| (aimed - 1 + k) % cluster.len() + 1) {
                let Some(out) = cluster.rabbitmqctl(i, &["list_queues", "name", "leader"]) else {
                    continue;
                };
                if let Some(leader) = out
                    .lines()
                    .filter_map(|l| l.split_once('\t'))
                    .find(|(name, _)| name.trim() == queue)
                    .and_then(|(_, leader)| index_of(leader.trim()))
                {
                    return (leader, "queue leader");
                }
            }
        }
        Backend::Warren => {
            // The node that most recently logged taking the lead of this turn's queue.
            let queue = format!("queue=faults-n{aimed}-live");
            let latest = (1..=cluster.len())
                .filter_map(|i| {
                    let log = cluster.log(i);
                    let line = log
                        .lines()
                        .rev()
                        .find(|l| l.contains("this node leads it now") && l.contains(&queue))?;
                    Some((line.split_whitespace().next()?.to_string(), i))
                })
                .max();
            if let Some((_, leader)) = latest {
                return (leader, "queue leader");
            }
        }
    }
    (aimed, "declared on")
}

/// Takes every message of `queue` through the node at `url`: a consumer (prefetch 500) until
/// it has been idle for 2 s, then basic.get must find the queue empty (else again).
async fn drain_through(
    url: &str,
    queue: &str,
    got: &mut Vec<Option<(u32, u64)>>,
) -> Result<usize, lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut n = 0;
    loop {
        let ch = conn.create_channel().await?;
        ch.basic_qos(500, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "drain".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        while let Ok(next) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
            let Some(delivery) = next else { break };
            let delivery = delivery?;
            got.push(stamp(&delivery.data));
            n += 1;
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        ch.close(200, "drained".into()).await?;
        let ch = conn.create_channel().await?;
        let get = ch.basic_get(queue.into(), BasicGetOptions { no_ack: false });
        let last = tokio::time::timeout(Duration::from_secs(10), get)
            .await
            .map_err(|_| {
                lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                    lapin::ConnectionState::Error,
                ))
            })??;
        match last {
            None => break,
            Some(message) => {
                got.push(stamp(&message.delivery.data));
                n += 1;
                message
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await?;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(0, "checker".into())).await;
    Ok(n)
}

/// Runs the checker on `cluster` (every node started) and returns its verdict.
pub async fn run(cluster: &mut Cluster, settings: &Settings) -> Report {
    let n = cluster.len();
    let urls: Arc<Vec<String>> = Arc::new((1..=n).map(|i| cluster.url(i)).collect());
    let mut queues = Vec::new();
    for home in 1..=n {
        for live in [true, false] {
            queues.push(QueueUnderTest {
                name: format!("faults-n{home}-{}", if live { "live" } else { "backlog" }),
                home,
                live_consumer: live,
            });
        }
    }
    // Every node up first: a replicated queue takes its members among the running nodes.
    for i in 1..=n {
        drop(cluster.connect(i).await);
    }
    // Declared through their home, which is where a classic queue lives.
    for q in &queues {
        let conn = cluster.connect(q.home).await;
        let ch = conn.create_channel().await.expect("channel for declare");
        ch.queue_declare(
            q.name.as_str().into(),
            QueueDeclareOptions {
                durable: settings.durable_queues,
                ..Default::default()
            },
            declare_arguments(settings.queue_type),
        )
        .await
        .unwrap_or_else(|e| panic!("declare {} through n{}: {e}", q.name, q.home));
        let _ = conn.close(0, "declared".into()).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for (id, q) in queues.iter().enumerate() {
        producers.push(tokio::spawn(produce(
            id as u32,
            q.clone(),
            urls.clone(),
            settings.clone(),
            stop.clone(),
        )));
    }
    let mut consumers = Vec::new();
    for q in queues.iter().filter(|q| q.live_consumer) {
        consumers.push(tokio::spawn(consume(
            q.clone(),
            urls.clone(),
            settings.queue_type,
            stop.clone(),
        )));
    }

    let mut dice = Dice(settings.seed);
    let mut records = Vec::new();
    let began = Instant::now();
    let mut round = 0;
    while round < settings.faults.len() || began.elapsed() < settings.run_for {
        tokio::time::sleep(settings.quiet).await;
        let kind = settings.faults[round % settings.faults.len()];
        let record = inject(cluster, kind, settings, &mut dice, round).await;
        eprintln!(
            "fault {}: {} {} held {:.1}s",
            round + 1,
            kind.label(),
            record.target,
            record.healed.duration_since(record.started).as_secs_f64()
        );
        records.push(record);
        round += 1;
    }
    // Time for the clients to come back after the last fault.
    tokio::time::sleep(settings.quiet.max(Duration::from_secs(5))).await;
    stop.store(true, Ordering::Relaxed);
    let ended = Instant::now();
    let mut ledgers = Vec::new();
    for p in producers {
        ledgers.push(p.await.expect("producer task"));
    }
    let mut delivered: Vec<Option<(u32, u64)>> = Vec::new();
    for c in consumers {
        delivered.extend(c.await.expect("consumer task"));
    }
    let delivered_live = delivered.len();

    // Heal everything, then restart every node at once (kill -9: a confirmed message must
    // survive any crash), and drain every queue through every node.
    cluster.heal();
    for i in 1..=n {
        cluster.kill(i);
    }
    for i in 1..=n {
        cluster.start_node(i);
    }
    for i in 1..=n {
        drop(cluster.connect(i).await);
    }
    let mut drain_refusals = Vec::new();
    let mut undrained_queues = Vec::new();
    for q in &queues {
        let mut drained_somewhere = false;
        for node in 1..=n {
            // A replicated queue may need a moment to elect after the restart: retried
            // unless refused outright (a classic queue through a node not its home).
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match drain_through(&urls[node - 1], &q.name, &mut delivered).await {
                    Ok(_) => {
                        drained_somewhere = true;
                        break;
                    }
                    Err(e) if e.is_amqp_soft_error() || Instant::now() >= deadline => {
                        drain_refusals.push(format!("{} through n{node}: {e}", q.name));
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        if !drained_somewhere {
            undrained_queues.push(q.name.clone());
        }
    }
    let delivered_drain = delivered.len() - delivered_live;

    // The verdict.
    let mut seen: HashMap<(u32, u64), usize> = HashMap::new();
    let mut unexpected = 0;
    for d in &delivered {
        match d {
            Some(stamp) => *seen.entry(*stamp).or_default() += 1,
            None => unexpected += 1,
        }
    }
    let mut report = Report {
        setting: format!(
            "{:?} backend, {n} nodes, {:?} queues (durable {}, persistent {}), {} faults over {:.0}s",
            cluster.backend,
            settings.queue_type,
            settings.durable_queues,
            settings.persistent,
            records.len(),
            ended.duration_since(began).as_secs_f64()
        ),
        seed: settings.seed,
        delivered_live,
        delivered_drain,
        drain_refusals,
        undrained_queues,
        ..Default::default()
    };
    let mut published = std::collections::HashSet::new();
    for (p, ledger) in ledgers.iter().enumerate() {
        let p = p as u32;
        report.nacked += ledger.nacked;
        report.returned += ledger.returned;
        report.unanswered += ledger.unanswered;
        for (seq, _) in &ledger.confirmed {
            published.insert((p, *seq));
            report.confirmed += 1;
            if !seen.contains_key(&(p, *seq)) {
                report.confirmed_lost.push((p, *seq));
            }
        }
        for (seq, _) in &ledger.unconfirmed {
            published.insert((p, *seq));
            report.unconfirmed += 1;
            if seen.contains_key(&(p, *seq)) {
                report.unconfirmed_delivered += 1;
            } else {
                report.unconfirmed_lost += 1;
            }
        }
    }
    report.published = published.len();
    for (stamp, count) in &seen {
        if !published.contains(stamp) {
            unexpected += count;
        } else {
            report.duplicates += count - 1;
        }
    }
    report.unexpected = unexpected;

    // Per-fault figures, from the producers' confirm times.
    for (k, record) in records.iter().enumerate() {
        let window_end = records.get(k + 1).map(|r| r.started).unwrap_or(ended);
        let confirmed_during = ledgers
            .iter()
            .flat_map(|l| &l.confirmed)
            .filter(|(_, t)| *t >= record.started && *t < record.healed)
            .count();
        let unconfirmed_after = ledgers
            .iter()
            .flat_map(|l| &l.unconfirmed)
            .filter(|(_, t)| *t >= record.started && *t < window_end)
            .count();
        let first_after = |l: &ProducerLedger, from: Instant| {
            l.confirmed
                .iter()
                .map(|(_, t)| *t)
                .find(|t| *t >= from && *t < window_end)
        };
        let recovered_in = ledgers
            .iter()
            .map(|l| first_after(l, record.healed).map(|t| t.duration_since(record.healed)))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max());
        // Queues served by a node the fault named (classic: their home).
        let hit: Vec<usize> = queues
            .iter()
            .enumerate()
            .filter(|(_, q)| {
                record
                    .target
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .next()
                    .is_some_and(|first| first == format!("n{}", q.home))
            })
            .map(|(i, _)| i)
            .collect();
        let first_confirm_after_fault = hit
            .iter()
            .map(|&i| {
                ledgers[i]
                    .confirmed
                    .iter()
                    .map(|(_, t)| *t)
                    .find(|t| *t > record.started && *t < window_end)
                    .map(|t| t.duration_since(record.started))
            })
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max());
        report.faults.push(FaultFigures {
            record: record.clone(),
            confirmed_during,
            unconfirmed_after,
            recovered_in,
            first_confirm_after_fault,
        });
    }
    report
}
