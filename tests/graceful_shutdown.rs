//! SIGTERM, as `docker stop` and systemd send it, and `warren ctl stop`, against the real
//! `warren` binary: the node stops accepting, closes every connection with 320 CONNECTION_FORCED (RabbitMQ's
//! text), lets the store writer commit what it was given, closes the store cleanly and
//! exits 0. Every message confirmed before the signal is there after a restart, and the
//! restart finds a cleanly closed store (no repair).

mod common;
mod node;
mod util;

use std::collections::HashSet;
use std::process::Child;
use std::time::{Duration, Instant};

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, connection};
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use node::{KillOnDrop, connect, free_port, start_logged};
use util::raw::{Raw, Read, method};

const QUEUE: &str = "graceful-shutdown";
const WINDOW: usize = 20;

/// Publishes persistent messages with confirms until the broker closes the connection;
/// returns the sequence numbers it confirmed.
async fn publish_until_closed(port: u16) -> Vec<u64> {
    let mut confirmed = Vec::new();
    let run = async {
        let conn = connect(port).await;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut seq = 0u64;
        loop {
            let mut window = Vec::with_capacity(WINDOW);
            for _ in 0..WINDOW {
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        QUEUE.into(),
                        BasicPublishOptions::default(),
                        &seq.to_be_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
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

/// Waits up to `limit` for the child to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// How the test asks the node to stop.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// kill(2) with SIGTERM.
    Signal,
    /// `warren ctl stop` through the management API.
    Ctl,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_with_320_keeps_confirmed_messages_and_exits_0() {
    stops_gracefully(Stop::Signal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_stop_does_what_sigterm_does() {
    stops_gracefully(Stop::Ctl).await;
}

async fn stops_gracefully(how: Stop) {
    let name = if how == Stop::Signal {
        "sigterm"
    } else {
        "ctl-stop"
    };
    let dir = std::env::temp_dir().join(format!("warren-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let management = free_port();
    let info = [
        ("WARREN_LOG", "info".to_string()),
        ("WARREN_MANAGEMENT_PORT", management.to_string()),
    ];

    let port = free_port();
    let first_log = dir.join("first.log");
    let mut node = KillOnDrop(start_logged(&data, port, &info, &first_log));
    let setup = connect(port).await;
    let ch = setup.create_channel().await.unwrap();
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();

    // An idle client that reads what the broker says when it stops.
    let (mut watcher, _) = Raw::open(&format!("127.0.0.1:{port}"), 0).await;
    watcher.open_channel(1).await;

    let publisher = tokio::spawn(publish_until_closed(port));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ctl = match how {
        Stop::Signal => {
            let pid = node.0.id() as libc::pid_t;
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "send SIGTERM");
            None
        }
        // rabbitmqctl stop returns once the node is gone: run it beside the test.
        Stop::Ctl => Some(
            tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"))
                .args(["ctl", "--url", &format!("http://127.0.0.1:{management}")])
                .arg("stop")
                .stdin(std::process::Stdio::null())
                .output(),
        ),
    };
    let ctl = ctl.map(tokio::spawn);

    // connection.close 320 with RabbitMQ's text; do not answer yet.
    let close = loop {
        match watcher.read_frame(Duration::from_secs(10)).await {
            Read::Frame(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(c)),
            )) => break c,
            Read::Frame(_) => continue,
            other => panic!("expected connection.close after SIGTERM, got {other:?}"),
        }
    };
    assert_eq!(close.reply_code, 320, "{close:?}");
    assert_eq!(
        close.reply_text.as_str(),
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    );

    // While our connection still waits for close-ok, the node no longer accepts.
    let deadline = Instant::now() + Duration::from_secs(2);
    let refused = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(_) => break true,
            Ok(_) if Instant::now() > deadline => break false,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert!(refused, "the node still accepts connections after SIGTERM");
    watcher
        .send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ))
        .await;
    assert!(watcher.closed_within(Duration::from_secs(5)).await);

    let confirmed = tokio::time::timeout(Duration::from_secs(10), publisher)
        .await
        .expect("the publisher's connection was closed")
        .unwrap();
    assert!(
        confirmed.len() > WINDOW,
        "too few confirms before SIGTERM: {}",
        confirmed.len()
    );

    let status = wait_exit(&mut node.0, Duration::from_secs(10)).expect("exits after SIGTERM");
    let log = std::fs::read_to_string(&first_log).unwrap();
    assert_eq!(status.code(), Some(0), "exit status; log:\n{log}");
    let reason = match how {
        Stop::Signal => "SIGTERM",
        Stop::Ctl => "warren ctl stop",
    };
    assert!(log.contains(reason), "log names {reason}:\n{log}");
    assert!(log.contains("stopped"), "log says the node stopped:\n{log}");
    if let Some(ctl) = ctl {
        let out = tokio::time::timeout(Duration::from_secs(10), ctl)
            .await
            .expect("warren ctl stop returns once the node is gone")
            .expect("joined")
            .expect("warren ctl runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "warren ctl stop: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.starts_with("Stopping and halting node warren@"),
            "{stdout}"
        );
    }

    // Restart: a cleanly closed store needs no repair, and every confirm holds.
    let port = free_port();
    let second_log = dir.join("second.log");
    let mut node = KillOnDrop(start_logged(&data, port, &info, &second_log));
    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    let mut found = HashSet::new();
    while let Some(m) = ch
        .basic_get(QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let seq: [u8; 8] = m.delivery.data[..].try_into().expect("an 8-byte body");
        found.insert(u64::from_be_bytes(seq));
    }
    let lost: Vec<_> = confirmed.iter().filter(|s| !found.contains(s)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} confirmed messages lost",
        lost.len(),
        confirmed.len()
    );
    let _ = conn.close(200, "done".into()).await;
    // SAFETY: as above.
    unsafe { libc::kill(node.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut node.0, Duration::from_secs(10)).expect("exits after SIGTERM");
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert_eq!(status.code(), Some(0), "second exit; log:\n{log}");
    assert!(
        !log.contains("repairing"),
        "the store was not closed cleanly on SIGTERM:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
