//! Disk faults against the real binary: an fsync that fails with EIO stops the node
//! (exit 70) without anything confirmed being lost, and a node that starts on a full
//! disk comes up, raises the disk alarm and serves its consumers.
//!
//! They need strace and root (to mount a small tmpfs). Without them they say so and
//! pass, unless WARREN_REQUIRE_FAULT_TOOLS=1 (as in CI), where missing tools fail.

mod node;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use node::{KillOnDrop, connect, free_port, start};

fn tools_required() -> bool {
    std::env::var("WARREN_REQUIRE_FAULT_TOOLS").is_ok_and(|v| v == "1")
}

/// Skips (or fails, when tools are required) with a reason.
fn missing(what: &str) {
    assert!(!tools_required(), "fault test cannot run: {what}");
    eprintln!("skipping a disk fault test: {what}");
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

async fn declare_durable(ch: &Channel, q: &str) {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
}

async fn count(conn: &Connection, q: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive")
    .message_count()
}

#[tokio::test]
async fn a_failed_fsync_stops_the_node_and_loses_nothing_confirmed() {
    if !has("strace") {
        return missing("strace is not installed");
    }
    let dir = temp_dir("eio");
    let port = free_port();
    // Every fdatasync from the 24th on fails with EIO: start-up and the first commits
    // pass, then a group commit fails.
    let mut traced = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=fdatasync,fsync",
            "-e",
            "inject=fdatasync,fsync:error=EIO:when=24+",
            env!("CARGO_BIN_EXE_warren"),
        ])
        .env("WARREN_PORT", port.to_string())
        .env("WARREN_MANAGEMENT_PORT", "0")
        .env("WARREN_PROMETHEUS_PORT", "0")
        .env("WARREN_LISTEN_ADDRESSES", "127.0.0.1")
        .env("WARREN_DATA_DIR", &dir)
        .env("WARREN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace starts");
    let conn = connect(port).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    declare_durable(&ch, "eio").await;
    let mut confirmed = Vec::new();
    for i in 0..500u32 {
        let Ok(pending) = ch
            .basic_publish(
                "".into(),
                "eio".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
        else {
            break;
        };
        match tokio::time::timeout(Duration::from_secs(10), pending).await {
            Ok(Ok(c)) if c.is_ack() => confirmed.push(i),
            _ => break,
        }
    }
    let status = tokio::task::spawn_blocking(move || traced.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(
        status.code(),
        Some(70),
        "a failed fsync is fatal: {status:?}"
    );
    assert!(!confirmed.is_empty(), "some publishes were confirmed first");
    assert!(confirmed.len() < 500, "the fault was hit");

    let _node = KillOnDrop(start(&dir, port, &[]));
    let conn = connect(port).await;
    let ch = conn.create_channel().await.expect("channel");
    let mut found = Vec::new();
    while let Some(m) = ch
        .basic_get("eio".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        found.push(u32::from_be_bytes(
            m.delivery.data[..4].try_into().expect("4 bytes"),
        ));
    }
    for c in &confirmed {
        assert!(found.contains(c), "confirmed message {c} was lost");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mounts a tmpfs of `mib` MiB at `at`; false when this process may not.
fn mount_tmpfs(at: &Path, mib: u32) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_node_started_on_a_full_disk_serves_its_consumers() {
    let mnt = temp_dir("full");
    if !mount_tmpfs(&mnt, 128) {
        let _ = std::fs::remove_dir_all(&mnt);
        return missing("cannot mount a tmpfs (not root?)");
    }
    let _unmount = Unmount(mnt.clone());
    let dir = mnt.join("data");
    let port = free_port();
    let total = 2000u32;
    {
        let _node = KillOnDrop(start(&dir, port, &[]));
        let conn = connect(port).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        declare_durable(&ch, "full").await;
        for i in 0..total {
            ch.basic_publish(
                "".into(),
                "full".into(),
                BasicPublishOptions::default(),
                &vec![i as u8; 1024],
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
        }
        assert!(dir.join("warren.reserve").exists(), "a reserve was made");
    } // SIGKILL
    // Another program fills the disk to the last byte.
    let filled = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=1000"])
        .arg(format!("of={}", mnt.join("filler").display()))
        .stderr(Stdio::null())
        .status()
        .expect("dd runs");
    assert!(!filled.success(), "dd stops at a full disk");

    let mut node = KillOnDrop(start(&dir, port, &[]));
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let conn = connect(port).await;
    // The disk alarm is on: a connection that publishes is not read any more (as in
    // RabbitMQ, its first publish goes through and blocks it), so its next publish gets
    // no confirm.
    let publisher = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("a publisher connects");
    let pch = publisher.create_channel().await.expect("channel");
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let first = pch
        .basic_publish(
            "".into(),
            "full".into(),
            BasicPublishOptions::default(),
            b"first while full",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish is written");
    let _ = tokio::time::timeout(Duration::from_secs(1), first).await;
    let second = async {
        pch.basic_publish(
            "".into(),
            "full".into(),
            BasicPublishOptions::default(),
            b"while full",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .is_err(),
        "no confirm while the disk alarm is on"
    );
    // Consumers drain and ack everything without stopping the node.
    let ch = conn.create_channel().await.expect("channel");
    let mut acked = 0;
    while let Some(m) = ch
        .basic_get("full".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
    {
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        acked += 1;
    }
    assert!(acked >= total, "every message was consumed: {acked}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        node.0.try_wait().expect("status").is_none(),
        "the node is still running"
    );
    assert_eq!(count(&conn, "full").await, 0);
}
