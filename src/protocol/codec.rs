//! Frame cutting and writing.
//!
//! Reading follows mini-redis: check that a whole frame is buffered, parse it, advance.
//! Bodies are split off the read buffer as `Bytes` (no copy); methods and content
//! headers are parsed with amq-protocol, except basic.publish and basic.ack, which every
//! message brings and `hot_methods` reads into amq-protocol's types. Writing appends to
//! one `BytesMut` that the connection flushes once per batch; the per-message frames
//! (deliver, ack, content) are written by hand, the rest through amq-protocol's
//! generator.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::basic::parse_properties;
use amq_protocol::protocol::{AMQPClass, BasicProperties, parse_class};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::reply::{AmqpError, ReplyCode};
use super::{fieldtable, hot_methods};

/// Frame type octets of AMQP 0-9-1.
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Bytes of a frame around its payload: type, channel, size, end.
pub const FRAME_OVERHEAD: usize = 8;

/// The 8 bytes a 0-9-1 client opens with, and that the broker answers a bad one with.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// A content header: the parsed properties for the broker's own use, and the raw
/// property bytes (flags + list) to pass on unchanged.
#[derive(Debug, Clone)]
pub struct ContentHeader {
    /// Class of the content (60 = basic).
    pub class_id: u16,
    /// Total body size announced.
    pub body_size: u64,
    /// Properties as parsed.
    pub properties: BasicProperties,
    /// Property flags and values exactly as received.
    pub raw_properties: Bytes,
}

/// One frame from a client.
#[derive(Debug)]
pub enum InFrame {
    /// A method frame.
    Method(u16, AMQPClass),
    /// A content header frame.
    Header(u16, Box<ContentHeader>),
    /// A content body frame: a slice of the read buffer.
    Body(u16, Bytes),
    /// A heartbeat (channel should be 0).
    Heartbeat(u16),
}

/// Cuts frames out of a read buffer, enforcing the negotiated frame_max.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    /// Largest frame accepted, overhead included (0 = no limit beyond u32).
    pub frame_max: u32,
}

impl tokio_util::codec::Decoder for FrameDecoder {
    type Item = InFrame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<InFrame>, DecodeError> {
        self.decode_frame(src).map_err(DecodeError::Amqp)
    }
}

/// Why reading stopped: a protocol error to report, or the socket failed.
#[derive(Debug)]
pub enum DecodeError {
    /// The peer sent something invalid: close the connection with this error.
    Amqp(AmqpError),
    /// I/O failure on the socket.
    Io(std::io::Error),
}

impl From<std::io::Error> for DecodeError {
    fn from(e: std::io::Error) -> Self {
        DecodeError::Io(e)
    }
}

fn frame_error(text: impl Into<String>) -> AmqpError {
    AmqpError::new(ReplyCode::FrameError, text)
}

impl FrameDecoder {
    /// Returns the next whole frame, `None` if more bytes are needed.
    pub fn decode_frame(&mut self, src: &mut BytesMut) -> Result<Option<InFrame>, AmqpError> {
        if src.len() < 7 {
            return Ok(None);
        }
        let kind = src[0];
        let channel = u16::from_be_bytes([src[1], src[2]]);
        let size = u32::from_be_bytes([src[3], src[4], src[5], src[6]]) as usize;
        // As RabbitMQ, a payload of up to frame_max octets is accepted (the frame's own 8
        // octets on top): some clients fill body frames to frame_max.
        if self.frame_max != 0 && size > self.frame_max as usize {
            return Err(frame_error(format!(
                "type {kind}, all octets = <<>>: {{frame_too_large,{},{}}}",
                size,
                self.frame_max as usize - FRAME_OVERHEAD
            )));
        }
        if src.len() < size + FRAME_OVERHEAD {
            src.reserve(size + FRAME_OVERHEAD - src.len());
            return Ok(None);
        }
        if src[7 + size] != FRAME_END {
            return Err(frame_error(format!("type {kind}, bad frame end marker")));
        }
        src.advance(7);
        let payload = src.split_to(size).freeze();
        src.advance(1);
        let frame = match kind {
            FRAME_METHOD => {
                if let Err(e) = fieldtable::check_method(&payload) {
                    return Err(table_error(&payload, e));
                }
                if let Some(method) = hot_methods::parse(&payload) {
                    return Ok(Some(InFrame::Method(channel, method)));
                }
                match parse_class(&payload[..]) {
                    Ok((_, method)) => {
                        check_qos_prefetch_size(&method, &payload)?;
                        InFrame::Method(channel, method)
                    }
                    Err(_) => return Err(method_error(&payload)),
                }
            }
            FRAME_HEADER => InFrame::Header(channel, Box::new(parse_header(&payload)?)),
            FRAME_BODY => InFrame::Body(channel, payload),
            FRAME_HEARTBEAT => InFrame::Heartbeat(channel),
            other => return Err(frame_error(format!("type {other}, unknown frame type"))),
        };
        Ok(Some(frame))
    }
}

