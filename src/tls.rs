//! TLS for the AMQP listener (amqps, port 5671) and the management API (https), with
//! rustls: the node's certificate and key from PEM files, optionally client
//! certificates verified against a CA, and the identity a verified client certificate
//! carries, for the EXTERNAL mechanism (as RabbitMQ's rabbitmq_auth_mechanism_ssl).

use std::sync::Arc;

use anyhow::Context;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::Config;

/// The rustls server configuration for `config`, or None when no certificate is set
/// (TLS listeners are then not started).
pub fn server_config(
    config: &Config,
    alpn: &[&[u8]],
) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    if config.tls_cert_file.is_empty() || config.tls_key_file.is_empty() {
        return Ok(None);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.tls_cert_file)
        .with_context(|| format!("tls_cert_file {}", config.tls_cert_file))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("tls_cert_file {}", config.tls_cert_file))?;
    let key = PrivateKeyDer::from_pem_file(&config.tls_key_file)
        .with_context(|| format!("tls_key_file {}", config.tls_key_file))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if config.tls_verify_peer {
        if config.tls_ca_file.is_empty() {
            anyhow::bail!("tls_verify_peer needs tls_ca_file");
        }
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&config.tls_ca_file)
            .with_context(|| format!("tls_ca_file {}", config.tls_ca_file))?
        {
            roots
                .add(ca.with_context(|| format!("tls_ca_file {}", config.tls_ca_file))?)
                .context("adding a CA certificate")?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if config.tls_fail_if_no_peer_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        builder.with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
    } else {
        builder.with_no_client_auth()
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .context("the certificate and key do not go together")?;
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Some(Arc::new(server)))
}

/// The user name a verified client certificate stands for: its subject's common name,
/// or its whole distinguished name (RabbitMQ's `ssl_cert_login_from`).
pub fn peer_identity(conn: &rustls::ServerConnection, login_from: &str) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    if login_from == "common_name" {
        subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(String::from)
    } else {
        Some(distinguished_name(subject))
    }
}

/// A subject as an RFC 4514 string, the way RabbitMQ writes user names taken from
/// certificates: the last RDN first, `type=value` joined by commas without spaces
/// (e.g. `CN=app,O=Example`).
fn distinguished_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    let rdns: Vec<_> = name.iter().collect();
    for rdn in rdns.into_iter().rev() {
        let attrs: Vec<String> = rdn
            .iter()
            .map(|attr| {
                let kind = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                    .map(String::from)
                    .unwrap_or_else(|_| attr.attr_type().to_id_string());
                let value = attr.as_str().unwrap_or_default();
                format!("{kind}={}", escape_dn_value(value))
            })
            .collect();
        parts.push(attrs.join("+"));
    }
    parts.join(",")
}

/// RFC 4514 escaping of an attribute value.
fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == value.len() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
