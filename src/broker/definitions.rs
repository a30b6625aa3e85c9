//! Definitions in RabbitMQ's JSON format (`rabbitmqctl export_definitions`, the
//! management API's `/api/definitions`): users, vhosts, permissions, exchanges, queues
//! and bindings. Export writes what the node has; import creates what a file names, so
//! a file exported from RabbitMQ 3.x loads into Warren (and `load_definitions` at boot).

use amq_protocol::types::FieldTable;
use serde::Deserialize;
use serde_json::{Value, json};

use super::exchange::{Destination, ExchangeDef, ExchangeKind};
use super::json::{json_to_table, table_to_json};
use super::{BrokerState, VHost};
use crate::auth::{
    AccessChange, PermissionRecord, PolicyRecord, TopicPermissionRecord, UserRecord, VHostRecord,
    password,
};
use crate::queue::QueueDef;

/// The connection id the broker itself acts as (never a client's: those start at 1).
pub const BROKER_CONN: u64 = 0;

/// RabbitMQ version Warren presents itself as in definitions and the management API
/// (tools branch on it).
pub const RABBITMQ_VERSION: &str = "3.10.8";

/// The node's definitions as RabbitMQ's JSON, for every vhost or only `only_vhost`.
pub fn export(state: &BrokerState, only_vhost: Option<&str>) -> Value {
    let wanted = |v: &str| only_vhost.is_none_or(|o| o == v);
    let access = &state.access;
    let mut exchanges = Vec::new();
    let mut queues = Vec::new();
    let mut bindings = Vec::new();
    for vhost in state.vhost_list().iter().filter(|v| wanted(&v.name)) {
        let (x, q, b) = vhost_objects(vhost);
        exchanges.extend(x);
        queues.extend(q);
        bindings.extend(b);
    }
    let users: Vec<Value> = access
        .users()
        .into_iter()
        .map(|u| {
            json!({
                "name": u.name, "password_hash": u.password_hash,
                "hashing_algorithm": u.hashing_algorithm, "tags": u.tags, "limits": {},
            })
        })
        .collect();
    let vhosts: Vec<Value> = access
        .vhosts()
        .into_iter()
        .filter(|v| wanted(&v.name))
        .map(|v| {
            json!({
                "name": v.name, "limits": [],
                "metadata": {"description": v.description, "tags": v.tags},
            })
        })
        .collect();
    let permissions: Vec<PermissionRecord> = access
        .permissions()
        .into_iter()
        .filter(|p| wanted(&p.vhost))
        .collect();
    let policies: Vec<PolicyRecord> = access
        .policies()
        .into_iter()
        .filter(|p| wanted(&p.vhost))
        .collect();
    let topic_permissions: Vec<TopicPermissionRecord> = access
        .topic_permissions()
        .into_iter()
        .filter(|t| wanted(&t.vhost))
        .collect();
    let mut out = json!({
        "rabbit_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "parameters": [],
        "global_parameters": [],
        "policies": policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    });
    if only_vhost.is_none() {
        out["users"] = json!(users);
        out["vhosts"] = json!(vhosts);
        out["permissions"] = json!(permissions);
        out["topic_permissions"] = json!(topic_permissions);
    } else {
        out["topic_permissions"] = json!([]);
    }
    out
}

