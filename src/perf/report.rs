//! The final summary: one struct, printed as text or as one JSON object.

use std::fmt::Write as _;

use serde::Serialize;

/// What was run.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Producer connections.
    pub producers: usize,
    /// Consumer connections.
    pub consumers: usize,
    /// Queues declared.
    pub queues: usize,
    /// Exchange published to ("" = the default exchange).
    pub exchange: String,
    /// Its type.
    pub exchange_type: String,
    /// Queue arguments as given.
    pub queue_args: Vec<String>,
    /// Durable queues.
    pub durable: bool,
    /// Body size in bytes.
    pub size: u32,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Confirm window (0 = no confirms).
    pub confirm: u64,
    /// Auto-ack (no_ack) consumers.
    pub auto_ack: bool,
    /// Manual acks carry `multiple` every this many deliveries.
    pub multi_ack: u64,
    /// basic.qos prefetch count (0 = unlimited).
    pub prefetch: u16,
    /// Publish rate limit per producer (0 = none).
    pub rate: f64,
    /// Publishing time limit, seconds.
    pub time_s: Option<f64>,
    /// Messages per producer.
    pub count: Option<u64>,
    /// Publish first, then drain.
    pub drain: bool,
    /// Extra idle connections.
    pub idle_connections: usize,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Deliveries measured.
    pub samples: u64,
}

/// Anomalies of one producer's messages at one queue.
#[derive(Debug, Clone, Serialize)]
pub struct StreamCheck {
    /// Queue name.
    pub queue: String,
    /// Producer id.
    pub producer: u16,
    /// Messages the producer published.
    pub published: u64,
    /// Deliveries from this producer at this queue.
    pub received: u64,
    /// Confirmed but never delivered.
    pub lost_confirmed: u64,
    /// Not confirmed and never delivered.
    pub unconfirmed_missing: u64,
    /// Delivered more than once.
    pub duplicates: u64,
    /// Flagged redelivered.
    pub redelivered: u64,
    /// Delivered after a later sequence.
    pub out_of_order: u64,
}

/// The checks over every (producer, queue) stream, summed, and the streams with anomalies.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    /// Confirmed by the broker but never delivered: the broker broke its promise.
    pub lost_confirmed: u64,
    /// Not confirmed (or no confirms) and never delivered.
    pub unconfirmed_missing: u64,
    /// Deliveries of a message already delivered.
    pub duplicates: u64,
    /// Deliveries flagged redelivered.
    pub redelivered: u64,
    /// First deliveries that came after a later message of the same producer.
    pub out_of_order: u64,
    /// Deliveries without this run's stamp (leftovers of another run).
    pub foreign: u64,
    /// The (producer, queue) streams with any anomaly.
    pub streams: Vec<StreamCheck>,
}

/// CPU time of this client.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientCpu {
    /// Seconds of CPU (user + system) during the run.
    pub cpu_s: f64,
    /// Microseconds of CPU per message published or delivered.
    pub cpu_us_per_msg: Option<f64>,
}

/// CPU and memory of the broker process, from /proc.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerProcess {
    /// Its process id.
    pub pid: u32,
    /// Seconds of CPU (user + system) during the run.
    pub cpu_s: f64,
    /// Microseconds of CPU per message published or delivered.
    pub cpu_us_per_msg: Option<f64>,
    /// Resident memory before anything was opened, KiB.
    pub rss_start_kb: u64,
    /// Largest resident memory sampled during the run, KiB.
    pub rss_peak_kb: u64,
    /// Resident memory at the end, before cleanup, KiB.
    pub rss_end_kb: u64,
    /// Peak resident memory since the broker started (VmHWM), KiB.
    pub hwm_kb: u64,
    /// (end - start) / idle connections, KiB, when idle connections were opened.
    pub kb_per_idle_connection: Option<f64>,
}

/// Everything `warren perf` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Free-form label given with --label.
    pub label: Option<String>,
    /// Product and version the broker announced.
    pub server: String,
    /// What was run.
    pub scenario: Scenario,
    /// Seconds from the first publish to the end of the drain.
    pub duration_s: f64,
    /// Messages published.
    pub published: u64,
    /// Publishes confirmed.
    pub confirmed: u64,
    /// Publishes refused (basic.nack).
    pub nacked: u64,
    /// Deliveries.
    pub delivered: u64,
    /// Publishes per second while publishing.
    pub publish_rate: f64,
    /// Confirms per second while publishing.
    pub confirm_rate: f64,
    /// Deliveries per second while consuming.
    pub consume_rate: f64,
    /// End-to-end latency (publish written to delivery read), microseconds.
    pub latency_us: Latency,
    /// Loss, duplicate and order checks.
    pub checks: Checks,
    /// This client's CPU.
    pub client: ClientCpu,
    /// The broker's CPU and memory (with --broker-pid).
    pub broker: Option<BrokerProcess>,
    /// False when a confirmed message was lost.
    pub ok: bool,
}

fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A latency in microseconds, in a readable unit.
pub fn duration_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1_000_000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

impl Report {
    /// The summary as lines of text.
    pub fn text(&self) -> String {
        let s = &self.scenario;
        let mut out = String::new();
        let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
        let acks = if s.auto_ack {
            "auto-ack".to_string()
        } else if s.multi_ack > 1 {
            format!("manual ack (multiple every {})", s.multi_ack)
        } else {
            "manual ack".to_string()
        };
        let _ = writeln!(
            out,
            "warren perf{}: {}, {}, {}{} ({} '{}'), {} B {}, {}{}, prefetch {}, {}",
            self.label
                .as_deref()
                .map(|l| format!(" [{l}]"))
                .unwrap_or_default(),
            plural(s.producers, "producer"),
            plural(s.consumers, "consumer"),
            plural(s.queues, "queue"),
            match (s.durable, s.queue_args.is_empty()) {
                (_, false) => format!(" [{}]", s.queue_args.join(",")),
                (true, true) => " [durable]".to_string(),
                (false, true) => String::new(),
            },
            s.exchange_type,
            s.exchange,
            s.size,
            if s.persistent {
                "persistent"
            } else {
                "transient"
            },
            acks,
            if s.confirm > 0 {
                format!(", confirms (window {})", s.confirm)
            } else {
                String::new()
            },
            s.prefetch,
            self.server
        );
        let _ = writeln!(out, "  duration     {:.2} s", self.duration_s);
        let _ = writeln!(
            out,
            "  published    {} msg, {} msg/s",
            count(self.published),
            count(self.publish_rate as u64)
        );
        if s.confirm > 0 {
            let _ = writeln!(
                out,
                "  confirmed    {} msg, {} msg/s{}",
                count(self.confirmed),
                count(self.confirm_rate as u64),
                if self.nacked > 0 {
                    format!(", {} nacked", count(self.nacked))
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            out,
            "  consumed     {} msg, {} msg/s",
            count(self.delivered),
            count(self.consume_rate as u64)
        );
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "  latency      p50 {}, p95 {}, p99 {}, max {} ({} samples)",
            duration_us(l.p50),
            duration_us(l.p95),
            duration_us(l.p99),
            duration_us(l.max),
            count(l.samples)
        );
        let c = &self.checks;
        let _ = writeln!(
            out,
            "  checks       lost confirmed {}, unconfirmed missing {}, duplicates {}, redelivered {}, out of order {}{}",
            c.lost_confirmed,
            c.unconfirmed_missing,
            c.duplicates,
            c.redelivered,
            c.out_of_order,
            if c.foreign > 0 {
                format!(", foreign {}", c.foreign)
            } else {
                String::new()
            }
        );
        for st in c.streams.iter().take(20) {
            let _ = writeln!(
                out,
                "    producer {} -> {}: published {}, received {}, lost confirmed {}, unconfirmed missing {}, duplicates {}, redelivered {}, out of order {}",
                st.producer,
                st.queue,
                st.published,
                st.received,
                st.lost_confirmed,
                st.unconfirmed_missing,
                st.duplicates,
                st.redelivered,
                st.out_of_order
            );
        }
        if c.streams.len() > 20 {
            let _ = writeln!(out, "    ... {} more streams", c.streams.len() - 20);
        }
        let per = |v: Option<f64>| v.map(|v| format!("{v:.2} us/msg")).unwrap_or("-".into());
        let _ = writeln!(
            out,
            "  client CPU   {:.2} s, {}",
            self.client.cpu_s,
            per(self.client.cpu_us_per_msg)
        );
        if let Some(b) = &self.broker {
            let _ = writeln!(
                out,
                "  broker CPU   {:.2} s, {} (pid {})",
                b.cpu_s,
                per(b.cpu_us_per_msg),
                b.pid
            );
            let _ = writeln!(
                out,
                "  broker RSS   start {}, peak {}, end {}, high-water mark {}{}",
                mib(b.rss_start_kb),
                mib(b.rss_peak_kb),
                mib(b.rss_end_kb),
                mib(b.hwm_kb),
                b.kb_per_idle_connection
                    .map(|k| format!(", {k:.1} KiB per idle connection"))
                    .unwrap_or_default()
            );
        }
        if !self.ok {
            let _ = writeln!(out, "  FAILED: confirmed messages were lost");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_separators() {
        assert_eq!(super::count(0), "0");
        assert_eq!(super::count(1234), "1,234");
        assert_eq!(super::count(1_234_567), "1,234,567");
        assert_eq!(super::count(123_456), "123,456");
    }
}
