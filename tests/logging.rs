//! `log_format = "json"`: the real binary writes one JSON object per log line, with
//! the event's fields as keys.

mod node;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn json_log_lines_are_objects_with_level_message_and_fields() {
    let dir = std::env::temp_dir().join(format!("warren-json-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = node::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_PORT", port.to_string())
        .env("WARREN_MANAGEMENT_PORT", "0")
        .env("WARREN_PROMETHEUS_PORT", "0")
        .env("WARREN_LISTEN_ADDRESSES", "127.0.0.1")
        .env("WARREN_DATA_DIR", &dir)
        .env("WARREN_LOG", "info")
        .env("WARREN_LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("warren starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut listening = None;
    let mut recovered = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("a line");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["message"] == "store: recovered" {
            recovered = Some(v.clone());
        }
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening for AMQP"))
        {
            listening = Some(v);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let r = recovered.expect("the store's recovery line");
    assert_eq!(r["definitions"], 0, "fields are keys of the object: {r}");
    let v = listening.expect("the listening line");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "warren::server");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.ends_with(&format!("127.0.0.1:{port}"))),
        "{v}"
    );
}

#[test]
fn an_unknown_log_format_is_a_configuration_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_LOG_FORMAT", "xml")
        .env("WARREN_PORT", "0")
        .env("WARREN_MANAGEMENT_PORT", "0")
        .env("WARREN_PROMETHEUS_PORT", "0")
        .output()
        .expect("warren runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad configuration"));
}
