//! Node-to-node links: one authenticated TCP connection per pair of nodes, carrying the
//! messages of every group (Raft group or other) multiplexed by [`GroupId`].
//!
//! - Who dials: of two nodes, the one whose name sorts first dials the other and keeps
//!   redialing, with exponential backoff, whenever the link is down; the other only
//!   accepts. So a pair never races to build two connections, and a restarted node is
//!   found again by the dialer (or finds its peer itself).
//! - Handshake ([`super::auth`]): both ends prove `cluster_secret` by HMAC; a node that
//!   cannot, or that is not a member, is refused and logged.
//! - Failure detection: each side sends [`Frame::Ping`] when it has sent nothing for
//!   [`PING_EVERY`]; a link on which nothing arrives for [`IDLE_LIMIT`] is dropped (a
//!   paused or cut-off peer), and its pending requests fail at once.
//! - Backpressure: every queue is bounded. A sender waits while the link's outgoing queue
//!   is full; the link stops reading while the receiving group's inbox is full, so a slow
//!   group slows its senders (over TCP) instead of growing memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::auth::{self, Role, Transcript};
use super::wire::{Frame, GroupId, WireCodec};

/// An idle link sends a ping this often.
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// A link on which nothing arrived for this long is considered dead and dropped.
pub const IDLE_LIMIT: Duration = Duration::from_secs(3);
/// The whole handshake must finish within this.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);
/// First and largest wait between two dial attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a message could not be sent or answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// No such member.
    UnknownPeer(String),
    /// The link to that member is down now.
    Unreachable(String),
    /// The link broke before the answer came.
    Disconnected,
    /// No answer within the caller's limit.
    Timeout,
    /// The peer runs no such group.
    NoSuchGroup(GroupId),
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::UnknownPeer(p) => write!(f, "{p} is not a cluster member"),
            TransportError::Unreachable(p) => write!(f, "{p} is unreachable"),
            TransportError::Disconnected => write!(f, "the link broke before the answer"),
            TransportError::Timeout => write!(f, "no answer in time"),
            TransportError::NoSuchGroup(g) => write!(f, "the peer runs no group {g}"),
        }
    }
}

impl std::error::Error for TransportError {}

/// How to run the links of this node.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// This node's name.
    pub me: String,
    /// Every other member and its inter-node address.
    pub peers: Vec<(String, PeerAddr)>,
    /// The secret every member proves.
    pub secret: Vec<u8>,
    /// Frames a link queues for sending before senders wait.
    pub outgoing_capacity: usize,
    /// Messages a group's inbox holds before its links stop reading.
    pub inbox_capacity: usize,
}

/// A member's inter-node address as configured: a host (name or IP address) and a port.
/// A host name is looked up on every dial, not once at start, so that a member whose
/// address changes (a container or pod started again) or that has no DNS record yet is
/// reached once it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        PeerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl TransportConfig {
    /// A configuration with the default queue sizes.
    pub fn new<A: Into<PeerAddr>>(me: String, peers: Vec<(String, A)>, secret: Vec<u8>) -> Self {
        TransportConfig {
            me,
            peers: peers.into_iter().map(|(n, a)| (n, a.into())).collect(),
            secret,
            outgoing_capacity: 1024,
            inbox_capacity: 1024,
        }
    }
}

/// A message that arrived for a group.
#[derive(Debug)]
pub struct Incoming {
    /// The member it came from.
    pub from: String,
    /// The group's own encoding.
    pub body: Vec<u8>,
    /// Set for requests: the way to answer.
    pub reply: Option<Responder>,
}

/// Answers one request on the link it came from.
#[derive(Debug)]
pub struct Responder {
    id: u64,
    out: mpsc::Sender<Frame>,
}

impl Responder {
    /// Sends the answer (dropped if the link has gone since: the caller sees
    /// [`TransportError::Disconnected`]).
    pub async fn reply(self, body: Vec<u8>) {
        let _ = self
            .out
            .send(Frame::Reply {
                id: self.id,
                body: Some(body),
            })
            .await;
    }
}

/// The answer to a request [`Transport::request`] sent.
#[derive(Debug)]
pub struct Answer {
    id: u64,
    group: GroupId,
    pending: Pending,
    rx: oneshot::Receiver<Option<Vec<u8>>>,
}

