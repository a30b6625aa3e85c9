//! TLS: AMQP over TLS (amqps) and the management API over HTTPS with certificates the
//! test makes (rcgen), client certificates verified against a CA, and the EXTERNAL
//! mechanism logging in as the user a client certificate names.

mod common;
mod util;

use std::net::SocketAddr;
use std::sync::Arc;

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{FieldTable, LongString};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use util::within;
use warren::auth::{AccessChange, PermissionRecord};

/// A CA, a server certificate for localhost / 127.0.0.1, and client certificates.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Warren test CA");
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let dir = std::env::temp_dir().join(util::uniq("warren-tls"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        let pki = Pki { ca, dir };
        let (cert, key) = pki.issue(&["localhost", "127.0.0.1"], "localhost");
        std::fs::write(pki.dir.join("server.pem"), cert).expect("write");
        std::fs::write(pki.dir.join("server.key"), key).expect("write");
        pki
    }

    /// (certificate PEM, key PEM) for `names` with common name `cn`, signed by the CA.
    fn issue(&self, names: &[&str], cn: &str) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Warren tests");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("signed");
        (cert.pem(), key.serialize_pem())
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A client configuration trusting the CA, with a client certificate if given.
    fn client(&self, cert: Option<(String, String)>) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let config = match cert {
            Some((cert, key)) => {
                use rustls::pki_types::pem::PemObject;
                let certs = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")];
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
                builder
                    .with_client_auth_cert(certs, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_broker(pki: &Pki, verify: bool, fail_if_no_cert: bool) -> common::TestBroker {
    tls_broker_login_from(pki, verify, fail_if_no_cert, "common_name").await
}

async fn tls_broker_login_from(
    pki: &Pki,
    verify: bool,
    fail_if_no_cert: bool,
    login_from: &str,
) -> common::TestBroker {
    let login_from = login_from.to_string();
    let (cert, key, ca) = (
        pki.file("server.pem"),
        pki.file("server.key"),
        pki.file("ca.pem"),
    );
    common::TestBroker::start_with(move |c| {
        c.tls_cert_file = cert;
        c.tls_key_file = key;
        c.tls_ca_file = ca;
        c.tls_verify_peer = verify;
        c.tls_fail_if_no_peer_cert = fail_if_no_cert;
        c.ssl_cert_login_from = login_from;
    })
    .await
}

async fn dial(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, m: AMQPClass) {
    let ctx = gen_frame(&AMQPFrame::Method(0, m))(WriteContext::from(Vec::new())).expect("encodes");
    s.write_all(&ctx.into_inner().0).await.expect("write");
    s.flush().await.expect("flush");
}

async fn recv<S: AsyncRead + Unpin>(s: &mut S) -> Option<AMQPClass> {
    let mut head = [0u8; 7];
    s.read_exact(&mut head).await.ok()?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut frame = head.to_vec();
    frame.resize(7 + size + 1, 0);
    s.read_exact(&mut frame[7..]).await.ok()?;
    match parse_frame(&frame[..]) {
        Ok((_, AMQPFrame::Method(_, m))) => Some(m),
        other => panic!("unexpected frame {other:?}"),
    }
}

/// Header, start (returns its mechanisms), start-ok with `mechanism` / `response`;
/// then the server's next method (tune on success, close on refusal).
async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    mechanism: &str,
    response: &[u8],
) -> (String, AMQPClass) {
    s.write_all(b"AMQP\x00\x00\x09\x01").await.expect("header");
    let mechanisms = match recv(s).await {
        Some(AMQPClass::Connection(connection::AMQPMethod::Start(start))) => {
            String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned()
        }
        other => panic!("expected connection.start, got {other:?}"),
    };
    send(
        s,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: mechanism.into(),
            response: LongString::from(response.to_vec()),
            locale: "en_US".into(),
        })),
    )
    .await;
    let next = recv(s).await.expect("an answer to start-ok");
    (mechanisms, next)
}

/// tune-ok and open of `/`; the answer to open.
async fn open<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> AMQPClass {
    send(
        s,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 16,
            frame_max: 131072,
            heartbeat: 0,
        })),
    )
    .await;
    send(
        s,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    )
    .await;
    recv(s).await.expect("an answer to open")
}

fn is_tune(m: &AMQPClass) -> bool {
    matches!(m, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))
}

