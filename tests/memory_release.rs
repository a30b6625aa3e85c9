//! The memory alarm against the real `warren` binary (its own process, so that its
//! resident memory is its own): a backlog raises the alarm and blocks the publisher; once
//! consumers drain it, the broker hands the memory back to the system, the alarm clears
//! and publishing resumes. (glibc's malloc would otherwise keep the drained pages, the
//! broker would stay above the limit, and the publisher would be blocked for good.)

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// The broker's memory limit, above what it needs when idle.
const LIMIT_MIB: u64 = 160;
const SIZE: usize = 4096;
/// Messages that take about twice the limit.
const TOTAL: usize = ((2 * LIMIT_MIB as usize) << 20) / SIZE;

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mem_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kb: u64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    kb * 1024
}

async fn connect(port: u16) -> Connection {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    for _ in 0..200 {
        if let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("broker on port {port} did not come up");
}

#[tokio::test]
async fn the_alarm_clears_once_a_backlog_is_drained() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("warren-memory-{}", std::process::id()));
    let fraction = (LIMIT_MIB << 20) as f64 / mem_total_bytes() as f64;
    let _broker = Broker(
        Command::new(env!("CARGO_BIN_EXE_warren"))
            .env("WARREN_PORT", port.to_string())
            .env("WARREN_LISTEN_ADDRESSES", "127.0.0.1")
            .env("WARREN_DATA_DIR", &dir)
            .env("WARREN_MEMORY_HIGH_WATERMARK", fraction.to_string())
            .env("WARREN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("warren binary starts"),
    );

    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "backlog".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // lapin waits while the connection is blocked, so the publisher has its own task.
    let publisher = connect(port).await;
    let pch = publisher.create_channel().await.unwrap();
    let publishing = tokio::spawn(async move {
        let body = vec![7u8; SIZE];
        for _ in 0..TOTAL {
            pch.basic_publish(
                "".into(),
                "backlog".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        }
    });

    // The backlog grows until the alarm stops the publisher.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let q = ch
            .queue_declare(
                "backlog".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let n = q.message_count() as usize;
        assert!(n < TOTAL, "the memory alarm never stopped the publisher");
        if n == last {
            break;
        }
        last = n;
    }

    // Drain everything; the rest of the publishes arrive once the alarm clears.
    let mut consumer = ch
        .basic_consume(
            "backlog".into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut received = 0;
    while received < TOTAL {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!("stuck after {received} of {TOTAL}: the alarm did not clear")
            });
        delivery.expect("consumer open").expect("delivery");
        received += 1;
    }
    publishing.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
