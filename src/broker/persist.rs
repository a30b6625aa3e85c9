//! How the broker's durable things look in the store: definition keys and values
//! (JSON: small, rare, readable when debugging) and message blobs (a compact binary
//! layout: routing info, raw properties, body). The store itself sees only bytes.

use amq_protocol::protocol::basic::parse_properties;
use amq_protocol::types::FieldTable;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::exchange::{ExchangeDef, ExchangeKind};
use crate::queue::{Message, QueueDef};

/// Store key of a durable exchange.
pub fn exchange_key(vhost: &str, name: &str) -> String {
    format!("x/{vhost}\u{0}{name}")
}

/// Store key of a durable queue (its definition and the key of its entries).
pub fn queue_key(vhost: &str, name: &str) -> String {
    format!("q/{vhost}\u{0}{name}")
}

/// Store key of a binding between durable ends.
pub fn binding_key(vhost: &str, b: &StoredBinding) -> String {
    let args = serde_json::to_string(&b.arguments).unwrap_or_default();
    format!(
        "b/{vhost}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
        b.source, b.to_exchange, b.destination, b.routing_key, args
    )
}

/// A durable exchange as stored.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredExchange {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Type name.
    pub kind: String,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Internal flag.
    pub internal: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

impl StoredExchange {
    /// From a declaration.
    pub fn new(vhost: &str, def: &ExchangeDef) -> StoredExchange {
        StoredExchange {
            vhost: vhost.into(),
            name: def.name.clone(),
            kind: def.kind.as_str().into(),
            auto_delete: def.auto_delete,
            internal: def.internal,
            arguments: def.arguments.clone(),
        }
    }

    /// Back to a declaration.
    pub fn def(&self) -> Option<ExchangeDef> {
        Some(ExchangeDef {
            name: self.name.clone(),
            kind: ExchangeKind::parse(&self.kind)?,
            durable: true,
            auto_delete: self.auto_delete,
            internal: self.internal,
            arguments: self.arguments.clone(),
        })
    }
}

/// A durable queue as stored.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredQueue {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

impl StoredQueue {
    /// From a declaration.
    pub fn new(vhost: &str, def: &QueueDef) -> StoredQueue {
        StoredQueue {
            vhost: vhost.into(),
            name: def.name.clone(),
            auto_delete: def.auto_delete,
            arguments: def.arguments.clone(),
        }
    }

    /// Back to a declaration.
    pub fn def(&self) -> QueueDef {
        QueueDef {
            name: self.name.clone(),
            durable: true,
            exclusive_owner: None,
            auto_delete: self.auto_delete,
            arguments: self.arguments.clone(),
        }
    }
}

/// A binding between durable ends as stored.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredBinding {
    /// Vhost.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination is an exchange (else a queue).
    pub to_exchange: bool,
    /// Destination name.
    pub destination: String,
    /// Binding key.
    pub routing_key: String,
    /// Arguments.
    pub arguments: FieldTable,
}

/// Encodes a definition value.
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Decodes a definition value.
pub fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

/// Encodes a message for the store.
pub fn encode_message(m: &Message) -> Bytes {
    let mut b = BytesMut::with_capacity(
        16 + m.exchange.len() + m.routing_key.len() + m.raw_properties.len() + m.body.len(),
    );
    b.put_u64(m.published_ms);
    b.put_u8(m.exchange.len() as u8);
    b.put_slice(m.exchange.as_bytes());
    b.put_u8(m.routing_key.len() as u8);
    b.put_slice(m.routing_key.as_bytes());
    b.put_u32(m.raw_properties.len() as u32);
    b.put_slice(&m.raw_properties);
    b.put_slice(&m.body);
    b.freeze()
}

/// Decodes a stored message (the body stays a slice of the blob).
pub fn decode_message(blob: &Bytes, store_id: u64) -> Option<Message> {
    let mut cur = &blob[..];
    let take_str = |cur: &mut &[u8]| -> Option<String> {
        if cur.is_empty() {
            return None;
        }
        let n = cur.get_u8() as usize;
        if cur.len() < n {
            return None;
        }
        let s = String::from_utf8_lossy(&cur[..n]).into_owned();
        cur.advance(n);
        Some(s)
    };
    if cur.len() < 8 {
        return None;
    }
    let published_ms = cur.get_u64();
    let exchange = take_str(&mut cur)?;
    let routing_key = take_str(&mut cur)?;
    if cur.len() < 4 {
        return None;
    }
    let plen = cur.get_u32() as usize;
    if cur.len() < plen {
        return None;
    }
    let start = blob.len() - cur.len();
    let raw_properties = blob.slice(start..start + plen);
    let body = blob.slice(start + plen..);
    let (_, properties) = parse_properties(&raw_properties[..]).ok()?;
    Some(Message {
        exchange,
        routing_key,
        properties,
        raw_properties,
        body,
        store_id: Some(store_id),
        published_ms,
    })
}
