//! Node-wide endpoints: overview, nodes, health checks, aliveness test, definitions.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::caller;
use super::{ApiError, Http, node_name};
use crate::broker::definitions::{self, BROKER_CONN, RABBITMQ_VERSION};
use crate::queue::QueueDef;

/// GET /api/overview: versions, listeners, object and message totals.
pub async fn overview(
    State(http): State<Http>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let b = &http.broker;
    let visible: Vec<_> = b
        .vhost_list()
        .into_iter()
        .filter(|v| who.may_see(b, &v.name))
        .collect();
    let (mut queues, mut exchanges, mut consumers) = (0u64, 0u64, 0u64);
    let (mut ready, mut unacked) = (0u64, 0u64);
    for v in &visible {
        exchanges += v.exchanges().len() as u64;
        for q in v.queues() {
            let s = q.snapshot();
            queues += 1;
            consumers += s.consumers;
            ready += s.ready;
            unacked += s.unacked;
        }
    }
    let connections: Vec<_> = b
        .connections()
        .into_iter()
        .filter(|c| who.sees_everything() || c.user == who.name)
        .collect();
    let channels: usize = connections.iter().map(|c| c.channel_count()).sum();
    let node = node_name();
    let listeners: Vec<Value> = http
        .amqp_addrs
        .iter()
        .map(|a| json!({"node": node, "protocol": "amqp", "ip_address": a.ip().to_string(), "port": a.port()}))
        .collect();
    Ok(Json(json!({
        "management_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "cluster_name": node,
        "node": node,
        "erlang_version": "none (Warren is written in Rust)",
        "message_stats": super::stats::node_stats(b, &http.rates),
        "queue_totals": {
            "messages": ready + unacked,
            "messages_ready": ready,
            "messages_unacknowledged": unacked,
        },
        "object_totals": {
            "connections": connections.len(),
            "channels": channels,
            "exchanges": exchanges,
            "queues": queues,
            "consumers": consumers,
        },
        "listeners": listeners,
        "contexts": [],
    })))
}

fn node_json() -> Value {
    let memory = crate::broker::memory::resident_bytes().unwrap_or(0);
    json!({
        "name": node_name(),
        "type": "disc",
        "running": true,
        "mem_used": memory,
        "uptime": 0,
        "processors": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// GET /api/nodes: this node, or on a clustered node every member, `running` when this
/// node has a link to it (as RabbitMQ lists the nodes it sees). The local entry also
/// names the metadata group's leader as this node knows it (`metadata_leader`, Warren's).
pub async fn nodes(State(http): State<Http>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_monitoring()?;
    let Some(link) = http.broker.cluster_link() else {
        return Ok(Json(json!([node_json()])));
    };
    let status = link.cluster.status();
    let mut list = Vec::new();
    for member in &status.members {
        if *member == status.node {
            let mut me = node_json();
            me["name"] = json!(member);
            me["metadata_leader"] = json!(status.metadata_leader);
            list.push(me);
        } else {
            let running = status
                .peers
                .iter()
                .any(|p| p.name == *member && p.connected);
            list.push(json!({"name": member, "type": "disc", "running": running}));
        }
    }
    Ok(Json(Value::Array(list)))
}

/// This node's cluster side, or 400 on a single node.
pub(super) fn clustered(
    http: &Http,
) -> Result<&crate::broker::cluster_defs::ClusterLink, ApiError> {
    http.broker
        .cluster_link()
        .ok_or_else(|| ApiError::bad_request("this node is not clustered"))
}

/// DELETE /api/cluster/nodes/{node} (Warren's; `warren ctl forget_cluster_node`): the
/// node stops being a cluster member.
pub async fn forget_cluster_node(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    link.cluster
        .forget(&name)
        .await
        .map_err(ApiError::bad_request)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// POST /api/cluster/join with `{"node": "<member>"}` (Warren's; `warren ctl
/// join_cluster`): this node becomes a member again through that member.
pub async fn join_cluster(
    State(http): State<Http>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    let via = body["node"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("the body names no \"node\""))?;
    link.cluster
        .join(via)
        .await
        .map_err(ApiError::bad_request)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// GET /api/nodes/{node}.
pub async fn node(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_monitoring()?;
    if name != node_name() {
        return Err(ApiError::not_found());
    }
    Ok(Json(node_json()))
}

/// POST /api/nodes/{node}/stop (administrators; Warren's own, for `warren ctl stop`):
/// asks the node to stop as SIGTERM does. The answer (202) goes out before the
/// listeners close; the caller then waits for the node to go away.
pub async fn stop_node(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if name != node_name() {
        return Err(ApiError::not_found());
    }
    tracing::info!("stop requested through the management API");
    http.stop.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"node": name, "stopping": true})),
    )
        .into_response())
}

