//! The inter-node transport over real sockets (in-process nodes on loopback, ephemeral
//! ports): every group rides one authenticated link per pair, strangers and wrong secrets
//! are refused, links come back after a peer restarts, and a slow group pushes back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use warren::cluster::transport::Incoming;
use warren::cluster::wire::{Frame, WireCodec};
use warren::cluster::{PeerAddr, Transport, TransportConfig, TransportError};

async fn listeners(n: usize) -> Vec<(TcpListener, SocketAddr)> {
    let mut all = Vec::new();
    for _ in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        all.push((l, a));
    }
    all
}

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i}@127.0.0.1")).collect()
}

/// Starts one transport per listener; `secrets[i]` is node i's secret.
fn start_all(ls: Vec<(TcpListener, SocketAddr)>, secrets: &[&str]) -> Vec<Transport> {
    let addrs: Vec<SocketAddr> = ls.iter().map(|(_, a)| *a).collect();
    let names = names(ls.len());
    ls.into_iter()
        .enumerate()
        .map(|(i, (l, _))| {
            let peers = names
                .iter()
                .zip(&addrs)
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (n, a))| (n.clone(), *a))
                .collect();
            let config =
                TransportConfig::new(names[i].clone(), peers, secrets[i].as_bytes().to_vec());
            Transport::start(config, l)
        })
        .collect()
}

