//! Connection class methods: start / start-ok (SASL PLAIN and AMQPLAIN), tune /
//! tune-ok, open / open-ok, close / close-ok, with RabbitMQ's server properties.

use amq_protocol::protocol::{AMQPClass, connection::*};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};

use super::{Connection, FRAME_MIN_SIZE, Phase};
use crate::protocol::{AmqpError, reply::amqp_err};

fn capabilities() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(cap.into(), AMQPValue::Boolean(true));
    }
    caps
}

fn server_properties() -> FieldTable {
    let mut p = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    p.insert("capabilities".into(), AMQPValue::FieldTable(capabilities()));
    p.insert("product".into(), text("Warren"));
    p.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    p.insert("platform".into(), text("Rust"));
    p.insert("cluster_name".into(), text("warren"));
    p.insert("copyright".into(), text("Warren developers"));
    p.insert(
        "information".into(),
        text("Warren: an AMQP 0-9-1 broker compatible with RabbitMQ clients"),
    );
    p
}

/// Parses an AMQPLAIN response: a field table without its length prefix.
fn amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
    framed.extend_from_slice(response);
    crate::protocol::fieldtable::check_table(&framed).ok()?;
    let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let get = |k: &str| match table.inner().get(k)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

/// Parses a PLAIN response: `authzid \0 user \0 password`.
fn plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8_lossy(user).into_owned(),
        String::from_utf8_lossy(pass).into_owned(),
    ))
}

/// RabbitMQ's check of a value the client chose in tune-ok: at least `min` (0 is "no
/// limit"), and within the server's offer unless that is 0; 530 naming connection.tune
/// otherwise.
fn negotiated(field: &str, min: u32, server: u32, client: u32) -> Result<(), AmqpError> {
    let detail = if client == 0 { " (no limit)" } else { "" };
    if client != 0 && client < min {
        return Err(amqp_err!(
            NotAllowed,
            "negotiated {} = {}{} is lower than the minimum allowed value ({})",
            field,
            client,
            detail,
            min
        )
        .at(10, 30));
    }
    if server != 0 && (client == 0 || client > server) {
        return Err(amqp_err!(
            NotAllowed,
            "negotiated {} = {}{} is higher than the maximum allowed value ({})",
            field,
            client,
            detail,
            server
        )
        .at(10, 30));
    }
    Ok(())
}

impl Connection {
    pub(super) fn send_start(&mut self) {
        self.send(
            0,
            AMQPClass::Connection(AMQPMethod::Start(Start {
                version_major: 0,
                version_minor: 9,
                server_properties: server_properties(),
                mechanisms: if self.certificate_user.is_some() {
                    "PLAIN AMQPLAIN EXTERNAL".into()
                } else {
                    "PLAIN AMQPLAIN".into()
                },
                locales: "en_US".into(),
            })),
        );
    }

    pub(super) fn handle_connection_method(&mut self, m: AMQPMethod) -> Result<(), AmqpError> {
        match (self.phase, m) {
            (Phase::AwaitStartOk, AMQPMethod::StartOk(ok)) => self.start_ok(ok),
            (Phase::AwaitTuneOk, AMQPMethod::TuneOk(ok)) => self.tune_ok(ok),
            (Phase::AwaitOpen, AMQPMethod::Open(open)) => self.open(open),
            (_, AMQPMethod::Close(close)) => {
                tracing::debug!(peer = %self.peer, code = close.reply_code, "client closed the connection");
                self.close_channels();
                self.send(0, AMQPClass::Connection(AMQPMethod::CloseOk(CloseOk {})));
                self.phase = Phase::Closed;
                self.linger = true;
                Ok(())
            }
            (Phase::Open, AMQPMethod::CloseOk(_)) => Ok(()),
            (Phase::Open, AMQPMethod::Blocked(_) | AMQPMethod::Unblocked(_)) => Ok(()),
            (Phase::Open, AMQPMethod::UpdateSecret(_)) => {
                self.send(
                    0,
                    AMQPClass::Connection(AMQPMethod::UpdateSecretOk(UpdateSecretOk {})),
                );
                Ok(())
            }
            (phase, m) => Err(amqp_err!(
                CommandInvalid,
                "unexpected method connection.{} in state {:?}",
                AMQPClass::Connection(m).get_amqp_method_id(),
                phase
            )),
        }
    }

