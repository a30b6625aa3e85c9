//! A replicated queue's members through the management API, on RabbitMQ's routes for
//! quorum queue replicas (what `rabbitmq-queues add_member`, `delete_member`, `grow` and
//! `shrink` do; `warren ctl` calls these): thin handlers over [`ClusterLink`]'s member
//! changes, which go through the metadata group.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use regex::Regex;
use serde_json::{Value, json};

use super::auth::caller;
use super::overview::clustered;
use super::{ApiError, Http};
use crate::broker::cluster_defs::MembersError;

fn answer(result: Result<(), MembersError>) -> Result<Response, ApiError> {
    match result {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(MembersError::NotFound) => Err(ApiError::not_found()),
        Err(MembersError::Refused(why)) => Err(ApiError::bad_request(why)),
        Err(MembersError::NotCommitted) => {
            Err(ApiError::internal("the metadata store operation timed out"))
        }
    }
}

/// The `node` a request body names.
fn node_of(body: &Value) -> Result<&str, ApiError> {
    body["node"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("the body names no \"node\""))
}

/// POST /api/queues/quorum/{vhost}/{name}/replicas/add with `{"node": NODE}`.
pub async fn add(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    answer(link.add_member(&vhost, &name, node_of(&body)?).await)
}

/// DELETE /api/queues/quorum/{vhost}/{name}/replicas/delete with `{"node": NODE}`.
pub async fn delete(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    answer(link.delete_member(&vhost, &name, node_of(&body)?).await)
}

/// POST /api/queues/quorum/{vhost}/{name}/leader with `{"node": NODE}` (Warren's
/// route; `warren ctl transfer_leadership`): moves the queue's leadership to member
/// NODE; answers `{"leader": NODE}` once it moved, 409 when it did not in time.
pub async fn transfer_leadership(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    let node = node_of(&body)?;
    let members = match link.placement(&vhost, &name) {
        None => return Err(ApiError::not_found()),
        Some(Ok(_)) => {
            return Err(ApiError::bad_request(format!(
                "'{name}' in vhost '{vhost}' is not a replicated queue"
            )));
        }
        Some(Err(members)) => members,
    };
    if !members.iter().any(|m| m == node) {
        return Err(ApiError::bad_request(format!(
            "{node} holds no replica of '{name}'"
        )));
    }
    match link.hand_over(&vhost, &name, node).await {
        Ok(Some(leader)) if leader == node => Ok(Json(json!({ "leader": leader })).into_response()),
        Ok(other) => Ok((
            StatusCode::CONFLICT,
            Json(json!({
                "error": "not_moved",
                "reason": format!("the leadership did not move to {node} in time"),
                "leader": other,
            })),
        )
            .into_response()),
        Err(why) => Err(ApiError::bad_request(why)),
    }
}

/// A pattern of a grow request (default: everything).
fn pattern(body: &Value, key: &str) -> Result<Regex, ApiError> {
    let text = body[key].as_str().unwrap_or(".*");
    Regex::new(text).map_err(|e| ApiError::bad_request(format!("{key}: {e}")))
}

/// One queue's outcome, as `rabbitmq-queues grow` and `shrink` list them: its members
/// then (`before` or `after` the change) and the result.
fn outcome(
    (vhost, name): (&str, &str),
    (before, after): (usize, usize),
    result: Result<(), MembersError>,
) -> Value {
    let (result, size) = match result {
        Ok(()) => ("ok".to_string(), after),
        Err(MembersError::Refused(why)) => (format!("error: {why}"), before),
        Err(e) => (format!("error: {e:?}"), before),
    };
    json!({"vhost": vhost, "name": name, "size": size, "result": result})
}

/// POST /api/queues/quorum/replicas/on/{node}/grow with `{"strategy": "all"|"even",
/// "vhost_pattern": RE, "queue_pattern": RE}`: adds `node` to every matching replicated
/// queue it holds no replica of (`even`: only to those with an even number of members).
pub async fn grow(
    State(http): State<Http>,
    Path(node): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    let even = match body["strategy"].as_str().unwrap_or("all") {
        "all" => false,
        "even" => true,
        other => return Err(ApiError::bad_request(format!("unknown strategy {other}"))),
    };
    let (vhosts, queues) = (
        pattern(&body, "vhost_pattern")?,
        pattern(&body, "queue_pattern")?,
    );
    let mut report = Vec::new();
    for (vhost, name, members) in link.replicated_queues() {
        if members.contains(&node)
            || (even && members.len() % 2 == 1)
            || !vhosts.is_match(&vhost)
            || !queues.is_match(&name)
        {
            continue;
        }
        let result = link.add_member(&vhost, &name, &node).await;
        report.push(outcome(
            (&vhost, &name),
            (members.len(), members.len() + 1),
            result,
        ));
    }
    Ok(Json(Value::Array(report)).into_response())
}

/// DELETE /api/queues/quorum/replicas/on/{node}/shrink: takes `node` out of every
/// replicated queue it holds a replica of (but the last one of a queue).
pub async fn shrink(
    State(http): State<Http>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    let mut report = Vec::new();
    for (vhost, name, members) in link.replicated_queues() {
        if !members.contains(&node) {
            continue;
        }
        let result = link.delete_member(&vhost, &name, &node).await;
        report.push(outcome(
            (&vhost, &name),
            (members.len(), members.len() - 1),
            result,
        ));
    }
    Ok(Json(Value::Array(report)).into_response())
}

/// POST /api/rebalance/queues (RabbitMQ's route; what `rabbitmq-queues rebalance` does):
/// moves replicated queues' leaders so that each node leads its share, optionally only
/// of the queues and vhosts whose names match `queue_pattern` and `vhost_pattern`;
/// answers with how many queues each node leads then.
pub async fn rebalance(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Result<Response, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let link = clustered(&http)?;
    let body = body.map(|Json(b)| b).unwrap_or(Value::Null);
    let (vhosts, queues) = (
        pattern(&body, "vhost_pattern")?,
        pattern(&body, "queue_pattern")?,
    );
    let after = crate::broker::rebalance::rebalance(link, |q| {
        vhosts.is_match(&q.vhost) && queues.is_match(&q.name)
    })
    .await;
    let report: Vec<Value> = after
        .iter()
        .map(|(node, n)| json!({"node": node, "queue_leaders": n}))
        .collect();
    Ok(Json(Value::Array(report)).into_response())
}
