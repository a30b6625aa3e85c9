//! The real `warren` binary as a child process, for tests that need a process of its own
//! (killed with SIGKILL, or measured from /proc).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Starts `warren` on 127.0.0.1:`port` with its data in `dir`, plus `env` settings.
pub fn start(dir: &Path, port: u16, env: &[(&str, String)]) -> Child {
    command(dir, port, env)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("warren binary starts")
}

/// Like [`start`], with the node's log (stderr) written to the file `log` so that a test
/// can read what it said.
pub fn start_logged(dir: &Path, port: u16, env: &[(&str, String)], log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("create the node's log file");
    command(dir, port, env)
        .stderr(Stdio::from(file))
        .spawn()
        .expect("warren binary starts")
}

fn command(dir: &Path, port: u16, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_warren"));
    command
        .env("WARREN_PORT", port.to_string())
        .env("WARREN_MANAGEMENT_PORT", "0")
        .env("WARREN_PROMETHEUS_PORT", "0")
        .env("WARREN_LISTEN_ADDRESSES", "127.0.0.1")
        .env("WARREN_DATA_DIR", dir)
        .env("WARREN_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null());
    command
}

/// Connects to the node on `port`, waiting (up to 5 s) for it to listen.
pub async fn connect(port: u16) -> Connection {
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    for _ in 0..200 {
        if let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("broker on port {port} did not come up");
}

/// Kills the node (SIGKILL) when dropped, so that a failing test leaves no broker behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
