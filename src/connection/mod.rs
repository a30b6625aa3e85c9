//! One task per TCP connection: the handshake (start, SASL, tune, open), the channels
//! multiplexed on it, heartbeats, and closing in both directions.
//!
//! The task reads frames in batches, handles each (channel methods live in `channel`),
//! takes the deliveries and confirms that queues and the store sent it meanwhile, and
//! writes everything produced by the batch with one `write_all`.

pub mod channel;
mod handshake;
pub mod sink;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, connection as conn_methods};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};

use crate::broker::{BrokerState, VHost};
use crate::protocol::codec::{FrameDecoder, InFrame, PROTOCOL_HEADER, encode};
use crate::protocol::{AmqpError, ReplyCode, reply::amqp_err};
use crate::queue::journal::Writes;
use channel::Channel;
use sink::{ConnEvent, ConnShared};

/// The protocol header of AMQP 0-9 (before 0-9-1): RabbitMQ serves it as 0-9-1, which
/// differs from 0-9 in nothing a client of it relies on.
const PROTOCOL_HEADER_0_9: &[u8; 8] = b"AMQP\x01\x01\x00\x09";

/// Frames of at most this size are allowed before tune-ok (the spec's minimum).
const FRAME_MIN_SIZE: u32 = 4096;
/// How long we wait for close-ok after sending connection.close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write may still stall once the node is shutting down.
const SHUTDOWN_WRITE_GRACE: Duration = Duration::from_secs(1);
/// How often a publisher held back by congested queues looks whether they cleared.
const FLOW_POLL: Duration = Duration::from_millis(1);
/// The longest a publisher is held back before one more read: queue flow control slows
/// a publisher down, it never stops one (a client that publishes and consumes on one
/// connection must always get its acks through).
pub const FLOW_MAX_HOLD: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitStartOk,
    AwaitTuneOk,
    AwaitOpen,
    Open,
    /// We sent connection.close and wait for close-ok.
    Closing,
    /// Done: close the socket.
    Closed,
}

impl Phase {
    /// The connection state as RabbitMQ names it in error texts.
    fn rabbit_name(self) -> &'static str {
        match self {
            Phase::AwaitStartOk => "starting",
            Phase::AwaitTuneOk => "tuning",
            Phase::AwaitOpen => "opening",
            Phase::Open => "running",
            Phase::Closing => "closing",
            Phase::Closed => "closed",
        }
    }
}

/// The state of one client connection.
pub struct Connection {
    id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    /// The connection came over TLS.
    tls: bool,
    /// The user a verified client certificate names (EXTERNAL mechanism).
    certificate_user: Option<String>,
    broker: Arc<BrokerState>,
    phase: Phase,
    user: String,
    vhost: Option<Arc<VHost>>,
    /// The client announced consumer_cancel_notify.
    cancel_notify: bool,
    channel_max: u16,
    frame_max: u32,
    heartbeat: u16,
    decoder: FrameDecoder,
    /// Hashed fast (every frame looks its channel up); at most channel_max of them.
    channels: HashMap<u16, Channel, foldhash::fast::RandomState>,
    shared: Arc<ConnShared>,
    out: BytesMut,
    /// Deliveries encoded into `out` since the last write.
    delivered: usize,
    /// Their bytes.
    delivered_bytes: usize,
    last_read: Instant,
    last_write: Instant,
    started: Instant,
    closing_since: Option<Instant>,
    /// Channels that ended recently (a crossing close may still arrive for them).
    closed_channels: Vec<u16>,
    /// The client closed the connection: let it close the socket first.
    linger: bool,
    /// The client has published (memory flow control applies to it).
    published: bool,
    /// The client announced the connection.blocked capability.
    blocked_notify: bool,
    /// We stopped reading because of a resource alarm.
    blocked: bool,
    /// Since when congested queues hold this connection's publishes back.
    held_since: Option<Instant>,
    /// The congested store holds this connection's publishes back (its heartbeats
    /// are not read meanwhile, so they cannot be missed).
    store_hold: bool,
    /// Removals of stored copies of auto-ack deliveries written into `out`: submitted
    /// once the write succeeded, so that a delivery that never left keeps its copy.
    written_auto_acks: Writes,
    /// The node is shutting down (seen while writing).
    shutdown_seen: bool,
    /// An exchange or queue method was handled: its answer waits until the store has
    /// committed what was submitted before it.
    definitions_changed: bool,
    /// On a clustered node: the answer to a definition method, held until the metadata
    /// group has committed what the method proposed (input after it waits too).
    awaiting_definitions: Option<AwaitedDefinitions>,
    /// A channel's method waiting for the node that hosts its queue (input after it
    /// waits too).
    awaiting_remote: Option<(u16, channel::RemoteCall)>,
}

