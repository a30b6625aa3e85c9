//! A minimal AMQP 0-9-1 client connection at the frame level: handshake and
//! request/response methods through the project's codec, and in-place parsing and
//! hand-written encoding of the per-message frames (publish, deliver, ack, confirm).

use std::io;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amq_protocol::uri::AMQPUri;
use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::codec::{FRAME_OVERHEAD, FrameDecoder, InFrame, PROTOCOL_HEADER, encode};

/// Frame type octets.
pub const FRAME_METHOD: u8 = 1;
/// Content header frame type.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame type.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame type.
pub const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

/// Largest frame this client asks for.
const CLIENT_FRAME_MAX: u32 = 128 * 1024;
/// How long a request (declare, consume, close, ...) may wait for its answer.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Spare room kept in the read buffer before each read.
pub const READ_CHUNK: usize = 256 * 1024;

/// One client connection with channel 1 open.
pub struct Conn {
    /// The socket (non-blocking; the hot loops use `ready` + `try_read`/`try_write`).
    pub stream: TcpStream,
    /// Bytes read and not yet parsed.
    pub rbuf: BytesMut,
    /// Bytes to write.
    pub wbuf: BytesMut,
    /// Frame cutter for everything that is not a per-message frame.
    pub decoder: FrameDecoder,
    /// Negotiated frame size limit, overhead included.
    pub frame_max: u32,
    /// Product and version the broker announced.
    pub server: String,
    /// The last write was cut short: wait for the socket to become writable.
    pub write_blocked: bool,
}

/// A frame at the front of a buffer: its type, channel and payload length.
#[derive(Debug, Clone, Copy)]
pub struct FrameHead {
    /// Frame type octet.
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// Payload length.
    pub size: usize,
}

/// The head of the first frame of `buf` if the whole frame is buffered.
#[inline]
pub fn whole_frame(buf: &[u8]) -> Option<FrameHead> {
    if buf.len() < 7 {
        return None;
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if buf.len() < size + FRAME_OVERHEAD {
        return None;
    }
    Some(FrameHead {
        kind: buf[0],
        channel: u16::from_be_bytes([buf[1], buf[2]]),
        size,
    })
}

/// (class id, method id) of a method frame payload.
#[inline]
pub fn method_id(payload: &[u8]) -> (u16, u16) {
    if payload.len() < 4 {
        return (0, 0);
    }
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    )
}

/// Delivery tag and redelivered flag of a basic.deliver payload.
#[inline]
pub fn parse_deliver(payload: &[u8]) -> Option<(u64, bool)> {
    let tag_len = *payload.get(4)? as usize;
    let at = 5 + tag_len;
    let tag = u64::from_be_bytes(payload.get(at..at + 8)?.try_into().ok()?);
    let redelivered = payload.get(at + 8)? & 1 != 0;
    Some((tag, redelivered))
}

/// Delivery tag and `multiple` bit of a basic.ack / basic.nack payload.
#[inline]
pub fn parse_ack(payload: &[u8]) -> Option<(u64, bool)> {
    let tag = u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?);
    Some((tag, payload.get(12)? & 1 != 0))
}

/// Body size announced by a content header payload.
#[inline]
pub fn parse_body_size(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?))
}

/// Writes a client basic.ack (the same layout as a broker's confirm).
#[inline]
pub fn write_ack(buf: &mut BytesMut, channel: u16, tag: u64, multiple: bool) {
    encode::confirm(buf, channel, tag, multiple, true);
}

/// The frames of one published message, written once; each publish copies them and
/// stamps the first 16 body bytes.
pub struct PublishTemplate {
    /// basic.publish + content header + body frames.
    pub bytes: Vec<u8>,
    /// Offset of the first body byte within `bytes`.
    pub body_at: usize,
}

