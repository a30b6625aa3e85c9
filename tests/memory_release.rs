//! The memory alarm against the real `warren` binary (its own process, so that its
//! resident memory is its own): a backlog raises the alarm and blocks the publisher; once
//! consumers drain it, the broker hands the memory back to the system, the alarm clears
//! and publishing resumes. (The allocators would otherwise keep the drained pages, the
//! broker would stay above the limit, and the publisher would be blocked for good.)
//!
//! The queue's transient messages go to disk once memory runs short, so on some runs the
//! broker stays near its limit (the alarm goes on and off) and the publisher finishes
//! without being stopped for good; either way every message must arrive and, at the
//! end, a publish must be confirmed (the alarm is off).

mod common;
mod node;
mod util;

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use node::{KillOnDrop, connect, free_port, start};

/// The broker's memory limit, above what it needs when idle.
const LIMIT_MIB: u64 = 160;
const SIZE: usize = 4096;
/// Messages that take about twice the limit.
const TOTAL: usize = ((2 * LIMIT_MIB as usize) << 20) / SIZE;

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

#[tokio::test]
async fn the_alarm_clears_once_a_backlog_is_drained() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("warren-memory-{}", std::process::id()));
    let fraction = (LIMIT_MIB << 20) as f64 / mem_total_bytes() as f64;
    let _node = KillOnDrop(start(
        &dir,
        port,
        &[("WARREN_MEMORY_HIGH_WATERMARK", fraction.to_string())],
    ));

    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    util::declare_queue(&ch, "backlog").await;

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

    // The backlog grows until the alarm stops the publisher (or it is all queued).
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = util::message_count(&ch, "backlog").await as usize;
        if n == last || n == TOTAL {
            eprintln!("{n} of {TOTAL} queued when the publisher stopped or finished");
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

    // With the backlog gone the alarm is off: a publish is confirmed. (lapin holds a
    // publish while the connection is blocked, so the wait covers the publish too.)
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirmed = tokio::time::timeout(Duration::from_secs(30), async {
        ch.basic_publish(
            "".into(),
            "backlog".into(),
            BasicPublishOptions::default(),
            b"after",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
    })
    .await
    .expect("the alarm did not clear after the drain");
    assert!(confirmed.is_ack());
    let _ = std::fs::remove_dir_all(&dir);
}
