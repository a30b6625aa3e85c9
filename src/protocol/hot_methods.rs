//! The two methods every confirmed, acknowledged message brings in, basic.publish and
//! basic.ack, read straight from their fixed layout.
//!
//! amq-protocol's generated parser reads them through nom combinators and a list of
//! named flags built for every frame: about 1,400 instructions a frame (callgrind on
//! bench/compare row 3's scenario), a tenth of the broker's work per message. This reads
//! the same fields into the same amq-protocol types. Whatever it does not take for a
//! well-formed publish or ack (another method, a short payload, a name that is not
//! UTF-8) is left to amq-protocol's `parse_class`, which also gives a malformed frame
//! its error, so the two cannot disagree on what is refused; a property test holds them
//! to the same answers on what is accepted.

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::ShortString;

const CLASS_BASIC: u16 = 60;
const METHOD_PUBLISH: u16 = 40;
const METHOD_ACK: u16 = 80;

/// The method in a method frame's `payload` if it is a well-formed basic.publish or
/// basic.ack; `None` for anything else (to be read by `parse_class`). As `parse_class`,
/// it ignores octets past the method's fields.
pub fn parse(payload: &[u8]) -> Option<AMQPClass> {
    let (ids, fields) = payload.split_first_chunk::<4>()?;
    if u16::from_be_bytes([ids[0], ids[1]]) != CLASS_BASIC {
        return None;
    }
    let method = match u16::from_be_bytes([ids[2], ids[3]]) {
        METHOD_PUBLISH => basic::AMQPMethod::Publish(publish(fields)?),
        METHOD_ACK => basic::AMQPMethod::Ack(ack(fields)?),
        _ => return None,
    };
    Some(AMQPClass::Basic(method))
}

/// reserved-1 (short), exchange, routing-key, then the bits mandatory and immediate.
fn publish(fields: &[u8]) -> Option<basic::Publish> {
    let (_reserved, rest) = fields.split_first_chunk::<2>()?;
    let (exchange, rest) = short_string(rest)?;
    let (routing_key, rest) = short_string(rest)?;
    let &bits = rest.first()?;
    Some(basic::Publish {
        exchange,
        routing_key,
        mandatory: bits & 1 != 0,
        immediate: bits & 2 != 0,
    })
}

/// delivery-tag (long long), then the bit multiple.
fn ack(fields: &[u8]) -> Option<basic::Ack> {
    let (tag, rest) = fields.split_first_chunk::<8>()?;
    let &bits = rest.first()?;
    Some(basic::Ack {
        delivery_tag: u64::from_be_bytes(*tag),
        multiple: bits & 1 != 0,
    })
}

/// A short string: one length octet, then that many octets of UTF-8.
fn short_string(input: &[u8]) -> Option<(ShortString, &[u8])> {
    let (&len, rest) = input.split_first()?;
    let (text, rest) = rest.split_at_checked(usize::from(len))?;
    let text = std::str::from_utf8(text).ok()?;
    Some((ShortString::try_new(text).ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::parse_class;
    use proptest::prelude::*;

    fn publish_payload(exchange: &[u8], key: &[u8], bits: u8, tail: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 40, 0, 0, exchange.len() as u8];
        p.extend_from_slice(exchange);
        p.push(key.len() as u8);
        p.extend_from_slice(key);
        p.push(bits);
        p.extend_from_slice(tail);
        p
    }

    /// What amq-protocol makes of `payload`, if it takes it.
    fn reference(payload: &[u8]) -> Option<AMQPClass> {
        parse_class(payload).ok().map(|(_, method)| method)
    }

    #[test]
    fn reads_publish_and_ack_as_amq_protocol_does() {
        let publish = publish_payload(b"amq.direct", b"orders.eu", 0b11, b"");
        assert_eq!(parse(&publish), reference(&publish));
        assert!(parse(&publish).is_some());
        let mut ack = vec![0, 60, 0, 80];
        ack.extend_from_slice(&u64::MAX.to_be_bytes());
        ack.push(1);
        assert_eq!(parse(&ack), reference(&ack));
        assert!(parse(&ack).is_some());
    }

    #[test]
    fn leaves_other_methods_and_malformed_frames_to_amq_protocol() {
        // basic.qos, a short publish, a publish whose routing key is not UTF-8.
        assert_eq!(parse(&[0, 60, 0, 10, 0, 0, 0, 0, 0, 1, 0]), None);
        assert_eq!(parse(&publish_payload(b"", b"rk", 0, b"")[..9]), None);
        assert_eq!(parse(&publish_payload(b"", &[0xff, 0xfe], 0, b"")), None);
        assert_eq!(parse(&[0, 60, 0, 80, 0, 0, 0]), None);
    }

    /// A name: mostly text (UTF-8 of up to 255 octets), sometimes any octets.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => "[a-zA-Z0-9.*#_-]{0,40}".prop_map(String::into_bytes),
            1 => "\\PC{0,60}".prop_map(|s| s.into_bytes()).prop_filter("a short string", |b| b.len() < 256),
            1 => proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    proptest! {
        /// On any publish-shaped payload (names of any bytes, any bits, trailing
        /// octets), and on arbitrary bytes after a publish or ack header: whenever this
        /// parser takes a frame, amq-protocol reads the very same method from it.
        #[test]
        fn agrees_with_amq_protocol(
            exchange in name(),
            key in name(),
            bits in any::<u8>(),
            tail in proptest::collection::vec(any::<u8>(), 0..4),
            raw in proptest::collection::vec(any::<u8>(), 0..24),
            ack in any::<bool>(),
        ) {
            let shaped = publish_payload(&exchange, &key, bits, &tail);
            let mine = parse(&shaped);
            if mine.is_some() {
                prop_assert_eq!(&mine, &reference(&shaped));
            }
            // Names of text always make a well-formed publish, which both must take.
            if std::str::from_utf8(&exchange).is_ok() && std::str::from_utf8(&key).is_ok() {
                prop_assert!(mine.is_some());
            }
            let mut loose = vec![0, 60, 0, if ack { 80 } else { 40 }];
            loose.extend_from_slice(&raw);
            if let Some(method) = parse(&loose) {
                prop_assert_eq!(Some(method), reference(&loose));
            }
        }
    }
}