impl PublishTemplate {
    /// Frames for a message of `size` bytes to `exchange` with `routing_key`.
    pub fn new(
        channel: u16,
        exchange: &str,
        routing_key: &str,
        size: usize,
        persistent: bool,
        frame_max: u32,
    ) -> PublishTemplate {
        let mut buf = BytesMut::new();
        let short = |s: &str| s.len().min(255);
        let size_method = 4 + 2 + 1 + short(exchange) + 1 + short(routing_key) + 1;
        buf.put_u8(FRAME_METHOD);
        buf.put_u16(channel);
        buf.put_u32(size_method as u32);
        buf.put_u16(60);
        buf.put_u16(40);
        buf.put_u16(0);
        buf.put_u8(short(exchange) as u8);
        buf.put_slice(&exchange.as_bytes()[..short(exchange)]);
        buf.put_u8(short(routing_key) as u8);
        buf.put_slice(&routing_key.as_bytes()[..short(routing_key)]);
        buf.put_u8(0);
        buf.put_u8(FRAME_END);
        // delivery-mode is property flag bit 12.
        let props: &[u8] = if persistent {
            &[0x10, 0x00, 2]
        } else {
            &[0x10, 0x00, 1]
        };
        let header_at = buf.len();
        encode::content(&mut buf, channel, props, &vec![0u8; size], frame_max);
        let body_at = header_at + FRAME_OVERHEAD + 12 + props.len() + 7;
        PublishTemplate {
            bytes: buf.to_vec(),
            body_at,
        }
    }
}

/// A connection-level or channel-level close from the broker.
fn close_error(method: &AMQPClass) -> Option<anyhow::Error> {
    match method {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => Some(anyhow!(
            "broker closed the connection: {} {}",
            c.reply_code,
            c.reply_text.as_str()
        )),
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => Some(anyhow!(
            "broker closed the channel: {} {}",
            c.reply_code,
            c.reply_text.as_str()
        )),
        _ => None,
    }
}

