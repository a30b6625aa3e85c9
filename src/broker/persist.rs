//! How the broker's durable things look in the store: definition keys and values, and
//! message blobs (routing info, raw properties, body). The store itself sees only bytes.
//!
//! Definitions are a format byte, then length-prefixed strings, flag octets and the
//! arguments in the AMQP field-table encoding itself, so that every value a client can
//! declare (NaN floats, byte arrays, decimals, tables as deep as the wire allows) is
//! stored bit-exact and reads back. Stores written before this format held JSON, which
//! cannot carry some of those values; they are still read, and rewritten at recovery.

use amq_protocol::types::FieldTable;
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use bytes::{Buf, Bytes};
use serde::Deserialize;

use super::exchange::{ExchangeDef, ExchangeKind};
use crate::protocol::fieldtable;
use crate::queue::{Message, QueueDef};

/// First byte of a definition in the binary format (JSON ones start with `{`).
const FORMAT_BINARY: u8 = 0x02;

/// Store key of a durable exchange.
pub fn exchange_key(vhost: &str, name: &str) -> String {
    format!("x/{vhost}\u{0}{name}")
}

/// Store key of a durable queue (its definition and the key of its entries).
pub fn queue_key(vhost: &str, name: &str) -> String {
    format!("q/{vhost}\u{0}{name}")
}

/// Store key of a binding between durable ends: the vhost, then every other field
/// length-prefixed (hex), so that no two bindings share a key whatever their names hold.
pub fn binding_key(vhost: &str, b: &StoredBinding) -> String {
    let mut w = Writer::default();
    w.str(&b.source);
    w.flag(b.to_exchange);
    w.str(&b.destination);
    w.str(&b.routing_key);
    w.table(&b.arguments);
    let mut key = format!("b/{vhost}\u{0}");
    for byte in w.0 {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// Appends definition fields.
#[derive(Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    fn str(&mut self, s: &str) {
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn flag(&mut self, b: bool) {
        self.0.push(b as u8);
    }

    fn table(&mut self, t: &FieldTable) {
        match gen_field_table(t)(std::mem::take(&mut self.0).into()) {
            Ok(ctx) => self.0 = ctx.into_inner().0,
            // Writing into a Vec cannot run out of room.
            Err(e) => tracing::error!("cannot encode a field table: {e:?}"),
        }
    }
}

/// Reads definition fields back; every read checks the bytes are there.
pub struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn str(&mut self) -> Option<String> {
        if self.0.len() < 4 {
            return None;
        }
        let n = self.0.get_u32() as usize;
        if self.0.len() < n {
            return None;
        }
        let s = std::str::from_utf8(&self.0[..n]).ok()?.to_owned();
        self.0.advance(n);
        Some(s)
    }

    fn flag(&mut self) -> Option<bool> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b != 0)
    }

    fn table(&mut self) -> Option<FieldTable> {
        let n = fieldtable::check_table(self.0).ok()?;
        let (_, t) = parse_field_table(&self.0[..n]).ok()?;
        self.0.advance(n);
        Some(t)
    }

    /// Nothing may follow the last field.
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// A stored definition: encoded in the binary format, decoded from it or from JSON.
pub trait StoredDefinition: Sized + for<'de> Deserialize<'de> {
    /// Appends the fields.
    fn write(&self, w: &mut Writer);
    /// Reads the fields back.
    fn read(r: &mut Reader) -> Option<Self>;

    /// The bytes to store.
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer(vec![FORMAT_BINARY]);
        self.write(&mut w);
        w.0
    }

    /// Reads stored bytes of either format; `None` when they cannot be read.
    fn decode(bytes: &[u8]) -> Option<Decoded<Self>> {
        match bytes.split_first() {
            Some((&FORMAT_BINARY, rest)) => {
                let mut r = Reader(rest);
                let value = Self::read(&mut r)?;
                r.end()?;
                Some(Decoded {
                    value,
                    legacy: false,
                })
            }
            Some((b'{', _)) => serde_json::from_slice(bytes).ok().map(|value| Decoded {
                value,
                legacy: true,
            }),
            _ => None,
        }
    }
}

/// A definition read back, and whether it was in the old JSON format (to be rewritten).
pub struct Decoded<T> {
    /// The definition.
    pub value: T,
    /// Stored as JSON by an earlier version.
    pub legacy: bool,
}

