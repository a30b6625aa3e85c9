//! Exchanges, queues and bindings: listings with counts and message stats, declare and
//! delete, purge, get and publish through the API. Every operation is also checked
//! against the caller's AMQP permissions, as RabbitMQ's API acts as the user.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use super::access::body_json;
use super::auth::{Caller, caller};
use super::overview::ListQuery;
use super::{ApiError, Http, filter, node_name};
use crate::auth::{Permission, ResourceKind};
use crate::broker::definitions::{BROKER_CONN, binding_json, properties_key};
use crate::broker::json::{json_to_table, table_to_json};
use crate::broker::{ExchangeDef, ExchangeKind, VHost};
use crate::protocol::codec::encode;
use crate::queue::{Message, Queue, QueueDef};

/// The API's name for the default exchange.
const DEFAULT_EXCHANGE: &str = "amq.default";

fn exchange_name(api_name: &str) -> &str {
    if api_name == DEFAULT_EXCHANGE {
        ""
    } else {
        api_name
    }
}

/// The vhosts a listing covers: one (checked) or every one the caller may see.
fn scope(http: &Http, who: &Caller, vhost: Option<&str>) -> Result<Vec<Arc<VHost>>, ApiError> {
    match vhost {
        Some(name) => {
            who.require_vhost(&http.broker, name)?;
            Ok(http.broker.vhost(name).into_iter().collect())
        }
        None => Ok(http
            .broker
            .vhost_list()
            .into_iter()
            .filter(|v| who.may_see(&http.broker, &v.name))
            .collect()),
    }
}

fn vhost_for(http: &Http, who: &Caller, name: &str) -> Result<Arc<VHost>, ApiError> {
    who.require_vhost(&http.broker, name)?;
    http.broker.vhost(name).ok_or_else(ApiError::not_found)
}

fn exchange_json(vhost: &str, d: &ExchangeDef) -> Value {
    json!({
        "name": if d.name.is_empty() { "" } else { d.name.as_str() },
        "vhost": vhost,
        "type": d.kind.as_str(),
        "durable": d.durable,
        "auto_delete": d.auto_delete,
        "internal": d.internal,
        "arguments": table_to_json(&d.arguments),
        "user_who_performed_action": "",
    })
}

fn list_exchanges(
    http: &Http,
    who: &Caller,
    vhost: Option<&str>,
    query: &ListQuery,
) -> Result<Json<Value>, ApiError> {
    let mut list = Vec::new();
    for v in scope(http, who, vhost)? {
        let mut xs = v.exchanges();
        xs.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        list.extend(xs.iter().map(|x| exchange_json(&v.name, &x.def)));
    }
    Ok(Json(filter::apply(list, query)))
}

/// GET /api/exchanges.
pub async fn exchanges(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    list_exchanges(&http, &who, None, &query)
}

/// GET /api/exchanges/{vhost}.
pub async fn exchanges_in(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    list_exchanges(&http, &who, Some(&vhost), &query)
}

/// GET /api/exchanges/{vhost}/{name}.
pub async fn exchange(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let x = v.exchange(exchange_name(&name))?;
    Ok(Json(exchange_json(&v.name, &x.def)))
}

/// PUT /api/exchanges/{vhost}/{name}: `type`, `durable` (default true), `auto_delete`,
/// `internal`, `arguments`.
pub async fn put_exchange(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let b = body_json(&body)?;
    let kind_name = b["type"].as_str().unwrap_or("direct");
    let kind = ExchangeKind::parse(kind_name)
        .ok_or_else(|| ApiError::bad_request(format!("invalid exchange type '{kind_name}'")))?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Exchange,
        &name,
        Permission::Configure,
    )?;
    let existed = v.exchange(&name).is_ok();
    let def = ExchangeDef {
        name,
        kind,
        durable: flag(&b, "durable", true)?,
        auto_delete: flag(&b, "auto_delete", false)?,
        internal: flag(&b, "internal", false)?,
        arguments: json_to_table(&b["arguments"]),
    };
    v.declare_exchange(def, false)?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

