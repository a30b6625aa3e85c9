//! A raw AMQP 0-9-1 client over a tokio `TcpStream`: writes whatever bytes a test wants
//! and reads frames back with amq-protocol's parser.

use std::time::Duration;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use amq_protocol::types::{FieldTable, LongString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The protocol header of AMQP 0-9-1.
pub const HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// One raw connection.
pub struct Raw {
    pub stream: TcpStream,
}

/// What the server offered in connection.tune.
#[derive(Debug, Clone, Copy)]
pub struct Tune {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

/// A frame read from the server, or why none could be.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Read {
    Frame(AMQPFrame),
    /// The server closed the socket (EOF or reset).
    Closed,
    /// Nothing arrived in time.
    Timeout,
}

/// Encodes one frame.
pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = gen_frame(frame)(WriteContext::from(Vec::new())).expect("frame encodes");
    ctx.into_inner().0
}

/// Encodes a method frame.
pub fn method(channel: u16, m: AMQPClass) -> Vec<u8> {
    encode(&AMQPFrame::Method(channel, m))
}

/// basic.publish + content header + one body frame, as bytes.
pub fn publish_frames(
    ch: u16,
    exchange: &str,
    key: &str,
    mandatory: bool,
    persistent: bool,
    body: &[u8],
) -> Vec<u8> {
    let mut out = method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.into(),
            routing_key: key.into(),
            mandatory,
            immediate: false,
        })),
    );
    let properties = if persistent {
        basic::AMQPProperties::default().with_delivery_mode(2)
    } else {
        basic::AMQPProperties::default()
    };
    out.extend(encode(&AMQPFrame::Header(
        ch,
        AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties,
        },
    )));
    out.extend(encode(&AMQPFrame::Body(ch, body.to_vec())));
    out
}

impl Raw {
    /// Opens the TCP connection; nothing is sent yet.
    pub async fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).ok();
        Raw { stream }
    }

    /// Connects and completes the handshake (PLAIN guest/guest, vhost "/"), answering
    /// tune with the server's channel_max and frame_max and the given heartbeat.
    pub async fn open(addr: &str, heartbeat: u16) -> (Raw, Tune) {
        let mut raw = Raw::connect(addr).await;
        let tune = raw.handshake(|t| Tune { heartbeat, ..t }).await;
        (raw, tune)
    }

    /// Writes bytes as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Writes bytes, ignoring errors (the server may have closed already).
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Writes a method frame.
    pub async fn send_method(&mut self, channel: u16, m: AMQPClass) {
        self.send(&method(channel, m)).await;
    }

    /// Header, start/start-ok, tune/tune-ok (values chosen by `answer`), open/open-ok.
    /// Returns what the server offered.
    pub async fn handshake(&mut self, answer: impl FnOnce(Tune) -> Tune) -> Tune {
        self.handshake_as(FieldTable::default(), answer).await
    }

    /// `handshake`, announcing `client_properties` (e.g. capabilities) in start-ok.
    pub async fn handshake_as(
        &mut self,
        client_properties: FieldTable,
        answer: impl FnOnce(Tune) -> Tune,
    ) -> Tune {
        self.send(HEADER).await;
        match self.recv_method().await {
            AMQPClass::Connection(connection::AMQPMethod::Start(_)) => {}
            other => panic!("expected connection.start, got {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: LongString::from(b"\0guest\0guest".to_vec()),
                locale: "en_US".into(),
            })),
        )
        .await;
        let offered = match self.recv_method().await {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => Tune {
                channel_max: t.channel_max,
                frame_max: t.frame_max,
                heartbeat: t.heartbeat,
            },
            other => panic!("expected connection.tune, got {other:?}"),
        };
        let ours = answer(offered);
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: ours.channel_max,
                frame_max: ours.frame_max,
                heartbeat: ours.heartbeat,
            })),
        )
        .await;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        match self.recv_method().await {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        offered
    }

    /// Opens channel `ch` and waits for open-ok.
    pub async fn open_channel(&mut self, ch: u16) {
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.recv_method().await {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => {}
            other => panic!("expected channel.open-ok, got {other:?}"),
        }
    }

    /// Reads one frame, waiting at most `wait`.
    pub async fn read_frame(&mut self, wait: Duration) -> Read {
        match tokio::time::timeout(wait, self.read_frame_inner()).await {
            Ok(r) => r,
            Err(_) => Read::Timeout,
        }
    }

    async fn read_frame_inner(&mut self) -> Read {
        let mut head = [0u8; 7];
        if self.stream.read_exact(&mut head).await.is_err() {
            return Read::Closed;
        }
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut frame = head.to_vec();
        frame.resize(7 + size + 1, 0);
        if self.stream.read_exact(&mut frame[7..]).await.is_err() {
            return Read::Closed;
        }
        match parse_frame(&frame[..]) {
            Ok((_, f)) => Read::Frame(f),
            Err(e) => panic!("server sent an unparsable frame {frame:?}: {e:?}"),
        }
    }

    /// The next method frame (heartbeats skipped); panics on EOF or after 10 s.
    pub async fn recv_method(&mut self) -> AMQPClass {
        loop {
            match self.read_frame(Duration::from_secs(10)).await {
                Read::Frame(AMQPFrame::Method(_, m)) => return m,
                Read::Frame(AMQPFrame::Heartbeat) => continue,
                other => panic!("expected a method frame, got {other:?}"),
            }
        }
    }

    /// Reads until connection.close arrives (skipping anything else), answers it with
    /// close-ok, and returns it. Panics if the socket closes first or after 10 s.
    pub async fn expect_connection_close(&mut self) -> connection::Close {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Read::Frame(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                )) => {
                    self.try_send(&method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    ))
                    .await;
                    return c;
                }
                Read::Frame(_) => continue,
                other => panic!("expected connection.close, got {other:?}"),
            }
        }
    }

    /// Reads until the server ends the connection, with connection.close (answered
    /// with close-ok; its code is returned) or by dropping the socket (None). Panics if
    /// neither happens within 10 s.
    pub async fn ends_connection(&mut self) -> Option<u16> {
        self.ends_connection_with().await.map(|c| c.reply_code)
    }

    /// `ends_connection`, returning the whole connection.close (None: socket dropped).
    pub async fn ends_connection_with(&mut self) -> Option<connection::Close> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Read::Frame(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                )) => {
                    self.try_send(&method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    ))
                    .await;
                    return Some(c);
                }
                Read::Frame(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)),
                )) => panic!("connection opened where it should have been refused"),
                Read::Frame(_) => continue,
                Read::Closed => return None,
                Read::Timeout => panic!("server neither closed nor dropped the connection"),
            }
        }
    }

    /// Reads (and discards) until the server closes the socket; false if it is still
    /// open after `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
