//! `warren healthcheck`, the container's HEALTHCHECK: healthy only when an AMQP 0-9-1
//! broker answers the protocol header with connection.start.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::TestBroker;

const TIMEOUT: Duration = Duration::from_secs(5);

fn healthcheck_binary(port: u16) -> std::process::ExitStatus {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["healthcheck", "--port", &port.to_string(), "--timeout", "3"])
        .env_remove("WARREN_CONFIG_FILE")
        .status()
        .expect("warren healthcheck runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_is_healthy() {
    let t = TestBroker::start().await;
    let port = t.broker.as_ref().unwrap().local_addr().port();
    let result = tokio::task::spawn_blocking(move || {
        (
            warren::healthcheck::check("127.0.0.1", port, TIMEOUT),
            healthcheck_binary(port),
        )
    })
    .await
    .unwrap();
    assert_eq!(result.0, Ok(()));
    assert!(
        result.1.success(),
        "warren healthcheck exit: {:?}",
        result.1
    );
}

#[test]
fn a_closed_port_is_unhealthy() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(warren::healthcheck::check("127.0.0.1", port, TIMEOUT).is_err());
    assert_eq!(healthcheck_binary(port).code(), Some(1));
}

/// A server that accepts and answers, but not with AMQP (say, an HTTP server that took
/// the port), is not a healthy node.
#[test]
fn a_port_that_does_not_speak_amqp_is_unhealthy() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut buf = [0u8; 8];
            let _ = s.read_exact(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let err = warren::healthcheck::check("127.0.0.1", port, TIMEOUT).unwrap_err();
    assert!(err.contains("frame type"), "{err}");
    assert_eq!(healthcheck_binary(port).code(), Some(1));
    server.join().unwrap();
}

/// A node that accepts but never answers (stuck) is unhealthy within the timeout.
#[test]
fn a_silent_port_is_unhealthy_within_the_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let err =
        warren::healthcheck::check("127.0.0.1", port, Duration::from_millis(300)).unwrap_err();
    assert!(err.contains("timed out"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(listener);
}