async fn wait_connected(t: &Transport, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.is_connected(peer) {
        assert!(
            Instant::now() < deadline,
            "{} never linked to {peer}: {:?}",
            t.me(),
            t.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn recv(inbox: &mut tokio::sync::mpsc::Receiver<Incoming>) -> Incoming {
    tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .expect("a message in time")
        .expect("inbox open")
}

#[tokio::test]
async fn every_group_rides_one_link_per_pair_both_ways() {
    let ts = start_all(listeners(3).await, &["s", "s", "s"]);
    let n = names(3);
    for t in &ts {
        for p in n.iter().filter(|p| *p != t.me()) {
            wait_connected(t, p).await;
        }
    }
    let mut meta_on_2 = ts[1].register(0);
    let mut queue_on_2 = ts[1].register(42);
    let mut meta_on_1 = ts[0].register(0);

    ts[0].send(&n[1], 0, b"to meta".to_vec()).await.unwrap();
    ts[0].send(&n[1], 42, b"to queue".to_vec()).await.unwrap();
    ts[2].send(&n[1], 42, b"from 3".to_vec()).await.unwrap();
    let m = recv(&mut meta_on_2).await;
    assert_eq!(
        (m.from.as_str(), m.body.as_slice()),
        (n[0].as_str(), &b"to meta"[..])
    );
    let m = recv(&mut queue_on_2).await;
    assert_eq!(m.body, b"to queue");
    let m = recv(&mut queue_on_2).await;
    assert_eq!(
        (m.from.as_str(), m.body.as_slice()),
        (n[2].as_str(), &b"from 3"[..])
    );

    // The acceptor side sends on the same link the dialer opened.
    ts[1].send(&n[0], 0, b"back".to_vec()).await.unwrap();
    assert_eq!(recv(&mut meta_on_1).await.body, b"back");

    // Requests are answered on the link they came on.
    let server = tokio::spawn(async move {
        let m = recv(&mut meta_on_2).await;
        let mut answer = m.body.clone();
        answer.reverse();
        m.reply.expect("a request").reply(answer).await;
    });
    let answer = ts[2]
        .call(&n[1], 0, b"abc".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(answer, b"cba");
    server.await.unwrap();
    assert_eq!(
        ts[0]
            .call(&n[1], 7, b"?".to_vec(), Duration::from_secs(5))
            .await,
        Err(TransportError::NoSuchGroup(7))
    );
    assert!(ts[0].status().iter().all(|p| p.connected));
    for t in &ts {
        t.shutdown();
    }
}

#[tokio::test]
async fn a_member_with_another_secret_is_refused() {
    let ts = start_all(listeners(2).await, &["right", "wrong"]);
    let n = names(2);
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (t, peer) in [(&ts[0], &n[1]), (&ts[1], &n[0])] {
        assert!(
            !t.is_connected(peer),
            "{} linked despite the secrets",
            t.me()
        );
    }
    let status = ts[0].status();
    let why = status[0].last_error.clone().unwrap_or_default();
    assert!(why.contains("cluster_secret"), "dialer says why: {why}");
    assert_eq!(
        ts[0].send(&n[1], 0, vec![]).await,
        Err(TransportError::Unreachable(n[1].clone()))
    );
    for t in &ts {
        t.shutdown();
    }
}

/// A raw client speaking the wire format.
async fn raw(addr: SocketAddr) -> Framed<TcpStream, WireCodec> {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        WireCodec::default(),
    )
}

async fn next_frame(f: &mut Framed<TcpStream, WireCodec>) -> Option<Frame> {
    match tokio::time::timeout(Duration::from_secs(5), f.next()).await {
        Ok(Some(Ok(frame))) => Some(frame),
        _ => None,
    }
}

#[tokio::test]
async fn strangers_and_forged_proofs_are_refused_and_the_secret_never_sent() {
    let mut ls = listeners(2).await;
    let addr = ls[1].1;
    ls.truncate(2);
    let ts = start_all(ls, &["topsecret", "topsecret"]);
    let n = names(2);
    use futures_util::SinkExt;

    // A name that is not a member.
    let mut f = raw(addr).await;
    f.send(Frame::Hello {
        from: "intruder@10.0.0.9".into(),
        to: n[1].clone(),
        nonce: [1; 32],
    })
    .await
    .unwrap();
    match next_frame(&mut f).await {
        Some(Frame::Refused { reason }) => assert!(reason.contains("not in cluster_nodes")),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A member's name without the secret: the challenge comes, a forged proof is refused.
    let mut f = raw(addr).await;
    f.send(Frame::Hello {
        from: n[0].clone(),
        to: n[1].clone(),
        nonce: [2; 32],
    })
    .await
    .unwrap();
    let challenge = next_frame(&mut f).await.expect("a challenge");
    let bytes = postcard::to_stdvec(&challenge).unwrap();
    assert!(
        !bytes.windows(9).any(|w| w == b"topsecret"),
        "the secret never crosses the wire"
    );
    f.send(Frame::Proof { proof: [0; 32] }).await.unwrap();
    match next_frame(&mut f).await {
        Some(Frame::Refused { reason }) => assert!(reason.contains("cluster secret")),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Garbage closes the connection without harm.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    let mut f = Framed::new(s, WireCodec::default());
    assert!(!matches!(next_frame(&mut f).await, Some(Frame::Welcome)));

    // The real members still link.
    wait_connected(&ts[0], &n[1]).await;
    for t in &ts {
        t.shutdown();
    }
}

#[tokio::test]
async fn the_link_comes_back_after_the_peer_restarts() {
    let ls = listeners(2).await;
    let addrs: Vec<SocketAddr> = ls.iter().map(|(_, a)| *a).collect();
    let ts = start_all(ls, &["s", "s"]);
    let n = names(2);
    wait_connected(&ts[0], &n[1]).await;

    // Node 2 goes away (both roles: it is the acceptor of this pair) ...
    ts[1].shutdown();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ts[0].is_connected(&n[1]) {
        assert!(Instant::now() < deadline, "the dead link is noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ts[0].send(&n[1], 0, vec![]).await.is_err());
    // ... and comes back on the same address: node 1 redials.
    let listener = TcpListener::bind(addrs[1]).await.unwrap();
    let again = Transport::start(
        TransportConfig::new(n[1].clone(), vec![(n[0].clone(), addrs[0])], b"s".to_vec()),
        listener,
    );
    let mut inbox = again.register(5);
    wait_connected(&ts[0], &n[1]).await;
    ts[0].send(&n[1], 5, b"hello again".to_vec()).await.unwrap();
    assert_eq!(recv(&mut inbox).await.body, b"hello again");
    ts[0].shutdown();
    again.shutdown();
}

#[tokio::test]
async fn a_group_that_does_not_read_holds_its_senders_back() {
    let ls = listeners(2).await;
    let addrs: Vec<SocketAddr> = ls.iter().map(|(_, a)| *a).collect();
    let n = names(2);
    let mut it = ls.into_iter();
    let small = |me: usize, peer: usize| {
        let mut c = TransportConfig::new(
            n[me].clone(),
            vec![(n[peer].clone(), addrs[peer])],
            b"s".to_vec(),
        );
        c.outgoing_capacity = 4;
        c.inbox_capacity = 4;
        c
    };
    let t1 = Transport::start(small(0, 1), it.next().unwrap().0);
    let t2 = Transport::start(small(1, 0), it.next().unwrap().0);
    wait_connected(&t1, &n[1]).await;
    let mut inbox = t2.register(9);

    let total = 64usize;
    let sender = {
        let t1 = t1.clone();
        let to = n[1].clone();
        tokio::spawn(async move {
            for i in 0..total {
                let mut body = vec![0u8; 1 << 20];
                body[..8].copy_from_slice(&(i as u64).to_be_bytes());
                t1.send(&to, 9, body).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !sender.is_finished(),
        "64 MiB cannot be queued while nobody reads"
    );
    for i in 0..total {
        let m = recv(&mut inbox).await;
        assert_eq!(m.body[..8], (i as u64).to_be_bytes(), "in order");
    }
    sender.await.unwrap();
    t1.shutdown();
    t2.shutdown();
}

#[tokio::test]
async fn a_peer_named_by_host_name_is_looked_up_when_dialed() {
    // Node 1 (which dials: its name sorts first) knows node 2 only as localhost:PORT, a
    // name to look up, as a container's peer is known by its service name.
    let ls = listeners(2).await;
    let addrs: Vec<SocketAddr> = ls.iter().map(|(_, a)| *a).collect();
    let n = names(2);
    let mut it = ls.into_iter();
    let by_name = PeerAddr {
        host: "localhost".into(),
        port: addrs[1].port(),
    };
    let t1 = Transport::start(
        TransportConfig::new(n[0].clone(), vec![(n[1].clone(), by_name)], b"s".to_vec()),
        it.next().unwrap().0,
    );
    let t2 = Transport::start(
        TransportConfig::new(n[1].clone(), vec![(n[0].clone(), addrs[0])], b"s".to_vec()),
        it.next().unwrap().0,
    );
    let mut inbox = t2.register(7);
    wait_connected(&t1, &n[1]).await;
    t1.send(&n[1], 7, b"by name".to_vec()).await.unwrap();
    assert_eq!(recv(&mut inbox).await.body, b"by name");
    t1.shutdown();
    t2.shutdown();
}