/// Runs a plain TCP connection until it closes.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<BrokerState>,
    shutdown: broadcast::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let (reader, writer) = stream.into_split();
    let transport = Transport {
        peer,
        local,
        tls: false,
        certificate_user: None,
    };
    run(reader, writer, transport, broker, shutdown).await
}

/// Runs a connection over TLS (amqps) until it closes. `certificate_user` is the user a
/// verified client certificate names, for the EXTERNAL mechanism.
pub async fn serve_tls(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    local: SocketAddr,
    certificate_user: Option<String>,
    broker: Arc<BrokerState>,
    shutdown: broadcast::Receiver<()>,
) {
    let (reader, writer) = tokio::io::split(stream);
    let transport = Transport {
        peer,
        local,
        tls: true,
        certificate_user,
    };
    run(reader, writer, transport, broker, shutdown).await
}

/// Where a connection comes from and what its transport proved.
struct Transport {
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    certificate_user: Option<String>,
}

/// The connection's life, over any byte stream split in two halves (plain TCP keeps
/// tokio's lock-free owned halves).
async fn run<R, W>(
    mut reader: R,
    mut writer: W,
    transport: Transport,
    broker: Arc<BrokerState>,
    mut shutdown: broadcast::Receiver<()>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let Transport {
        peer,
        local,
        tls,
        certificate_user,
    } = transport;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = broker.next_id();
    let shared = Arc::new(ConnShared {
        id,
        tx,
        pending: Default::default(),
        pending_bytes: Default::default(),
        waiting: Default::default(),
        held_by: Default::default(),
        held_by_store: Default::default(),
        channels: Default::default(),
        stats: Default::default(),
    });
    let mut conn = Connection {
        id,
        peer,
        local,
        tls,
        certificate_user,
        channel_max: broker.config.channel_max,
        frame_max: broker.config.frame_max,
        heartbeat: 0,
        broker,
        phase: Phase::AwaitStartOk,
        user: String::new(),
        vhost: None,
        cancel_notify: false,
        decoder: FrameDecoder {
            frame_max: FRAME_MIN_SIZE,
        },
        channels: HashMap::default(),
        shared,
        out: BytesMut::with_capacity(64 * 1024),
        delivered: 0,
        delivered_bytes: 0,
        last_read: Instant::now(),
        last_write: Instant::now(),
        started: Instant::now(),
        closing_since: None,
        closed_channels: Vec::new(),
        linger: false,
        published: false,
        blocked_notify: false,
        blocked: false,
        held_since: None,
        store_hold: false,
        written_auto_acks: Writes::default(),
        shutdown_seen: false,
        definitions_changed: false,
        awaiting_definitions: None,
        awaiting_remote: None,
    };

    let mut buf = BytesMut::with_capacity(64 * 1024);
    // Protocol header: exactly 8 bytes, or we answer with ours and close.
    let header_ok = tokio::time::timeout(conn.broker.config.handshake_timeout(), async {
        while buf.len() < 8 {
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            let seen = &buf[..buf.len().min(8)];
            if !PROTOCOL_HEADER.starts_with(seen) && !PROTOCOL_HEADER_0_9.starts_with(seen) {
                return false;
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    if !header_ok || (&buf[..8] != PROTOCOL_HEADER && &buf[..8] != PROTOCOL_HEADER_0_9) {
        let _ = writer.write_all(PROTOCOL_HEADER).await;
        tracing::debug!(%peer, "bad or missing protocol header");
        return;
    }
    let _ = buf.split_to(8);
    conn.send_start();

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alarm = conn.broker.alarms.subscribe();
    loop {
        // Resource alarms: a connection that publishes is not read until they clear.
        // (Always mark the alarms seen, or `changed()` below would fire at once, forever.)
        let alarms = *alarm.borrow_and_update();
        let throttled = conn.published && alarms.any();
        conn.set_blocked(throttled.then(|| alarms.reason()));
        if let Some((ch, mut call)) = conn.awaiting_remote.take() {
            let answer = (&mut call.answer).await;
            conn.remote_answered(ch, call, answer);
            // What the client sent after the method is read now.
            conn.handle_input(&mut buf);
            continue;
        }
        if let Some(awaited) = conn.awaiting_definitions.take() {
            conn.settle_definitions(awaited).await;
            // What the client sent after the method is read now.
            conn.handle_input(&mut buf);
            continue;
        }
        if conn.definitions_changed {
            // Answers to declare, bind and delete go out only once the definitions they
            // changed are on disk, as RabbitMQ answers: an empty commit after them is a
            // barrier (one fsync, shared with whatever else the writer commits).
            conn.definitions_changed = false;
            if let Some(store) = conn.broker.store() {
                store.commit(Vec::new()).await;
            }
        }
        if conn.flush(&mut writer, &mut shutdown).await.is_err() {
            break;
        }
        if conn.shutdown_seen {
            conn.close_connection(amqp_err!(
                ConnectionForced,
                "broker forced connection closure with reason 'shutdown'"
            ));
        }
        if conn.phase == Phase::Closed {
            break;
        }
        let held = conn.held_back();
        tokio::select! {
            _ = alarm.changed() => {}
            _ = tokio::time::sleep(FLOW_POLL), if held => {}
            read = reader.read_buf(&mut buf), if !throttled && !held => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        conn.last_read = Instant::now();
                        conn.handle_input(&mut buf);
                    }
                }
            }
            Some(event) = rx.recv() => {
                let now = Instant::now();
                conn.handle_event(event, now);
                let mut more = 0;
                while more < 4096 {
                    match rx.try_recv() {
                        Ok(event) => conn.handle_event(event, now),
                        Err(_) => break,
                    }
                    more += 1;
                }
            }
            _ = tick.tick() => conn.on_tick(),
            _ = shutdown.recv(), if conn.phase != Phase::Closing => {
                conn.close_connection(amqp_err!(ConnectionForced, "broker forced connection closure with reason 'shutdown'"));
            }
        }
    }
    if conn.linger {
        // After close-ok the client closes the socket; give it a moment to do so, as
        // RabbitMQ does, so that it never reads an unexpected EOF.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                buf.clear();
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    let _ = writer.shutdown().await;
    rx.close();
    conn.cleanup(&mut rx);
}

/// A definition method's answer waiting for the metadata group.
struct AwaitedDefinitions {
    /// Proposal tickets after this one and up to `upto` must be committed.
    after: u64,
    upto: u64,
    /// The method, for the error if they are not.
    class_method: (u16, u16),
    /// What the method wrote (its -ok).
    answer: BytesMut,
}

impl Connection {
    /// Sends a definition method's answer once its proposals are committed; when they
    /// cannot be (no majority in time), closes the connection with 541 as RabbitMQ does
    /// when its metadata store times out.
    async fn settle_definitions(&mut self, awaited: AwaitedDefinitions) {
        let Some(link) = self.broker.cluster_link() else {
            return;
        };
        match link.proposals.wait(awaited.after, awaited.upto).await {
            Ok(()) => self.out.extend_from_slice(&awaited.answer),
            Err(e) => {
                let mut err = amqp_err!(
                    InternalError,
                    "the metadata store operation timed out: {}",
                    e
                );
                err.class_method = awaited.class_method;
                self.close_connection(err);
            }
        }
    }

    /// Enters (with the alarm's reason) or leaves the resource-alarm block, telling
    /// clients that asked to know.
    fn set_blocked(&mut self, reason: Option<&str>) {
        let blocked = reason.is_some();
        if blocked == self.blocked || self.phase != Phase::Open {
            return;
        }
        self.blocked = blocked;
        if self.blocked_notify {
            let method = match reason {
                Some(reason) => conn_methods::AMQPMethod::Blocked(conn_methods::Blocked {
                    reason: reason.into(),
                }),
                None => conn_methods::AMQPMethod::Unblocked(conn_methods::Unblocked {}),
            };
            self.send(0, AMQPClass::Connection(method));
        }
    }

    /// Flow control: whether to wait before reading more publishes. Queues this
    /// connection published to that are congested hold it at most `FLOW_MAX_HOLD` at a
    /// time (their consumers may need this connection's acks); a congested store holds
    /// it until the writer catches up (the writer needs nothing from any client).
    fn held_back(&mut self) -> bool {
        let by_store = &self.shared.held_by_store;
        self.store_hold = by_store.load(Ordering::Relaxed)
            && (self.broker.store().is_some_and(|s| s.is_congested())
                || self
                    .broker
                    .cluster_link()
                    .is_some_and(|l| l.forwarder.is_congested()));
        if !self.store_hold {
            by_store.store(false, Ordering::Relaxed);
        }
        let mut held = self
            .shared
            .held_by
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !held.is_empty() {
            let now = Instant::now();
            let since = *self.held_since.get_or_insert(now);
            if now.duration_since(since) < FLOW_MAX_HOLD {
                held.retain(|q| q.still_congested());
            } else {
                held.clear();
            }
        }
        if held.is_empty() {
            self.held_since = None;
        }
        self.store_hold || !held.is_empty()
    }

    fn send(&mut self, channel: u16, method: AMQPClass) {
        encode::method(&mut self.out, channel, method);
    }

    async fn flush<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> std::io::Result<()> {
        for ch in self.channels.values_mut() {
            ch.flush_confirms(&mut self.out);
        }
        if !self.out.is_empty() {
            self.write_out(writer, shutdown).await?;
            self.out.clear();
            self.last_write = Instant::now();
        }
        if !self.written_auto_acks.is_empty()
            && let Some(journal) = self.broker.journal()
        {
            journal.append(std::mem::take(&mut self.written_auto_acks));
        }
        if self.delivered > 0 {
            self.shared
                .pending
                .fetch_sub(self.delivered, Ordering::Relaxed);
            self.shared
                .pending_bytes
                .fetch_sub(self.delivered_bytes, Ordering::Relaxed);
            self.delivered = 0;
            self.delivered_bytes = 0;
        }
        // Queues that ran out of credit (socket backlog, channel-wide prefetch) try again
        // now that writes and acks may have freed some.
        for queue in self.shared.take_waiting() {
            if let Some(q) = queue.upgrade() {
                q.kick();
            }
        }
        Ok(())
    }

    /// Writes `out` whole. A peer that stops reading must not hold the connection (and
    /// its unacked messages) forever: when no byte goes out for as long as missed
    /// heartbeats would take (the handshake or close timeout before and after), or for
    /// a second once the node is shutting down, the connection is given up.
    async fn write_out<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        shutdown: &mut broadcast::Receiver<()>,
    ) -> std::io::Result<()> {
        let stall_limit = match self.phase {
            Phase::Open if self.heartbeat > 0 => {
                Some(Duration::from_secs(self.heartbeat as u64) * 2)
            }
            Phase::Open => None,
            Phase::Closing | Phase::Closed => Some(CLOSE_TIMEOUT),
            _ => Some(self.broker.config.handshake_timeout()),
        };
        let mut written = 0;
        while written < self.out.len() {
            let limit = if self.shutdown_seen {
                Some(SHUTDOWN_WRITE_GRACE)
            } else {
                stall_limit
            };
            let stalled = async {
                match limit {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = writer.write(&self.out[written..]) => match n? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    n => written += n,
                },
                _ = stalled => {
                    tracing::info!(peer = %self.peer, user = %self.user, "peer stopped reading; closing the connection");
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                _ = shutdown.recv(), if !self.shutdown_seen => self.shutdown_seen = true,
            }
        }
        Ok(())
    }

    fn handle_input(&mut self, buf: &mut BytesMut) {
        loop {
            if matches!(self.phase, Phase::Closed) {
                return;
            }
            if self.awaiting_definitions.is_some() || self.awaiting_remote.is_some() {
                return;
            }
            match self.decoder.decode_frame(buf) {
                Ok(Some(frame)) => self.handle_frame(frame),
                Ok(None) => return,
                Err(e) => {
                    buf.clear();
                    if crate::protocol::codec::is_unknown_method(&e) {
                        // An unknown class or method: RabbitMQ cannot parse it either and
                        // drops the socket without a connection.close.
                        tracing::warn!(peer = %self.peer, "closing connection: {}", e.reply_text());
                        self.phase = Phase::Closed;
                        return;
                    }
                    self.close_connection(e);
                    // Nothing more can be parsed from a broken stream.
                    self.phase = Phase::Closed;
                    return;
                }
            }
        }
    }

    fn handle_frame(&mut self, frame: InFrame) {
        if let InFrame::Method(
            _,
            AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Publish(_)),
        ) = &frame
        {
            self.published = true;
        }
        if self.phase == Phase::Closing {
            // Only close / close-ok matter now.
            if let InFrame::Method(0, AMQPClass::Connection(m)) = frame {
                match m {
                    conn_methods::AMQPMethod::CloseOk(_) => self.phase = Phase::Closed,
                    conn_methods::AMQPMethod::Close(_) => {
                        self.send(
                            0,
                            AMQPClass::Connection(conn_methods::AMQPMethod::CloseOk(
                                conn_methods::CloseOk {},
                            )),
                        );
                        self.phase = Phase::Closed;
                    }
                    _ => {}
                }
            }
            return;
        }
        let result = match frame {
            InFrame::Heartbeat(0) => Ok(()),
            InFrame::Heartbeat(_) => Err(amqp_err!(UnexpectedFrame, "type 8, all octets = <<>>")),
            InFrame::Method(0, AMQPClass::Connection(m)) => self.handle_connection_method(m),
            InFrame::Method(0, other) => Err(amqp_err!(
                ChannelError,
                "unexpected method in connection state {}",
                self.phase.rabbit_name()
            )
            .caused_by(&other)),
            InFrame::Header(0, _) | InFrame::Body(0, _) => {
                Err(amqp_err!(UnexpectedFrame, "content frame on channel 0"))
            }
            frame if self.phase != Phase::Open => Err(amqp_err!(
                ChannelError,
                "channel frame before connection.open-ok: {:?}",
                frame_channel(&frame)
            )),
            InFrame::Method(
                ch,
                AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Open(_)),
            ) => self.open_channel(ch),
            frame => self.channel_frame(frame),
        };
        if let Err(e) = result {
            self.close_connection(e);
        }
    }

    /// Tells listings which channels are open (on channel open and close only).
    fn publish_channel_numbers(&self) {
        let mut numbers: Vec<u16> = self.channels.keys().copied().collect();
        numbers.sort_unstable();
        *self
            .shared
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = numbers;
    }

    fn recently_closed(&self, ch: u16) -> bool {
        self.closed_channels.contains(&ch)
    }

    fn open_channel(&mut self, ch: u16) -> Result<(), AmqpError> {
        // channel_max bounds how many channels are open at once, not their numbers.
        if self.channels.len() >= self.channel_max as usize {
            return Err(amqp_err!(
                NotAllowed,
                "number of channels opened ({}) has reached the negotiated channel_max ({})",
                self.channels.len(),
                self.channel_max
            ));
        }
        if self.channels.contains_key(&ch) {
            return Err(amqp_err!(ChannelError, "second 'channel.open' seen").at(20, 10));
        }
        self.closed_channels.retain(|c| *c != ch);
        let Some(vhost) = self.vhost.clone() else {
            return Err(amqp_err!(
                CommandInvalid,
                "channel.open before connection.open"
            ));
        };
        let channel = Channel::new(
            ch,
            self.id,
            self.user.clone(),
            vhost,
            self.broker.clone(),
            self.shared.clone(),
            self.frame_max,
        );
        self.channels.insert(ch, channel);
        self.publish_channel_numbers();
        self.send(
            ch,
            AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::OpenOk(
                amq_protocol::protocol::channel::OpenOk {},
            )),
        );
        Ok(())
    }

    fn channel_frame(&mut self, frame: InFrame) -> Result<(), AmqpError> {
        let ch = frame_channel(&frame);
        // Exchange and queue methods that write to the store answer once it committed.
        let sent_before = matches!(
            frame,
            InFrame::Method(_, AMQPClass::Exchange(_) | AMQPClass::Queue(_))
        )
        .then(|| self.broker.store().map(|s| s.sent_requests()))
        .flatten();
        // On a clustered node they answer once the metadata group committed them.
        let proposed_before = match (&frame, self.broker.cluster_link()) {
            (
                InFrame::Method(_, m @ (AMQPClass::Exchange(_) | AMQPClass::Queue(_))),
                Some(link),
            ) => Some((
                link.proposals.submitted(),
                (m.get_amqp_class_id(), m.get_amqp_method_id()),
                self.out.len(),
            )),
            _ => None,
        };
        let Some(channel) = self.channels.get_mut(&ch) else {
            // A channel.close that crossed ours already ended the channel: its close-ok,
            // or a repeated close, is answered quietly, as RabbitMQ does.
            use amq_protocol::protocol::channel as ch_methods;
            match frame {
                InFrame::Method(_, AMQPClass::Channel(ch_methods::AMQPMethod::CloseOk(_))) => {
                    return Ok(());
                }
                InFrame::Method(_, AMQPClass::Channel(ch_methods::AMQPMethod::Close(_)))
                    if self.recently_closed(ch) =>
                {
                    self.send(
                        ch,
                        AMQPClass::Channel(ch_methods::AMQPMethod::CloseOk(ch_methods::CloseOk {})),
                    );
                    return Ok(());
                }
                InFrame::Method(_, m) => {
                    return Err(amqp_err!(ChannelError, "expected 'channel.open'").caused_by(&m));
                }
                _ => {}
            }
            return Err(amqp_err!(
                UnexpectedFrame,
                "expected method frame, got non method frame instead"
            ));
        };
        let outcome = channel.handle_frame(frame, &mut self.out);
        if let Some(call) = channel.take_remote_call() {
            self.awaiting_remote = Some((ch, call));
        }
        if let (Some(before), Some(store)) = (sent_before, self.broker.store()) {
            self.definitions_changed |= store.sent_requests() != before;
        }
        if let (Some((after, class_method, answer_at)), Some(link)) =
            (proposed_before, self.broker.cluster_link())
        {
            let upto = link.proposals.submitted();
            if upto != after {
                self.awaiting_definitions = Some(AwaitedDefinitions {
                    after,
                    upto,
                    class_method,
                    answer: self.out.split_off(answer_at.min(self.out.len())),
                });
            }
        }
        self.channel_outcome(ch, outcome)
    }

    /// A channel's method's outcome for the connection.
    fn channel_outcome(&mut self, ch: u16, outcome: channel::Outcome) -> Result<(), AmqpError> {
        match outcome {
            channel::Outcome::Continue => Ok(()),
            channel::Outcome::Closed => {
                self.channels.remove(&ch);
                self.publish_channel_numbers();
                self.closed_channels.push(ch);
                if self.closed_channels.len() > 64 {
                    self.closed_channels.remove(0);
                }
                Ok(())
            }
            channel::Outcome::ConnectionError(e) => Err(e),
        }
    }

    /// A channel's method got its answer from the node that hosts its queue.
    fn remote_answered(
        &mut self,
        ch: u16,
        call: channel::RemoteCall,
        answer: Result<crate::broker::remote_consume::Answer, AmqpError>,
    ) {
        let Some(channel) = self.channels.get_mut(&ch) else {
            return;
        };
        let outcome = channel.remote_answered(call, answer, &mut self.out);
        if let Err(e) = self.channel_outcome(ch, outcome) {
            self.close_connection(e);
        }
    }

    fn handle_event(&mut self, event: ConnEvent, now: Instant) {
        match event {
            ConnEvent::RemoteDeliver(ch, d) => {
                self.delivered += 1;
                self.delivered_bytes += d.entry.msg.size();
                match self.channels.get_mut(&ch) {
                    Some(channel) => channel.deliver_remote(d, now, &mut self.out),
                    None => d.give_back(),
                }
            }
            ConnEvent::Deliver(ch, d) => {
                self.delivered += 1;
                self.delivered_bytes += d.entry.msg.size();
                match self.channels.get_mut(&ch) {
                    Some(channel) => {
                        channel.deliver(d, now, &mut self.out, &mut self.written_auto_acks)
                    }
                    None => {
                        d.queue.return_undelivered(d.entry);
                    }
                }
            }
            ConnEvent::Cancelled(ch, tag) => {
                if let Some(channel) = self.channels.get_mut(&ch) {
                    channel.server_cancel(&tag, self.cancel_notify, &mut self.out);
                }
            }
            ConnEvent::TxCommitted(ch) => {
                if let Some(channel) = self.channels.get_mut(&ch) {
                    channel.tx_committed(&mut self.out);
                }
            }
            ConnEvent::Stored(ch, seqs) => {
                if let Some(channel) = self.channels.get_mut(&ch) {
                    channel.stored(&seqs);
                }
            }
            ConnEvent::Nacked(ch, seqs) => {
                if let Some(channel) = self.channels.get_mut(&ch) {
                    channel.nacked(&seqs);
                }
            }
            ConnEvent::Close(reason) => self.close_connection(reason),
            ConnEvent::CreditBack => {}
            ConnEvent::Reply(ch, tag, msg) => {
                if let Some(channel) = self.channels.get_mut(&ch) {
                    channel.deliver_reply(&tag, &msg, &mut self.out);
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        match self.phase {
            Phase::AwaitStartOk | Phase::AwaitTuneOk | Phase::AwaitOpen
                if now.duration_since(self.started) > self.broker.config.handshake_timeout() =>
            {
                tracing::info!(peer = %self.peer, "handshake timeout");
                self.phase = Phase::Closed;
            }
            Phase::Closing
                if self
                    .closing_since
                    .is_some_and(|t| now.duration_since(t) > CLOSE_TIMEOUT) =>
            {
                self.phase = Phase::Closed;
            }
            Phase::Open if self.heartbeat > 0 || self.broker.config.consumer_timeout > 0 => {
                if let Some(timeout) = self.broker.config.consumer_timeout() {
                    for ch in self.channels.values_mut() {
                        ch.check_consumer_timeout(now, timeout, &mut self.out);
                    }
                }
                if self.heartbeat == 0 {
                    return;
                }
                let interval = Duration::from_secs(self.heartbeat as u64);
                if !self.blocked
                    && !self.store_hold
                    && now.duration_since(self.last_read) > interval * 2
                {
                    tracing::info!(peer = %self.peer, user = %self.user, "missed heartbeats from client, timeout: {}s", self.heartbeat);
                    self.phase = Phase::Closed;
                } else if now.duration_since(self.last_write) >= interval / 2 {
                    encode::heartbeat(&mut self.out);
                }
            }
            _ => {}
        }
    }

    /// Sends connection.close with this error and waits for close-ok.
    fn close_connection(&mut self, e: AmqpError) {
        if matches!(self.phase, Phase::Closing | Phase::Closed) {
            return;
        }
        if e.code != ReplyCode::Success {
            tracing::warn!(peer = %self.peer, user = %self.user, code = e.code.code(), "closing connection: {}", e.reply_text());
        }
        let (class_id, method_id) = e.class_method;
        self.send(
            0,
            AMQPClass::Connection(conn_methods::AMQPMethod::Close(conn_methods::Close {
                reply_code: e.code.code(),
                reply_text: e.reply_text().into(),
                class_id,
                method_id,
            })),
        );
        self.phase = Phase::Closing;
        self.closing_since = Some(Instant::now());
        self.close_channels();
    }

    fn close_channels(&mut self) {
        for (_, mut ch) in self.channels.drain() {
            ch.release();
        }
        self.publish_channel_numbers();
    }

    /// After the socket is gone: unacked messages go back, exclusive queues go away.
    fn cleanup(&mut self, rx: &mut mpsc::UnboundedReceiver<ConnEvent>) {
        self.close_channels();
        while let Ok(event) = rx.try_recv() {
            match event {
                ConnEvent::Deliver(_, d) => d.queue.return_undelivered(d.entry),
                ConnEvent::RemoteDeliver(_, d) => d.give_back(),
                _ => {}
            }
        }
        self.broker
            .deregister_connection(self.id, self.shared.stats.values());
        if let Some(vhost) = &self.vhost {
            vhost.remove_exclusive_queues(self.id);
            tracing::info!(peer = %self.peer, user = %self.user, vhost = %vhost.name, "connection closed");
        }
    }
}

fn frame_channel(frame: &InFrame) -> u16 {
    match frame {
        InFrame::Method(c, _)
        | InFrame::Header(c, _)
        | InFrame::Body(c, _)
        | InFrame::Heartbeat(c) => *c,
    }
}

/// The method id of a method, for error reports.
pub fn method_id(m: &AMQPClass) -> u16 {
    m.get_amqp_method_id()
}
