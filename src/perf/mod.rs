//! `warren perf`: a load generator for any AMQP 0-9-1 broker, modelled on RabbitMQ's
//! PerfTest, and lean enough (well under a microsecond of CPU per message) that on a
//! small machine it measures the broker rather than itself.
//!
//! Producers and consumers are tasks on one single-threaded runtime, one connection
//! each, working at the frame level on the project's codec (see [`client`]). Every body
//! starts with a stamp (producer id, sequence, send time, run tag); consumers check the
//! stamps per producer per queue ([`check`]) to find lost, duplicated, redelivered and
//! reordered messages, and measure end-to-end latency ([`hist`]). Given the broker's
//! process id, the report adds the broker's CPU per message and memory ([`procfs`]).

pub mod check;
pub mod client;
pub mod hist;
pub mod procfs;
pub mod report;
pub mod wire;

use std::cell::Cell;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, exchange, queue};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amq_protocol::uri::AMQPUri;
use anyhow::{Context, Result, anyhow, bail};
use tokio::task::JoinHandle;

use client::{ConsumerSpec, ProducerResult, ProducerSpec, Shared};
use report::{BrokerProcess, Checks, ClientCpu, Latency, Report, Scenario, StreamCheck};
use wire::{Conn, PublishTemplate};

/// Exit status when a confirmed message was lost.
pub const EXIT_LOST: u8 = 3;

/// Exchange types `warren perf` can route through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExchangeType {
    /// Each queue bound with its own name as the key; producer i publishes to queue i.
    Direct,
    /// Every queue gets every message.
    Fanout,
    /// As direct, through a topic exchange.
    Topic,
}

impl ExchangeType {
    fn name(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
        }
    }
}

/// Options of `warren perf` (names follow RabbitMQ's PerfTest where it has them).
#[derive(Debug, Clone, clap::Args)]
pub struct PerfArgs {
    /// Broker to drive.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
    /// Producers (one connection each).
    #[arg(short = 'x', long, default_value_t = 1)]
    pub producers: usize,
    /// Consumers (one connection each); consumer i reads queue i mod --queues.
    #[arg(short = 'y', long, default_value_t = 1)]
    pub consumers: usize,
    /// Queues, named PREFIX-0, PREFIX-1, ...; deleted and declared afresh at the start.
    #[arg(short = 'Q', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub queues: u32,
    /// Prefix of the queue names.
    #[arg(long, default_value = "perf-q")]
    pub queue_prefix: String,
    /// Queue arguments, KEY=VALUE[,KEY=VALUE...]; integers and true/false are typed,
    /// e.g. x-queue-type=quorum (which implies --durable) or x-max-length=1000.
    #[arg(long, value_delimiter = ',')]
    pub queue_args: Vec<String>,
    /// Declare durable queues (and exchange).
    #[arg(long)]
    pub durable: bool,
    /// Exchange to publish to (default: perf.TYPE; "" = the default exchange).
    #[arg(short = 'e', long)]
    pub exchange: Option<String>,
    /// Exchange type.
    #[arg(short = 't', long, value_enum, default_value_t = ExchangeType::Direct)]
    pub exchange_type: ExchangeType,
    /// Body size in bytes (at least 16: the stamp).
    #[arg(short = 's', long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(16..))]
    pub size: u32,
    /// Publish persistent messages (delivery-mode 2).
    #[arg(short = 'f', long)]
    pub persistent: bool,
    /// Publisher confirms, with at most this many publishes awaiting a confirm per
    /// producer (0 = no confirms).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub confirm: u64,
    /// Consumers do not ack (no_ack); default is manual acks.
    #[arg(short = 'a', long)]
    pub auto_ack: bool,
    /// Manual acks: one ack with `multiple` every N deliveries (1 = ack each; capped to
    /// half the prefetch).
    #[arg(short = 'A', long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub multi_ack: u64,
    /// Prefetch (basic.qos) per consumer (0 = unlimited).
    #[arg(short = 'q', long, default_value_t = 0)]
    pub prefetch: u16,
    /// Publish rate limit per producer, messages per second (0 = none).
    #[arg(short = 'r', long, default_value_t = 0.0)]
    pub rate: f64,
    /// Publish for this many seconds (without it and --count: until Ctrl-C).
    #[arg(short = 'z', long)]
    pub time: Option<f64>,
    /// Messages to publish per producer.
    #[arg(short = 'C', long)]
    pub count: Option<u64>,
    /// Publish only, then drain: consumers start when every producer is done and its
    /// confirms are in.
    #[arg(long)]
    pub drain: bool,
    /// Stop waiting for deliveries (or confirms) after this many seconds without any.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Also open this many idle connections with one channel each (broker memory).
    #[arg(long, default_value_t = 0)]
    pub idle_connections: usize,
    /// Process id of the broker: report its CPU per message and memory from /proc.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Print the summary as one JSON object (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Leave the queues in place at the end (they are deleted by default).
    #[arg(long)]
    pub keep_queues: bool,
    /// Declare the queues without deleting them first: publish into (or drain) what an
    /// earlier run left with --keep-queues, e.g. to measure publishing into a backlog.
    #[arg(long)]
    pub reuse_queues: bool,
    /// A label carried into the report.
    #[arg(long)]
    pub label: Option<String>,
}

