//! The metadata Raft group over real sockets and real stores (in-process nodes on
//! loopback, ephemeral ports): fresh members form the group by themselves in any start
//! order, a change is answered once a majority has it, a lone node refuses, and a node
//! that was down catches up from its own store and its peers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use warren::FlushMode;
use warren::cluster::meta::storage::META_GROUP;
use warren::cluster::meta::{MetaCommand, MetaError, MetaGroup};
use warren::cluster::{Member, Membership, Transport, TransportConfig};
use warren::store::Store;

struct TestNode {
    group: MetaGroup,
    transport: Transport,
    store: Store,
}

struct Net {
    addrs: Vec<SocketAddr>,
    dirs: Vec<PathBuf>,
    nodes: Vec<Option<TestNode>>,
}

fn name(i: usize) -> String {
    format!("n{}@127.0.0.1", i + 1)
}

impl Net {
    async fn new(n: usize) -> Net {
        let mut addrs = Vec::new();
        for _ in 0..n {
            // Reserve a port, then free it for the node to bind (with address reuse).
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap());
        }
        let base = std::env::temp_dir().join(format!(
            "wc-meta-{}-{}",
            std::process::id(),
            addrs[0].port()
        ));
        let dirs = (0..n).map(|i| base.join(format!("n{i}"))).collect();
        Net {
            addrs,
            dirs,
            nodes: (0..n).map(|_| None).collect(),
        }
    }

    async fn start(&mut self, i: usize) {
        let n = self.addrs.len();
        let membership = Membership {
            members: (0..n)
                .map(|j| Member {
                    name: name(j),
                    host: "127.0.0.1".into(),
                })
                .collect(),
            me: i,
            port: 0,
            secret: b"s".to_vec(),
        };
        let peers = (0..n)
            .filter(|j| *j != i)
            .map(|j| (name(j), self.addrs[j]))
            .collect();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addrs[i]).unwrap();
        let listener = socket.listen(64).unwrap();
        let transport = Transport::start(
            TransportConfig::new(name(i), peers, b"s".to_vec()),
            listener,
        );
        let (store, mut recovered) =
            Store::open(&self.dirs[i], FlushMode::Sync, Duration::from_millis(100)).unwrap();
        let log = recovered.raft.remove(&META_GROUP).unwrap_or_default();
        let group = MetaGroup::start(&membership, transport.clone(), store.clone(), log, None)
            .await
            .unwrap();
        self.nodes[i] = Some(TestNode {
            group,
            transport,
            store,
        });
    }

    async fn stop(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.group.shutdown().await;
            node.transport.shutdown();
            tokio::task::spawn_blocking(move || node.store.close())
                .await
                .unwrap();
        }
    }

    fn group(&self, i: usize) -> &MetaGroup {
        &self.nodes[i].as_ref().expect("node running").group
    }

    async fn wait_leader(&self, on: &[usize]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leaders: Vec<Option<String>> = on.iter().map(|i| self.group(*i).leader()).collect();
            if let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| x.as_ref() == Some(l))
            {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_has(&self, i: usize, key: &str, present: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.group(i).machine().get(key).is_some() != present {
            assert!(
                Instant::now() < deadline,
                "node {i}: {key} present={present}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(base) = self.dirs.first().and_then(|d| d.parent()) {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

fn put(key: &str) -> MetaCommand {
    MetaCommand::Put {
        key: key.into(),
        value: key.as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_members_form_the_group_in_any_order_and_agree() {
    let mut net = Net::new(3).await;
    net.start(2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        net.group(2).leader(),
        None,
        "one node of three cannot elect itself"
    );
    net.start(0).await;
    net.start(1).await;
    net.wait_leader(&[0, 1, 2]).await;
    for i in 0..3 {
        let key = format!("q/%2f/from-{i}");
        let reply = net.group(i).propose(put(&key)).await.expect("committed");
        assert!(reply.changed);
        assert!(
            net.group(i).machine().get(&key).is_some(),
            "the proposing node has applied it when the answer comes"
        );
    }
    for i in 0..3 {
        for j in 0..3 {
            net.wait_has(i, &format!("q/%2f/from-{j}"), true).await;
        }
    }
    let first = net
        .group(1)
        .propose(MetaCommand::PutIfAbsent {
            key: "q/%2f/from-0".into(),
            value: b"other".to_vec(),
        })
        .await
        .unwrap();
    assert!(!first.changed, "an existing definition is kept");
    for i in 0..3 {
        net.stop(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_refuses_changes_the_majority_commits_and_a_returning_node_catches_up() {
    let mut net = Net::new(3).await;
    for i in 0..3 {
        net.start(i).await;
    }
    let leader = net.wait_leader(&[0, 1, 2]).await;
    net.group(0).propose(put("x/%2f/before")).await.unwrap();

    // Stop the leader: the other two elect a new one and go on committing.
    let gone = (0..3).find(|i| name(*i) == leader).unwrap();
    net.stop(gone).await;
    let rest: Vec<usize> = (0..3).filter(|i| *i != gone).collect();
    net.wait_leader(&rest).await;
    net.group(rest[0])
        .propose(put("x/%2f/while-one-is-down"))
        .await
        .expect("two of three is a majority");

    // Stop one more: the last node alone cannot commit, and says so in time.
    let lone = rest[1];
    net.stop(rest[0]).await;
    let started = Instant::now();
    assert_eq!(
        net.group(lone).propose(put("x/%2f/refused")).await,
        Err(MetaError::Unavailable)
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "refused within the limit"
    );

    // Both come back: the lone node's uncommitted entry may or may not survive, but every
    // node agrees, and the returning ones caught up with what the majority committed.
    net.start(gone).await;
    net.start(rest[0]).await;
    net.wait_leader(&[0, 1, 2]).await;
    net.group(gone).propose(put("x/%2f/after")).await.unwrap();
    for i in 0..3 {
        for key in ["x/%2f/before", "x/%2f/while-one-is-down", "x/%2f/after"] {
            net.wait_has(i, key, true).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let defs: Vec<_> = (0..3)
            .map(|i| net.group(i).machine().definitions())
            .collect();
        if defs.iter().all(|d| *d == defs[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "definitions differ: {defs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..3 {
        net.stop(i).await;
    }
}