/// A vhost's exchanges (not the built-in ones), non-exclusive queues and bindings (not
/// the default exchange's implicit ones), as definitions.
fn vhost_objects(vhost: &VHost) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let mut exchanges = Vec::new();
    let mut bindings = Vec::new();
    let mut xs = vhost.exchanges();
    xs.sort_by(|a, b| a.def.name.cmp(&b.def.name));
    for x in &xs {
        let d = &x.def;
        if !d.name.is_empty() && !d.name.starts_with("amq.") {
            exchanges.push(json!({
                "name": d.name, "vhost": vhost.name, "type": d.kind.as_str(),
                "durable": d.durable, "auto_delete": d.auto_delete, "internal": d.internal,
                "arguments": table_to_json(&d.arguments),
            }));
        }
        if d.name.is_empty() {
            continue;
        }
        for b in x.bindings() {
            bindings.push(binding_json(&vhost.name, &d.name, &b));
        }
    }
    let mut qs = vhost.queues();
    qs.sort_by(|a, b| a.name().cmp(b.name()));
    let queues = qs
        .iter()
        .filter(|q| q.def.exclusive_owner.is_none())
        .map(|q| {
            json!({
                "name": q.name(), "vhost": vhost.name, "durable": q.def.durable,
                "auto_delete": q.def.auto_delete, "arguments": table_to_json(&q.def.arguments),
            })
        })
        .collect();
    (exchanges, queues, bindings)
}

/// One binding as the management API and definitions show it.
pub fn binding_json(vhost: &str, source: &str, b: &super::Binding) -> Value {
    let (destination, kind) = match &b.dest {
        Destination::Queue(q) => (q.name().to_string(), "queue"),
        Destination::Exchange(x) => (x.clone(), "exchange"),
    };
    json!({
        "source": source, "vhost": vhost, "destination": destination,
        "destination_type": kind, "routing_key": b.key,
        "arguments": table_to_json(&b.args),
        "properties_key": properties_key(&b.key, &b.args),
    })
}

/// The management API's id of a binding within its (source, destination): the routing
/// key, with a hash of the arguments when there are any, URL-safe.
pub fn properties_key(key: &str, args: &FieldTable) -> String {
    let escaped: String = key
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    if args.inner().is_empty() {
        if escaped.is_empty() {
            "~".into()
        } else {
            escaped
        }
    } else {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        table_to_json(args).to_string().hash(&mut h);
        format!("{escaped}~{:x}", h.finish())
    }
}

#[derive(Deserialize)]
struct Definitions {
    #[serde(default)]
    users: Vec<ImportUser>,
    #[serde(default)]
    vhosts: Vec<ImportVHost>,
    #[serde(default)]
    permissions: Vec<PermissionRecord>,
    #[serde(default)]
    topic_permissions: Vec<TopicPermissionRecord>,
    #[serde(default)]
    policies: Vec<ImportPolicy>,
    #[serde(default)]
    exchanges: Vec<ImportExchange>,
    #[serde(default)]
    queues: Vec<ImportQueue>,
    #[serde(default)]
    bindings: Vec<ImportBinding>,
}

#[derive(Deserialize)]
struct ImportPolicy {
    vhost: Option<String>,
    name: String,
    pattern: String,
    #[serde(rename = "apply-to", default)]
    apply_to: Option<String>,
    definition: Value,
    #[serde(default)]
    priority: i64,
}

#[derive(Deserialize)]
struct ImportUser {
    name: String,
    password_hash: Option<String>,
    password: Option<String>,
    hashing_algorithm: Option<String>,
    #[serde(default)]
    tags: Value,
}

