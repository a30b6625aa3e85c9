//! Shared set-up for integration tests: a broker in-process on an ephemeral port, with
//! its own data directory, and lapin connections to it.

#![allow(dead_code)]

use lapin::{Connection, ConnectionProperties};
use warren::{Broker, Config};

/// A broker for one test, removed with its data directory when dropped.
pub struct TestBroker {
    pub broker: Option<Broker>,
    pub url: String,
    pub dir: std::path::PathBuf,
}

impl TestBroker {
    /// Starts a node with default settings on 127.0.0.1:0.
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Starts a node after letting the test adjust its settings.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = std::env::temp_dir().join(format!(
            "warren-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let mut config = Config::for_tests(&dir);
        adjust(&mut config);
        let broker = Broker::start(config).await.expect("broker starts");
        let url = broker.amqp_url();
        TestBroker {
            broker: Some(broker),
            url,
            dir,
        }
    }

    /// A new lapin connection.
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("connects")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (N.fetch_add(1, Ordering::Relaxed) << 48)
}
