//! The cluster test harness: N real `warren` processes, each a separate "host" in a
//! network namespace of its own, wired to one bridge, with faults on demand.
//!
//! Layout of one harness (`N` is a subnet number picked per harness, unique on the machine
//! while it lives, so parallel tests and other users of the machine never collide):
//!
//! ```text
//! host: bridge wc-N-br 10.77.N.254/24
//!   ├── veth wc-N-vK ── netns wc-N-nK: eth0 10.77.N.K/24, lo; warren on :5672, :25672
//!   └── ...
//! ```
//!
//! Tests talk to `10.77.N.K` only. Faults: SIGKILL, SIGSTOP/SIGCONT, restart, a node's link
//! down, nftables drops between nodes (both ways or one way). Everything made is removed on
//! drop, also when a test fails; harnesses left by a killed test process are reaped by the
//! next one. Needs root (`ip netns`, `nft`); [`Cluster::start`] returns `None` without it
//! unless `CI` is set, where it fails.
//!
//! `WARREN_TEST_CLUSTER_BACKEND=rabbitmq` runs RabbitMQ nodes instead of Warren ones (through
//! the `rabbitmq-cluster-node` stand-in, which takes the same `WARREN_*` cluster settings;
//! its path is `WARREN_RABBITMQ_CLUSTER_NODE`), so that a test can be pointed at RabbitMQ to
//! compare: the fault checker (tests/faults.rs) is run that way.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

/// AMQP port of every node (inside its namespace).
pub const AMQP_PORT: u16 = 5672;
/// Inter-node port of every node (inside its namespace).
pub const CLUSTER_PORT: u16 = 25672;
/// User the harness creates on every node (guest may log in from loopback only).
pub const USER: &str = "harness";
/// Where harnesses note their owner's pid, so that a later run can reap an abandoned one.
const OWNERS_DIR: &str = "/tmp/wc-harness";

/// Where the RabbitMQ stand-in script is, unless `WARREN_RABBITMQ_CLUSTER_NODE` says.
const RABBITMQ_CLUSTER_NODE: &str = "/work/shared/tools/rabbitmq-cluster-node";

/// Which broker runs on every node of a harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// This repository's `warren` binary.
    Warren,
    /// RabbitMQ through the stand-in script (to compare Warren with).
    RabbitMq,
}

impl Backend {
    /// The backend `WARREN_TEST_CLUSTER_BACKEND` names (`warren`, the default, or
    /// `rabbitmq`); any other value is a mistake worth stopping for.
    pub fn from_env() -> Backend {
        match std::env::var("WARREN_TEST_CLUSTER_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("warren") => Backend::Warren,
            Ok("rabbitmq") => Backend::RabbitMq,
            Ok(other) => panic!("WARREN_TEST_CLUSTER_BACKEND={other}: expected warren or rabbitmq"),
        }
    }

    /// The user and password clients log in with.
    pub fn credentials(self) -> (&'static str, &'static str) {
        match self {
            Backend::Warren => (USER, USER),
            // The stand-in lets guest in from any address.
            Backend::RabbitMq => ("guest", "guest"),
        }
    }

    /// How long a (re)started node may take before it accepts AMQP connections.
    pub fn boot_time(self) -> Duration {
        match self {
            Backend::Warren => Duration::from_secs(20),
            Backend::RabbitMq => Duration::from_secs(120),
        }
    }
}

/// Runs a command, returning whether it succeeded (its stderr is kept for the panic
/// message of [`sh`]).
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a set-up command that must succeed.
fn sh(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("harness: {e}");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `signal` to `pid` (no `kill` binary needed: minimal systems lack procps).
fn send_signal(pid: u32, signal: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) == 0 }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// One node: its namespace, address and process.
pub struct Node {
    /// 1-based index (also the last byte of its address).
    pub index: usize,
    /// Its cluster name, `nK@10.77.N.K`.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    netns: String,
    veth: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster of `warren` processes in network namespaces.
pub struct Cluster {
    /// The subnet number N of 10.77.N.0/24.
    pub subnet: u8,
    /// The broker every node runs.
    pub backend: Backend,
    bridge: String,
    dir: PathBuf,
    secret: String,
    /// Settings given to every node (WARREN_* variables), on top of the harness's own.
    env: Vec<(String, String)>,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes that form one cluster (`cluster_nodes` names all of them). `None`
    /// when not root and not in CI: the test is then skipped (and says so).
    pub fn start(n: usize) -> Option<Cluster> {
        Self::start_with(n, &[])
    }

