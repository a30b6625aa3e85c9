//! Settings: the defaults in `config/warren.toml` (compiled in), then an optional file,
//! then `WARREN_*` environment variables. One place that knows every knob.

use std::path::PathBuf;

use serde::Deserialize;

/// The built-in defaults, documented setting by setting in the shipped file.
const DEFAULTS: &str = include_str!("../config/warren.toml");

/// How publisher confirms relate to fsync; see `flush` in `config/warren.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// fsync (group commit) before every confirm.
    Sync,
    /// Commit without fsync, fsync on a timer.
    Interval,
}

/// How log lines look; see `log_format` in `config/warren.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, message, fields).
    Json,
}

/// Every setting of a Warren node.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Addresses to bind (IPv4 and IPv6 by default).
    pub listen_addresses: Vec<String>,
    /// AMQP port (0 = ephemeral).
    pub port: u16,
    /// Directory of the redb database.
    pub data_dir: PathBuf,
    /// fsync policy for confirms.
    pub flush: FlushMode,
    /// fsync period for `flush = "interval"`.
    pub flush_interval_ms: u64,
    /// User created with full rights on the default vhost.
    pub default_user: String,
    /// Its password.
    pub default_pass: String,
    /// The vhost that exists from the start.
    pub default_vhost: String,
    /// Users allowed to log in only from loopback addresses.
    pub loopback_users: Vec<String>,
    /// Highest channel number offered in tune.
    pub channel_max: u16,
    /// Largest frame offered in tune.
    pub frame_max: u32,
    /// Heartbeat interval offered in tune, in seconds.
    pub heartbeat: u16,
    /// Largest message body accepted, in bytes.
    pub max_message_size: u64,
    /// Milliseconds a connection has to complete the handshake.
    pub handshake_timeout: u64,
    /// Milliseconds a delivery may stay unacknowledged (0: no limit).
    pub consumer_timeout: u64,
    /// Most client connections served at once (0: no limit).
    pub connection_max: usize,
    /// Fraction of RAM above which publishers are blocked.
    pub memory_high_watermark: f64,
    /// Free bytes on the data directory's file system below which publishers are
    /// blocked (0: never).
    pub disk_free_limit: u64,
    /// Management HTTP API port (0 = ephemeral), on `listen_addresses`.
    pub management_port: u16,
    /// AMQP over TLS port (0 = ephemeral); only with a certificate.
    pub tls_port: u16,
    /// Management API over TLS port (0 = ephemeral); only with a certificate.
    pub management_tls_port: u16,
    /// PEM certificate chain of the node (empty: no TLS listeners).
    pub tls_cert_file: String,
    /// PEM private key of the node.
    pub tls_key_file: String,
    /// PEM CA certificates that client certificates are verified against.
    pub tls_ca_file: String,
    /// Ask clients for a certificate and verify it.
    pub tls_verify_peer: bool,
    /// Refuse clients without a certificate (with `tls_verify_peer`).
    pub tls_fail_if_no_peer_cert: bool,
    /// Which part of a client certificate is the user name for EXTERNAL:
    /// "distinguished_name" or "common_name".
    pub ssl_cert_login_from: String,
    /// Prometheus metrics port (0 = ephemeral), on `listen_addresses`.
    pub prometheus_port: u16,
    /// A definitions file (RabbitMQ's JSON) imported at boot; empty: none.
    pub load_definitions: String,
    /// tracing filter.
    pub log: String,
    /// Plain text or JSON log lines.
    pub log_format: LogFormat,
}

impl Config {
    /// Loads defaults, then `file` (if any), then `WARREN_*` environment variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<Config, config::ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path.to_path_buf()).required(true));
        }
        builder
            .add_source(
                config::Environment::with_prefix("WARREN")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("listen_addresses")
                    .with_list_parse_key("loopback_users"),
            )
            .build()?
            .try_deserialize()
    }

    /// `handshake_timeout` as a duration.
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_timeout)
    }

    /// `max_message_size`, capped at RabbitMQ's hard limit of 512 MiB.
    pub fn max_message_size(&self) -> u64 {
        self.max_message_size.min(512 * 1024 * 1024)
    }

    /// `consumer_timeout` as a duration, `None` when off.
    pub fn consumer_timeout(&self) -> Option<std::time::Duration> {
        (self.consumer_timeout > 0).then(|| std::time::Duration::from_millis(self.consumer_timeout))
    }

    /// The built-in defaults alone (no file, no environment).
    pub fn defaults() -> Config {
        config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("the compiled-in config/warren.toml is valid")
    }

    /// Defaults for an in-process test broker: loopback only, ephemeral port, the given
    /// data directory.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen_addresses: vec!["127.0.0.1".into()],
            port: 0,
            management_port: 0,
            prometheus_port: 0,
            tls_port: 0,
            management_tls_port: 0,
            data_dir: data_dir.into(),
            ..Config::defaults()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_defaults_parse() {
        let c = Config::defaults();
        assert_eq!(c.port, 5672);
        assert_eq!(c.default_user, "guest");
        assert_eq!(c.flush, FlushMode::Sync);
        assert_eq!(c.management_port, 15672);
        assert_eq!(c.prometheus_port, 15692);
        assert!(c.load_definitions.is_empty());
        assert_eq!(c.log_format, LogFormat::Text);
    }
}