#[derive(Deserialize)]
struct ImportVHost {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
struct ImportExchange {
    name: String,
    vhost: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "default_true")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
struct ImportQueue {
    name: String,
    vhost: Option<String>,
    #[serde(default = "default_true")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
struct ImportBinding {
    source: String,
    vhost: Option<String>,
    destination: String,
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: Value,
}

/// Tags as a list, from a list or a comma-separated string.
fn tags_of(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        Value::String(s) => crate::auth::records::split_tags(s),
        _ => Vec::new(),
    }
}

/// Creates what `defs` names. Objects of a vhost-scoped import (`into_vhost`) go to
/// that vhost whatever the file says. Stops at the first thing that cannot be created,
/// with a message naming it.
pub async fn import(
    state: &BrokerState,
    defs: &Value,
    into_vhost: Option<&str>,
) -> Result<(), String> {
    let defs: Definitions =
        serde_json::from_value(defs.clone()).map_err(|e| format!("malformed definitions: {e}"))?;
    for u in defs.users {
        let algorithm = u
            .hashing_algorithm
            .unwrap_or_else(|| password::SHA256.to_string());
        let (hash, algorithm) = match (u.password_hash, u.password) {
            (Some(h), _) if !h.is_empty() => (h, algorithm),
            (_, Some(p)) => (password::hash(&p), password::SHA256.to_string()),
            _ => (String::new(), algorithm),
        };
        if !hash.is_empty() && !password::is_supported(&algorithm) {
            return Err(format!(
                "user '{}': hashing algorithm {algorithm} is not supported",
                u.name
            ));
        }
        let record = UserRecord {
            name: u.name,
            password_hash: hash,
            hashing_algorithm: algorithm,
            tags: tags_of(&u.tags),
        };
        state
            .access
            .change(AccessChange::PutUser(record))
            .await
            .map_err(|e| e.to_string())?;
    }
    for v in defs.vhosts {
        let meta = v.metadata.unwrap_or(Value::Null);
        let description = v
            .description
            .or_else(|| meta["description"].as_str().map(String::from))
            .unwrap_or_default();
        state
            .add_vhost(VHostRecord {
                name: v.name,
                description,
                tags: tags_of(&meta["tags"]),
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    for p in defs.permissions {
        state
            .access
            .change(AccessChange::SetPermissions(p))
            .await
            .map_err(|e| e.to_string())?;
    }
    for p in defs.policies {
        let vhost = into_vhost.or(p.vhost.as_deref()).unwrap_or("/").to_string();
        let name = p.name.clone();
        state
            .set_policy(PolicyRecord {
                vhost,
                name: p.name,
                pattern: p.pattern,
                apply_to: p.apply_to.unwrap_or_else(|| "all".into()),
                definition: p.definition,
                priority: p.priority,
            })
            .await
            .map_err(|e| format!("policy '{name}': {e}"))?;
    }
    for t in defs.topic_permissions {
        state
            .access
            .change(AccessChange::SetTopicPermission(t))
            .await
            .map_err(|e| e.to_string())?;
    }
    let vhost_of = |named: &Option<String>| -> Result<std::sync::Arc<VHost>, String> {
        let name = into_vhost.or(named.as_deref()).unwrap_or("/");
        state
            .vhost(name)
            .ok_or_else(|| format!("vhost '{name}' does not exist"))
    };
    for x in defs.exchanges {
        let vhost = vhost_of(&x.vhost)?;
        let kind = ExchangeKind::parse(&x.kind)
            .ok_or_else(|| format!("exchange '{}': unknown type '{}'", x.name, x.kind))?;
        let def = ExchangeDef {
            name: x.name,
            kind,
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: json_to_table(&x.arguments),
        };
        vhost
            .declare_exchange(def, false)
            .map_err(|e| e.reply_text())?;
    }
    for q in defs.queues {
        let vhost = vhost_of(&q.vhost)?;
        let def = QueueDef {
            name: q.name,
            durable: q.durable,
            exclusive_owner: None,
            auto_delete: q.auto_delete,
            arguments: json_to_table(&q.arguments),
        };
        vhost
            .declare_queue(def, false, false, BROKER_CONN)
            .map_err(|e| e.reply_text())?;
    }
    for b in defs.bindings {
        let vhost = vhost_of(&b.vhost)?;
        let args = json_to_table(&b.arguments);
        let bound = match b.destination_type.as_str() {
            "queue" => {
                vhost.bind_queue(&b.destination, &b.source, &b.routing_key, args, BROKER_CONN)
            }
            "exchange" => vhost.bind_exchange(&b.destination, &b.source, &b.routing_key, args),
            other => return Err(format!("binding: unknown destination_type '{other}'")),
        };
        bound.map_err(|e| e.reply_text())?;
    }
    Ok(())
}