    fn start_ok(&mut self, ok: StartOk) -> Result<(), AmqpError> {
        let mut failure_close = false;
        if let Some(AMQPValue::FieldTable(caps)) = ok.client_properties.inner().get("capabilities")
        {
            failure_close = matches!(
                caps.inner().get("authentication_failure_close"),
                Some(AMQPValue::Boolean(true))
            );
            self.cancel_notify = matches!(
                caps.inner().get("consumer_cancel_notify"),
                Some(AMQPValue::Boolean(true))
            );
            self.blocked_notify = matches!(
                caps.inner().get("connection.blocked"),
                Some(AMQPValue::Boolean(true))
            );
        }
        let mechanism = ok.mechanism.as_str();
        let creds = match mechanism {
            "PLAIN" => plain(ok.response.as_bytes()),
            "AMQPLAIN" => amqplain(ok.response.as_bytes()),
            "EXTERNAL" if self.certificate_user.is_some() => {
                return self.external_login(mechanism);
            }
            other => {
                // As RabbitMQ: an unknown mechanism ends the handshake without a
                // connection.close, whatever the client's capabilities.
                tracing::warn!(peer = %self.peer, "unknown authentication mechanism '{other}'");
                self.phase = Phase::Closed;
                return Ok(());
            }
        };
        // A refused login is a 403 connection.close only for clients that announced the
        // authentication_failure_close capability; others just see the socket close
        // (RabbitMQ's rule: older clients would not understand the close).
        let mut refused = || {
            if failure_close {
                return Err(amqp_err!(
                    AccessRefused,
                    "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                    mechanism
                ));
            }
            self.phase = Phase::Closed;
            Ok(())
        };
        let Some((user, pass)) = creds else {
            tracing::warn!(peer = %self.peer, "malformed {mechanism} response");
            return refused();
        };
        if self.broker.access.authenticate(&user, &pass).is_none() {
            tracing::warn!(peer = %self.peer, %user, "authentication failed");
            return refused();
        }
        if self.broker.access.loopback_only(&user) && !self.peer.ip().to_canonical().is_loopback() {
            tracing::warn!(peer = %self.peer, %user, "user may only connect via localhost");
            return refused();
        }
        self.logged_in(user);
        Ok(())
    }

    /// EXTERNAL: the verified client certificate names the user; it must exist (and
    /// obey loopback_users), no password is asked.
    fn external_login(&mut self, mechanism: &str) -> Result<(), AmqpError> {
        let refused = || {
            amqp_err!(
                AccessRefused,
                "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                mechanism
            )
        };
        let Some(user) = self.certificate_user.clone() else {
            return Err(refused());
        };
        if self.broker.access.user(&user).is_none() {
            tracing::warn!(peer = %self.peer, %user, "EXTERNAL: no user for this client certificate");
            return Err(refused());
        }
        if self.broker.access.loopback_only(&user) && !self.peer.ip().to_canonical().is_loopback() {
            tracing::warn!(peer = %self.peer, %user, "user may only connect via localhost");
            return Err(refused());
        }
        self.logged_in(user);
        Ok(())
    }

    /// Authentication succeeded: offer the tuning.
    fn logged_in(&mut self, user: String) {
        self.user = user;
        self.phase = Phase::AwaitTuneOk;
        self.send(
            0,
            AMQPClass::Connection(AMQPMethod::Tune(Tune {
                channel_max: self.broker.config.channel_max,
                frame_max: self.broker.config.frame_max,
                heartbeat: self.broker.config.heartbeat,
            })),
        );
    }

    fn tune_ok(&mut self, ok: TuneOk) -> Result<(), AmqpError> {
        let server_frame_max = self.broker.config.frame_max;
        let server_channel_max = self.broker.config.channel_max;
        negotiated("frame_max", FRAME_MIN_SIZE, server_frame_max, ok.frame_max)?;
        negotiated(
            "channel_max",
            1,
            server_channel_max as u32,
            ok.channel_max as u32,
        )?;
        let frame_max = ok.frame_max;
        self.channel_max = match ok.channel_max {
            0 => u16::MAX,
            n => n,
        };
        self.frame_max = frame_max;
        self.decoder.frame_max = frame_max;
        self.heartbeat = ok.heartbeat;
        self.phase = Phase::AwaitOpen;
        Ok(())
    }

    fn open(&mut self, open: Open) -> Result<(), AmqpError> {
        let name = open.virtual_host.as_str();
        self.broker
            .access
            .check_vhost(&self.user, name)
            .map_err(|e| e.at(10, 40))?;
        let Some(vhost) = self.broker.vhost(name) else {
            return Err(amqp_err!(NotAllowed, "vhost {} not found", name).at(10, 40));
        };
        tracing::info!(peer = %self.peer, user = %self.user, vhost = %name, "connection opened");
        self.broker
            .register_connection(crate::broker::ConnectionEntry {
                id: self.id,
                peer: self.peer,
                local: self.local,
                tls: self.tls,
                connected_at_ms: crate::queue::now_ms(),
                user: self.user.clone(),
                vhost: name.to_string(),
                shared: self.shared.clone(),
            });
        self.vhost = Some(vhost);
        self.phase = Phase::Open;
        self.send(0, AMQPClass::Connection(AMQPMethod::OpenOk(OpenOk {})));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_responses() {
        assert_eq!(
            plain(b"\0guest\0secret"),
            Some(("guest".into(), "secret".into()))
        );
        assert_eq!(plain(b"guest"), None);
        let mut resp = Vec::new();
        for (k, v) in [("LOGIN", "bob"), ("PASSWORD", "pw")] {
            resp.push(k.len() as u8);
            resp.extend_from_slice(k.as_bytes());
            resp.push(b'S');
            resp.extend_from_slice(&(v.len() as u32).to_be_bytes());
            resp.extend_from_slice(v.as_bytes());
        }
        assert_eq!(amqplain(&resp), Some(("bob".into(), "pw".into())));
    }
}
