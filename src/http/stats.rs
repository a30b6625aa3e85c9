//! Message rates for the API: every few seconds the sampler reads each queue's counters
//! (plain integers kept under the queue's own lock), and a rate is the difference between
//! the last two samples over the time between them, as RabbitMQ's management plugin
//! derives its `*_details.rate` from periodic statistics.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::broker::BrokerState;
use crate::queue::MessageCounters;

/// How often queues are sampled (RabbitMQ's default `collect_statistics_interval`).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    counters: MessageCounters,
    /// Per-second rates between this sample and the one before.
    rates: [f64; 7],
}

/// Samples of every queue's counters, keyed by (vhost, queue), and of the node's
/// channel totals.
#[derive(Debug, Default)]
pub struct RateSampler {
    samples: Mutex<HashMap<(String, String), Sample>>,
    node: Mutex<Option<NodeSample>>,
}

/// When the node's channel totals (in `ConnStats::values` order) were read, the
/// totals, and their rates since the sample before.
type NodeSample = (Instant, [u64; 10], [f64; 10]);

fn as_array(c: &MessageCounters) -> [u64; 7] {
    [
        c.publish,
        c.deliver,
        c.deliver_no_ack,
        c.get,
        c.get_no_ack,
        c.redeliver,
        c.ack,
    ]
}

impl RateSampler {
    /// Reads every queue's counters and the node's channel totals now.
    pub fn sample(&self, broker: &BrokerState) {
        let now = Instant::now();
        {
            let totals = broker.message_totals();
            let mut node = self.node.lock().unwrap_or_else(|p| p.into_inner());
            let rates = match *node {
                Some((at, prev, _)) => {
                    let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                    std::array::from_fn(|i| totals[i].saturating_sub(prev[i]) as f64 / dt)
                }
                None => [0.0; 10],
            };
            *node = Some((now, totals, rates));
        }
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashMap::with_capacity(samples.len());
        for vhost in broker.vhost_list() {
            for q in vhost.queues() {
                let key = (vhost.name.clone(), q.name().to_string());
                let counters = q.snapshot().counters;
                let rates = match samples.get(&key) {
                    Some(prev) => {
                        let dt = now.duration_since(prev.at).as_secs_f64().max(1e-3);
                        let (a, b) = (as_array(&prev.counters), as_array(&counters));
                        std::array::from_fn(|i| b[i].saturating_sub(a[i]) as f64 / dt)
                    }
                    None => [0.0; 7],
                };
                seen.insert(
                    key,
                    Sample {
                        at: now,
                        counters,
                        rates,
                    },
                );
            }
        }
        *samples = seen;
    }

    /// Rates of one queue (zeros before two samples).
    fn rates(&self, vhost: &str, queue: &str) -> [f64; 7] {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(vhost.to_string(), queue.to_string()))
            .map_or([0.0; 7], |s| s.rates)
    }

    /// RabbitMQ's `message_stats` object for a queue: totals and their rates.
    pub fn queue_stats(&self, vhost: &str, queue: &str, counters: &MessageCounters) -> Value {
        message_stats(as_array(counters), self.rates(vhost, queue))
    }

    /// `message_stats` summed over the queues of `vhost` (or of all vhosts).
    pub fn totals(&self, broker: &BrokerState, vhost: Option<&str>) -> Value {
        let mut counts = [0u64; 7];
        let mut rates = [0f64; 7];
        for v in broker.vhost_list() {
            if vhost.is_some_and(|name| name != v.name) {
                continue;
            }
            for q in v.queues() {
                let c = as_array(&q.snapshot().counters);
                let r = self.rates(&v.name, q.name());
                for i in 0..7 {
                    counts[i] += c[i];
                    rates[i] += r[i];
                }
            }
        }
        message_stats(counts, rates)
    }
}

/// The node's `message_stats` (overview) from its channels, as RabbitMQ counts them:
/// a publish counts once however many queues it reaches.
pub fn node_stats(broker: &BrokerState, sampler: &RateSampler) -> Value {
    let c = broker.message_totals();
    let r = sampler
        .node
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map_or([0.0; 10], |(_, _, r)| r);
    // ConnStats order: published, confirmed, returned, dropped, delivered_ack,
    // delivered_no_ack, get_ack, get_no_ack, redelivered, acked.
    const NAMES: [&str; 10] = [
        "publish",
        "confirm",
        "return_unroutable",
        "drop_unroutable",
        "deliver",
        "deliver_no_ack",
        "get",
        "get_no_ack",
        "redeliver",
        "ack",
    ];
    let mut out = Map::new();
    for i in 0..10 {
        out.insert(NAMES[i].into(), json!(c[i]));
        out.insert(format!("{}_details", NAMES[i]), json!({"rate": r[i]}));
    }
    out.insert("deliver_get".into(), json!(c[4] + c[5] + c[6] + c[7]));
    out.insert(
        "deliver_get_details".into(),
        json!({"rate": r[4] + r[5] + r[6] + r[7]}),
    );
    Value::Object(out)
}

fn message_stats(c: [u64; 7], r: [f64; 7]) -> Value {
    const NAMES: [&str; 7] = [
        "publish",
        "deliver",
        "deliver_no_ack",
        "get",
        "get_no_ack",
        "redeliver",
        "ack",
    ];
    let mut out = Map::new();
    for i in 0..7 {
        out.insert(NAMES[i].into(), json!(c[i]));
        out.insert(format!("{}_details", NAMES[i]), json!({"rate": r[i]}));
    }
    let deliver_get = c[1] + c[2] + c[3] + c[4];
    let rate = r[1] + r[2] + r[3] + r[4];
    out.insert("deliver_get".into(), json!(deliver_get));
    out.insert("deliver_get_details".into(), json!({"rate": rate}));
    Value::Object(out)
}

/// Samples every [`SAMPLE_INTERVAL`] until `stop` fires.
pub async fn run_sampler(
    sampler: std::sync::Arc<RateSampler>,
    broker: std::sync::Arc<BrokerState>,
    mut stop: tokio::sync::broadcast::Receiver<()>,
) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => sampler.sample(&broker),
            _ = stop.recv() => return,
        }
    }
}