#[tokio::test]
async fn a_verified_client_certificate_logs_in_with_external_as_its_user() {
    let pki = Pki::new();
    let t = tls_broker(&pki, true, false).await;
    let b = t.broker.as_ref().expect("broker");
    let addr = b.tls_addr().expect("amqps listener");
    let access = &b.state().access;
    access
        .put_user("app", "unused", vec![])
        .await
        .expect("user");
    access
        .change(AccessChange::SetPermissions(PermissionRecord {
            user: "app".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }))
        .await
        .expect("permissions");

    let client = pki.client(Some(pki.issue(&[], "app")));
    let mut s = within(dial(&client, addr)).await.expect("TLS handshake");
    let (mechanisms, next) = within(login(&mut s, "EXTERNAL", b"")).await;
    assert!(
        mechanisms.split(' ').any(|m| m == "EXTERNAL"),
        "{mechanisms}"
    );
    assert!(is_tune(&next), "EXTERNAL login refused: {next:?}");
    let opened = within(open(&mut s)).await;
    assert!(
        matches!(
            opened,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))
        ),
        "{opened:?}"
    );
    let listed = b.state().connections();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].user.as_str(), listed[0].tls), ("app", true));

    // A certificate naming no user is refused as RabbitMQ refuses a login.
    let stranger = pki.client(Some(pki.issue(&[], "stranger")));
    let mut s = within(dial(&stranger, addr)).await.expect("TLS handshake");
    let (_, next) = within(login(&mut s, "EXTERNAL", b"")).await;
    match next {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            assert_eq!(c.reply_code, 403);
            assert!(
                c.reply_text.as_str().contains("EXTERNAL"),
                "{}",
                c.reply_text.as_str()
            );
        }
        other => panic!("expected connection.close, got {other:?}"),
    }
}

#[tokio::test]
async fn without_a_client_certificate_plain_works_over_tls_and_external_is_not_offered() {
    let pki = Pki::new();
    let t = tls_broker(&pki, true, false).await;
    let b = t.broker.as_ref().expect("broker");
    let client = pki.client(None);
    let mut s = within(dial(&client, b.tls_addr().expect("amqps")))
        .await
        .expect("TLS handshake");
    let (mechanisms, next) = within(login(&mut s, "PLAIN", b"\0guest\0guest")).await;
    assert_eq!(mechanisms, "PLAIN AMQPLAIN");
    assert!(is_tune(&next), "{next:?}");
    let opened = within(open(&mut s)).await;
    assert!(matches!(
        opened,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))
    ));
}

#[tokio::test]
async fn fail_if_no_peer_cert_refuses_clients_without_one() {
    let pki = Pki::new();
    let t = tls_broker(&pki, true, true).await;
    let b = t.broker.as_ref().expect("broker");
    let addr = b.tls_addr().expect("amqps");
    let client = pki.client(None);
    // TLS 1.3 reports the refusal on the first read after the handshake.
    let refused = match within(dial(&client, addr)).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"AMQP\x00\x00\x09\x01").await;
            let mut buf = [0u8; 8];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate got through");
    let with_cert = pki.client(Some(pki.issue(&[], "guest")));
    within(dial(&with_cert, addr))
        .await
        .expect("a client with a certificate gets in");
}

#[tokio::test]
async fn the_management_api_answers_over_https() {
    let pki = Pki::new();
    let t = tls_broker(&pki, false, false).await;
    let b = t.broker.as_ref().expect("broker");
    let addr = b.management_tls_addr().expect("https listener");
    let mut s = within(dial(&pki.client(None), addr))
        .await
        .expect("TLS handshake");
    let request = "GET /api/whoami HTTP/1.1\r\nHost: localhost\r\n\
                   Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n";
    s.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let _ = within(s.read_to_end(&mut raw)).await;
    let r = util::http::parse(&raw);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "guest");
}

#[test]
fn no_certificate_means_no_tls_listeners() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let t = common::TestBroker::start().await;
        let b = t.broker.as_ref().expect("broker");
        assert!(b.tls_addr().is_none() && b.management_tls_addr().is_none());
    });
}

#[tokio::test]
async fn by_default_the_user_is_the_certificates_distinguished_name_as_rabbitmq_writes_it() {
    let pki = Pki::new();
    let t = tls_broker_login_from(&pki, true, false, "distinguished_name").await;
    let b = t.broker.as_ref().expect("broker");
    let user = "O=Warren tests,CN=app";
    b.state()
        .access
        .put_user(user, "unused", vec![])
        .await
        .expect("user");
    let client = pki.client(Some(pki.issue(&[], "app")));
    let mut s = within(dial(&client, b.tls_addr().expect("amqps")))
        .await
        .expect("TLS handshake");
    let (_, next) = within(login(&mut s, "EXTERNAL", b"")).await;
    assert!(is_tune(&next), "{next:?}");
}