/// A boolean field of a request body; RabbitMQ's 400 text for a non-boolean.
fn flag(b: &Value, key: &str, default: bool) -> Result<bool, ApiError> {
    match &b[key] {
        Value::Null => Ok(default),
        Value::Bool(v) => Ok(*v),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        other => Err(ApiError::bad_request(format!("[\"not_boolean\",{other}]"))),
    }
}

/// DELETE /api/exchanges/{vhost}/{name} (`?if-unused=true` as exchange.delete).
pub async fn delete_exchange(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    v.exchange(&name)?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Exchange,
        &name,
        Permission::Configure,
    )?;
    v.delete_exchange(&name, q.get("if-unused").is_some_and(|s| s == "true"))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Builds a message the broker publishes itself (API publish, aliveness test).
pub fn message(
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
    body: bytes::Bytes,
) -> Message {
    Message {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        raw_properties: encode::properties(&properties),
        properties,
        body,
        store_id: None,
        published_ms: crate::queue::now_ms(),
    }
}

/// Message properties from the API's JSON (`delivery_mode`, `headers`, ...).
fn properties_from_json(p: &Value) -> BasicProperties {
    let mut props = BasicProperties::default();
    let text = |k: &str| p[k].as_str().map(|s| s.into());
    if let Some(v) = text("content_type") {
        props = props.with_content_type(v);
    }
    if let Some(v) = text("content_encoding") {
        props = props.with_content_encoding(v);
    }
    if p["headers"].is_object() {
        props = props.with_headers(json_to_table(&p["headers"]));
    }
    let number = |k: &str| {
        p[k].as_u64()
            .or_else(|| p[k].as_str().and_then(|s| s.parse().ok()))
    };
    if let Some(v) = number("delivery_mode") {
        props = props.with_delivery_mode(v.min(255) as u8);
    }
    if let Some(v) = number("priority") {
        props = props.with_priority(v.min(255) as u8);
    }
    if let Some(v) = text("correlation_id") {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = text("reply_to") {
        props = props.with_reply_to(v);
    }
    if let Some(v) = text("expiration") {
        props = props.with_expiration(v);
    }
    if let Some(v) = text("message_id") {
        props = props.with_message_id(v);
    }
    if let Some(v) = number("timestamp") {
        props = props.with_timestamp(v);
    }
    if let Some(v) = text("type") {
        props = props.with_type(v);
    }
    if let Some(v) = text("user_id") {
        props = props.with_user_id(v);
    }
    if let Some(v) = text("app_id") {
        props = props.with_app_id(v);
    }
    props
}

fn properties_to_json(p: &BasicProperties) -> Value {
    let mut out = serde_json::Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            out.insert(k.into(), v);
        }
    };
    put(
        "content_type",
        p.content_type().as_ref().map(|v| json!(v.as_str())),
    );
    put(
        "content_encoding",
        p.content_encoding().as_ref().map(|v| json!(v.as_str())),
    );
    put("headers", p.headers().as_ref().map(table_to_json));
    put("delivery_mode", p.delivery_mode().map(|v| json!(v)));
    put("priority", p.priority().map(|v| json!(v)));
    put(
        "correlation_id",
        p.correlation_id().as_ref().map(|v| json!(v.as_str())),
    );
    put("reply_to", p.reply_to().as_ref().map(|v| json!(v.as_str())));
    put(
        "expiration",
        p.expiration().as_ref().map(|v| json!(v.as_str())),
    );
    put(
        "message_id",
        p.message_id().as_ref().map(|v| json!(v.as_str())),
    );
    put("timestamp", p.timestamp().map(|v| json!(v)));
    put("type", p.kind().as_ref().map(|v| json!(v.as_str())));
    put("user_id", p.user_id().as_ref().map(|v| json!(v.as_str())));
    put("app_id", p.app_id().as_ref().map(|v| json!(v.as_str())));
    Value::Object(out)
}