    /// As [`Cluster::start`], with extra `WARREN_*` settings for every node.
    pub fn start_with(n: usize, env: &[(&str, &str)]) -> Option<Cluster> {
        let mut cluster = Self::create(n, env)?;
        for i in 1..=n {
            cluster.start_node(i);
        }
        cluster.wait_linked();
        Some(cluster)
    }

    /// Waits (up to the boot time) until every node logged its link to every other one
    /// up since it started: a node not yet linked to the metadata leader has not heard
    /// of the latest definitions, nor can it reach a queue's leader. Tests assert what
    /// a formed cluster does.
    fn wait_linked(&self) {
        if self.backend != Backend::Warren {
            return;
        }
        let deadline = Instant::now() + self.backend.boot_time();
        let linked = |i: usize| {
            let log = self.log(i);
            let since = log
                .rfind("listening for cluster peers")
                .map_or("", |at| &log[at..]);
            self.nodes
                .iter()
                .filter(|peer| peer.index != i)
                .all(|peer| since.contains(&format!("cluster: link to {} up", peer.name)))
        };
        while Instant::now() < deadline && !(1..=self.nodes.len()).all(linked) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The network of `n` nodes with no process started yet (tests that choose the start
    /// order call [`Cluster::start_node`]).
    pub fn create(n: usize, env: &[(&str, &str)]) -> Option<Cluster> {
        if !is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "the cluster tests need root (ip netns, nft)"
            );
            eprintln!("skipped: the cluster tests need root (ip netns, nft)");
            return None;
        }
        assert!((1..=200).contains(&n), "1..=200 nodes");
        reap_abandoned();
        let subnet = claim_subnet();
        let bridge = format!("wc-{subnet}-br");
        let dir = std::env::temp_dir().join(format!("wc-harness-{subnet}-{}", std::process::id()));
        let mut cluster = Cluster {
            subnet,
            backend: Backend::from_env(),
            bridge: bridge.clone(),
            dir,
            secret: format!("secret-{}-{subnet}", std::process::id()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nodes: Vec::new(),
        };
        // From here on, Drop cleans up whatever was made, even if a step below panics.
        std::fs::create_dir_all(&cluster.dir).expect("harness directory");
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.77.{subnet}.254/24"),
            "dev",
            &bridge,
        ]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        for index in 1..=n {
            let node = cluster.make_node(index);
            cluster.nodes.push(node);
        }
        Some(cluster)
    }

