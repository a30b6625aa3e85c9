//! The management HTTP API, RabbitMQ-compatible where tools read it (rabbitmqadmin,
//! monitoring scripts): axum handlers, each a thin layer over the broker's public
//! functions, as LavinMQ's http/ controllers. Authentication is HTTP basic against the
//! node's users; what a caller may see and do follows its tags, as in RabbitMQ. The
//! same listener serves the web UI at `/`.

mod access;
mod auth;
mod connections;
mod error;
mod filter;
mod overview;
mod policies;
mod replicas;
mod resources;
mod stats;
mod topic_permissions;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, post};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::broker::BrokerState;
pub use error::ApiError;
pub use stats::{RateSampler, run_sampler};

/// What every handler gets: the broker, and facts about this node's listeners.
#[derive(Clone)]
pub struct Http {
    /// The node.
    pub broker: Arc<BrokerState>,
    /// Addresses the AMQP listeners are bound to (overview's `listeners`).
    pub amqp_addrs: Arc<Vec<SocketAddr>>,
    /// Message rates derived from the queues' counters.
    pub rates: Arc<RateSampler>,
    /// Raised by `warren ctl stop`: the process that runs the node waits on it beside
    /// SIGTERM and stops the node the same way.
    pub stop: Arc<tokio::sync::Notify>,
}

/// The web UI: one page with its script and styles inline (no external assets) that
/// drives this API from the browser. Like RabbitMQ's, it logs in from
/// `#/login/<user>/<password>` too.
const WEB_UI: &str = include_str!("ui.html");

async fn web_ui() -> axum::response::Html<&'static str> {
    axum::response::Html(WEB_UI)
}

/// The API's routes.
pub fn router(http: Http) -> Router {
    Router::new()
        .route("/", get(web_ui))
        .route("/index.html", get(web_ui))
        .route("/api/overview", get(overview::overview))
        .route("/api/nodes", get(overview::nodes))
        .route("/api/nodes/{node}", get(overview::node))
        .route("/api/nodes/{node}/stop", post(overview::stop_node))
        .route("/api/nodes/{node}/{action}", post(overview::maintenance))
        .route(
            "/api/cluster/nodes/{node}",
            axum::routing::delete(overview::forget_cluster_node),
        )
        .route(
            "/api/cluster/join",
            axum::routing::post(overview::join_cluster),
        )
        .route("/api/whoami", get(access::whoami))
        .route("/api/aliveness-test/{vhost}", get(overview::aliveness))
        .route("/api/health/checks/alarms", get(overview::alarms))
        .route("/api/health/checks/local-alarms", get(overview::alarms))
        .route(
            "/api/health/checks/virtual-hosts",
            get(overview::virtual_hosts),
        )
        .route("/api/vhosts", get(access::vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(access::vhost)
                .put(access::put_vhost)
                .delete(access::delete_vhost),
        )
        .route(
            "/api/vhosts/{vhost}/permissions",
            get(access::vhost_permissions),
        )
        .route("/api/users", get(access::users))
        .route(
            "/api/users/{user}",
            get(access::user)
                .put(access::put_user)
                .delete(access::delete_user),
        )
        .route(
            "/api/users/{user}/permissions",
            get(access::user_permissions),
        )
        .route("/api/permissions", get(access::permissions))
        .route("/api/policies", get(policies::all))
        .route("/api/policies/{vhost}", get(policies::of_vhost))
        .route(
            "/api/policies/{vhost}/{name}",
            get(policies::one)
                .put(policies::put)
                .delete(policies::delete),
        )
        .route("/api/topic-permissions", get(topic_permissions::all))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(topic_permissions::of_user_in_vhost)
                .put(topic_permissions::put)
                .delete(topic_permissions::delete),
        )
        .route(
            "/api/vhosts/{vhost}/topic-permissions",
            get(topic_permissions::of_vhost),
        )
        .route(
            "/api/users/{user}/topic-permissions",
            get(topic_permissions::of_user),
        )
        .route(
            "/api/permissions/{vhost}/{user}",
            get(access::permission)
                .put(access::put_permission)
                .delete(access::delete_permission),
        )
        .route("/api/exchanges", get(resources::exchanges))
        .route("/api/exchanges/{vhost}", get(resources::exchanges_in))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(resources::exchange)
                .put(resources::put_exchange)
                .delete(resources::delete_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            post(resources::publish),
        )
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/add",
            post(replicas::add),
        )
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/delete",
            delete(replicas::delete),
        )
        .route(
            "/api/queues/quorum/{vhost}/{name}/leader",
            post(replicas::transfer_leadership),
        )
        .route("/api/rebalance/queues", post(replicas::rebalance))
        .route(
            "/api/queues/quorum/replicas/on/{node}/grow",
            post(replicas::grow),
        )
        .route(
            "/api/queues/quorum/replicas/on/{node}/shrink",
            delete(replicas::shrink),
        )
        .route("/api/queues", get(resources::queues))
        .route("/api/queues/{vhost}", get(resources::queues_in))
        .route(
            "/api/queues/{vhost}/{name}",
            get(resources::queue)
                .put(resources::put_queue)
                .delete(resources::delete_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            delete(resources::purge),
        )
        .route(
            "/api/queues/{vhost}/{name}/get",
            post(resources::get_messages),
        )
        .route("/api/bindings", get(resources::bindings))
        .route("/api/bindings/{vhost}", get(resources::bindings_in))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}",
            get(resources::bindings_between).post(resources::add_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(resources::binding).delete(resources::delete_binding),
        )
        .route("/api/connections", get(connections::list))
        .route("/api/channels", get(connections::channels))
        .route("/api/consumers", get(connections::consumers))
        .route("/api/consumers/{vhost}", get(connections::consumers_in))
        .route(
            "/api/connections/{name}",
            get(connections::one).delete(connections::close),
        )
        .route(
            "/api/definitions",
            get(overview::export).post(overview::import),
        )
        .route(
            "/api/definitions/{vhost}",
            get(overview::export_vhost).post(overview::import_vhost),
        )
        .fallback(|| async { ApiError::not_found() })
        .layer(axum::middleware::from_fn_with_state(
            http.clone(),
            caught_up_for_writes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            http.clone(),
            auth::loopback_guard,
        ))
        .with_state(http)
}