impl Answer {
    /// Waits up to `limit` for the answer.
    pub async fn wait(self, limit: Duration) -> Result<Vec<u8>, TransportError> {
        let Answer {
            id,
            group,
            pending,
            rx,
        } = self;
        let result = match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Some(answer))) => Ok(answer),
            Ok(Ok(None)) => Err(TransportError::NoSuchGroup(group)),
            Ok(Err(_)) => Err(TransportError::Disconnected),
            Err(_) => Err(TransportError::Timeout),
        };
        lock(&pending).remove(&id);
        result
    }
}

/// One member's link as [`Transport::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The member's name.
    pub name: String,
    /// Whether an authenticated link to it is up now.
    pub connected: bool,
    /// Why the last attempt or link failed, if it did.
    pub last_error: Option<String>,
}

/// Requests sent on a link that wait for their answer, by id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Option<Vec<u8>>>>>>;

/// A live link: how to send on it, and the requests waiting for an answer on it.
struct Link {
    /// Tells this link apart from the one that replaces it.
    serial: u64,
    out: mpsc::Sender<Frame>,
    pending: Pending,
    cancel: CancellationToken,
}

struct Peer {
    addr: PeerAddr,
    link: Mutex<Option<Link>>,
    last_error: Mutex<Option<String>>,
}

struct Inner {
    config: TransportConfig,
    peers: HashMap<String, Peer>,
    groups: Mutex<HashMap<GroupId, mpsc::Sender<Incoming>>>,
    next_id: AtomicU64,
    stop: CancellationToken,
    /// The member whose link just went down, for every link that ends.
    losses: tokio::sync::broadcast::Sender<String>,
    /// The member whose link just came up, for every link that starts.
    gains: tokio::sync::broadcast::Sender<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// This node's links to every other member. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("me", &self.inner.config.me)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Starts accepting on `listener` and dialing the members whose names sort after this
    /// node's. Runs until [`Transport::shutdown`].
    pub fn start(config: TransportConfig, listener: TcpListener) -> Transport {
        let peers = config
            .peers
            .iter()
            .map(|(name, addr)| {
                (
                    name.clone(),
                    Peer {
                        addr: addr.clone(),
                        link: Mutex::new(None),
                        last_error: Mutex::new(None),
                    },
                )
            })
            .collect();
        let transport = Transport {
            inner: Arc::new(Inner {
                config,
                peers,
                groups: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                stop: CancellationToken::new(),
                losses: tokio::sync::broadcast::channel(256).0,
                gains: tokio::sync::broadcast::channel(256).0,
            }),
        };
        tokio::spawn(transport.clone().accept_loop(listener));
        for name in transport.inner.peers.keys() {
            if transport.inner.config.me < *name {
                tokio::spawn(transport.clone().dial_loop(name.clone()));
            }
        }
        transport
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.inner.config.me
    }