    /// Creates node `index`'s namespace, veth pair and address.
    fn make_node(&self, index: usize) -> Node {
        let s = self.subnet;
        let netns = format!("wc-{s}-n{index}");
        let veth = format!("wc-{s}-v{index}");
        let peer = format!("wc-{s}-p{index}");
        let ip = Ipv4Addr::new(10, 77, s, index as u8);
        sh(&["ip", "netns", "add", &netns]);
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &netns]);
        sh(&["ip", "link", "set", &veth, "master", &self.bridge]);
        sh(&["ip", "link", "set", &veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", netns.as_str()];
            all.extend_from_slice(args);
            sh(&all);
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&["ip", "link", "set", &peer, "name", "eth0"]);
        inside(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        inside(&["ip", "link", "set", "eth0", "up"]);
        let data_dir = self.dir.join(format!("n{index}"));
        Node {
            index,
            name: format!("n{index}@{ip}"),
            ip,
            netns,
            veth,
            log: self.dir.join(format!("n{index}.log")),
            data_dir,
            child: None,
        }
    }

    /// Every node's cluster name, as `cluster_nodes` lists them.
    pub fn member_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Starts node `i`'s process (its data directory is kept across restarts).
    pub fn start_node(&mut self, i: usize) {
        let members = self.member_names().join(",");
        let secret = self.secret.clone();
        let env = self.env.clone();
        let node = &mut self.nodes[i - 1];
        assert!(node.child.is_none(), "node {i} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("node log file");
        let mut command = Command::new("ip");
        match self.backend {
            Backend::Warren => {
                command.args(["netns", "exec", &node.netns, env!("CARGO_BIN_EXE_warren")])
            }
            Backend::RabbitMq => {
                let script = std::env::var("WARREN_RABBITMQ_CLUSTER_NODE")
                    .unwrap_or_else(|_| RABBITMQ_CLUSTER_NODE.to_string());
                // Guest may log in from any address (WARREN_LOOPBACK_USERS set, without it).
                command
                    .args(["netns", "exec", &node.netns, &script])
                    .env("WARREN_LOOPBACK_USERS", "")
            }
        };
        let child = command
            .env("WARREN_LISTEN_ADDRESSES", "0.0.0.0")
            .env("WARREN_PORT", AMQP_PORT.to_string())
            .env("WARREN_DATA_DIR", &node.data_dir)
            .env("WARREN_DEFAULT_USER", USER)
            .env("WARREN_DEFAULT_PASS", USER)
            .env("WARREN_NODE_NAME", &node.name)
            .env("WARREN_CLUSTER_NODES", members)
            .env("WARREN_CLUSTER_PORT", CLUSTER_PORT.to_string())
            .env("WARREN_CLUSTER_SECRET", secret)
            .env("WARREN_LOG", "info")
            .env_remove("RUST_LOG")
            .envs(env)
            // The stand-in names its node rabbit@<name>: it takes the bare name.
            .envs((self.backend == Backend::RabbitMq).then(|| {
                (
                    "WARREN_NODE_NAME",
                    node.name.split('@').next().unwrap_or_default(),
                )
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("warren starts in its namespace");
        node.child = Some(child);
    }

    /// Replaces a setting of node `i` for its next start (e.g. a wrong secret).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    fn signal(&self, i: usize, signal: i32) {
        let child = self.nodes[i - 1]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("node {i} is not running"));
        assert!(
            send_signal(child.id(), signal),
            "signal {signal} to node {i} failed"
        );
        if self.backend == Backend::RabbitMq {
            // A RabbitMQ node is a shell, the Erlang VM and epmd: the host is all of them.
            self.signal_namespace(i, signal);
        }
    }

    /// Sends `signal` to every process of node `i`'s namespace.
    fn signal_namespace(&self, i: usize, signal: i32) {
        let netns = &self.nodes[i - 1].netns;
        if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    send_signal(pid, signal);
                }
            }
        }
    }