impl Conn {
    /// Connects, authenticates (PLAIN), tunes (no heartbeats) and opens the vhost and
    /// channel 1.
    pub async fn open(uri: &AMQPUri, name: &str) -> Result<Conn> {
        let addr = (uri.authority.host.as_str(), uri.authority.port);
        let stream = tokio::time::timeout(RPC_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("timed out connecting to {}:{}", addr.0, addr.1))?
            .with_context(|| format!("cannot connect to {}:{}", addr.0, addr.1))?;
        stream.set_nodelay(true)?;
        let mut c = Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(64 * 1024),
            decoder: FrameDecoder { frame_max: 0 },
            frame_max: 4096,
            server: String::new(),
            write_blocked: false,
        };
        c.stream.write_all(PROTOCOL_HEADER).await?;
        match c.recv_method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(start))) => {
                let props = start.server_properties.inner();
                let text = |k: &str| match props.get(k) {
                    Some(AMQPValue::LongString(s)) => {
                        String::from_utf8_lossy(s.as_bytes()).into_owned()
                    }
                    _ => String::new(),
                };
                c.server = format!("{} {}", text("product"), text("version"))
                    .trim()
                    .to_string();
            }
            (_, other) => bail!("expected connection.start, got {other:?}"),
        }
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "basic.nack",
            "connection.blocked",
            "authentication_failure_close",
        ] {
            caps.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        props.insert("product".into(), text("warren perf"));
        props.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
        props.insert("connection_name".into(), text(name));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        let user = &uri.authority.userinfo;
        let response = format!("\0{}\0{}", user.username, user.password);
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(response.into_bytes()),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let tune = match c.recv_method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
            (_, other) => bail!("expected connection.tune, got {other:?}"),
        };
        let frame_max = match tune.frame_max {
            0 => CLIENT_FRAME_MAX,
            n => n.min(CLIENT_FRAME_MAX),
        };
        c.frame_max = frame_max;
        let vhost = if uri.vhost.is_empty() {
            "/"
        } else {
            &uri.vhost
        };
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        c.rpc(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost.into(),
            })),
        )
        .await?;
        c.rpc(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        Ok(c)
    }

    /// Encodes `method` and writes it (and anything already queued) out.
    pub async fn send(&mut self, channel: u16, method: AMQPClass) -> io::Result<()> {
        encode::method(&mut self.wbuf, channel, method);
        self.flush().await
    }

    /// Writes out everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads until a method frame arrives; heartbeats and stray content are skipped.
    pub async fn recv_method(&mut self) -> Result<(u16, AMQPClass)> {
        tokio::time::timeout(RPC_TIMEOUT, async {
            loop {
                match self
                    .decoder
                    .decode_frame(&mut self.rbuf)
                    .map_err(|e| anyhow!("bad frame from the broker: {}", e.text))?
                {
                    Some(InFrame::Method(ch, m)) => return Ok((ch, m)),
                    Some(_) => continue,
                    None => {
                        self.rbuf.reserve(READ_CHUNK);
                        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                            bail!("the broker closed the socket");
                        }
                    }
                }
            }
        })
        .await
        .map_err(|_| anyhow!("timed out waiting for the broker"))?
    }

    /// Sends a synchronous method on `channel` and returns the broker's answer; a close
    /// from the broker is an error (answered with close-ok).
    pub async fn rpc(&mut self, ch: u16, method: AMQPClass) -> Result<AMQPClass> {
        let what = format!(
            "{}.{}",
            method.get_amqp_class_id(),
            method.get_amqp_method_id()
        );
        self.send(ch, method).await?;
        loop {
            let (got_ch, m) = self.recv_method().await?;
            if let Some(e) = self.on_close(got_ch, &m).await {
                return Err(e.context(format!("answering method {what}")));
            }
            if got_ch == ch {
                return Ok(m);
            }
        }
    }

    /// When `m` is a close from the broker: answers it and returns it as an error.
    pub async fn on_close(&mut self, ch: u16, m: &AMQPClass) -> Option<anyhow::Error> {
        let e = close_error(m)?;
        let ok = match m {
            AMQPClass::Connection(_) => {
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}))
            }
            _ => AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        };
        let _ = self.send(ch, ok).await;
        Some(e)
    }

    /// Handles a frame the hot loops do not: returns an error for a close from the
    /// broker or a cancelled consumer, ignores the rest.
    pub async fn slow_frame(&mut self) -> Result<()> {
        let frame = self
            .decoder
            .decode_frame(&mut self.rbuf)
            .map_err(|e| anyhow!("bad frame from the broker: {}", e.text))?;
        if let Some(InFrame::Method(ch, m)) = frame {
            if let Some(e) = self.on_close(ch, &m).await {
                return Err(e);
            }
            if let AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) = m {
                bail!("the broker cancelled consumer {}", c.consumer_tag.as_str());
            }
        }
        Ok(())
    }

    /// Closes channel 1 and then the connection, waiting up to `patience` for the
    /// answers: channel.close-ok comes after the broker handled everything sent before
    /// (a broker may drop publishes still in flight when the connection closes).
    pub async fn close(mut self, patience: Duration) {
        let _ = tokio::time::timeout(patience, async {
            let channel_close = AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            }));
            if self.send(1, channel_close).await.is_err() {
                return;
            }
            loop {
                match self.recv_method().await {
                    Ok((1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))) => break,
                    Ok((0, AMQPClass::Connection(connection::AMQPMethod::Close(_)))) | Err(_) => {
                        return;
                    }
                    Ok(_) => {}
                }
            }
            let close = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            }));
            if self.send(0, close).await.is_err() {
                return;
            }
            loop {
                match self.recv_method().await {
                    Ok((0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))) | Err(_) => {
                        return;
                    }
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    /// Drops the first frame of the read buffer (its head already parsed).
    #[inline]
    pub fn skip_frame(&mut self, head: FrameHead) {
        self.rbuf.advance(head.size + FRAME_OVERHEAD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_template_decodes_and_body_offset_is_right() {
        let mut t = PublishTemplate::new(1, "ex", "key", 100, true, 4096);
        let at = t.body_at;
        t.bytes[at..at + 4].copy_from_slice(b"STMP");
        let mut buf = BytesMut::from(&t.bytes[..]);
        let mut d = FrameDecoder { frame_max: 4096 };
        let Ok(Some(InFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p))))) =
            d.decode_frame(&mut buf)
        else {
            panic!("expected basic.publish")
        };
        assert_eq!((p.exchange.as_str(), p.routing_key.as_str()), ("ex", "key"));
        let Ok(Some(InFrame::Header(1, h))) = d.decode_frame(&mut buf) else {
            panic!("expected a header")
        };
        assert_eq!(h.body_size, 100);
        assert_eq!(h.properties.delivery_mode(), &Some(2));
        let Ok(Some(InFrame::Body(1, b))) = d.decode_frame(&mut buf) else {
            panic!("expected a body")
        };
        assert_eq!(&b[..4], b"STMP");
        assert!(buf.is_empty());
    }

    #[test]
    fn deliver_and_ack_parse_in_place() {
        let mut buf = BytesMut::new();
        encode::deliver(&mut buf, 1, "ctag-1", 77, true, "ex", "rk");
        write_ack(&mut buf, 1, 78, true);
        let h = whole_frame(&buf).expect("whole");
        let payload = &buf[7..7 + h.size];
        assert_eq!(method_id(payload), (60, 60));
        assert_eq!(parse_deliver(payload), Some((77, true)));
        buf.advance(h.size + FRAME_OVERHEAD);
        let h = whole_frame(&buf).expect("whole");
        assert_eq!(parse_ack(&buf[7..7 + h.size]), Some((78, true)));
    }
}
