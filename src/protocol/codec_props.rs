//! Round trips of the hand-written frame encoders: what `encode` writes, amq-protocol's
//! own parser (the one clients use, in lapin) reads back field for field, and Warren's
//! decoder cuts into the same frames.

use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic};
use bytes::BytesMut;
use proptest::prelude::*;

use super::codec::{FrameDecoder, InFrame, encode};

/// Every frame in `buf`, parsed by amq-protocol.
fn client_frames(mut buf: &[u8]) -> Vec<AMQPFrame> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (rest, f) = parse_frame(buf).expect("a client parses what Warren writes");
        out.push(f);
        buf = rest;
    }
    out
}

fn short(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::char::range(' ', '~'), 0..max)
        .prop_map(|c| c.into_iter().collect())
}

proptest! {
    #[test]
    fn deliver_round_trips(
        channel in 1u16..,
        tag in short(255),
        delivery_tag in any::<u64>(),
        redelivered in any::<bool>(),
        exchange in short(255),
        key in short(255),
    ) {
        let mut buf = BytesMut::new();
        encode::deliver(&mut buf, channel, &tag, delivery_tag, redelivered, &exchange, &key);
        let frames = client_frames(&buf);
        prop_assert_eq!(frames.len(), 1);
        match &frames[0] {
            AMQPFrame::Method(ch, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                prop_assert_eq!(*ch, channel);
                prop_assert_eq!(d.consumer_tag.as_str(), tag.as_str());
                prop_assert_eq!(d.delivery_tag, delivery_tag);
                prop_assert_eq!(d.redelivered, redelivered);
                prop_assert_eq!(d.exchange.as_str(), exchange.as_str());
                prop_assert_eq!(d.routing_key.as_str(), key.as_str());
            }
            other => prop_assert!(false, "expected basic.deliver, got {other:?}"),
        }
    }

    #[test]
    fn confirm_round_trips(channel in 1u16.., tag in any::<u64>(), multiple in any::<bool>(), ack in any::<bool>()) {
        let mut buf = BytesMut::new();
        encode::confirm(&mut buf, channel, tag, multiple, ack);
        let frames = client_frames(&buf);
        match &frames[..] {
            [AMQPFrame::Method(ch, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))] if ack => {
                prop_assert_eq!((*ch, a.delivery_tag, a.multiple), (channel, tag, multiple));
            }
            [AMQPFrame::Method(ch, AMQPClass::Basic(basic::AMQPMethod::Nack(n)))] if !ack => {
                prop_assert_eq!((*ch, n.delivery_tag, n.multiple, n.requeue), (channel, tag, multiple, false));
            }
            other => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    /// A content header with properties, then the body cut at frame_max: clients read the
    /// same properties and body, and Warren's decoder cuts the same frames back.
    #[test]
    fn content_round_trips(
        channel in 1u16..,
        body in proptest::collection::vec(any::<u8>(), 0..3000),
        frame_max in 4096u32..8192,
        content_type in proptest::option::of(short(40)),
        priority in proptest::option::of(0u8..10),
        persistent in any::<bool>(),
    ) {
        let mut props = basic::AMQPProperties::default();
        if let Some(ct) = &content_type {
            props = props.with_content_type(ct.as_str().into());
        }
        if let Some(p) = priority {
            props = props.with_priority(p);
        }
        if persistent {
            props = props.with_delivery_mode(2);
        }
        let raw = encode::properties(&props);
        let mut buf = BytesMut::new();
        encode::content(&mut buf, channel, &raw, &body, frame_max);
        let frames = client_frames(&buf);
        let mut got = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            match f {
                AMQPFrame::Header(ch, h) if i == 0 => {
                    prop_assert_eq!(*ch, channel);
                    prop_assert_eq!(h.body_size, body.len() as u64);
                    prop_assert_eq!(&h.properties, &props);
                }
                AMQPFrame::Body(ch, b) if i > 0 => {
                    prop_assert_eq!(*ch, channel);
                    prop_assert!(b.len() + 8 <= frame_max as usize);
                    got.extend_from_slice(b);
                }
                other => prop_assert!(false, "unexpected frame {other:?}"),
            }
        }
        prop_assert_eq!(&got, &body);

        let mut decoder = FrameDecoder { frame_max };
        let mut again = Vec::new();
        while let Some(f) = decoder.decode_frame(&mut buf).expect("Warren reads its own frames") {
            match f {
                InFrame::Header(_, h) => prop_assert_eq!(&h.raw_properties[..], &raw[..]),
                InFrame::Body(_, b) => again.extend_from_slice(&b),
                other => prop_assert!(false, "unexpected {other:?}"),
            }
        }
        prop_assert_eq!(again, body);
    }
}
