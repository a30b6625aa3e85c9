//! The listener: binds the configured addresses, accepts connections and runs one task
//! per connection; shutdown is one broadcast that every connection task listens for
//! (as in mini-redis), and the accept loops stop with it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

use crate::broker::BrokerState;
use crate::config::Config;

/// A running node. Dropping it does not stop it; call `shutdown`.
pub struct Broker {
    addrs: Vec<SocketAddr>,
    management_addrs: Vec<SocketAddr>,
    prometheus_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    management_tls_addrs: Vec<SocketAddr>,
    shutdown: broadcast::Sender<()>,
    tasks: JoinSet<()>,
    state: Arc<BrokerState>,
    cluster: Option<crate::cluster::ClusterNode>,
    stop: Arc<tokio::sync::Notify>,
}

/// Restores a clustered node's vhosts from the definitions it last agreed to (its own
/// definitions table is not used), then joins the metadata group with the vhosts as its
/// mirror.
async fn start_clustered(
    state: &Arc<BrokerState>,
    membership: crate::cluster::Membership,
    mut recovered: crate::store::Recovered,
    store: crate::store::Store,
    meta_log: crate::store::RecoveredRaftGroup,
) -> anyhow::Result<crate::cluster::ClusterNode> {
    use crate::broker::cluster_defs::{ClusterLink, DefinitionsMirror, agreed_definitions};
    use crate::cluster::meta::storage::{DefinitionsObserver, StateMachine};
    let node = membership.this_node().name.clone();
    let names: Vec<String> = membership.members.iter().map(|m| m.name.clone()).collect();
    // What is left of the recovered Raft groups are replicated queues' logs.
    let queue_logs = std::mem::take(&mut recovered.raft);
    let agreed = StateMachine::recover(store.clone(), &meta_log)?.definitions();
    // Agreed users, vhosts and permissions first: the vhosts must exist to be restored.
    for (key, value) in &agreed {
        if let Some(record) = key.strip_prefix(crate::auth::CLUSTER_PREFIX) {
            state.access.apply_record(record, Some(value));
            if let Some(vhost) = record.strip_prefix("v/") {
                state.ensure_vhost(vhost);
            }
        }
    }
    recovered.definitions = agreed_definitions(&agreed);
    state.recover(recovered);
    let mirror = DefinitionsMirror::new(state, &node);
    mirror.reset(&agreed);
    let observer: Arc<dyn DefinitionsObserver> = mirror.clone();
    let cluster =
        crate::cluster::ClusterNode::start(membership, store.clone(), meta_log, Some(observer))
            .await?;
    state.access.join_cluster(cluster.proposals().clone());
    let proxies = crate::broker::remote_consume::start(state, cluster.transport());
    let forwarder = crate::broker::remote::Forwarder::new(cluster.transport().clone());
    state.join_cluster(ClusterLink {
        proposals: cluster.proposals().clone(),
        node: node.clone(),
        cluster: cluster.clone(),
        forwarder: forwarder.clone(),
        proxies,
        replicas: crate::replica::Replicas::new(
            cluster.transport().clone(),
            store,
            &node,
            &names,
            queue_logs,
            state.msg_ids(),
            forwarder,
        ),
        mirroring: Arc::default(),
    });
    mirror.start_replicas(&cluster.meta().machine().definitions());
    // Other nodes' queue traffic is served once every replicated queue here is set up.
    let inbox = cluster
        .transport()
        .register(crate::broker::remote::QUEUE_GROUP);
    tokio::spawn(crate::broker::remote::serve(Arc::downgrade(state), inbox));
    Ok(cluster)
}