/// On a clustered node, a change (any method but GET and HEAD) waits until this node has
/// applied every definition change committed before it: a user, vhost or queue that
/// another node has just answered for is then found here too (read-your-writes across
/// nodes, as a change made through node 1 and then used through node 3 expects). A
/// node that cannot reach a metadata majority answers 503 instead. Membership and node
/// commands (`/api/cluster/...`, `/api/nodes/...`) do not wait.
async fn caught_up_for_writes(
    axum::extract::State(http): axum::extract::State<Http>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let reads = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    // (Membership and node commands are what mends a cluster without a majority.)
    let path = request.uri().path();
    let mends = path.starts_with("/api/cluster/") || path.starts_with("/api/nodes/");
    if !reads
        && !mends
        && let Some(link) = http.broker.cluster_link()
        && link.caught_up().await.is_err()
    {
        return ApiError::unavailable("the metadata store operation timed out").into_response();
    }
    next.run(request).await
}

/// The client's address, as the loopback rule needs it (for plain and TLS listeners).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// An HTTPS listener: TCP accept, then the TLS handshake (bounded in time, so that a
/// client that never finishes it cannot hold the listener for long).
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    /// TLS over `tcp` with `config`.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("management accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handshake = self.acceptor.accept(stream);
            match tokio::time::timeout(std::time::Duration::from_secs(5), handshake).await {
                Ok(Ok(tls)) => return (tls, peer),
                Ok(Err(e)) => tracing::debug!(%peer, "management TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "management TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Serves the API on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, http: Http, mut stop: broadcast::Receiver<()>) {
    let app = router(http).into_make_service_with_connect_info::<Peer>();
    let shutdown = async move {
        let _ = stop.recv().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("management listener stopped: {e}");
    }
}

/// Serves the API over HTTPS on `listener` until `stop` fires.
pub async fn serve_tls(listener: TlsListener, http: Http, mut stop: broadcast::Receiver<()>) {
    let app = router(http).into_make_service_with_connect_info::<Peer>();
    let shutdown = async move {
        let _ = stop.recv().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("management TLS listener stopped: {e}");
    }
}

/// The node's name as the API shows it (`warren@host`, as RabbitMQ's `rabbit@host`).
pub fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("warren@{host}")
}