/// basic.qos with a prefetch_size other than 0 is RabbitMQ's 540 (amq-protocol does not
/// keep the field, so it is read from the payload: class, method, then the u32).
fn check_qos_prefetch_size(method: &AMQPClass, payload: &[u8]) -> Result<(), AmqpError> {
    if let AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Qos(_)) = method
        && let Some(size) = payload.get(4..8)
    {
        let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]);
        if size != 0 {
            return Err(AmqpError::new(
                ReplyCode::NotImplemented,
                format!("prefetch_size!=0 ({size})"),
            )
            .at(60, 10));
        }
    }
    Ok(())
}

/// Whether a decode error is an unknown class or method: RabbitMQ cannot parse such a
/// frame and drops the socket without a connection.close.
pub fn is_unknown_method(e: &AmqpError) -> bool {
    e.code == ReplyCode::NotImplemented && e.text.starts_with(UNKNOWN_METHOD)
}

const UNKNOWN_METHOD: &str = "unknown method";

/// A method whose field table the bounded walk refused: too deep or an unknown type is a
/// syntax error naming the method; a length past the end is reported as the parser would.
fn table_error(payload: &[u8], e: fieldtable::TableError) -> AmqpError {
    if e == fieldtable::TableError::Truncated {
        return method_error(payload);
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    AmqpError::new(
        ReplyCode::SyntaxError,
        format!("{e} in arguments of method {class}.{method}"),
    )
}

/// Tells an unknown method (540) from malformed arguments of a known one (502).
fn method_error(payload: &[u8]) -> AmqpError {
    if payload.len() < 4 {
        return AmqpError::new(ReplyCode::FrameError, "method frame too short");
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    let known = matches!(
        (class, method),
        (10, 10..=61)
            | (20, 10..=41)
            | (30, 10..=11)
            | (40, 10..=51)
            | (50, 10..=51)
            | (60, 10..=120)
            | (85, 10..=11)
            | (90, 10..=31)
    );
    if known {
        AmqpError::new(
            ReplyCode::SyntaxError,
            format!("cannot decode arguments of method {class}.{method}"),
        )
    } else {
        AmqpError::new(
            ReplyCode::NotImplemented,
            format!("{UNKNOWN_METHOD} {class}.{method}"),
        )
    }
}

fn parse_header(payload: &Bytes) -> Result<ContentHeader, AmqpError> {
    if payload.len() < 14 {
        return Err(frame_error("content header too short"));
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let body_size = u64::from_be_bytes(payload[4..12].try_into().unwrap_or([0; 8]));
    let raw_properties = payload.slice(12..);
    // A length past the end is left for the property parser to report.
    if let Err(e) = fieldtable::check_properties(&raw_properties)
        && e != fieldtable::TableError::Truncated
    {
        return Err(AmqpError::new(
            ReplyCode::SyntaxError,
            format!("{e} in content headers"),
        ));
    }
    let properties = match parse_properties(&raw_properties[..]) {
        Ok((_, p)) => p,
        Err(_) => {
            return Err(AmqpError::new(
                ReplyCode::SyntaxError,
                "cannot decode content properties",
            ));
        }
    };
    Ok(ContentHeader {
        class_id,
        body_size,
        properties,
        raw_properties,
    })
}

/// Writers of outgoing frames into a batch buffer.
pub mod encode {
    use super::*;

    /// Any method, through amq-protocol's generator.
    pub fn method(buf: &mut BytesMut, channel: u16, method: AMQPClass) {
        let frame = AMQPFrame::Method(channel, method);
        let scratch: Vec<u8> = Vec::with_capacity(128);
        match gen_frame(&frame)(WriteContext::from(scratch)) {
            Ok(ctx) => buf.extend_from_slice(&ctx.into_inner().0),
            // Generation into a Vec cannot run out of room; a failure is a bug worth a log.
            Err(e) => tracing::error!("cannot encode {frame}: {e:?}"),
        }
    }

    fn short_str(buf: &mut BytesMut, s: &str) {
        let b = s.as_bytes();
        let n = b.len().min(255);
        buf.put_u8(n as u8);
        buf.put_slice(&b[..n]);
    }

    /// basic.deliver, written by hand: it is on the hot path.
    pub fn deliver(
        buf: &mut BytesMut,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
    ) {
        let size = 4
            + 1
            + consumer_tag.len().min(255)
            + 8
            + 1
            + 1
            + exchange.len().min(255)
            + 1
            + routing_key.len().min(255);
        buf.reserve(size + FRAME_OVERHEAD);
        buf.put_u8(FRAME_METHOD);
        buf.put_u16(channel);
        buf.put_u32(size as u32);
        buf.put_u16(60);
        buf.put_u16(60);
        short_str(buf, consumer_tag);
        buf.put_u64(delivery_tag);
        buf.put_u8(redelivered as u8);
        short_str(buf, exchange);
        short_str(buf, routing_key);
        buf.put_u8(FRAME_END);
    }

    /// basic.ack / basic.nack from the broker (publisher confirms), by hand.
    pub fn confirm(buf: &mut BytesMut, channel: u16, tag: u64, multiple: bool, ack: bool) {
        buf.put_u8(FRAME_METHOD);
        buf.put_u16(channel);
        buf.put_u32(13);
        buf.put_u16(60);
        buf.put_u16(if ack { 80 } else { 120 });
        buf.put_u64(tag);
        buf.put_u8(multiple as u8);
        buf.put_u8(FRAME_END);
    }

    /// A content header with the raw properties passed through, then the body cut into
    /// frames of at most `frame_max`.
    pub fn content(
        buf: &mut BytesMut,
        channel: u16,
        raw_properties: &[u8],
        body: &[u8],
        frame_max: u32,
    ) {
        let max_chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
        buf.reserve(raw_properties.len() + body.len() + 40);
        buf.put_u8(FRAME_HEADER);
        buf.put_u16(channel);
        buf.put_u32((12 + raw_properties.len()) as u32);
        buf.put_u16(60);
        buf.put_u16(0);
        buf.put_u64(body.len() as u64);
        buf.put_slice(raw_properties);
        buf.put_u8(FRAME_END);
        for chunk in body.chunks(max_chunk) {
            buf.put_u8(FRAME_BODY);
            buf.put_u16(channel);
            buf.put_u32(chunk.len() as u32);
            buf.put_slice(chunk);
            buf.put_u8(FRAME_END);
        }
    }

    /// A heartbeat frame.
    pub fn heartbeat(buf: &mut BytesMut) {
        buf.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
    }

    /// Raw property bytes for `props` (used when the broker makes a message itself).
    pub fn properties(props: &BasicProperties) -> Bytes {
        let scratch: Vec<u8> = Vec::with_capacity(64);
        match amq_protocol::protocol::basic::gen_properties(props)(WriteContext::from(scratch)) {
            Ok(ctx) => Bytes::from(ctx.into_inner().0),
            Err(_) => Bytes::from_static(&[0, 0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic;

    #[test]
    fn method_round_trip_and_body_is_a_slice() {
        let mut buf = BytesMut::new();
        encode::method(
            &mut buf,
            3,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "ex".into(),
                routing_key: "rk".into(),
                mandatory: true,
                immediate: false,
            })),
        );
        encode::content(&mut buf, 3, &[0, 0], b"hello world", 8 + 5);
        let mut d = FrameDecoder { frame_max: 4096 };
        let Some(InFrame::Method(3, AMQPClass::Basic(basic::AMQPMethod::Publish(p)))) =
            d.decode_frame(&mut buf).unwrap()
        else {
            panic!("expected publish")
        };
        assert_eq!(p.routing_key.as_str(), "rk");
        let Some(InFrame::Header(3, h)) = d.decode_frame(&mut buf).unwrap() else {
            panic!("expected header")
        };
        assert_eq!(h.body_size, 11);
        let mut body = Vec::new();
        while let Some(InFrame::Body(3, b)) = d.decode_frame(&mut buf).unwrap() {
            assert!(b.len() <= 5);
            body.extend_from_slice(&b);
        }
        assert_eq!(body, b"hello world");
    }

    #[test]
    fn oversized_frame_is_a_frame_error() {
        let mut buf = BytesMut::new();
        encode::content(&mut buf, 1, &[0, 0], &[7u8; 100], 1000);
        let mut d = FrameDecoder { frame_max: 50 };
        let _ = d.decode_frame(&mut buf); // header fits
        let err = d.decode_frame(&mut buf).unwrap_err();
        assert_eq!(err.code, ReplyCode::FrameError);
    }

    #[test]
    fn bad_frame_end_is_a_frame_error() {
        let mut buf = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0xAB][..]);
        let mut d = FrameDecoder { frame_max: 0 };
        assert_eq!(
            d.decode_frame(&mut buf).unwrap_err().code,
            ReplyCode::FrameError
        );
    }
}