/// Runs `warren perf` and returns its exit status: 0, 1 on an error, [`EXIT_LOST`] when
/// a confirmed message was lost.
pub fn run(args: PerfArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren perf: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json;
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, run_async(args)) {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("warren perf: cannot write JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.text());
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_LOST)
            }
        }
        Err(e) => {
            eprintln!("warren perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Who publishes where and who reads what.
struct Plan {
    exchange: String,
    queues: Vec<String>,
    /// Routing key of each producer.
    keys: Vec<String>,
    /// Queues each producer's messages reach.
    routes: Vec<Vec<usize>>,
    /// Queue of each consumer.
    consumer_queue: Vec<usize>,
    /// Queues with at least one consumer.
    consumed: Vec<bool>,
}

impl Plan {
    fn new(a: &PerfArgs) -> Plan {
        let nq = a.queues as usize;
        let queues: Vec<String> = (0..nq).map(|i| format!("{}-{i}", a.queue_prefix)).collect();
        let exchange = a
            .exchange
            .clone()
            .unwrap_or_else(|| format!("perf.{}", a.exchange_type.name()));
        let fanout = !exchange.is_empty() && a.exchange_type == ExchangeType::Fanout;
        let keys = (0..a.producers)
            .map(|p| {
                if fanout {
                    String::new()
                } else {
                    queues[p % nq].clone()
                }
            })
            .collect();
        let routes = (0..a.producers)
            .map(|p| {
                if fanout {
                    (0..nq).collect()
                } else {
                    vec![p % nq]
                }
            })
            .collect();
        let consumer_queue: Vec<usize> = (0..a.consumers).map(|c| c % nq).collect();
        let mut consumed = vec![false; nq];
        for &q in &consumer_queue {
            consumed[q] = true;
        }
        Plan {
            exchange,
            queues,
            keys,
            routes,
            consumer_queue,
            consumed,
        }
    }
}

fn queue_arguments(args: &[String]) -> Result<FieldTable> {
    let mut t = FieldTable::default();
    for kv in args.iter().filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("queue argument '{kv}' is not KEY=VALUE"))?;
        let value = if let Ok(i) = v.parse::<i64>() {
            AMQPValue::LongLongInt(i)
        } else if let Ok(b) = v.parse::<bool>() {
            AMQPValue::Boolean(b)
        } else {
            AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
        };
        t.insert(k.trim().into(), value);
    }
    Ok(t)
}

/// Declares the exchange, then deletes (unless reused), declares and binds every queue.
async fn declare(conn: &mut Conn, a: &PerfArgs, plan: &Plan) -> Result<()> {
    let args = queue_arguments(&a.queue_args)?;
    let replicated = a
        .queue_args
        .iter()
        .any(|s| s == "x-queue-type=quorum" || s == "x-queue-type=stream");
    let durable = a.durable || replicated;
    if !plan.exchange.is_empty() {
        // Afresh, so that an earlier run's exchange of another type or durability does
        // not get in the way.
        conn.rpc(
            1,
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                exchange: plan.exchange.as_str().into(),
                ..Default::default()
            })),
        )
        .await
        .with_context(|| format!("deleting exchange '{}'", plan.exchange))?;
        conn.rpc(
            1,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: plan.exchange.as_str().into(),
                kind: a.exchange_type.name().into(),
                durable,
                ..Default::default()
            })),
        )
        .await
        .with_context(|| format!("declaring exchange '{}'", plan.exchange))?;
    }
    for q in &plan.queues {
        if a.reuse_queues {
            declare_queue(conn, q, durable, &args).await?;
            bind_queue(conn, a, plan, q).await?;
            continue;
        }
        let deleted = conn
            .rpc(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                    queue: q.as_str().into(),
                    ..Default::default()
                })),
            )
            .await;
        if deleted.is_err() {
            // Some brokers refuse to delete what does not exist: reopen the channel.
            conn.rpc(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            )
            .await?;
        }
        declare_queue(conn, q, durable, &args).await?;
        bind_queue(conn, a, plan, q).await?;
    }
    Ok(())
}

