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
        "ssl": c.tls,
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

/// (connection id, channel) -> consumers on it, over the vhosts the caller sees.
fn consumer_counts(http: &Http, who: &Caller) -> std::collections::HashMap<(u64, u16), usize> {
    let mut counts = std::collections::HashMap::new();
    for v in http.broker.vhost_list() {
        if !who.may_see(&http.broker, &v.name) {
            continue;
        }
        for q in v.queues() {
            for c in q.consumers() {
                if let Some(key) = c.channel {
                    *counts.entry(key).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

fn channel_details(c: &ConnectionEntry, number: u16) -> Value {
    json!({
        "name": format!("{} ({number})", c.name()),
        "number": number,
        "connection_name": c.name(),
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "user": c.user,
    })
}

/// GET /api/channels.
pub async fn channels(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let counts = consumer_counts(&http, &who);
    let mut list = Vec::new();
    for c in visible(&http, &who) {
        for n in c.channel_numbers() {
            list.push(json!({
                "name": format!("{} ({n})", c.name()),
                "number": n,
                "node": node_name(),
                "user": c.user,
                "vhost": c.vhost,
                "state": "running",
                "consumer_count": counts.get(&(c.id, n)).copied().unwrap_or(0),
                "connection_details": {
                    "name": c.name(),
                    "peer_host": c.peer.ip().to_string(),
                    "peer_port": c.peer.port(),
                },
            }));
        }
    }
    Ok(Json(filter::apply(list, &query)))
}

fn list_consumers(
    http: &Http,
    who: &Caller,
    vhost: Option<&str>,
    query: &ListQuery,
) -> Result<Json<Value>, ApiError> {
    if let Some(name) = vhost {
        who.require_vhost(&http.broker, name)?;
    }
    let connections: std::collections::HashMap<u64, ConnectionEntry> = http
        .broker
        .connections()
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    let mut list = Vec::new();
    for v in http.broker.vhost_list() {
        if vhost.is_some_and(|name| name != v.name) || !who.may_see(&http.broker, &v.name) {
            continue;
        }
        let mut queues = v.queues();
        queues.sort_by(|a, b| a.name().cmp(b.name()));
        for q in queues {
            for c in q.consumers() {
                let details = c
                    .channel
                    .and_then(|(id, n)| connections.get(&id).map(|conn| channel_details(conn, n)))
                    .unwrap_or(Value::Null);
                list.push(json!({
                    "consumer_tag": c.tag.as_ref(),
                    "queue": {"name": q.name(), "vhost": v.name},
                    "channel_details": details,
                    "ack_required": c.ack_required,
                    "exclusive": c.exclusive,
                    "prefetch_count": c.prefetch,
                    "active": true,
                    "activity_status": "up",
                    "arguments": {},
                }));
            }
        }
    }
    Ok(Json(filter::apply(list, query)))
}

/// GET /api/consumers.
pub async fn consumers(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    list_consumers(&http, &who, None, &query)
}

/// GET /api/consumers/{vhost}.
pub async fn consumers_in(
    State(http): State<Http>,
    axum::extract::Path(vhost): axum::extract::Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    list_consumers(&http, &who, Some(&vhost), &query)
}
