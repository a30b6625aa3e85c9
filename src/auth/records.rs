//! Users, vhosts and permissions as records, in the shape of RabbitMQ's definitions JSON
//! (`users`, `vhosts`, `permissions`), so that one serde type serves the store, the
//! management API and definitions files.

use serde::{Deserialize, Deserializer, Serialize};

/// A user: name, password hash and tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Login name.
    pub name: String,
    /// base64 of salt and digest (see [`super::password`]); empty: no password login.
    #[serde(default)]
    pub password_hash: String,
    /// RabbitMQ's name of the hashing algorithm.
    #[serde(default = "default_algorithm")]
    pub hashing_algorithm: String,
    /// Management tags: administrator, monitoring, policymaker, management, or any other.
    #[serde(default, deserialize_with = "tags")]
    pub tags: Vec<String>,
}

fn default_algorithm() -> String {
    super::password::SHA256.to_string()
}

/// A virtual host's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VHostRecord {
    /// Name.
    pub name: String,
    /// Free text shown by management tools.
    #[serde(default)]
    pub description: String,
    /// Free-form tags.
    #[serde(default, deserialize_with = "tags")]
    pub tags: Vec<String>,
}

/// What a user may do in a vhost: three regular expressions over resource names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionRecord {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// Resources the user may declare and delete.
    pub configure: String,
    /// Resources the user may publish to / bind to.
    pub write: String,
    /// Resources the user may consume from / bind from.
    pub read: String,
}

/// What a user may do with routing keys on one topic exchange in a vhost (RabbitMQ's
/// topic authorisation): two regular expressions over routing and binding keys, in
/// which `{username}` and `{vhost}` stand for the user's name and the vhost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPermissionRecord {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// The topic exchange the patterns apply to.
    pub exchange: String,
    /// Routing keys the user may publish with.
    pub write: String,
    /// Binding keys the user may bind with (consume from the exchange).
    pub read: String,
}

/// A policy in RabbitMQ's JSON shape (`apply-to` with its dash): settings applied to
/// the queues and/or exchanges of a vhost whose names match `pattern`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The vhost.
    pub vhost: String,
    /// The policy's name.
    pub name: String,
    /// Regular expression over queue or exchange names.
    pub pattern: String,
    /// "queues", "exchanges" or "all".
    #[serde(rename = "apply-to", default = "apply_to_all")]
    pub apply_to: String,
    /// The settings (a JSON object: "max-length": 10, ...).
    pub definition: serde_json::Value,
    /// Higher wins when several match.
    #[serde(default)]
    pub priority: i64,
}

fn apply_to_all() -> String {
    "all".into()
}

/// Tags come as a list (RabbitMQ 3.9+) or as one comma-separated string (older files).
fn tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tags {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Tags::deserialize(d)? {
        Tags::List(list) => list,
        Tags::Text(text) => split_tags(&text),
    })
}

/// Splits `"administrator, monitoring"` into tags, dropping empty ones.
pub fn split_tags(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_from_rabbitmq_definitions_parse() {
        let new: UserRecord = serde_json::from_str(
            r#"{"hashing_algorithm":"rabbit_password_hashing_sha256","limits":{},"name":"guest",
                "password_hash":"ho4++3ffxTFPftJy2+RYXb4nVGw6AVxPNgiJc7Oakg+kaNCS","tags":["administrator"]}"#,
        )
        .expect("3.10 format");
        assert_eq!(new.tags, vec!["administrator"]);
        let old: UserRecord = serde_json::from_str(
            r#"{"name":"ops","password_hash":"x","tags":"administrator,monitoring"}"#,
        )
        .expect("3.8 format");
        assert_eq!(old.tags, vec!["administrator", "monitoring"]);
        assert_eq!(old.hashing_algorithm, super::super::password::SHA256);
    }
}