/// Declares queue `q` (channel 1).
async fn declare_queue(conn: &mut Conn, q: &str, durable: bool, args: &FieldTable) -> Result<()> {
    conn.rpc(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: q.into(),
            durable,
            arguments: args.clone(),
            ..Default::default()
        })),
    )
    .await
    .with_context(|| format!("declaring queue '{q}'"))?;
    Ok(())
}

/// Binds queue `q` to the run's exchange (if it has one): by its name, or with an empty
/// key for fanout.
async fn bind_queue(conn: &mut Conn, a: &PerfArgs, plan: &Plan, q: &str) -> Result<()> {
    if plan.exchange.is_empty() {
        return Ok(());
    }
    let key = if a.exchange_type == ExchangeType::Fanout {
        ""
    } else {
        q
    };
    conn.rpc(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: q.into(),
            exchange: plan.exchange.as_str().into(),
            routing_key: key.into(),
            ..Default::default()
        })),
    )
    .await
    .with_context(|| format!("binding queue '{q}'"))?;
    Ok(())
}

/// Opens a consumer connection and registers its consumer.
async fn open_consumer(uri: &AMQPUri, a: &PerfArgs, i: usize, queue_name: &str) -> Result<Conn> {
    let mut c = Conn::open(uri, &format!("perf consumer {i}")).await?;
    if a.prefetch > 0 {
        c.rpc(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: a.prefetch,
                global: false,
            })),
        )
        .await?;
    }
    c.rpc(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue_name.into(),
            consumer_tag: format!("perf-{i}").into(),
            no_ack: a.auto_ack,
            ..Default::default()
        })),
    )
    .await
    .with_context(|| format!("consuming from '{queue_name}'"))?;
    Ok(c)
}

async fn start_consumers(
    uri: &AMQPUri,
    a: &PerfArgs,
    plan: &Plan,
    shared: &Rc<Shared>,
) -> Result<Vec<JoinHandle<Result<()>>>> {
    let ack_every = if a.prefetch > 0 {
        a.multi_ack.min((u64::from(a.prefetch) / 2).max(1))
    } else {
        a.multi_ack
    };
    let flush_every = match a.prefetch {
        0 => 256,
        p => (u64::from(p) / 4).max(1),
    };
    let mut handles = Vec::new();
    for (i, &q) in plan.consumer_queue.iter().enumerate() {
        let conn = open_consumer(uri, a, i, &plan.queues[q]).await?;
        let spec = ConsumerSpec {
            queue: q,
            auto_ack: a.auto_ack,
            ack_every,
            flush_every,
        };
        handles.push(tokio::task::spawn_local(client::consume(
            conn,
            spec,
            shared.clone(),
        )));
    }
    Ok(handles)
}

/// Opens `n` connections with a channel each, 50 at a time.
async fn open_idle(uri: &AMQPUri, n: usize) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = (n - conns.len()).min(50);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..batch {
            let uri = uri.clone();
            let name = format!("perf idle {}", conns.len() + i);
            set.spawn_local(async move { Conn::open(&uri, &name).await });
        }
        while let Some(r) = set.join_next().await {
            conns.push(r.context("idle connection task")??);
        }
    }
    Ok(conns)
}

/// Samples the broker's memory.
struct BrokerWatch {
    pid: u32,
    pid_s: String,
    cpu_start: f64,
    rss_start_kb: u64,
    rss_peak_kb: u64,
}

