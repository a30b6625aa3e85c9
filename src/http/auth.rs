//! HTTP basic authentication against the node's users, and RabbitMQ's rules for
//! what each management tag allows.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::ApiError;
use crate::auth::{Permission, ResourceKind};
use crate::broker::BrokerState;

/// An authenticated API caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User name.
    pub name: String,
    tags: Vec<String>,
}

impl Caller {
    fn has(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// Whether the caller's user has this management tag.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.has(tag)
    }

    /// Administrators may do anything.
    pub fn is_admin(&self) -> bool {
        self.has("administrator")
    }

    /// Monitoring (and administrator) users see every vhost and connection.
    pub fn sees_everything(&self) -> bool {
        self.is_admin() || self.has("monitoring")
    }

    /// 401 "Not administrator user" unless an administrator.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not administrator user"))
        }
    }

    /// 401 "Not monitor user" unless monitoring or administrator.
    pub fn require_monitoring(&self) -> Result<(), ApiError> {
        if self.sees_everything() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not monitor user"))
        }
    }

    /// Whether the caller may see objects of `vhost`: everything for monitoring users,
    /// else the vhosts it has permissions in.
    pub fn may_see(&self, broker: &BrokerState, vhost: &str) -> bool {
        self.sees_everything() || broker.access.check_vhost(&self.name, vhost).is_ok()
    }

    /// 401 unless the caller may use `vhost`, as for an AMQP connection.
    pub fn require_vhost(&self, broker: &BrokerState, vhost: &str) -> Result<(), ApiError> {
        if broker.vhost(vhost).is_none() {
            return Err(ApiError::not_found());
        }
        if self.is_admin() || broker.access.check_vhost(&self.name, vhost).is_ok() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Access refused."))
        }
    }

    /// The caller's AMQP permission on a resource, as the same operation over AMQP.
    pub fn require(
        &self,
        broker: &BrokerState,
        vhost: &str,
        kind: ResourceKind,
        name: &str,
        permission: Permission,
    ) -> Result<(), ApiError> {
        broker
            .access
            .check(&self.name, vhost, kind, name, permission)
            .map_err(ApiError::from)
    }
}

/// The user name and password of a request's `Authorization: Basic` header.
fn credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let decoded = BASE64.decode(header.strip_prefix("Basic ")?.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_string(), password.to_string()))
}

/// Middleware: users in `loopback_users` (guest) may use the API only from a loopback
/// address, as over AMQP and as in RabbitMQ.
pub async fn loopback_guard(
    axum::extract::State(http): axum::extract::State<super::Http>,
    axum::extract::ConnectInfo(super::Peer(peer)): axum::extract::ConnectInfo<super::Peer>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some((name, _)) = credentials(request.headers())
        && http.broker.access.loopback_only(&name)
        && !peer.ip().to_canonical().is_loopback()
    {
        tracing::warn!(%peer, user = %name, "management login refused: user may only connect via localhost");
        return ApiError::login_failed().into_response();
    }
    next.run(request).await
}

/// The caller behind the request's `Authorization: Basic` header. Every tag of
/// RabbitMQ's management plugin (management, policymaker, monitoring, administrator)
/// grants API access; other users get 401 "Not management user".
pub fn caller(broker: &BrokerState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let (name, password) = credentials(headers).ok_or_else(ApiError::login_failed)?;
    let user = broker
        .access
        .authenticate(&name, &password)
        .ok_or_else(ApiError::login_failed)?;
    const MANAGEMENT_TAGS: [&str; 4] = ["management", "policymaker", "monitoring", "administrator"];
    if !user
        .tags
        .iter()
        .any(|t| MANAGEMENT_TAGS.contains(&t.as_str()))
    {
        return Err(ApiError::not_authorised("Not management user"));
    }
    Ok(Caller {
        name: user.name,
        tags: user.tags,
    })
}
