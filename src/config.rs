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
    /// Body bytes of ready persistent messages a durable queue keeps in memory at its
    /// head; the rest stay in the store until they come near the head.
    pub queue_body_window: u64,
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
    /// This node's cluster name (`name@host`); empty: `warren@<host name>`.
    pub node_name: String,
    /// Every member of the cluster as `name@host`, this node included; empty: single node.
    pub cluster_nodes: Vec<String>,
    /// Inter-node port.
    pub cluster_port: u16,
    /// Shared secret that peers prove to each other.
    pub cluster_secret: String,
    /// tracing filter.
    pub log: String,
    /// Plain text or JSON log lines.
    pub log_format: LogFormat,
}

impl Config {
    /// Loads defaults, then `file` (if any), then RabbitMQ's image variables
    /// (`RABBITMQ_DEFAULT_USER`, `_PASS`, `_VHOST`), then `WARREN_*` environment variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<Config, config::ConfigError> {
        Config::load_with_env(file, std::env::vars())
    }

    /// Like [`Config::load`], with the environment variables given (tests use this to
    /// check the precedence without touching the process environment).
    pub fn load_with_env(
        file: Option<&std::path::Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, config::ConfigError> {
        let vars = with_secret_files(vars.into_iter().collect())?;
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path.to_path_buf()).required(true));
        }
        builder
            .add_source(rabbitmq_image_env(&vars))
            .add_source(
                config::Environment::with_prefix("WARREN")
                    .source(Some(vars))
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("listen_addresses")
                    .with_list_parse_key("loopback_users")
                    .with_list_parse_key("cluster_nodes"),
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

/// The variables RabbitMQ's Docker image reads for its first user and vhost, so that a
/// `docker run -e RABBITMQ_DEFAULT_USER=...` line written for RabbitMQ works unchanged.
/// `WARREN_DEFAULT_USER` and friends win when both are set.
const RABBITMQ_IMAGE_VARS: [(&str, &str); 3] = [
    ("RABBITMQ_DEFAULT_USER", "default_user"),
    ("RABBITMQ_DEFAULT_PASS", "default_pass"),
    ("RABBITMQ_DEFAULT_VHOST", "default_vhost"),
];

/// Settings that may come from a file named by `<VARIABLE>_FILE` (Docker and Kubernetes
/// secrets, as RabbitMQ's image once read `RABBITMQ_DEFAULT_PASS_FILE`).
const SECRET_FILE_VARS: [&str; 7] = [
    "WARREN_DEFAULT_USER",
    "WARREN_DEFAULT_PASS",
    "WARREN_DEFAULT_VHOST",
    "WARREN_CLUSTER_SECRET",
    "RABBITMQ_DEFAULT_USER",
    "RABBITMQ_DEFAULT_PASS",
    "RABBITMQ_DEFAULT_VHOST",
];

/// `vars` with each `<VARIABLE>_FILE` of [`SECRET_FILE_VARS`] replaced by the file's
/// contents under `<VARIABLE>` (without a trailing newline); the variable itself, when
/// also set, wins. A file that cannot be read is an error, not a silent default.
fn with_secret_files(
    mut vars: config::Map<String, String>,
) -> Result<config::Map<String, String>, config::ConfigError> {
    for var in SECRET_FILE_VARS {
        let Some(path) = vars.remove(&format!("{var}_FILE")) else {
            continue;
        };
        if vars.contains_key(var) {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            config::ConfigError::Message(format!("{var}_FILE: cannot read {path}: {e}"))
        })?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        vars.insert(
            var.to_string(),
            value.strip_suffix('\r').unwrap_or(value).into(),
        );
    }
    Ok(vars)
}

/// A source holding the settings named by RabbitMQ's image variables found in `vars`.
fn rabbitmq_image_env(vars: &config::Map<String, String>) -> config::Environment {
    let picked = RABBITMQ_IMAGE_VARS
        .iter()
        .filter_map(|(var, key)| {
            Some((
                format!("RABBITMQ_{}", key.to_uppercase()),
                vars.get(*var)?.clone(),
            ))
        })
        .collect();
    config::Environment::with_prefix("RABBITMQ").source(Some(picked))
}