impl BrokerWatch {
    fn new(pid: u32) -> Result<BrokerWatch> {
        let pid_s = pid.to_string();
        let mem = procfs::memory(&pid_s)
            .ok_or_else(|| anyhow!("cannot read /proc/{pid}/status (--broker-pid)"))?;
        Ok(BrokerWatch {
            pid,
            cpu_start: procfs::cpu_seconds(&pid_s).unwrap_or(0.0),
            pid_s,
            rss_start_kb: mem.rss_kb,
            rss_peak_kb: mem.rss_kb,
        })
    }

    fn sample(&mut self) -> Option<procfs::Memory> {
        let m = procfs::memory(&self.pid_s)?;
        self.rss_peak_kb = self.rss_peak_kb.max(m.rss_kb);
        Some(m)
    }
}

fn rate(n: u64, from: Instant, to: Option<Instant>) -> f64 {
    match to {
        Some(t) if t > from => n as f64 / t.duration_since(from).as_secs_f64(),
        _ => 0.0,
    }
}

fn short_rate(r: f64) -> String {
    if r >= 1_000_000.0 {
        format!("{:.2}M/s", r / 1_000_000.0)
    } else if r >= 1000.0 {
        format!("{:.1}k/s", r / 1000.0)
    } else {
        format!("{r:.0}/s")
    }
}

/// Takes the result of a finished task, or its error.
async fn finished<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.await.map_err(|e| anyhow!("task failed: {e}"))?
}

