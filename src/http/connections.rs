//! Connections: list, show, close (320 CONNECTION_FORCED with the operator's reason).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::auth::{Caller, caller};
use super::overview::ListQuery;
use super::{ApiError, Http, filter, node_name};
use crate::broker::ConnectionEntry;
use crate::protocol::reply::amqp_err;

fn connection_json(c: &ConnectionEntry) -> Value {
    json!({
        "name": c.name(),
        "node": node_name(),
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "state": "running",
        "user": c.user,
        "vhost": c.vhost,
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "host": c.local.ip().to_string(),
        "port": c.local.port(),
        "channels": c.channel_count(),
        "connected_at": c.connected_at_ms,
        "ssl": false,
    })
}

fn visible(http: &Http, who: &Caller) -> Vec<ConnectionEntry> {
    http.broker
        .connections()
        .into_iter()
        .filter(|c| who.sees_everything() || c.user == who.name)
        .collect()
}

/// GET /api/connections.
pub async fn list(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let list = visible(&http, &who).iter().map(connection_json).collect();
    Ok(Json(filter::apply(list, &query)))
}

/// GET /api/connections/{name}.
pub async fn one(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    visible(&http, &who)
        .iter()
        .find(|c| c.name() == name)
        .map(|c| Json(connection_json(c)))
        .ok_or_else(ApiError::not_found)
}

/// DELETE /api/connections/{name}: closes it with 320 CONNECTION_FORCED and the
/// `X-Reason` header's text (RabbitMQ's default: "Closed via management plugin").
pub async fn close(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    if !visible(&http, &who).iter().any(|c| c.name() == name) {
        return Err(ApiError::not_found());
    }
    if !who.is_admin()
        && !visible(&http, &who)
            .iter()
            .any(|c| c.name() == name && c.user == who.name)
    {
        return Err(ApiError::not_authorised("Not administrator user"));
    }
    let reason = headers
        .get("x-reason")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("Closed via management plugin")
        .to_string();
    http.broker.close_connections(
        |c| c.name() == name,
        &amqp_err!(ConnectionForced, "{}", reason),
    );
    Ok(StatusCode::NO_CONTENT)
}
