//! A published message as the broker keeps it: routing info, properties (parsed for the
//! broker's own decisions, raw for passing on bit-exact) and the body as `Bytes`.
//! One `Arc<Message>` is shared by every queue the message was routed to.

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;

/// Milliseconds since the Unix epoch (TTLs and x-death times are wall-clock based, so
/// that they survive restarts).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An immutable published message.
#[derive(Debug)]
pub struct Message {
    /// Exchange it was published to (as given by the publisher).
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Parsed properties (delivery mode, priority, expiration, headers).
    pub properties: BasicProperties,
    /// Property flags + values exactly as the publisher sent them.
    pub raw_properties: Bytes,
    /// The body.
    pub body: Bytes,
    /// Id of its stored copy, when it is persistent and went to a durable queue.
    pub store_id: Option<u64>,
    /// When it was published (ms since the epoch): TTLs count from here.
    pub published_ms: u64,
}

impl Message {
    /// delivery-mode 2: the publisher asked for the message to survive a restart.
    pub fn is_persistent(&self) -> bool {
        *self.properties.delivery_mode() == Some(2)
    }

    /// Bytes the message accounts for in queue length limits (the body, as RabbitMQ).
    pub fn size(&self) -> usize {
        self.body.len()
    }

    /// The per-message TTL from the `expiration` property, in ms.
    pub fn ttl_ms(&self) -> Option<u64> {
        self.properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse().ok())
    }

    /// The `priority` property (0 when absent).
    pub fn priority(&self) -> u8 {
        self.properties.priority().unwrap_or(0)
    }

    /// A bare message, for unit tests of queue logic.
    pub fn for_tests(body: Bytes, published_ms: u64) -> Message {
        Message {
            exchange: String::new(),
            routing_key: "q".into(),
            properties: BasicProperties::default(),
            raw_properties: Bytes::from_static(&[0, 0]),
            body,
            store_id: None,
            published_ms,
        }
    }
}