async fn run_async(a: PerfArgs) -> Result<Report> {
    let uri: AMQPUri = a
        .uri
        .parse()
        .map_err(|e| anyhow!("bad --uri '{}': {e}", a.uri))?;
    let plan = Plan::new(&a);
    let nq = plan.queues.len();
    let run_tag = {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (nanos ^ std::process::id() ^ (nanos >> 16)) as u16
    };
    let shared = Rc::new(Shared::new(a.producers, nq, run_tag));
    let mut broker = a.broker_pid.map(BrokerWatch::new).transpose()?;

    let interrupts = Rc::new(Cell::new(0u32));
    {
        let interrupts = interrupts.clone();
        tokio::task::spawn_local(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                interrupts.set(interrupts.get() + 1);
            }
        });
    }

    let mut setup = Conn::open(&uri, "perf setup").await?;
    let server = setup.server.clone();
    let moves_messages = a.producers > 0 || a.consumers > 0;
    if moves_messages {
        declare(&mut setup, &a, &plan).await?;
    }
    let idle = open_idle(&uri, a.idle_connections).await?;

    let mut consumers = if a.drain {
        Vec::new()
    } else {
        start_consumers(&uri, &a, &plan, &shared).await?
    };
    let mut producer_conns = Vec::new();
    for p in 0..a.producers {
        let mut c = Conn::open(&uri, &format!("perf producer {p}")).await?;
        if a.confirm > 0 {
            c.rpc(
                1,
                AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                    nowait: false,
                })),
            )
            .await?;
        }
        producer_conns.push(c);
    }

    let t0 = Instant::now();
    let cpu0 = procfs::cpu_seconds("self").unwrap_or(0.0);
    if let Some(b) = broker.as_mut() {
        b.cpu_start = procfs::cpu_seconds(&b.pid_s).unwrap_or(0.0);
    }
    let confirm_timeout = Duration::from_secs_f64(a.drain_timeout.max(0.1));
    let mut producers: Vec<Option<JoinHandle<Result<ProducerResult>>>> = Vec::new();
    for (p, conn) in producer_conns.into_iter().enumerate() {
        let spec = ProducerSpec {
            id: p as u16,
            template: PublishTemplate::new(
                1,
                &plan.exchange,
                &plan.keys[p],
                a.size as usize,
                a.persistent,
                conn.frame_max,
            ),
            confirm_window: a.confirm,
            rate: a.rate,
            count: a.count.unwrap_or(0),
            confirm_timeout,
        };
        producers.push(Some(tokio::task::spawn_local(client::produce(
            conn,
            spec,
            shared.clone(),
        ))));
    }

    let deadline = a.time.map(|t| t0 + Duration::from_secs_f64(t.max(0.0)));
    let drain_timeout = Duration::from_secs_f64(a.drain_timeout.max(0.1));
    let mut results: Vec<Option<ProducerResult>> = (0..a.producers).map(|_| None).collect();
    let mut producers_done: Option<Instant> = None;
    let mut consume_start = t0;
    let mut next_progress = t0 + Duration::from_secs(1);
    let mut next_sample = t0;
    let mut last = (0u64, 0u64, 0u64);
    let tick = Duration::from_millis(50);
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        if now >= next_sample {
            if let Some(b) = broker.as_mut() {
                b.sample();
            }
            next_sample = now + Duration::from_millis(200);
        }
        if deadline.is_some_and(|d| now >= d) || interrupts.get() > 0 {
            shared.stop_publishing.set(true);
        }
        // Collect finished producers; an error ends the run.
        for (i, slot) in producers.iter_mut().enumerate() {
            if let Some(h) = slot.take_if(|h| h.is_finished()) {
                results[i] = Some(finished(h).await.with_context(|| format!("producer {i}"))?);
            }
        }
        if let Some(i) = consumers.iter().position(JoinHandle::is_finished) {
            let h = consumers.swap_remove(i);
            finished(h).await.with_context(|| format!("consumer {i}"))?;
            bail!("consumer {i} stopped early");
        }
        let publishing_over = if a.producers == 0 {
            shared.stop_publishing.get()
        } else {
            results.iter().all(Option::is_some)
        };
        if publishing_over && producers_done.is_none() {
            producers_done = Some(now);
            if a.drain {
                consume_start = Instant::now();
                consumers = start_consumers(&uri, &a, &plan, &shared).await?;
            }
        }
        if let Some(done) = producers_done {
            if interrupts.get() > 1 || a.consumers == 0 || a.producers == 0 {
                break;
            }
            let mut all_in = a.producers > 0;
            for (q, consumed) in plan.consumed.iter().enumerate() {
                if !consumed {
                    continue;
                }
                let expected: u64 = (0..a.producers)
                    .filter(|p| plan.routes[*p].contains(&q))
                    .map(|p| shared.published[p].get())
                    .sum();
                let got: u64 = (0..a.producers)
                    .map(|p| shared.trackers[q * a.producers + p].borrow().unique())
                    .sum();
                all_in &= got >= expected;
            }
            let quiet_since = shared
                .last_delivery
                .get()
                .map_or(done, |l| l.max(done))
                .max(consume_start);
            if all_in || now.duration_since(quiet_since) > drain_timeout {
                break;
            }
        }
        if !a.quiet && now >= next_progress {
            next_progress += Duration::from_secs(1);
            let cur = (
                shared.total_published(),
                shared.confirmed.get(),
                shared.delivered.get(),
            );
            let mut h = shared.interval_latency.borrow_mut();
            let mut line = format!(
                "{:>5.0}s  published {:>9}",
                now.duration_since(t0).as_secs_f64(),
                short_rate((cur.0 - last.0) as f64),
            );
            if a.confirm > 0 {
                line += &format!("  confirmed {:>9}", short_rate((cur.1 - last.1) as f64));
            }
            line += &format!("  consumed {:>9}", short_rate((cur.2 - last.2) as f64));
            if h.count() > 0 {
                line += &format!(
                    "  latency p50 {} p99 {}",
                    report::duration_us(h.quantile(0.5) as f64 / 1000.0),
                    report::duration_us(h.quantile(0.99) as f64 / 1000.0)
                );
            }
            if let Some(b) = broker.as_mut().and_then(BrokerWatch::sample) {
                line += &format!("  broker RSS {:.0} MiB", b.rss_kb as f64 / 1024.0);
            }
            eprintln!("{line}");
            h.clear();
            last = cur;
        }
    }
    shared.stop_publishing.set(true);
    shared.stop_consuming.set(true);
    let end = Instant::now();
    let cpu1 = procfs::cpu_seconds("self").unwrap_or(cpu0);
    let broker_end = broker.as_mut().map(|b| {
        let mem = b.sample().unwrap_or_default();
        (procfs::cpu_seconds(&b.pid_s).unwrap_or(b.cpu_start), mem)
    });
    for (i, h) in producers.into_iter().enumerate() {
        if let Some(h) = h {
            results[i] = Some(finished(h).await.with_context(|| format!("producer {i}"))?);
        }
    }
    for (i, h) in consumers.into_iter().enumerate() {
        finished(h).await.with_context(|| format!("consumer {i}"))?;
    }

    // Checks per producer per consumed queue.
    let mut checks = Checks {
        foreign: shared.foreign.get(),
        ..Default::default()
    };
    for (p, r) in results.iter().enumerate() {
        let Some(r) = r else { continue };
        for &q in &plan.routes[p] {
            if !plan.consumed[q] {
                continue;
            }
            let t = shared.trackers[q * a.producers + p].borrow();
            let m = t.missing(r.published, &r.confirmed);
            checks.lost_confirmed += m.lost_confirmed;
            checks.unconfirmed_missing += m.unconfirmed_missing;
            checks.duplicates += t.duplicates;
            checks.redelivered += t.redelivered;
            checks.out_of_order += t.out_of_order;
            if m.lost_confirmed
                + m.unconfirmed_missing
                + t.duplicates
                + t.redelivered
                + t.out_of_order
                > 0
            {
                checks.streams.push(StreamCheck {
                    queue: plan.queues[q].clone(),
                    producer: p as u16,
                    published: r.published,
                    received: t.received,
                    lost_confirmed: m.lost_confirmed,
                    unconfirmed_missing: m.unconfirmed_missing,
                    duplicates: t.duplicates,
                    redelivered: t.redelivered,
                    out_of_order: t.out_of_order,
                });
            }
        }
    }

    if moves_messages && !a.keep_queues {
        for q in &plan.queues {
            let _ = setup
                .rpc(
                    1,
                    AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                        queue: q.as_str().into(),
                        ..Default::default()
                    })),
                )
                .await;
        }
    }
    setup.close(Duration::from_secs(5)).await;
    for c in idle {
        c.close(Duration::from_secs(2)).await;
    }

    let published = shared.total_published();
    let delivered = shared.delivered.get();
    let messages = published + delivered;
    let per_msg = |cpu: f64| (messages > 0).then(|| cpu * 1e6 / messages as f64);
    let lat = shared.latency.borrow();
    let us = |ns: u64| ns as f64 / 1000.0;
    let client_cpu = cpu1 - cpu0;
    let broker = match (broker, broker_end) {
        (Some(b), Some((cpu, mem))) => {
            let cpu_s = cpu - b.cpu_start;
            Some(BrokerProcess {
                pid: b.pid,
                cpu_s,
                cpu_us_per_msg: per_msg(cpu_s),
                rss_start_kb: b.rss_start_kb,
                rss_peak_kb: b.rss_peak_kb,
                rss_end_kb: mem.rss_kb,
                hwm_kb: mem.hwm_kb,
                kb_per_idle_connection: (a.idle_connections > 0).then(|| {
                    (mem.rss_kb as f64 - b.rss_start_kb as f64) / a.idle_connections as f64
                }),
            })
        }
        _ => None,
    };
    let ok = checks.lost_confirmed == 0;
    Ok(Report {
        label: a.label.clone(),
        server,
        scenario: Scenario {
            producers: a.producers,
            consumers: a.consumers,
            queues: nq,
            exchange: plan.exchange.clone(),
            exchange_type: a.exchange_type.name().to_string(),
            queue_args: a.queue_args.clone(),
            durable: a.durable,
            size: a.size,
            persistent: a.persistent,
            confirm: a.confirm,
            auto_ack: a.auto_ack,
            multi_ack: a.multi_ack,
            prefetch: a.prefetch,
            rate: a.rate,
            time_s: a.time,
            count: a.count,
            drain: a.drain,
            idle_connections: a.idle_connections,
        },
        duration_s: end.duration_since(t0).as_secs_f64(),
        published,
        confirmed: shared.confirmed.get(),
        nacked: shared.nacked.get(),
        delivered,
        publish_rate: rate(published, t0, shared.last_publish.get()),
        confirm_rate: rate(shared.confirmed.get(), t0, shared.last_confirm.get()),
        consume_rate: rate(delivered, consume_start, shared.last_delivery.get()),
        latency_us: Latency {
            p50: us(lat.quantile(0.5)),
            p95: us(lat.quantile(0.95)),
            p99: us(lat.quantile(0.99)),
            max: us(lat.max()),
            samples: lat.count(),
        },
        checks,
        client: ClientCpu {
            cpu_s: client_cpu,
            cpu_us_per_msg: per_msg(client_cpu),
        },
        broker,
        ok,
    })
}