/// A listening socket on `addr` (address reuse on; an IPv6 one serves IPv6 only).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        // IPv4 is served by its own listener: keep the IPv6 one to IPv6.
        socket2::SockRef::from(&socket).set_only_v6(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Broker {
    /// Starts a node with these settings: opens the store, binds the listeners.
    pub async fn start(config: Config) -> anyhow::Result<Broker> {
        let membership = crate::cluster::Membership::from_config(&config)?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("data_dir {}", config.data_dir.display()))?;
        // On a nearly full disk, give back the reserve before the store needs room.
        crate::broker::disk::tend_reserve(&config.data_dir);
        let interval = std::time::Duration::from_millis(config.flush_interval_ms.max(1));
        // Opening reads the whole message log once (about a second for millions of
        // messages): keep it off the async workers.
        let (dir, flush) = (config.data_dir.clone(), config.flush);
        let window = config.queue_body_window as usize;
        let (store, mut recovered) = tokio::task::spawn_blocking(move || {
            // Bodies past each queue's window stay on disk (see `queue::paging`).
            let trim = crate::store::BlobTrim {
                whole_per_queue: window,
                digest: crate::queue::Message::head_digest,
                head_len: crate::queue::Message::head_len,
            };
            crate::store::Store::open_trimmed(&dir, flush, interval, Some(trim))
        })
        .await??;
        let meta_log = recovered
            .raft
            .remove(&crate::cluster::meta::storage::META_GROUP)
            .unwrap_or_default();
        let cluster_store = store.clone();
        let access_records = std::mem::take(&mut recovered.access);
        let access =
            crate::auth::AccessControl::open(&access_records, Some(store.clone()), &config).await;
        let state = BrokerState::new(config.clone(), Some(store), access);
        let cluster = match membership {
            None => {
                state.recover(recovered);
                None
            }
            Some(m) => Some(start_clustered(&state, m, recovered, cluster_store, meta_log).await?),
        };
        state.refresh_policies();
        let (shutdown, _) = broadcast::channel(1);
        let mut tasks = JoinSet::new();
        let mut addrs = Vec::new();
        // Client connections open on all listeners together.
        let open = Arc::new(AtomicUsize::new(0));
        let mut port = config.port;
        for host in &config.listen_addresses {
            let ip: IpAddr = host
                .parse()
                .with_context(|| format!("listen address '{host}'"))?;
            let listener = match bind(SocketAddr::new(ip, port)) {
                Ok(l) => l,
                // A host without IPv6 still serves IPv4.
                Err(e) if ip.is_ipv6() && config.listen_addresses.len() > 1 => {
                    tracing::warn!("not listening on [{ip}]:{port}: {e}");
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("cannot listen on {ip}:{port}")),
            };
            let local = listener.local_addr()?;
            // With port 0, every address shares the port picked for the first one.
            port = local.port();
            tracing::info!("listening for AMQP 0-9-1 on {local}");
            addrs.push(local);
            tasks.spawn(accept_loop(
                listener,
                None,
                state.clone(),
                shutdown.clone(),
                open.clone(),
            ));
        }
        let mut tls_addrs = Vec::new();
        if let Some(tls) = crate::tls::server_config(&config, &[])? {
            for listener in bind_all(&config, config.tls_port, "AMQP over TLS")? {
                let local = listener.local_addr()?;
                tracing::info!("listening for AMQP 0-9-1 over TLS on {local}");
                tls_addrs.push(local);
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                tasks.spawn(accept_loop(
                    listener,
                    Some(acceptor),
                    state.clone(),
                    shutdown.clone(),
                    open.clone(),
                ));
            }
        }
        if !config.load_definitions.is_empty() {
            load_definitions(&state, &config.load_definitions).await?;
        }
        let stop = Arc::new(tokio::sync::Notify::new());
        let (management_addrs, management_tls_addrs) =
            start_management(&config, &state, &addrs, &stop, &shutdown, &mut tasks)?;
        let mut prometheus_addrs = Vec::new();
        for listener in bind_all(&config, config.prometheus_port, "Prometheus metrics")? {
            let local = listener.local_addr()?;
            tracing::info!("Prometheus metrics on http://{local}/metrics");
            prometheus_addrs.push(local);
            tasks.spawn(crate::metrics::serve(
                listener,
                state.clone(),
                shutdown.subscribe(),
            ));
        }
        tasks.spawn(ticker(state.clone(), shutdown.subscribe()));
        Ok(Broker {
            addrs,
            management_addrs,
            prometheus_addrs,
            tls_addrs,
            management_tls_addrs,
            shutdown,
            tasks,
            state,
            cluster,
            stop,
        })
    }

    /// Completes when an operator asked the node to stop (`warren ctl stop`); the
    /// process running the node then calls `shutdown`, as on SIGTERM.
    pub async fn stop_requested(&self) {
        self.stop.notified().await;
    }

    /// The first address the node listens on (tests connect here).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The first address the management API listens on.
    pub fn management_addr(&self) -> Option<SocketAddr> {
        self.management_addrs.first().copied()
    }

    /// The first address AMQP over TLS listens on (when a certificate is configured).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addrs.first().copied()
    }

    /// The first address the management API listens on over HTTPS.
    pub fn management_tls_addr(&self) -> Option<SocketAddr> {
        self.management_tls_addrs.first().copied()
    }

    /// The first address the Prometheus endpoint listens on.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus_addrs.first().copied()
    }

    /// `amqp://guest:guest@host:port/%2f` for the first listener.
    pub fn amqp_url(&self) -> String {
        let c = &self.state.config;
        format!(
            "amqp://{}:{}@{}/%2f",
            c.default_user,
            c.default_pass,
            self.local_addr()
        )
    }

    /// The node's shared state: vhosts, access control, connections (the management API
    /// and tests work through it).
    pub fn state(&self) -> &Arc<BrokerState> {
        &self.state
    }

    /// Raises or clears the memory alarm by hand, as if memory use had crossed the
    /// watermark (tests; a future `warren ctl`).
    pub fn set_memory_alarm(&self, on: bool) {
        self.state.alarms.set_memory(on);
    }

    /// Sets by hand whether memory runs short, as if memory use had crossed half the
    /// watermark: queues then page transient messages too (tests).
    pub fn set_memory_short(&self, on: bool) {
        self.state.alarms.set_memory_short(on);
    }

    /// Counters of the store's writer (tests; later the metrics endpoint).
    pub fn store_stats(&self) -> Option<crate::store::StoreStats> {
        self.state.store().map(|s| s.stats())
    }

    /// This node's cluster side (links, metadata group); `None` for a single node.
    pub fn cluster(&self) -> Option<&crate::cluster::ClusterNode> {
        self.cluster.as_ref()
    }

    /// The cluster's members and this node's links to them; `None` for a single node.
    pub fn cluster_status(&self) -> Option<crate::cluster::ClusterStatus> {
        self.cluster.as_ref().map(|c| c.status())
    }

    /// Test hook: holds the store writer after the requests queued so far until the
    /// returned sender is used or dropped (None without a store).
    #[doc(hidden)]
    pub fn pause_store_writer(&self) -> Option<std::sync::mpsc::Sender<()>> {
        self.state.store().map(|s| s.pause())
    }

    /// Hands over the leadership of the replicated queues this node leads, then closes
    /// every connection (320 CONNECTION_FORCED) and stops listening.
    pub async fn shutdown(mut self) {
        if let Some(link) = self.state.cluster_link() {
            link.replicas.hand_over_all().await;
        }
        let _ = self.shutdown.send(());
        if let Some(cluster) = &self.cluster {
            cluster.shutdown().await;
        }
        while self.tasks.join_next().await.is_some() {}
        if let Some(store) = self.state.store().cloned() {
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
    }
}