impl Config {
    /// This node's name: `node_name`, or `warren@<host name>` when it is empty.
    pub fn node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("warren@{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("warren-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pass = dir.join("pass");
        std::fs::write(&pass, "s3cret\n").unwrap();
        let secret = dir.join("cookie");
        std::fs::write(&secret, "cookie").unwrap();
        let vars = |extra: &[(&str, &str)]| {
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let p = pass.to_string_lossy().into_owned();
        let c = Config::load_with_env(None, vars(&[("RABBITMQ_DEFAULT_PASS_FILE", &p)])).unwrap();
        assert_eq!(c.default_pass, "s3cret", "the newline is not part of it");
        let s = secret.to_string_lossy().into_owned();
        let c = Config::load_with_env(None, vars(&[("WARREN_CLUSTER_SECRET_FILE", &s)])).unwrap();
        assert_eq!(c.cluster_secret, "cookie");
        let c = Config::load_with_env(
            None,
            vars(&[
                ("WARREN_DEFAULT_PASS_FILE", &p),
                ("WARREN_DEFAULT_PASS", "direct"),
            ]),
        )
        .unwrap();
        assert_eq!(c.default_pass, "direct", "the variable itself wins");
        let missing = Config::load_with_env(None, vars(&[("WARREN_DEFAULT_PASS_FILE", "/nope")]));
        assert!(missing.is_err(), "an unreadable secret file is an error");
        std::fs::remove_dir_all(&dir).ok();
    }

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
        assert!(c.cluster_nodes.is_empty(), "single node unless configured");
        assert_eq!(c.cluster_port, 25672);
    }

    #[test]
    fn node_name_defaults_to_warren_at_host() {
        let c = Config::defaults();
        assert!(c.node_name().starts_with("warren@"));
        let named = Config {
            node_name: "n1@10.0.0.1".into(),
            ..Config::defaults()
        };
        assert_eq!(named.node_name(), "n1@10.0.0.1");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rabbitmq_image_variables_set_the_first_user_and_vhost() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("RABBITMQ_DEFAULT_USER", "app"),
                ("RABBITMQ_DEFAULT_PASS", "s3cret"),
                ("RABBITMQ_DEFAULT_VHOST", "prod"),
                // Other RABBITMQ_* variables are not Warren settings.
                ("RABBITMQ_NODENAME", "rabbit@host"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (
                c.default_user.as_str(),
                c.default_pass.as_str(),
                c.default_vhost.as_str()
            ),
            ("app", "s3cret", "prod")
        );
        assert_eq!(c.loopback_users, vec!["guest".to_string()]);
    }

    #[test]
    fn warren_variables_win_over_rabbitmq_ones() {
        let c = Config::load_with_env(
            None,
            env(&[
                ("RABBITMQ_DEFAULT_USER", "rabbit"),
                ("WARREN_DEFAULT_USER", "warren"),
                ("RABBITMQ_DEFAULT_VHOST", "v"),
            ]),
        )
        .unwrap();
        assert_eq!(c.default_user, "warren");
        assert_eq!(c.default_vhost, "v");
    }

    #[test]
    fn empty_loopback_users_lets_guest_in_from_anywhere() {
        let c = Config::load_with_env(None, env(&[("WARREN_LOOPBACK_USERS", "")])).unwrap();
        assert!(
            c.loopback_users.iter().all(|u| u.is_empty()),
            "{:?}",
            c.loopback_users
        );
    }

    #[test]
    fn a_file_sets_what_the_environment_leaves_alone() {
        let dir = std::env::temp_dir().join(format!("warren-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("warren.toml");
        std::fs::write(&file, "default_vhost = \"from-file\"\nheartbeat = 17\n").unwrap();
        let c = Config::load_with_env(Some(&file), env(&[("WARREN_HEARTBEAT", "5")])).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(c.default_vhost, "from-file");
        assert_eq!(c.heartbeat, 5);
    }
}
