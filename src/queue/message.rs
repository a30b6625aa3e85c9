//! A published message as the broker keeps it: routing info, properties (parsed for the
//! broker's own decisions, raw for passing on bit-exact) and the body as `Bytes`.
//! One `Arc<Message>` is shared by every queue the message was routed to.

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;

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
}