/// POST /api/exchanges/{vhost}/{name}/publish: `routing_key`, `payload`,
/// `payload_encoding` ("string" or "base64"), `properties`. Answers `{"routed": bool}`.
pub async fn publish(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let b = body_json(&body)?;
    let exchange = exchange_name(&name);
    let payload = b["payload"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("payload missing"))?;
    let payload = match b["payload_encoding"].as_str().unwrap_or("string") {
        "string" => bytes::Bytes::from(payload.as_bytes().to_vec()),
        "base64" => bytes::Bytes::from(
            BASE64
                .decode(payload)
                .map_err(|_| ApiError::bad_request("payload is not valid base64"))?,
        ),
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown payload_encoding '{other}'"
            )));
        }
    };
    let routing_key = b["routing_key"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("routing_key missing"))?;
    v.exchange(exchange)?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Exchange,
        exchange,
        Permission::Write,
    )?;
    // As RabbitMQ's direct channel: topic authorisation of the routing key.
    if !exchange.is_empty() && v.exchange(exchange)?.def.kind == crate::broker::ExchangeKind::Topic
    {
        http.broker
            .access
            .check_topic(&who.name, &vhost, exchange, routing_key, true)?;
    }
    let mut props = properties_from_json(&b["properties"]);
    if let Some(mode) = b["delivery_mode"].as_str().and_then(|m| m.parse().ok()) {
        props = props.with_delivery_mode(mode);
    }
    let mut msg = message(exchange, routing_key, props, payload);
    if msg.is_persistent() {
        msg.store_id = Some(http.broker.next_msg_id());
    }
    let routed = v.publish(msg).await?;
    // As RabbitMQ's API publish (mandatory, confirmed, on its direct channel) counts:
    // publish and confirm, and return_unroutable when nothing took it.
    http.broker
        .count_direct([1, 1, u64::from(!routed), 0, 0, 0, 0, 0, 0, 0]);
    Ok(Json(json!({"routed": routed})))
}

fn queue_json(http: &Http, vhost: &str, q: &Queue) -> Value {
    let s = q.snapshot();
    let mut v = json!({
        "name": q.name(),
        "vhost": vhost,
        "node": node_name(),
        "type": "classic",
        "state": "running",
        "durable": q.def.durable,
        "auto_delete": q.def.auto_delete,
        "exclusive": q.def.exclusive_owner.is_some(),
        "arguments": table_to_json(&q.def.arguments),
        "policy": null,
        "exclusive_consumer_tag": null,
        "consumers": s.consumers,
        "messages": s.ready + s.unacked,
        "messages_ready": s.ready,
        "messages_unacknowledged": s.unacked,
        "message_bytes_ready": s.ready_bytes,
        // As RabbitMQ's fields of the same names (for ready messages): bodies in memory,
        // and messages (and their bytes) whose body is in the store only.
        "message_bytes_ram": s.ready_bytes_in_memory,
        "messages_paged_out": s.ready_paged,
        "message_bytes_paged_out": s.ready_bytes.saturating_sub(s.ready_bytes_in_memory),
        "memory": s.memory,
        "message_stats": http.rates.queue_stats(vhost, q.name(), &s.counters),
    });
    if q.is_replicated() {
        // As RabbitMQ lists a replicated queue: its leader (also its "node") and members.
        let leader = http
            .broker
            .vhost(vhost)
            .and_then(|v| v.remote_home(q.name()))
            .or_else(|| http.broker.cluster_link().map(|l| l.node.clone()))
            .unwrap_or_else(node_name);
        let members = q.members();
        if crate::broker::vhost::is_quorum(&q.def) {
            v["type"] = json!("quorum");
            // Dead letters held until their targets take them (at-least-once).
            v["messages_dlx"] = json!(s.dead_letters.0);
            v["message_bytes_dlx"] = json!(s.dead_letters.1);
        } else {
            // A classic queue replicated by a mirroring policy, as RabbitMQ lists a
            // mirrored queue: its mirrors beside the leader (its "master").
            let mirrors: Vec<&String> = members.iter().filter(|m| **m != leader).collect();
            v["slave_nodes"] = json!(mirrors);
        }
        v["node"] = json!(leader);
        v["leader"] = json!(leader);
        v["members"] = json!(members);
    }
    v
}