    /// Stops every link and the listener.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        for peer in self.inner.peers.values() {
            if let Some(link) = lock(&peer.link).take() {
                link.cancel.cancel();
            }
        }
    }

    /// The inbox of `group` on this node: every message any member sends to it. Registering
    /// a group again replaces its inbox.
    pub fn register(&self, group: GroupId) -> mpsc::Receiver<Incoming> {
        let (tx, rx) = mpsc::channel(self.inner.config.inbox_capacity.max(1));
        lock(&self.inner.groups).insert(group, tx);
        rx
    }

    /// Each member's link state, sorted by name.
    pub fn status(&self) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = self
            .inner
            .peers
            .iter()
            .map(|(name, p)| PeerStatus {
                name: name.clone(),
                connected: lock(&p.link).is_some(),
                last_error: lock(&p.last_error).clone(),
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Tells of every link that goes down (the member's name), whoever ended it: what
    /// was sent on it may be lost, and state held for that member (consumers proxied to
    /// it, its deliveries) must be let go. A link that comes back is a new one.
    pub fn link_losses(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.inner.losses.subscribe()
    }

    /// Tells of every link that comes up (the member's name): a member that was away
    /// (restarted, cut off) is reachable again and may need to hear who leads its groups.
    pub fn link_gains(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.inner.gains.subscribe()
    }

    /// Whether the link to `peer` is up.
    pub fn is_connected(&self, peer: &str) -> bool {
        self.inner
            .peers
            .get(peer)
            .is_some_and(|p| lock(&p.link).is_some())
    }

    fn link_parts(&self, to: &str) -> Result<(mpsc::Sender<Frame>, Pending), TransportError> {
        let peer = self
            .inner
            .peers
            .get(to)
            .ok_or_else(|| TransportError::UnknownPeer(to.to_string()))?;
        let link = lock(&peer.link);
        let link = link
            .as_ref()
            .ok_or_else(|| TransportError::Unreachable(to.to_string()))?;
        Ok((link.out.clone(), link.pending.clone()))
    }

    /// Sends a one-way message to `group` on `to`, waiting while the link's queue is full.
    /// Fails at once when the link is down (Raft retries; nothing is queued for later).
    pub async fn send(
        &self,
        to: &str,
        group: GroupId,
        body: Vec<u8>,
    ) -> Result<(), TransportError> {
        let (out, _) = self.link_parts(to)?;
        out.send(Frame::Send { group, body })
            .await
            .map_err(|_| TransportError::Unreachable(to.to_string()))
    }

    /// Sends a request to `group` on `to` and waits up to `limit` for its answer.
    pub async fn call(
        &self,
        to: &str,
        group: GroupId,
        body: Vec<u8>,
        limit: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(limit, self.request(to, group, body)).await {
            Ok(Ok(answer)) => answer.wait(limit.saturating_sub(started.elapsed())).await,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::Timeout),
        }
    }

    /// Puts a request to `group` on `to` on the link (waiting while its queue is full)
    /// and returns the way to its answer. Requests a caller puts on one link one after
    /// another reach the peer in that order, whenever their answers come.
    pub async fn request(
        &self,
        to: &str,
        group: GroupId,
        body: Vec<u8>,
    ) -> Result<Answer, TransportError> {
        let (out, pending) = self.link_parts(to)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&pending).insert(id, tx);
        if out.send(Frame::Request { id, group, body }).await.is_err() {
            lock(&pending).remove(&id);
            return Err(TransportError::Unreachable(to.to_string()));
        }
        Ok(Answer {
            id,
            group,
            pending,
            rx,
        })
    }

    async fn accept_loop(self, listener: TcpListener) {
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        tokio::spawn(self.clone().accept_one(stream, addr));
                    }
                    Err(e) => {
                        tracing::warn!("cluster: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    async fn accept_one(self, stream: TcpStream, addr: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let mut framed = Framed::new(stream, WireCodec::default());
        match tokio::time::timeout(HANDSHAKE_LIMIT, self.accept_handshake(&mut framed)).await {
            Ok(Ok(peer)) => self.run_link(peer, framed).await,
            Ok(Err(why)) => {
                tracing::warn!("cluster: refused inter-node connection from {addr}: {why}");
                let _ = framed.send(Frame::Refused { reason: why }).await;
            }
            Err(_) => tracing::warn!("cluster: inter-node handshake from {addr} timed out"),
        }
    }

    /// The acceptor's side of the handshake: the dialer's name if it proves the secret.
    async fn accept_handshake(
        &self,
        framed: &mut Framed<TcpStream, WireCodec>,
    ) -> Result<String, String> {
        let me = &self.inner.config.me;
        let secret = &self.inner.config.secret;
        let (from, to, dialer_nonce) = match framed.next().await {
            Some(Ok(Frame::Hello { from, to, nonce })) => (from, to, nonce),
            Some(Ok(other)) => return Err(format!("expected a hello, got {other:?}")),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed during the handshake".into()),
        };
        if to != *me {
            return Err(format!("it called '{to}', this node is '{me}'"));
        }
        if !self.inner.peers.contains_key(&from) {
            return Err(format!("'{from}' is not in cluster_nodes"));
        }
        let acceptor_nonce = auth::nonce();
        let transcript = Transcript {
            dialer: &from,
            acceptor: me,
            dialer_nonce: &dialer_nonce,
            acceptor_nonce: &acceptor_nonce,
        };
        framed
            .send(Frame::Challenge {
                nonce: acceptor_nonce,
                proof: transcript.proof(secret, Role::Acceptor),
            })
            .await
            .map_err(|e| e.to_string())?;
        let proof = match framed.next().await {
            Some(Ok(Frame::Proof { proof })) => proof,
            Some(Ok(Frame::Refused { reason })) => {
                return Err(format!("'{from}' refused: {reason}"));
            }
            Some(Ok(other)) => return Err(format!("expected a proof, got {other:?}")),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err(format!("'{from}' closed during the handshake")),
        };
        if !transcript.verify(secret, Role::Dialer, &proof) {
            return Err(format!(
                "'{from}' could not prove the cluster secret (cluster_secret differs)"
            ));
        }
        framed
            .send(Frame::Welcome)
            .await
            .map_err(|e| e.to_string())?;
        Ok(from)
    }

    /// The dialer's side of the handshake.
    async fn dial_handshake(
        &self,
        peer: &str,
        framed: &mut Framed<TcpStream, WireCodec>,
    ) -> Result<(), String> {
        let me = &self.inner.config.me;
        let secret = &self.inner.config.secret;
        let dialer_nonce = auth::nonce();
        framed
            .send(Frame::Hello {
                from: me.clone(),
                to: peer.to_string(),
                nonce: dialer_nonce,
            })
            .await
            .map_err(|e| e.to_string())?;
        let (acceptor_nonce, proof) = match framed.next().await {
            Some(Ok(Frame::Challenge { nonce, proof })) => (nonce, proof),
            Some(Ok(Frame::Refused { reason })) => return Err(format!("refused: {reason}")),
            Some(Ok(other)) => return Err(format!("expected a challenge, got {other:?}")),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed during the handshake".into()),
        };
        let transcript = Transcript {
            dialer: me,
            acceptor: peer,
            dialer_nonce: &dialer_nonce,
            acceptor_nonce: &acceptor_nonce,
        };
        if !transcript.verify(secret, Role::Acceptor, &proof) {
            let reason = "could not prove the cluster secret (cluster_secret differs)".to_string();
            let _ = framed
                .send(Frame::Refused {
                    reason: reason.clone(),
                })
                .await;
            return Err(reason);
        }
        framed
            .send(Frame::Proof {
                proof: transcript.proof(secret, Role::Dialer),
            })
            .await
            .map_err(|e| e.to_string())?;
        match framed.next().await {
            Some(Ok(Frame::Welcome)) => Ok(()),
            Some(Ok(Frame::Refused { reason })) => Err(format!("refused: {reason}")),
            Some(Ok(other)) => Err(format!("expected a welcome, got {other:?}")),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("closed during the handshake".into()),
        }
    }

    async fn dial_loop(self, peer: String) {
        let Some(addr) = self.inner.peers.get(&peer).map(|p| p.addr.clone()) else {
            return;
        };
        let mut backoff = BACKOFF_FIRST;
        let mut failures = 0u32;
        loop {
            if self.inner.stop.is_cancelled() {
                return;
            }
            let attempt = async {
                let stream = TcpStream::connect((addr.host.as_str(), addr.port))
                    .await
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                let _ = stream.set_nodelay(true);
                let mut framed = Framed::new(stream, WireCodec::default());
                self.dial_handshake(&peer, &mut framed).await?;
                Ok::<_, String>(framed)
            };
            let outcome = tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                r = tokio::time::timeout(HANDSHAKE_LIMIT, attempt) => r,
            };
            match outcome {
                Ok(Ok(framed)) => {
                    failures = 0;
                    backoff = BACKOFF_FIRST;
                    self.run_link(peer.clone(), framed).await;
                }
                Ok(Err(why)) => self.note_failure(&peer, why, &mut failures),
                Err(_) => self.note_failure(&peer, "handshake timed out".into(), &mut failures),
            }
            // Jitter keeps nodes that lost each other at once from redialing in lockstep.
            let jitter = Duration::from_millis(rand::random::<u64>() % 50);
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Records why a dial failed; logs it when the reason changes, and every 30th time.
    fn note_failure(&self, peer: &str, why: String, failures: &mut u32) {
        let Some(p) = self.inner.peers.get(peer) else {
            return;
        };
        let mut last = lock(&p.last_error);
        if failures.is_multiple_of(30) || last.as_deref() != Some(why.as_str()) {
            tracing::warn!("cluster: no link to {peer}: {why}");
        } else {
            tracing::debug!("cluster: no link to {peer}: {why}");
        }
        *failures += 1;
        *last = Some(why);
    }

    /// Serves an authenticated link until it breaks, is replaced or the transport stops.
    async fn run_link(&self, peer_name: String, framed: Framed<TcpStream, WireCodec>) {
        let Some(peer) = self.inner.peers.get(&peer_name) else {
            return;
        };
        let (out_tx, mut out_rx) =
            mpsc::channel::<Frame>(self.inner.config.outgoing_capacity.max(1));
        let pending: Pending = Arc::default();
        let cancel = self.inner.stop.child_token();
        let serial = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let old = lock(&peer.link).replace(Link {
            serial,
            out: out_tx.clone(),
            pending: pending.clone(),
            cancel: cancel.clone(),
        });
        if let Some(old) = old {
            old.cancel.cancel();
        }
        *lock(&peer.last_error) = None;
        tracing::info!("cluster: link to {peer_name} up");
        let _ = self.inner.gains.send(peer_name.clone());

        let (mut sink, mut stream) = framed.split();
        let writer_cancel = cancel.clone();
        let writer = async move {
            loop {
                let frame = tokio::select! {
                    _ = writer_cancel.cancelled() => return Ok::<(), std::io::Error>(()),
                    f = tokio::time::timeout(PING_EVERY, out_rx.recv()) => match f {
                        Ok(Some(frame)) => frame,
                        Ok(None) => return Ok(()),
                        Err(_) => Frame::Ping,
                    },
                };
                sink.feed(frame).await?;
                // Coalesce whatever else is queued into the same write.
                while let Ok(frame) = out_rx.try_recv() {
                    sink.feed(frame).await?;
                }
                sink.flush().await?;
            }
        };
        let reader = async {
            loop {
                let frame = match tokio::time::timeout(IDLE_LIMIT, stream.next()).await {
                    Err(_) => {
                        return Err::<(), String>(format!("nothing heard for {IDLE_LIMIT:?}"));
                    }
                    Ok(None) => return Err("closed by the peer".to_string()),
                    Ok(Some(Err(e))) => return Err(e.to_string()),
                    Ok(Some(Ok(frame))) => frame,
                };
                match frame {
                    Frame::Ping => {}
                    Frame::Send { group, body } => {
                        self.deliver(group, &peer_name, body, None).await;
                    }
                    Frame::Request { id, group, body } => {
                        let responder = Responder {
                            id,
                            out: out_tx.clone(),
                        };
                        if !self.deliver(group, &peer_name, body, Some(responder)).await {
                            let _ = out_tx.send(Frame::Reply { id, body: None }).await;
                        }
                    }
                    Frame::Reply { id, body } => {
                        if let Some(waiter) = lock(&pending).remove(&id) {
                            let _ = waiter.send(body);
                        }
                    }
                    other => {
                        return Err(format!("unexpected frame after the handshake: {other:?}"));
                    }
                }
            }
        };
        let started = Instant::now();
        let why = tokio::select! {
            _ = cancel.cancelled() => "replaced or stopped".to_string(),
            r = writer => match r {
                Ok(()) => "replaced or stopped".to_string(),
                Err(e) => e.to_string(),
            },
            r = reader => r.err().unwrap_or_default(),
        };
        cancel.cancel();
        {
            let mut slot = lock(&peer.link);
            if slot.as_ref().is_some_and(|l| l.serial == serial) {
                *slot = None;
                *lock(&peer.last_error) = Some(why.clone());
            }
        }
        // Waiters on this link get Disconnected now rather than at their timeout.
        lock(&pending).clear();
        let _ = self.inner.losses.send(peer_name.clone());
        tracing::info!(
            up_ms = started.elapsed().as_millis() as u64,
            "cluster: link to {peer_name} down: {why}"
        );
    }

    /// Hands a message to its group's inbox, waiting while it is full. False when no such
    /// group runs here.
    async fn deliver(
        &self,
        group: GroupId,
        from: &str,
        body: Vec<u8>,
        reply: Option<Responder>,
    ) -> bool {
        let inbox = lock(&self.inner.groups).get(&group).cloned();
        let Some(inbox) = inbox else {
            return false;
        };
        inbox
            .send(Incoming {
                from: from.to_string(),
                body,
                reply,
            })
            .await
            .is_ok()
    }
}
