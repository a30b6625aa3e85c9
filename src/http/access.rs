//! Users, vhosts and permissions: /api/whoami, /api/users, /api/vhosts, /api/permissions.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::auth::caller;
use super::overview::ListQuery;
use super::{ApiError, Http, filter, node_name};
use crate::auth::records::split_tags;
use crate::auth::{AccessChange, PermissionRecord, UserRecord, VHostRecord, password};

/// A JSON request body (any content type, as RabbitMQ accepts); empty is `{}`.
pub fn body_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// Tags from a list or a comma-separated string.
fn tags_of(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        Value::String(s) => split_tags(s),
        _ => Vec::new(),
    }
}

fn created(existed: bool) -> StatusCode {
    if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    }
}

/// GET /api/whoami.
pub async fn whoami(State(http): State<Http>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let tags = http
        .broker
        .access
        .user(&who.name)
        .map(|u| u.tags)
        .unwrap_or_default();
    Ok(Json(json!({"name": who.name, "tags": tags})))
}

fn user_json(u: &UserRecord) -> Value {
    json!({
        "name": u.name, "password_hash": u.password_hash,
        "hashing_algorithm": u.hashing_algorithm, "tags": u.tags, "limits": {},
    })
}

/// GET /api/users (administrators).
pub async fn users(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let list = http.broker.access.users().iter().map(user_json).collect();
    Ok(Json(filter::apply(list, &query)))
}

/// GET /api/users/{user}.
pub async fn user(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let u = http
        .broker
        .access
        .user(&name)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(user_json(&u)))
}

/// PUT /api/users/{user}: `password` (hashed here) or `password_hash` (+
/// `hashing_algorithm`), and `tags`. Without either, an existing user keeps its hash.
pub async fn put_user(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let b = body_json(&body)?;
    let access = &http.broker.access;
    let existing = access.user(&name);
    let (hash, algorithm) = if let Some(p) = b["password"].as_str() {
        (password::hash(p), password::SHA256.to_string())
    } else if let Some(h) = b["password_hash"].as_str() {
        let algorithm = b["hashing_algorithm"]
            .as_str()
            .unwrap_or(password::SHA256)
            .to_string();
        if !h.is_empty() && !password::is_supported(&algorithm) {
            return Err(ApiError::bad_request(format!(
                "hashing algorithm {algorithm} is not supported"
            )));
        }
        (h.to_string(), algorithm)
    } else if let Some(u) = &existing {
        (u.password_hash.clone(), u.hashing_algorithm.clone())
    } else {
        return Err(ApiError::bad_request(
            "password or password_hash must be set",
        ));
    };
    let tags = match b.get("tags") {
        Some(t) => tags_of(t),
        None => Vec::new(),
    };
    access
        .change(AccessChange::PutUser(UserRecord {
            name,
            password_hash: hash,
            hashing_algorithm: algorithm,
            tags,
        }))
        .await?;
    Ok(created(existing.is_some()))
}

/// DELETE /api/users/{user}: also closes its connections.
pub async fn delete_user(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    http.broker.delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn vhost_json(http: &Http, v: &VHostRecord) -> Value {
    let (mut ready, mut unacked) = (0u64, 0u64);
    if let Some(vh) = http.broker.vhost(&v.name) {
        for q in vh.queues() {
            let s = q.snapshot();
            ready += s.ready;
            unacked += s.unacked;
        }
    }
    json!({
        "name": v.name,
        "description": v.description,
        "tags": v.tags,
        "metadata": {"description": v.description, "tags": v.tags},
        "tracing": false,
        "cluster_state": {node_name(): "running"},
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "message_stats": http.rates.totals(&http.broker, Some(&v.name)),
    })
}

/// GET /api/vhosts: the vhosts the caller may see.
pub async fn vhosts(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let list = http
        .broker
        .access
        .vhosts()
        .iter()
        .filter(|v| who.may_see(&http.broker, &v.name))
        .map(|v| vhost_json(&http, v))
        .collect();
    Ok(Json(filter::apply(list, &query)))
}

/// GET /api/vhosts/{vhost}.
pub async fn vhost(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    let v = http
        .broker
        .access
        .vhost(&name)
        .ok_or_else(ApiError::not_found)?;
    if !who.may_see(&http.broker, &name) {
        return Err(ApiError::not_authorised("Access refused."));
    }
    Ok(Json(vhost_json(&http, &v)))
}

/// PUT /api/vhosts/{vhost}: creates it (or updates description and tags).
pub async fn put_vhost(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let b = body_json(&body)?;
    let existed = http.broker.access.vhost(&name).is_some();
    http.broker
        .add_vhost(VHostRecord {
            name,
            description: b["description"].as_str().unwrap_or_default().to_string(),
            tags: tags_of(&b["tags"]),
        })
        .await?;
    Ok(created(existed))
}

/// DELETE /api/vhosts/{vhost}: with its queues, exchanges, permissions, connections.
pub async fn delete_vhost(
    State(http): State<Http>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    http.broker.delete_vhost(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn permissions_where(
    http: &Http,
    query: &ListQuery,
    keep: impl Fn(&PermissionRecord) -> bool,
) -> Json<Value> {
    let list = http
        .broker
        .access
        .permissions()
        .into_iter()
        .filter(|p| keep(p))
        .map(|p| json!(p))
        .collect();
    Json(filter::apply(list, query))
}

/// GET /api/permissions (administrators).
pub async fn permissions(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    Ok(permissions_where(&http, &query, |_| true))
}

/// GET /api/vhosts/{vhost}/permissions.
pub async fn vhost_permissions(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if http.broker.access.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    Ok(permissions_where(&http, &query, |p| p.vhost == vhost))
}

/// GET /api/users/{user}/permissions.
pub async fn user_permissions(
    State(http): State<Http>,
    Path(user): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    if http.broker.access.user(&user).is_none() {
        return Err(ApiError::not_found());
    }
    Ok(permissions_where(&http, &query, |p| p.user == user))
}

/// GET /api/permissions/{vhost}/{user}.
pub async fn permission(
    State(http): State<Http>,
    Path((vhost, user)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    http.broker
        .access
        .permissions()
        .into_iter()
        .find(|p| p.vhost == vhost && p.user == user)
        .map(|p| Json(json!(p)))
        .ok_or_else(ApiError::not_found)
}

/// PUT /api/permissions/{vhost}/{user}: `configure`, `write`, `read` patterns.
pub async fn put_permission(
    State(http): State<Http>,
    Path((vhost, user)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    let b = body_json(&body)?;
    let field = |k: &str| -> Result<String, ApiError> {
        b[k].as_str()
            .map(String::from)
            .ok_or_else(|| ApiError::bad_request(format!("[{{key_missing,{k}}}]")))
    };
    let record = PermissionRecord {
        user,
        vhost,
        configure: field("configure")?,
        write: field("write")?,
        read: field("read")?,
    };
    let existed = http
        .broker
        .access
        .permissions()
        .iter()
        .any(|p| p.vhost == record.vhost && p.user == record.user);
    http.broker
        .access
        .change(AccessChange::SetPermissions(record))
        .await?;
    Ok(created(existed))
}

/// DELETE /api/permissions/{vhost}/{user}.
pub async fn delete_permission(
    State(http): State<Http>,
    Path((vhost, user)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    caller(&http.broker, &headers)?.require_admin()?;
    http.broker
        .access
        .change(AccessChange::ClearPermissions(user, vhost))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
