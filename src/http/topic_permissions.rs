//! Topic permissions (RabbitMQ's topic authorisation): /api/topic-permissions, per user
//! and vhost a write and a read pattern over routing keys on one topic exchange.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::access::body_json;
use super::auth::caller;
use super::overview::ListQuery;
use super::{ApiError, Http, filter};
use crate::auth::{AccessChange, TopicPermissionRecord};

fn listed(
    http: &Http,
    query: &ListQuery,
    keep: impl Fn(&TopicPermissionRecord) -> bool,
) -> Vec<Value> {
    let list = http
        .broker
        .access
        .topic_permissions()
        .into_iter()
        .filter(|t| keep(t))
        .map(|t| json!(t))
        .collect();
    match filter::apply(list, query) {
        Value::Array(items) => items,
        other => vec![other],
    }
}

/// GET /api/topic-permissions (administrators).
pub async fn all(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    Ok(Json(Value::Array(listed(&http, &query, |_| true))))
}

/// GET /api/vhosts/{vhost}/topic-permissions.
pub async fn of_vhost(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if http.broker.access.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    Ok(Json(Value::Array(listed(&http, &query, |t| {
        t.vhost == vhost
    }))))
}

/// GET /api/users/{user}/topic-permissions.
pub async fn of_user(
    State(http): State<Http>,
    Path(user): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if http.broker.access.user(&user).is_none() {
        return Err(ApiError::not_found());
    }
    Ok(Json(Value::Array(listed(&http, &query, |t| {
        t.user == user
    }))))
}

/// GET /api/topic-permissions/{vhost}/{user}: the user's topic permissions in the vhost
/// (404 when it has none).
pub async fn of_user_in_vhost(
    State(http): State<Http>,
    Path((vhost, user)): Path<(String, String)>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let list = listed(&http, &query, |t| t.vhost == vhost && t.user == user);
    if list.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(Json(Value::Array(list)))
}

/// PUT /api/topic-permissions/{vhost}/{user}: `exchange`, `write`, `read`. 201 when the
/// user had no topic permission in the vhost, 204 otherwise, as RabbitMQ answers.
pub async fn put(
    State(http): State<Http>,
    Path((vhost, user)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let b = body_json(&body)?;
    // RabbitMQ names every missing key at once.
    let missing: Vec<String> = ["exchange", "write", "read"]
        .iter()
        .filter(|k| !b[**k].is_string())
        .map(|k| format!("{{key_missing,{k}}}"))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!("[{}]", missing.join(","))));
    }
    let field = |k: &str| b[k].as_str().unwrap_or_default().to_string();
    let access = &http.broker.access;
    if access.user(&user).is_none() || access.vhost(&vhost).is_none() {
        return Err(ApiError::bad_request("vhost_or_user_not_found"));
    }
    let existed = access
        .topic_permissions()
        .iter()
        .any(|t| t.vhost == vhost && t.user == user);
    let record = TopicPermissionRecord {
        user,
        vhost,
        exchange: field("exchange"),
        write: field("write"),
        read: field("read"),
    };
    match access
        .change(AccessChange::SetTopicPermission(record))
        .await
    {
        Ok(()) => Ok(if existed {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::CREATED
        }),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

/// DELETE /api/topic-permissions/{vhost}/{user}: all of the user's topic permissions in
/// the vhost, or only the one on `?exchange=`.
pub async fn delete(
    State(http): State<Http>,
    Path((vhost, user)): Path<(String, String)>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let exchange = query.get("exchange").cloned();
    http.broker
        .access
        .change(AccessChange::ClearTopicPermissions {
            user,
            vhost,
            exchange,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