    /// kill -9 node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if self.backend == Backend::RabbitMq {
            self.signal_namespace(i, libc::SIGKILL);
        }
        if let Some(mut child) = self.nodes[i - 1].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `i` cleanly (SIGTERM), waiting up to 10 s, then kill -9.
    pub fn stop(&mut self, i: usize) {
        let Some(mut child) = self.nodes[i - 1].child.take() else {
            return;
        };
        send_signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// kill -9 then start again on the same data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_node(i);
    }

    /// SIGSTOP: the node keeps its sockets but answers nothing.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    /// Node `i`'s process id, while it runs (the broker itself: `ip netns exec` execs
    /// it).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i - 1].child.as_ref().map(|c| c.id())
    }

    /// Whether node `i`'s process is running (not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i - 1].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Cuts node `i` off everything (its veth down on the bridge side).
    pub fn link_down(&self, i: usize) {
        sh(&["ip", "link", "set", &self.nodes[i - 1].veth, "down"]);
    }

    /// Undoes [`Cluster::link_down`].
    pub fn link_up(&self, i: usize) {
        sh(&["ip", "link", "set", &self.nodes[i - 1].veth, "up"]);
    }

    /// Runs `nft` inside node `i`'s namespace.
    fn nft(&self, i: usize, rules: &str) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.nodes[i - 1].netns,
            "nft",
            rules,
        ]);
    }

    /// The drop table of node `i`, created on first use.
    fn ensure_table(&self, i: usize) {
        self.nft(i, "add table inet wc");
        self.nft(
            i,
            "add chain inet wc in { type filter hook input priority 0 ; policy accept ; }",
        );
        self.nft(
            i,
            "add chain inet wc out { type filter hook output priority 0 ; policy accept ; }",
        );
    }

    /// Drops every packet that node `from` sends to node `to` (one way: `to` still
    /// reaches `from`, though TCP needs both ways, so connections break all the same).
    pub fn drop_one_way(&self, from: usize, to: usize) {
        let to_ip = self.nodes[to - 1].ip;
        let from_ip = self.nodes[from - 1].ip;
        self.ensure_table(from);
        self.nft(from, &format!("add rule inet wc out ip daddr {to_ip} drop"));
        self.ensure_table(to);
        self.nft(to, &format!("add rule inet wc in ip saddr {from_ip} drop"));
    }

    /// Cuts every link between the nodes of `a` and those of `b`, both ways. Tests still
    /// reach every node.
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.drop_one_way(x, y);
                self.drop_one_way(y, x);
            }
        }
    }

    /// Removes every drop rule and brings every link up.
    pub fn heal(&self) {
        for n in &self.nodes {
            let _ = run(&[
                "ip",
                "netns",
                "exec",
                &n.netns,
                "nft",
                "delete table inet wc",
            ]);
            let _ = run(&["ip", "link", "set", &n.veth, "up"]);
        }
    }

    /// Whether a TCP connection from node `from`'s namespace to node `to` on `port`
    /// succeeds within a second.
    pub fn can_reach(&self, from: usize, to: usize, port: u16) -> bool {
        let target = format!("/dev/tcp/{}/{port}", self.nodes[to - 1].ip);
        run(&[
            "ip",
            "netns",
            "exec",
            &self.nodes[from - 1].netns,
            "timeout",
            "1",
            "bash",
            "-c",
            &format!("exec 3<>{target}"),
        ])
        .is_ok()
    }

    /// The AMQP URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        let (user, pass) = self.backend.credentials();
        format!(
            "amqp://{user}:{pass}@{}:{AMQP_PORT}/%2f",
            self.nodes[i - 1].ip
        )
    }

    /// Connects to node `i`, waiting as long as a node of the backend may take to boot
    /// (20 s for Warren).
    pub async fn connect(&self, i: usize) -> Connection {
        let deadline = Instant::now() + self.backend.boot_time();
        loop {
            match self.try_connect(i, Duration::from_secs(2)).await {
                Some(c) => return c,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                None => panic!(
                    "node {i} did not accept an AMQP connection; its log:\n{}",
                    self.log_tail(i)
                ),
            }
        }
    }

    /// One connection attempt to node `i`, given up after `limit`.
    pub async fn try_connect(&self, i: usize, limit: Duration) -> Option<Connection> {
        let url = self.url(i);
        let attempt = Connection::connect(&url, ConnectionProperties::default());
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(c)) => Some(c),
            _ => None,
        }
    }

    /// The last lines of node `i`'s log (stderr of every run of it).
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i - 1].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `warren ctl ARGS` against node `i`'s management API: its output (a failure fails
    /// the test, with what the command printed).
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let out = self.ctl_output(i, args);
        assert!(
            out.status.success(),
            "warren ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `warren ctl ARGS` against node `i`'s management API, whether it fails or not.
    pub fn ctl_output(&self, i: usize, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["ctl", "--url", &format!("http://{}:15672", self.node(i).ip)])
            .args(["-u", USER, "--password", USER])
            .args(args)
            .output()
            .expect("warren ctl runs")
    }

    /// The whole log of node `i`.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i - 1].log).unwrap_or_default()
    }

    /// The metadata leader node `i` last logged, `None` if it logged none or "no leader".
    pub fn logged_leader(&self, i: usize) -> Option<String> {
        let log = self.log(i);
        let line = log.lines().rev().find(|l| {
            l.contains("cluster: metadata leader is ") || l.contains("cluster: no metadata leader")
        })?;
        let (_, name) = line.split_once("cluster: metadata leader is ")?;
        Some(name.trim().to_string())
    }

    /// Waits up to `limit` until every node of `on` logged the same metadata leader (other
    /// than node `not`, when given), and returns its index.
    pub async fn wait_agreed_leader(
        &self,
        on: &[usize],
        not: Option<usize>,
        limit: Duration,
    ) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let leaders: Vec<Option<String>> = on.iter().map(|i| self.logged_leader(*i)).collect();
            if let Some(Some(first)) = leaders.first()
                && leaders.iter().all(|l| l.as_ref() == Some(first))
                && let Some(n) = self.nodes.iter().find(|n| &n.name == first)
                && Some(n.index) != not
            {
                return n.index;
            }
            if Instant::now() >= deadline {
                panic!("nodes {on:?} did not agree on a metadata leader: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs RabbitMQ's `rabbitmqctl` against node `i` (RabbitMQ backend) from inside its
    /// namespace, so that a test can see what AMQP does not show (a quorum queue's
    /// leader); what it printed within 10 s (`list_queues` prints every row, then may wait
    /// long on a member that is down), `None` when it printed nothing.
    pub fn rabbitmqctl(&self, i: usize, args: &[&str]) -> Option<String> {
        let node = &self.nodes[i - 1];
        let short = node.name.split('@').next()?;
        let out = Command::new("ip")
            .args(["netns", "exec", &node.netns, "timeout", "10", "env"])
            // The stand-in keeps the cookie and the name resolution in the data directory.
            .arg(format!("HOME={}", node.data_dir.display()))
            .arg(format!(
                "ERL_INETRC={}",
                node.data_dir.join("inetrc").display()
            ))
            .arg("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .args(["-q", "-n", &format!("rabbit@{short}")])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        (!out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Packets node `i` has sent on its network link since it was made (the bridge side
    /// of its veth receives them): what a node says to its peers, counted by the kernel.
    pub fn packets_sent(&self, i: usize) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", self.node(i).veth);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("harness: {path}: {e}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("harness: {path}: {e}"))
    }

    /// Names of the network namespaces this harness made (tests check cleanup).
    pub fn namespaces(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.netns.clone()).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!("---- log of {} ----\n{}", n.name, self.log_tail(n.index));
            }
        }
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                // A paused process still dies of SIGKILL.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        remove_network(self.subnet);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deletes every namespace, veth and the bridge of subnet `s` and its owner note.
fn remove_network(s: u8) {
    let prefix = format!("wc-{s}-n");
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&prefix) {
                // Processes of an abandoned harness are still running in it.
                if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse() {
                            send_signal(pid, libc::SIGKILL);
                        }
                    }
                }
                // Deleting the namespace destroys its end of the veth, and with it the pair.
                let _ = run(&["ip", "netns", "delete", name]);
            }
        }
    }
    // A deleted namespace can linger in the kernel (and its veths with it) while sockets
    // of its processes wind down: delete the host-side veths, which takes their pairs.
    let veth = format!("wc-{s}-v");
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(": ").nth(1).unwrap_or("");
            let name = name.split('@').next().unwrap_or("");
            if name.starts_with(&veth) {
                let _ = run(&["ip", "link", "delete", name]);
            }
        }
    }
    let _ = run(&["ip", "link", "delete", &format!("wc-{s}-br")]);
    let _ = std::fs::remove_file(format!("{OWNERS_DIR}/{s}"));
}

