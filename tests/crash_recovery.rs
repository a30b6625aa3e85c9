//! The seed promise under fire: confirming publishers and an acking consumer run against
//! the real `warren` binary, which is killed with SIGKILL at a random moment, restarted
//! and drained. Every confirmed (producer, sequence) must have been delivered at least
//! once; duplicates are counted and allowed (at-least-once).
//!
//! `WARREN_CRASH_ROUNDS` sets the number of rounds (default 20).

mod node;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use node::{connect, free_port, start};

const QUEUES: [&str; 2] = ["crash-a", "crash-b"];
/// Dead-letter scenario: publishers target `DL_SOURCE`, whose messages expire at once
/// into `crash-dead` through a durable fanout exchange.
const DL_SOURCE: &str = "crash-dl-src";
const PRODUCERS: u32 = 3;
const WINDOW: usize = 50;

async fn declare(ch: &Channel) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in QUEUES {
        ch.queue_declare(q.into(), durable, FieldTable::default())
            .await?;
    }
    ch.exchange_declare(
        "crash-dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare("crash-dead".into(), durable, FieldTable::default())
        .await?;
    ch.queue_bind(
        "crash-dead".into(),
        "crash-dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("crash-dlx".into()),
    );
    args.insert("x-message-ttl".into(), lapin::types::AMQPValue::LongInt(0));
    ch.queue_declare(DL_SOURCE.into(), durable, args).await?;
    Ok(())
}

fn stamp(producer: u32, seq: u64) -> Vec<u8> {
    let mut body = producer.to_be_bytes().to_vec();
    body.extend_from_slice(&seq.to_be_bytes());
    body.resize(64, 0);
    body
}

fn unstamp(body: &[u8]) -> Option<(u32, u64)> {
    if body.len() < 12 {
        return None;
    }
    Some((
        u32::from_be_bytes(body[0..4].try_into().ok()?),
        u64::from_be_bytes(body[4..12].try_into().ok()?),
    ))
}

/// Publishes until the broker dies; returns the sequence numbers the broker confirmed.
async fn producer(port: u16, id: u32, dead_letter: bool) -> Vec<u64> {
    let mut confirmed = Vec::new();
    let run = async {
        let conn = connect(port).await;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        declare(&ch).await?;
        let queue = if dead_letter {
            DL_SOURCE
        } else {
            QUEUES[id as usize % QUEUES.len()]
        };
        let mut seq = 0u64;
        loop {
            let mut window = Vec::with_capacity(WINDOW);
            for _ in 0..WINDOW {
                let props = BasicProperties::default().with_delivery_mode(2);
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &stamp(id, seq),
                        props,
                    )
                    .await?;
                window.push((seq, confirm));
                seq += 1;
            }
            for (s, confirm) in window {
                if confirm.await?.is_ack() {
                    confirmed.push(s);
                }
            }
        }
        #[allow(unreachable_code)]
        lapin::Result::Ok(())
    };
    let _ = run.await;
    confirmed
}

/// Consumes and acks until the broker dies.
async fn consumer(port: u16, seen: Arc<Mutex<Vec<(u32, u64)>>>) {
    let run = async {
        let conn = connect(port).await;
        let ch = conn.create_channel().await?;
        declare(&ch).await?;
        ch.basic_qos(100, BasicQosOptions::default()).await?;
        let mut streams = Vec::new();
        for q in QUEUES {
            streams.push(
                ch.basic_consume(
                    q.into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?,
            );
        }
        let mut merged = streams.pop().ok_or(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "no consumer",
        ))?;
        let other = streams.pop();
        if let Some(other) = other {
            let mut both = futures_lite::stream::or(merged, other);
            while let Some(d) = both.next().await {
                let d = d?;
                if let Some(id) = unstamp(&d.data) {
                    seen.lock().unwrap().push(id);
                }
                d.ack(BasicAckOptions::default()).await?;
            }
        } else {
            while let Some(d) = merged.next().await {
                let d = d?;
                if let Some(id) = unstamp(&d.data) {
                    seen.lock().unwrap().push(id);
                }
                d.ack(BasicAckOptions::default()).await?;
            }
        }
        lapin::Result::Ok(())
    };
    let _ = run.await;
}

/// Takes everything left in the queues.
async fn drain(port: u16, seen: &Arc<Mutex<Vec<(u32, u64)>>>) {
    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch).await.unwrap();
    for q in QUEUES.into_iter().chain([DL_SOURCE, "crash-dead"]) {
        while let Some(m) = ch
            .basic_get(q.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            if let Some(id) = unstamp(&m.delivery.data) {
                seen.lock().unwrap().push(id);
            }
        }
    }
    let _ = conn.close(200, "drained".into()).await;
}

fn rounds() -> u32 {
    std::env::var("WARREN_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_across_kill_9() {
    crash_rounds(rounds(), false, "plain").await;
}

/// Messages expire at once from a durable queue into a durable dead-letter queue while
/// the broker is killed: none may be lost on the way (at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_durable_messages_loses_nothing_across_kill_9() {
    crash_rounds(rounds().min(8), true, "dlx").await;
}

async fn crash_rounds(rounds: u32, dead_letter: bool, tag: &str) {
    let dir = std::env::temp_dir().join(format!("warren-crash-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut port = free_port();
    let mut broker = start(&dir, port, &[]);
    connect(port).await.close(200, "up".into()).await.unwrap();
    let mut total_lost = 0usize;
    for round in 0..rounds {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| tokio::spawn(producer(port, round * 100 + p, dead_letter)))
            .collect();
        let consumer_task = tokio::spawn(consumer(port, seen.clone()));
        let delay = 300 + (rand_u64() % 1200);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        broker.kill().expect("SIGKILL");
        broker.wait().unwrap();
        let mut confirmed: HashMap<u32, Vec<u64>> = HashMap::new();
        for (p, task) in producers.into_iter().enumerate() {
            confirmed.insert(round * 100 + p as u32, task.await.unwrap());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), consumer_task).await;
        port = free_port();
        broker = start(&dir, port, &[]);
        drain(port, &seen).await;

        let seen = seen.lock().unwrap().clone();
        let mut unique: HashSet<(u32, u64)> = HashSet::new();
        let mut duplicates = 0usize;
        for id in &seen {
            if !unique.insert(*id) {
                duplicates += 1;
            }
        }
        let mut lost = 0usize;
        let mut count = 0usize;
        for (p, seqs) in &confirmed {
            count += seqs.len();
            lost += seqs.iter().filter(|s| !unique.contains(&(*p, **s))).count();
        }
        eprintln!(
            "{tag} round {round}: killed after {delay} ms, {count} confirmed, {} delivered, {duplicates} duplicates, {lost} lost",
            seen.len()
        );
        total_lost += lost;
    }
    broker.kill().ok();
    broker.wait().ok();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(total_lost, 0, "confirmed messages were lost");
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}