/// POST /api/nodes/{node}/drain and /revive (administrators; Warren's own, for `warren
/// ctl drain` and `revive`, which RabbitMQ offers as `rabbitmq-upgrade`): puts the node
/// into maintenance mode and back.
pub async fn maintenance(
    State(http): State<Http>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if name != node_name() {
        return Err(ApiError::not_found());
    }
    match action.as_str() {
        "drain" => http.broker.drain().await,
        "revive" => http.broker.revive(),
        _ => return Err(ApiError::not_found()),
    }
    Ok(Json(json!({"node": name, "being_drained": http.broker.is_drained()})).into_response())
}

/// GET /api/health/checks/alarms (and local-alarms): 503 while a resource alarm is on.
pub async fn alarms(State(http): State<Http>, headers: HeaderMap) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?;
    let a = http.broker.alarms.current();
    if !a.any() {
        return Ok(Json(json!({"status": "ok"})).into_response());
    }
    let mut list = Vec::new();
    if a.memory {
        list.push(json!({"node": node_name(), "resource": "memory"}));
    }
    if a.disk {
        list.push(json!({"node": node_name(), "resource": "disk"}));
    }
    let body = json!({
        "status": "failed",
        "reason": "resource alarm(s) in effect in the cluster",
        "alarms": list,
    });
    Ok((StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response())
}

/// GET /api/health/checks/virtual-hosts: every vhost is running.
pub async fn virtual_hosts(
    State(http): State<Http>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?;
    Ok(Json(json!({"status": "ok"})))
}

/// GET /api/aliveness-test/{vhost}: declares the queue `aliveness-test`, publishes a
/// message to it and gets it back, as RabbitMQ does.
pub async fn aliveness(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    who.require_vhost(&http.broker, &vhost)?;
    let v = http.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let def = QueueDef {
        name: "aliveness-test".into(),
        durable: false,
        exclusive_owner: None,
        auto_delete: false,
        arguments: Default::default(),
    };
    let (q, _) = v.declare_queue(def, false, false, BROKER_CONN)?;
    q.purge();
    let body = bytes::Bytes::from_static(b"test_message");
    let msg = super::resources::message("", "aliveness-test", Default::default(), body);
    v.publish(msg).await?;
    match q.get(true) {
        Some((entry, _)) if &entry.msg.body[..] == b"test_message" => {
            Ok(Json(json!({"status": "ok"})))
        }
        _ => Ok(Json(
            json!({"status": "failed", "reason": "the test message did not come back"}),
        )),
    }
}

/// GET /api/definitions: everything, in RabbitMQ's format.
pub async fn export(State(http): State<Http>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    Ok(Json(definitions::export(&http.broker, None)))
}

/// GET /api/definitions/{vhost}: one vhost's exchanges, queues and bindings.
pub async fn export_vhost(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if http.broker.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    Ok(Json(definitions::export(&http.broker, Some(&vhost))))
}

async fn import_into(
    http: &Http,
    body: &[u8],
    vhost: Option<&str>,
) -> Result<StatusCode, ApiError> {
    let defs: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    definitions::import(&http.broker, &defs, vhost)
        .await
        .map_err(ApiError::bad_request)?;
    Ok(StatusCode::NO_CONTENT)
}

/// POST /api/definitions: creates what the file names.
pub async fn import(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    import_into(&http, &body, None).await
}

/// POST /api/definitions/{vhost}: imports exchanges, queues and bindings into a vhost.
pub async fn import_vhost(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if http.broker.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    import_into(&http, &body, Some(&vhost)).await
}

/// Unused query parameters are accepted, as RabbitMQ ignores unknown ones.
pub type ListQuery = Query<HashMap<String, String>>;