async fn list_queues(
    http: &Http,
    who: &Caller,
    vhost: Option<&str>,
    query: &ListQuery,
) -> Result<Json<Value>, ApiError> {
    let mut list = Vec::new();
    for v in scope(http, who, vhost)? {
        let mut qs = v.queues();
        qs.sort_by(|a, b| a.name().cmp(b.name()));
        list.extend(qs.iter().map(|q| queue_json(http, &v.name, q)));
    }
    with_host_figures(http, &mut list).await;
    Ok(Json(filter::apply(list, query)))
}

/// A queue hosted on another node (a classic queue's home, a replicated queue's
/// leader) has no messages here: its figures are asked of its host (all at once), as
/// RabbitMQ lists a queue's figures from its leader. A host that does not answer leaves
/// this node's (empty) figures.
async fn with_host_figures(http: &Http, list: &mut [Value]) {
    use crate::broker::remote_consume::Answer;
    let Some(link) = http.broker.cluster_link() else {
        return;
    };
    let mut asked = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let (Some(vhost), Some(name)) = (v["vhost"].as_str(), v["name"].as_str()) else {
            continue;
        };
        if let Some(host) = http.broker.vhost(vhost).and_then(|vh| vh.remote_home(name)) {
            asked.push((i, link.proxies.stats(&host, vhost, name)));
        }
    }
    let (places, answers): (Vec<usize>, Vec<_>) = asked.into_iter().unzip();
    let answers = futures_util::future::join_all(
        answers
            .into_iter()
            .map(|a| tokio::time::timeout(std::time::Duration::from_secs(5), a)),
    )
    .await;
    for (i, answer) in places.into_iter().zip(answers) {
        if let Ok(Ok(Answer::Stats {
            ready,
            unacked,
            ready_bytes,
            consumers,
            memory,
            dead_letters,
        })) = answer
        {
            let v = &mut list[i];
            if v.get("messages_dlx").is_some() {
                v["messages_dlx"] = json!(dead_letters.0);
                v["message_bytes_dlx"] = json!(dead_letters.1);
            }
            v["messages"] = json!(ready + unacked);
            v["messages_ready"] = json!(ready);
            v["messages_unacknowledged"] = json!(unacked);
            v["message_bytes_ready"] = json!(ready_bytes);
            v["consumers"] = json!(consumers);
            v["memory"] = json!(memory);
        }
    }
}

/// GET /api/queues.
pub async fn queues(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    list_queues(&http, &who, None, &query).await
}

/// GET /api/queues/{vhost}.
pub async fn queues_in(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    list_queues(&http, &who, Some(&vhost), &query).await
}

fn find_queue(v: &VHost, name: &str) -> Result<Arc<Queue>, ApiError> {
    v.find_queue(name).ok_or_else(ApiError::not_found)
}

/// GET /api/queues/{vhost}/{name}.
pub async fn queue(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let q = find_queue(&v, &name)?;
    let mut one = [queue_json(&http, &v.name, &q)];
    with_host_figures(&http, &mut one).await;
    let [json] = one;
    Ok(Json(json))
}

/// PUT /api/queues/{vhost}/{name}: `durable` (default true), `auto_delete`, `arguments`.
pub async fn put_queue(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let b = body_json(&body)?;
    let def = QueueDef {
        name: name.clone(),
        durable: flag(&b, "durable", true)?,
        exclusive_owner: None,
        auto_delete: flag(&b, "auto_delete", false)?,
        arguments: json_to_table(&b["arguments"]),
    };
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Queue,
        &name,
        Permission::Configure,
    )?;
    let (_, created) = v.declare_queue(def, false, false, BROKER_CONN)?;
    Ok(if created {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    })
}

