//! `warren healthcheck`: is a node on this host serving AMQP? It connects to the AMQP
//! port, sends the 0-9-1 protocol header and waits for `connection.start`, then hangs up.
//! This is what a container's HEALTHCHECK runs: it needs nothing but the `warren` binary
//! (no shell, curl or client library in the image) and proves more than an open port,
//! namely that the node finished recovery and its connection handling answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::{AMQPClass, connection};

use crate::protocol::codec::PROTOCOL_HEADER;

/// Largest `connection.start` frame we accept (its server properties are small).
const START_FRAME_MAX: usize = 64 * 1024;

/// Checks that the node at `host:port` answers the AMQP 0-9-1 protocol header with
/// `connection.start` within `timeout`. The error says what went wrong.
pub fn check(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last_error = format!("no address for {host}");
    for addr in addrs {
        match check_addr(addr, deadline) {
            Ok(()) => return Ok(()),
            Err(e) => last_error = format!("{addr}: {e}"),
        }
    }
    Err(last_error)
}

fn check_addr(addr: SocketAddr, deadline: Instant) -> Result<(), String> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| "timed out".to_string())
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?).map_err(|e| e.to_string())?;
    stream
        .write_all(PROTOCOL_HEADER)
        .map_err(|e| format!("sending the protocol header: {e}"))?;
    // Frame header: type (1), channel (2), payload size (4); then payload and frame-end.
    let mut frame = vec![0u8; 7];
    read_exact_by(&mut stream, &mut frame, &left)?;
    if frame[0] != 1 {
        return Err(format!(
            "expected a method frame, got frame type {} (not an AMQP 0-9-1 broker?)",
            frame[0]
        ));
    }
    let size = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
    if size > START_FRAME_MAX {
        return Err(format!(
            "connection.start frame of {size} bytes is too large"
        ));
    }
    frame.resize(7 + size + 1, 0);
    read_exact_by(&mut stream, &mut frame[7..], &left)?;
    match parse_frame(&frame[..]) {
        Ok((_, AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(s)))))
            if (s.version_major, s.version_minor) == (0, 9) =>
        {
            Ok(())
        }
        Ok((_, other)) => Err(format!("expected connection.start 0-9, got {other:?}")),
        Err(e) => Err(format!("unparsable reply: {e:?}")),
    }
}

/// `read_exact` that gives up when `left` says the time is up.
fn read_exact_by(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    left: &impl Fn() -> Result<Duration, String>,
) -> Result<(), String> {
    while !buf.is_empty() {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match stream.read(buf) {
            Ok(0) => return Err("the node closed the connection".into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out waiting for connection.start".into());
            }
            Err(e) => return Err(format!("reading connection.start: {e}")),
        }
    }
    Ok(())
}

/// The address to check a node at, from its `listen_addresses`: loopback when it listens
/// on every address (0.0.0.0 or ::), else the first address it listens on.
pub fn local_host(listen_addresses: &[String]) -> String {
    let Some(first) = listen_addresses.first() else {
        return "127.0.0.1".into();
    };
    match first.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() && ip.is_ipv6() => "::1".into(),
        Ok(ip) if ip.is_unspecified() => "127.0.0.1".into(),
        _ => first.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_are_checked_on_loopback() {
        let all = vec!["0.0.0.0".to_string(), "::".to_string()];
        assert_eq!(local_host(&all), "127.0.0.1");
        assert_eq!(local_host(&["::".to_string()]), "::1");
        assert_eq!(local_host(&["10.1.2.3".to_string()]), "10.1.2.3");
        assert_eq!(local_host(&[]), "127.0.0.1");
    }
}
