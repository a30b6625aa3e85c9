//! A published message as the broker keeps it: routing info, properties (parsed for the
//! broker's own decisions, raw for passing on bit-exact) and the body as `Bytes`.
//! One `Arc<Message>` is shared by every queue the message was routed to.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::basic::parse_properties;
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::store::{HeadDigest, MessageBlob};

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
        let mut b = BytesMut::with_capacity(self.head_capacity() + self.body.len());
        self.encode_head(&mut b);
        b.put_slice(&self.body);
        b.freeze()
    }

    /// What `encode` writes, as the store takes it from a publish: the head encoded, the
    /// body as it is (not copied).
    pub fn stored_blob(&self) -> MessageBlob {
        let mut head = BytesMut::with_capacity(self.head_capacity());
        self.encode_head(&mut head);
        MessageBlob::Parts {
            head: head.freeze(),
            body: self.body.clone(),
        }
    }

    /// Bytes of the encoded head: publish time, the two names and their lengths, and the
    /// properties with theirs.
    fn head_capacity(&self) -> usize {
        16 + self.exchange.len() + self.routing_key.len() + self.raw_properties.len()
    }

    /// Writes everything of `encode` before the body (what `head_len` measures).
    fn encode_head(&self, b: &mut BytesMut) {
        b.put_u64(self.published_ms);
        b.put_u8(self.exchange.len() as u8);
        b.put_slice(self.exchange.as_bytes());
        b.put_u8(self.routing_key.len() as u8);
        b.put_slice(self.routing_key.as_bytes());
        b.put_u32(self.raw_properties.len() as u32);
        b.put_slice(&self.raw_properties);
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

    /// The store's digest of an encoded message's head (see `store::BlobTrim`): its
    /// length and the [`PagedHead`] of the message, found by skipping through the
    /// property list rather than decoding it. `None` when anything looks unusual (damaged
    /// bytes, a property flag continuation, an expiration that is not text): the message
    /// is then read back whole and decoded in full.
    pub fn head_digest(blob: &[u8]) -> Option<HeadDigest> {
        let head_len = Message::head_len(blob)?;
        let mut published = [0u8; 8];
        published.copy_from_slice(blob.get(..8)?);
        let mut props = head_properties(blob, head_len)?;
        let flags = u16::from_be_bytes([*props.first()?, *props.get(1)?]);
        if flags & 1 != 0 {
            return None;
        }
        props = &props[2..];
        let skip_short = |p: &mut &[u8]| -> Option<()> {
            let n = *p.first()? as usize;
            *p = p.get(1 + n..)?;
            Some(())
        };
        let mut priority = 0u8;
        let mut ttl_ms = None;
        if flags & FLAG_CONTENT_TYPE != 0 {
            skip_short(&mut props)?;
        }
        if flags & FLAG_CONTENT_ENCODING != 0 {
            skip_short(&mut props)?;
        }
        if flags & FLAG_HEADERS != 0 {
            let n = u32::from_be_bytes(props.get(..4)?.try_into().ok()?) as usize;
            props = props.get(4usize.checked_add(n)?..)?;
        }
        if flags & FLAG_DELIVERY_MODE != 0 {
            props = props.get(1..)?;
        }
        if flags & FLAG_PRIORITY != 0 {
            priority = *props.first()?;
            props = &props[1..];
        }
        if flags & FLAG_CORRELATION_ID != 0 {
            skip_short(&mut props)?;
        }
        if flags & FLAG_REPLY_TO != 0 {
            skip_short(&mut props)?;
        }
        if flags & FLAG_EXPIRATION != 0 {
            let n = *props.first()? as usize;
            let text = std::str::from_utf8(props.get(1..1 + n)?).ok()?;
            ttl_ms = text.parse().ok();
        }
        let head = PagedHead {
            published_ms: u64::from_be_bytes(published),
            priority,
            ttl_ms,
        };
        Some(HeadDigest {
            head_len,
            words: head.to_words(),
        })
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

/// Property flags of `basic` content headers (AMQP 0-9-1, 4.2.6.1), in the order the
/// values follow them: what [`Message::head_digest`] skips or reads.
const FLAG_CONTENT_TYPE: u16 = 1 << 15;
const FLAG_CONTENT_ENCODING: u16 = 1 << 14;
const FLAG_HEADERS: u16 = 1 << 13;
const FLAG_DELIVERY_MODE: u16 = 1 << 12;
const FLAG_PRIORITY: u16 = 1 << 11;
const FLAG_CORRELATION_ID: u16 = 1 << 10;
const FLAG_REPLY_TO: u16 = 1 << 9;
const FLAG_EXPIRATION: u16 = 1 << 8;

/// The raw properties inside the first `head_len` bytes of an encoded message.
fn head_properties(blob: &[u8], head_len: usize) -> Option<&[u8]> {
    let mut at = 8usize;
    for _ in 0..2 {
        at = at.checked_add(1 + *blob.get(at)? as usize)?;
    }
    blob.get(at.checked_add(4)?..head_len)
}

/// What a queue needs of a message whose body stays on disk: its place in priority
/// order and when it expires. Recovery gets it from the store without reading the body
/// (as the two words of [`HeadDigest`]); a message has the same one whether its head
/// is decoded ([`PagedHead::of`]) or skimmed ([`Message::head_digest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedHead {
    /// When it was published (ms since the epoch).
    pub published_ms: u64,
    /// Its `priority` property (0 when absent).
    pub priority: u8,
    /// Its per-message TTL, from the `expiration` property.
    pub ttl_ms: Option<u64>,
}

impl PagedHead {
    /// Publish times past this (year 2^56 ms) are clamped to fit beside the priority.
    const MAX_PUBLISHED_MS: u64 = (1 << 56) - 1;

    /// The paged head of `msg`.
    pub fn of(msg: &Message) -> PagedHead {
        PagedHead {
            published_ms: msg.published_ms,
            priority: msg.priority(),
            ttl_ms: msg.ttl_ms(),
        }
    }

    /// Packs it into the store's digest words (a TTL of `u64::MAX` ms stands for none,
    /// which expires no sooner).
    pub fn to_words(self) -> [u64; 2] {
        let published = self.published_ms.min(PagedHead::MAX_PUBLISHED_MS);
        [
            published << 8 | u64::from(self.priority),
            self.ttl_ms.unwrap_or(u64::MAX),
        ]
    }

    /// Unpacks what [`PagedHead::to_words`] packed.
    pub fn from_words(words: [u64; 2]) -> PagedHead {
        PagedHead {
            published_ms: words[0] >> 8,
            priority: (words[0] & 0xff) as u8,
            ttl_ms: (words[1] != u64::MAX).then_some(words[1]),
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
    use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
    use proptest::prelude::*;

    /// Any property list a publisher can send, the fields before and around priority and
    /// expiration included (headers with long values, odd expiration text).
    fn any_properties() -> impl Strategy<Value = BasicProperties> {
        let short = || proptest::option::of("\\PC{0,40}");
        (
            (
                short(),
                short(),
                proptest::option::of(proptest::collection::vec(
                    ("[a-z]{1,8}", "\\PC{0,300}"),
                    0..4,
                )),
            ),
            (
                proptest::option::of(1u8..=2),
                proptest::option::of(any::<u8>()),
                short(),
                short(),
            ),
            proptest::option::of(prop_oneof![
                "[0-9]{1,12}",
                "\\PC{0,12}",
                Just("18446744073709551616".to_string())
            ]),
            (
                short(),
                proptest::option::of(any::<u64>()),
                short(),
                short(),
            ),
        )
            .prop_map(
                |((ctype, cenc, headers), (mode, prio, corr, reply), exp, (id, ts, kind, app))| {
                    let mut p = BasicProperties::default();
                    if let Some(v) = ctype {
                        p = p.with_content_type(ShortString::from(v));
                    }
                    if let Some(v) = cenc {
                        p = p.with_content_encoding(ShortString::from(v));
                    }
                    if let Some(kv) = headers {
                        let mut t = FieldTable::default();
                        for (k, v) in kv {
                            t.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
                        }
                        p = p.with_headers(t);
                    }
                    if let Some(v) = mode {
                        p = p.with_delivery_mode(v);
                    }
                    if let Some(v) = prio {
                        p = p.with_priority(v);
                    }
                    if let Some(v) = corr {
                        p = p.with_correlation_id(ShortString::from(v));
                    }
                    if let Some(v) = reply {
                        p = p.with_reply_to(ShortString::from(v));
                    }
                    if let Some(v) = exp {
                        p = p.with_expiration(ShortString::from(v));
                    }
                    if let Some(v) = id {
                        p = p.with_message_id(ShortString::from(v));
                    }
                    if let Some(v) = ts {
                        p = p.with_timestamp(v);
                    }
                    if let Some(v) = kind {
                        p = p.with_type(ShortString::from(v));
                    }
                    if let Some(v) = app {
                        p = p.with_app_id(ShortString::from(v));
                    }
                    p
                },
            )
    }

    proptest! {
        /// Skimming a stored message's head gives the same paged head as decoding it,
        /// and the head's length.
        #[test]
        fn the_head_digest_agrees_with_the_decoded_message(
            properties in any_properties(),
            published_ms in 0u64..(1 << 50),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut msg = Message::for_tests(Bytes::from(body), published_ms);
            msg.raw_properties = crate::protocol::codec::encode::properties(&properties);
            msg.properties = properties;
            let blob = msg.encode();
            let decoded = Message::decode(&blob, Some(1)).expect("decodes");
            let digest = Message::head_digest(&blob).expect("a digest");
            prop_assert_eq!(digest.head_len, Message::head_len(&blob).expect("a head"));
            prop_assert_eq!(PagedHead::from_words(digest.words), PagedHead::of(&decoded));
        }
    }

    #[test]
    fn a_damaged_head_has_no_digest() {
        let mut msg = Message::for_tests(Bytes::from_static(b"body"), 5);
        msg.raw_properties = Bytes::from_static(&[0x01, 0x00, 9]);
        let blob = msg.encode();
        assert_eq!(
            Message::head_digest(&blob[..blob.len() - 5]),
            None,
            "cut short"
        );
        assert_eq!(
            Message::head_digest(&blob),
            None,
            "expiration runs past its end"
        );
    }

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