/// DELETE /api/queues/{vhost}/{name} (`?if-unused=true`, `?if-empty=true`).
pub async fn delete_queue(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    find_queue(&v, &name)?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Queue,
        &name,
        Permission::Configure,
    )?;
    let yes = |k: &str| q.get(k).is_some_and(|s| s == "true");
    v.delete_queue(&name, yes("if-unused"), yes("if-empty"), BROKER_CONN)?;
    Ok(StatusCode::NO_CONTENT)
}

/// DELETE /api/queues/{vhost}/{name}/contents: purge.
pub async fn purge(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let q = find_queue(&v, &name)?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Queue,
        &name,
        Permission::Read,
    )?;
    q.purge();
    Ok(StatusCode::NO_CONTENT)
}

/// POST /api/queues/{vhost}/{name}/get: `count`, `ackmode` (ack_requeue_true,
/// ack_requeue_false, reject_requeue_true, reject_requeue_false), `encoding` (auto or
/// base64), `truncate`.
pub async fn get_messages(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let b = body_json(&body)?;
    let q = find_queue(&v, &name)?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Queue,
        &name,
        Permission::Read,
    )?;
    let count = b["count"]
        .as_u64()
        .or_else(|| b["count"].as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(1);
    let ackmode = b["ackmode"].as_str().unwrap_or("ack_requeue_true");
    if !matches!(
        ackmode,
        "ack_requeue_true" | "ack_requeue_false" | "reject_requeue_true" | "reject_requeue_false"
    ) {
        return Err(ApiError::bad_request(format!(
            "invalid ackmode '{ackmode}'"
        )));
    }
    let base64 = b["encoding"].as_str() == Some("base64");
    let truncate = b["truncate"].as_u64().map(|t| t as usize);
    let mut got = Vec::new();
    let mut offsets = Vec::new();
    for _ in 0..count {
        let Some((entry, left)) = q.get(false) else {
            break;
        };
        offsets.push(entry.offset);
        let body = &entry.msg.body;
        let shown = &body[..truncate.map_or(body.len(), |t| t.min(body.len()))];
        let (payload, encoding) = match std::str::from_utf8(shown) {
            Ok(text) if !base64 => (json!(text), "string"),
            _ => (json!(BASE64.encode(shown)), "base64"),
        };
        got.push(json!({
            "payload_bytes": body.len(),
            "redelivered": entry.redelivered,
            "exchange": entry.msg.exchange,
            "routing_key": entry.msg.routing_key,
            "message_count": left,
            "properties": properties_to_json(&entry.msg.properties),
            "payload": payload,
            "payload_encoding": encoding,
        }));
    }
    // As RabbitMQ's API get (basic.get on its direct channel) counts: get, or
    // get_no_ack for ack_requeue_false, and redeliver.
    let n = got.len() as u64;
    let redelivered = got.iter().filter(|g| g["redelivered"] == true).count() as u64;
    let (get_ack, get_no_ack) = if ackmode == "ack_requeue_false" {
        (0, n)
    } else {
        (n, 0)
    };
    http.broker
        .count_direct([0, 0, 0, 0, 0, 0, get_ack, get_no_ack, redelivered, 0]);
    match ackmode {
        "ack_requeue_false" => q.settle(&offsets, None),
        "reject_requeue_false" => q.reject(&offsets),
        _ => q.requeue(&offsets),
    }
    Ok(Json(Value::Array(got)))
}

/// Every binding of a vhost, the default exchange's implicit ones included.
fn vhost_bindings(v: &VHost) -> Vec<Value> {
    let mut out = Vec::new();
    let mut qs = v.queues();
    qs.sort_by(|a, b| a.name().cmp(b.name()));
    for q in &qs {
        out.push(json!({
            "source": "", "vhost": v.name, "destination": q.name(),
            "destination_type": "queue", "routing_key": q.name(), "arguments": {},
            "properties_key": properties_key(q.name(), &Default::default()),
        }));
    }
    let mut xs = v.exchanges();
    xs.sort_by(|a, b| a.def.name.cmp(&b.def.name));
    for x in xs.iter().filter(|x| !x.def.name.is_empty()) {
        for b in x.bindings() {
            out.push(binding_json(&v.name, &x.def.name, &b));
        }
    }
    out
}