/// Claims a free subnet number: creating the bridge `wc-N-br` is the atomic claim.
fn claim_subnet() -> u8 {
    let _ = std::fs::create_dir_all(OWNERS_DIR);
    let start = (std::process::id() as usize + rand_u32() as usize) % 200;
    for k in 0..200 {
        let s = ((start + k) % 200 + 1) as u8;
        let in_use = Command::new("ip")
            .args(["-4", "addr", "show", "to", &format!("10.77.{s}.0/24")])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(true);
        if in_use {
            continue;
        }
        if run(&["ip", "link", "add", &format!("wc-{s}-br"), "type", "bridge"]).is_ok() {
            let _ = std::fs::write(format!("{OWNERS_DIR}/{s}"), std::process::id().to_string());
            return s;
        }
    }
    panic!("harness: no free subnet 10.77.N.0/24");
}

/// Removes harnesses whose owning test process is gone (killed before its Drop ran).
fn reap_abandoned() {
    let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let Some(s) = name
            .strip_prefix("wc-")
            .and_then(|r| r.strip_suffix("-br"))
            .and_then(|n| n.parse::<u8>().ok())
        else {
            continue;
        };
        let owner = std::fs::read_to_string(format!("{OWNERS_DIR}/{s}"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        match owner {
            Some(pid) if pid_alive(pid) => {}
            // No note yet may be a harness being claimed right now: leave it.
            None => {}
            Some(_) => remove_network(s),
        }
    }
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
