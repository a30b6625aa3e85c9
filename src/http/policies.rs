//! Policies: /api/policies[/{vhost}[/{name}]] in RabbitMQ's JSON (`pattern`,
//! `definition`, `priority`, `apply-to`), stored through the access-control commands
//! like users and vhosts.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::access::body_json;
use super::auth::{Caller, caller};
use super::overview::ListQuery;
use super::{ApiError, Http, filter};
use crate::auth::PolicyRecord;

/// Administrators and policymakers manage policies; others see those of the vhosts
/// they may use.
fn may_manage(who: &Caller) -> Result<(), ApiError> {
    if who.is_admin() || who.has_tag("policymaker") {
        Ok(())
    } else {
        Err(ApiError::not_authorised("Not policymaker user"))
    }
}

fn listed(http: &Http, who: &Caller, query: &ListQuery, vhost: Option<&str>) -> Json<Value> {
    let list = http
        .broker
        .access
        .policies()
        .into_iter()
        .filter(|p| vhost.is_none_or(|v| v == p.vhost))
        .filter(|p| who.may_see(&http.broker, &p.vhost))
        .map(|p| json!(p))
        .collect();
    Json(filter::apply(list, query))
}

/// GET /api/policies.
pub async fn all(
    State(http): State<Http>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    Ok(listed(&http, &who, &query, None))
}

/// GET /api/policies/{vhost}.
pub async fn of_vhost(
    State(http): State<Http>,
    Path(vhost): Path<String>,
    query: ListQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    who.require_vhost(&http.broker, &vhost)?;
    Ok(listed(&http, &who, &query, Some(&vhost)))
}

/// GET /api/policies/{vhost}/{name}.
pub async fn one(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&http.broker, &headers)?;
    who.require_vhost(&http.broker, &vhost)?;
    http.broker
        .access
        .vhost_policies(&vhost)
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| Json(json!(p)))
        .ok_or_else(ApiError::not_found)
}

/// PUT /api/policies/{vhost}/{name}: `pattern`, `definition`, optional `priority` (0)
/// and `apply-to` ("all"). 201 when new, 204 when replaced.
pub async fn put(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    may_manage(&who)?;
    who.require_vhost(&http.broker, &vhost)?;
    let b = body_json(&body)?;
    let missing: Vec<String> = ["pattern", "definition"]
        .iter()
        .filter(|k| b[**k].is_null())
        .map(|k| format!("{{key_missing,{k}}}"))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!("[{}]", missing.join(","))));
    }
    let priority = match &b["priority"] {
        Value::Null => 0,
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| ApiError::bad_request("priority must be an integer"))?,
        Value::String(s) => s
            .parse()
            .map_err(|_| ApiError::bad_request("priority must be an integer"))?,
        _ => return Err(ApiError::bad_request("priority must be an integer")),
    };
    let record = PolicyRecord {
        vhost,
        name,
        pattern: b["pattern"].as_str().unwrap_or_default().to_string(),
        apply_to: b["apply-to"].as_str().unwrap_or("all").to_string(),
        definition: b["definition"].clone(),
        priority,
    };
    let existed = http
        .broker
        .access
        .vhost_policies(&record.vhost)
        .iter()
        .any(|p| p.name == record.name);
    http.broker
        .set_policy(record)
        .await
        .map_err(ApiError::bad_request)?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

/// DELETE /api/policies/{vhost}/{name}.
pub async fn delete(
    State(http): State<Http>,
    Path((vhost, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let who = caller(&http.broker, &headers)?;
    may_manage(&who)?;
    who.require_vhost(&http.broker, &vhost)?;
    http.broker.clear_policy(&vhost, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