/// Imports a definitions file at boot (`load_definitions`); a file that cannot be read
/// or applied stops the start, as RabbitMQ refuses to boot with a broken one.
async fn load_definitions(state: &Arc<BrokerState>, path: &str) -> anyhow::Result<()> {
    let text = std::fs::read(path).with_context(|| format!("load_definitions {path}"))?;
    let defs: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("load_definitions {path}"))?;
    crate::broker::definitions::import(state, &defs, None)
        .await
        .map_err(|e| anyhow::anyhow!("load_definitions {path}: {e}"))?;
    tracing::info!(file = path, "loaded definitions");
    Ok(())
}

/// Binds `port` on every listen address (with port 0, all share the port picked for
/// the first); a host without IPv6 still serves IPv4.
fn bind_all(config: &Config, mut port: u16, what: &str) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for host in &config.listen_addresses {
        let ip: IpAddr = host
            .parse()
            .with_context(|| format!("listen address '{host}'"))?;
        let listener = match bind(SocketAddr::new(ip, port)) {
            Ok(l) => l,
            Err(e) if ip.is_ipv6() && config.listen_addresses.len() > 1 => {
                tracing::warn!("no {what} on [{ip}]:{port}: {e}");
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot listen on {ip}:{port} ({what})"));
            }
        };
        port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Binds the management API on every listen address (sharing one port when it is 0)
/// and starts it with its rate sampler.
fn start_management(
    config: &Config,
    state: &Arc<BrokerState>,
    amqp_addrs: &[SocketAddr],
    stop: &Arc<tokio::sync::Notify>,
    shutdown: &broadcast::Sender<()>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<(Vec<SocketAddr>, Vec<SocketAddr>)> {
    let rates = Arc::new(crate::http::RateSampler::default());
    let http = crate::http::Http {
        broker: state.clone(),
        amqp_addrs: Arc::new(amqp_addrs.to_vec()),
        rates: rates.clone(),
        stop: stop.clone(),
    };
    let mut addrs = Vec::new();
    for listener in bind_all(config, config.management_port, "management API")? {
        let local = listener.local_addr()?;
        tracing::info!("management API on http://{local}/api/");
        addrs.push(local);
        tasks.spawn(crate::http::serve(
            listener,
            http.clone(),
            shutdown.subscribe(),
        ));
    }
    let mut tls_addrs = Vec::new();
    if let Some(tls) = crate::tls::server_config(config, &[b"http/1.1"])? {
        for listener in bind_all(
            config,
            config.management_tls_port,
            "management API over TLS",
        )? {
            let local = listener.local_addr()?;
            tracing::info!("management API on https://{local}/api/");
            tls_addrs.push(local);
            let listener = crate::http::TlsListener::new(listener, tls.clone());
            tasks.spawn(crate::http::serve_tls(
                listener,
                http.clone(),
                shutdown.subscribe(),
            ));
        }
    }
    tasks.spawn(crate::http::run_sampler(
        rates,
        state.clone(),
        shutdown.subscribe(),
    ));
    Ok((addrs, tls_addrs))
}

/// How long a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One accepted AMQP-over-TLS socket: the handshake (bounded), then the connection,
/// with the user its verified client certificate names.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<BrokerState>,
    shutdown: broadcast::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let user = crate::tls::peer_identity(tls.get_ref().1, &state.config.ssl_cert_login_from);
    crate::connection::serve_tls(tls, peer, local, user, state, shutdown).await
}

/// One open client connection, counted against `connection_max` until dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// A slot, unless `limit` (0: none) connections are open already.
    fn take(open: &Arc<AtomicUsize>, limit: usize) -> Option<ConnectionSlot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (limit == 0 || n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| ConnectionSlot(open.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<BrokerState>,
    shutdown: broadcast::Sender<()>,
    open: Arc<AtomicUsize>,
) {
    let mut stop = shutdown.subscribe();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if state.is_drained() {
                        // (RabbitMQ suspends its listeners while drained.)
                        tracing::debug!(%peer, "maintenance mode: connection refused");
                        drop(stream);
                        continue;
                    }
                    let Some(slot) = ConnectionSlot::take(&open, state.config.connection_max) else {
                        tracing::warn!(%peer, limit = state.config.connection_max, "connection limit reached; closing the new connection");
                        drop(stream);
                        continue;
                    };
                    let (state, stop) = (state.clone(), shutdown.subscribe());
                    let tls = tls.clone();
                    connections.spawn(async move {
                        match tls {
                            None => crate::connection::serve(stream, peer, state, stop).await,
                            Some(acceptor) => serve_tls(stream, peer, acceptor, state, stop).await,
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.recv() => break,
        }
    }
    drop(listener);
    let wait = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(5), wait)
        .await
        .is_err()
    {
        connections.abort_all();
    }
}

/// Timer work (message TTLs, x-expires) every 50 ms until shutdown.
async fn ticker(state: Arc<BrokerState>, mut stop: broadcast::Receiver<()>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            // Alarm checks read procfs and statvfs and may trim the allocator, and
            // expiry scans lock every queue: keep them off the async workers.
            _ = tick.tick() => {
                let state = state.clone();
                let _ = tokio::task::spawn_blocking(move || state.tick()).await;
            }
            _ = stop.recv() => return,
        }
    }
}
