//! A published message as the broker keeps it: routing info, properties (parsed for the
//! broker's own decisions, raw for passing on bit-exact) and the body as `Bytes`.
//! One `Arc<Message>` is shared by every queue the message was routed to.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::basic::parse_properties;
use bytes::{Buf, BufMut, Bytes, BytesMut};

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

    /// The message as bytes, for the store and for commands that travel in a log:
    /// publish time, exchange, routing key, raw properties, body.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(
            16 + self.exchange.len()
                + self.routing_key.len()
                + self.raw_properties.len()
                + self.body.len(),
        );
        b.put_u64(self.published_ms);
        b.put_u8(self.exchange.len() as u8);
        b.put_slice(self.exchange.as_bytes());
        b.put_u8(self.routing_key.len() as u8);
        b.put_slice(self.routing_key.as_bytes());
        b.put_u32(self.raw_properties.len() as u32);
        b.put_slice(&self.raw_properties);
        b.put_slice(&self.body);
        b.freeze()
    }

    /// Reads what `encode` wrote (the body stays a slice of the blob); `None` when the
    /// bytes are damaged.
    pub fn decode(blob: &Bytes, store_id: Option<u64>) -> Option<Message> {
        let mut cur = &blob[..];
        let take_str = |cur: &mut &[u8]| -> Option<String> {
            if cur.is_empty() {
                return None;
            }
            let n = cur.get_u8() as usize;
            if cur.len() < n {
                return None;
            }
            // Warren writes only text here; anything else is a damaged blob.
            let s = std::str::from_utf8(&cur[..n]).ok()?.to_owned();
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
            store_id,
            published_ms,
        })
    }

    /// Length of the head of what `encode` wrote: everything before the body (publish
    /// time, exchange, routing key, properties). `decode` of the head alone gives the
    /// message without its body. `None` when the bytes are damaged.
    pub fn head_len(blob: &[u8]) -> Option<usize> {
        let mut at = 8usize;
        for _ in 0..2 {
            let n = *blob.get(at)? as usize;
            at = at.checked_add(1 + n)?;
        }
        let plen = blob.get(at..at.checked_add(4)?)?;
        let plen = u32::from_be_bytes([plen[0], plen[1], plen[2], plen[3]]) as usize;
        let end = at.checked_add(4)?.checked_add(plen)?;
        (end <= blob.len()).then_some(end)
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

/// Two messages are the same when what a client can see of them, their store id and
/// their publish time are (the parsed properties follow from the raw ones).
impl PartialEq for Message {
    fn eq(&self, other: &Message) -> bool {
        self.store_id == other.store_id
            && self.published_ms == other.published_ms
            && self.exchange == other.exchange
            && self.routing_key == other.routing_key
            && self.raw_properties == other.raw_properties
            && self.body == other.body
    }
}

/// Serde for a shared message inside a command or an entry: its store id and its
/// `Message::encode` bytes (a log carries the message, not a pointer to it).
pub mod codec {
    use std::sync::Arc;

    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Message;

    /// Writes the message as (store id, encoded bytes).
    pub fn serialize<S: Serializer>(msg: &Arc<Message>, s: S) -> Result<S::Ok, S::Error> {
        (msg.store_id, &msg.encode()[..]).serialize(s)
    }

    /// Reads what `serialize` wrote.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Message>, D::Error> {
        let (store_id, blob) = <(Option<u64>, Vec<u8>)>::deserialize(d)?;
        Message::decode(&Bytes::from(blob), store_id)
            .map(Arc::new)
            .ok_or_else(|| serde::de::Error::custom("damaged message bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_of_an_encoded_message_decodes_to_it_without_its_body() {
        let mut msg = Message::for_tests(Bytes::from_static(b"the body"), 42);
        msg.exchange = "x".into();
        msg.properties = msg.properties.with_priority(3);
        msg.raw_properties = Bytes::from_static(&[0x08, 0x00, 3]);
        let blob = msg.encode();
        let head = Message::head_len(&blob).expect("a head");
        assert_eq!(head, blob.len() - 8);
        let back = Message::decode(&blob.slice(..head), Some(7)).expect("decodes");
        assert!(back.body.is_empty());
        assert_eq!((back.published_ms, back.priority()), (42, 3));
        assert_eq!(back.exchange, "x");
        assert_eq!(Message::head_len(&blob[..head - 1]), None, "cut short");
    }
}