/// A durable exchange as stored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl StoredDefinition for StoredExchange {
    fn write(&self, w: &mut Writer) {
        w.str(&self.vhost);
        w.str(&self.name);
        w.str(&self.kind);
        w.flag(self.auto_delete);
        w.flag(self.internal);
        w.table(&self.arguments);
    }

    fn read(r: &mut Reader) -> Option<Self> {
        Some(StoredExchange {
            vhost: r.str()?,
            name: r.str()?,
            kind: r.str()?,
            auto_delete: r.flag()?,
            internal: r.flag()?,
            arguments: r.table()?,
        })
    }
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl StoredDefinition for StoredQueue {
    fn write(&self, w: &mut Writer) {
        w.str(&self.vhost);
        w.str(&self.name);
        w.flag(self.auto_delete);
        w.table(&self.arguments);
    }

    fn read(r: &mut Reader) -> Option<Self> {
        Some(StoredQueue {
            vhost: r.str()?,
            name: r.str()?,
            auto_delete: r.flag()?,
            arguments: r.table()?,
        })
    }
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl StoredDefinition for StoredBinding {
    fn write(&self, w: &mut Writer) {
        w.str(&self.vhost);
        w.str(&self.source);
        w.flag(self.to_exchange);
        w.str(&self.destination);
        w.str(&self.routing_key);
        w.table(&self.arguments);
    }

    fn read(r: &mut Reader) -> Option<Self> {
        Some(StoredBinding {
            vhost: r.str()?,
            source: r.str()?,
            to_exchange: r.flag()?,
            destination: r.str()?,
            routing_key: r.str()?,
            arguments: r.table()?,
        })
    }
}

/// Encodes a message for the store.
pub fn encode_message(m: &Message) -> Bytes {
    m.encode()
}

/// Decodes a stored message (the body stays a slice of the blob).
pub fn decode_message(blob: &Bytes, store_id: u64) -> Option<Message> {
    Message::decode(blob, Some(store_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, LongString};
    use proptest::prelude::*;

    /// Any field value a client can send, nested a few levels.
    fn any_value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<u32>().prop_map(|b| AMQPValue::Float(f32::from_bits(b))),
            any::<u64>().prop_map(|b| AMQPValue::Double(f64::from_bits(b))),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| AMQPValue::ByteArray(b.into())),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                proptest::collection::vec(("[a-z]{0,4}", inner), 0..4).prop_map(|kv| {
                    let mut t = FieldTable::default();
                    for (k, v) in kv {
                        t.insert(k.into(), v);
                    }
                    AMQPValue::FieldTable(t)
                }),
            ]
        })
    }

    fn any_table() -> impl Strategy<Value = FieldTable> {
        proptest::collection::vec(("[a-z-]{1,12}", any_value()), 0..6).prop_map(|kv| {
            let mut t = FieldTable::default();
            for (k, v) in kv {
                t.insert(k.into(), v);
            }
            t
        })
    }

    proptest! {
        /// Every definition a client can declare is stored and read back bit for bit
        /// (compared as bytes: a NaN is not equal to itself as a value).
        #[test]
        fn definitions_round_trip_bit_exact(
            vhost in "[ -~]{0,8}",
            name in "\\PC{0,16}",
            key in "\\PC{0,16}",
            flag in any::<bool>(),
            arguments in any_table(),
        ) {
            let q = StoredQueue { vhost: vhost.clone(), name: name.clone(), auto_delete: flag, arguments: arguments.clone() };
            let bytes = q.encode();
            let back = StoredQueue::decode(&bytes).expect("decodes");
            prop_assert!(!back.legacy);
            prop_assert_eq!(back.value.encode(), bytes);

            let x = StoredExchange { vhost: vhost.clone(), name: name.clone(), kind: "topic".into(), auto_delete: flag, internal: !flag, arguments: arguments.clone() };
            let bytes = x.encode();
            prop_assert_eq!(StoredExchange::decode(&bytes).expect("decodes").value.encode(), bytes);

            let b = StoredBinding { vhost, source: name.clone(), to_exchange: flag, destination: name, routing_key: key, arguments };
            let bytes = b.encode();
            let back = StoredBinding::decode(&bytes).expect("decodes").value;
            prop_assert_eq!(back.encode(), bytes);
            prop_assert_eq!(binding_key(&back.vhost, &back), binding_key(&b.vhost, &b));
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_definitions_are_refused_not_fatal(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = StoredQueue::decode(&bytes);
            let _ = StoredBinding::decode(&bytes);
            let _ = StoredExchange::decode(&bytes);
        }
    }

    #[test]
    fn binding_keys_cannot_collide_through_separators_in_names() {
        let b = |source: &str, destination: &str| StoredBinding {
            vhost: "/".into(),
            source: source.into(),
            to_exchange: false,
            destination: destination.into(),
            routing_key: "".into(),
            arguments: FieldTable::default(),
        };
        assert_ne!(
            binding_key("/", &b("a\u{0}b", "c")),
            binding_key("/", &b("a", "b\u{0}c"))
        );
    }

    #[test]
    fn json_definitions_of_earlier_versions_are_read_and_marked_for_rewrite() {
        let json = br#"{"vhost":"/","name":"q1","auto_delete":false,"arguments":{"x-max-length":{"LongInt":10}}}"#;
        let d = StoredQueue::decode(json).expect("reads the JSON format");
        assert!(d.legacy);
        assert_eq!(d.value.name, "q1");
        assert_eq!(
            d.value.arguments.inner().get("x-max-length"),
            Some(&AMQPValue::LongInt(10))
        );
        let again = StoredQueue::decode(&d.value.encode()).expect("binary");
        assert!(!again.legacy);
    }
}