/// GET /api/bindings.
pub async fn bindings(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let list = scope(&http, &who, None)?
        .iter()
        .flat_map(|v| vhost_bindings(v))
        .collect();
    Ok(Json(filter::apply(list, &query)))
}

/// GET /api/bindings/{vhost}.
pub async fn bindings_in(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let list = scope(&http, &who, Some(&vhost))?
        .iter()
        .flat_map(|v| vhost_bindings(v))
        .collect();
    Ok(Json(filter::apply(list, &query)))
}

fn destination_type(kind: &str) -> Result<&'static str, ApiError> {
    match kind {
        "q" => Ok("queue"),
        "e" => Ok("exchange"),
        _ => Err(ApiError::not_found()),
    }
}

fn between(v: &VHost, source: &str, kind: &str, destination: &str) -> Result<Vec<Value>, ApiError> {
    let kind = destination_type(kind)?;
    Ok(vhost_bindings(v)
        .into_iter()
        .filter(|b| {
            b["source"] == source
                && b["destination"] == destination
                && b["destination_type"] == kind
        })
        .collect())
}

/// GET /api/bindings/{vhost}/e/{source}/{q|e}/{destination}.
pub async fn bindings_between(
    State(http): State<Http>,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    Ok(Json(Value::Array(between(
        &v,
        exchange_name(&source),
        &kind,
        &destination,
    )?)))
}

/// GET /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{props}.
pub async fn binding(
    State(http): State<Http>,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    between(&v, exchange_name(&source), &kind, &destination)?
        .into_iter()
        .find(|b| b["properties_key"] == props.as_str())
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

/// POST /api/bindings/{vhost}/e/{source}/{q|e}/{destination}: `routing_key`,
/// `arguments`. 201 with the new binding's location.
pub async fn add_binding(
    State(http): State<Http>,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, HeaderMap), ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let b = body_json(&body)?;
    let key = b["routing_key"].as_str().unwrap_or_default().to_string();
    let args = json_to_table(&b["arguments"]);
    let props = properties_key(&key, &args);
    let source = exchange_name(&source);
    let dest_kind = match destination_type(&kind)? {
        "queue" => ResourceKind::Queue,
        _ => ResourceKind::Exchange,
    };
    who.require(
        &http.broker,
        &vhost,
        dest_kind,
        &destination,
        Permission::Write,
    )?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Exchange,
        source,
        Permission::Read,
    )?;
    match dest_kind {
        ResourceKind::Queue => v.bind_queue(&destination, source, &key, args, BROKER_CONN)?,
        ResourceKind::Exchange => v.bind_exchange(&destination, source, &key, args)?,
    }
    let mut out = HeaderMap::new();
    if let Ok(location) = props.parse() {
        out.insert(axum::http::header::LOCATION, location);
    }
    Ok((StatusCode::CREATED, out))
}

/// DELETE /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{props}.
pub async fn delete_binding(
    State(http): State<Http>,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = vhost_for(&http, &who, &vhost)?;
    let source = exchange_name(&source);
    let found = between(&v, source, &kind, &destination)?
        .into_iter()
        .find(|b| b["properties_key"] == props.as_str())
        .ok_or_else(ApiError::not_found)?;
    let key = found["routing_key"].as_str().unwrap_or_default();
    let args = json_to_table(&found["arguments"]);
    let dest_kind = match destination_type(&kind)? {
        "queue" => ResourceKind::Queue,
        _ => ResourceKind::Exchange,
    };
    who.require(
        &http.broker,
        &vhost,
        dest_kind,
        &destination,
        Permission::Write,
    )?;
    who.require(
        &http.broker,
        &vhost,
        ResourceKind::Exchange,
        source,
        Permission::Read,
    )?;
    match dest_kind {
        ResourceKind::Queue => v.unbind_queue(&destination, source, key, &args, BROKER_CONN)?,
        ResourceKind::Exchange => v.unbind_exchange(&destination, source, key, &args)?,
    }
    Ok(StatusCode::NO_CONTENT)
}
