//! Proving `cluster_secret` without sending it: both ends of a new inter-node connection
//! answer the other's random challenge with HMAC-SHA256, keyed by the secret, over both
//! nonces and both node names (as RabbitMQ's Erlang distribution does with its cookie).
//! The two directions use different labels, so one side's proof can never be replayed as
//! the other's, and fresh nonces make every proof good for one connection only.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::wire::NONCE_BYTES;

/// Which end of the connection a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node that opened the connection.
    Dialer,
    /// The node that accepted it.
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"warren-cluster-dialer\0",
            Role::Acceptor => b"warren-cluster-acceptor\0",
        }
    }
}

/// The handshake's shared inputs.
#[derive(Debug, Clone)]
pub struct Transcript<'a> {
    /// The dialer's node name.
    pub dialer: &'a str,
    /// The acceptor's node name.
    pub acceptor: &'a str,
    /// The dialer's nonce.
    pub dialer_nonce: &'a [u8; NONCE_BYTES],
    /// The acceptor's nonce.
    pub acceptor_nonce: &'a [u8; NONCE_BYTES],
}

impl Transcript<'_> {
    fn mac(&self, secret: &[u8], role: Role) -> Hmac<Sha256> {
        // HMAC takes keys of any length; this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(role.label());
        mac.update(self.dialer_nonce);
        mac.update(self.acceptor_nonce);
        for name in [self.dialer, self.acceptor] {
            mac.update(&(name.len() as u64).to_be_bytes());
            mac.update(name.as_bytes());
        }
        mac
    }

    /// The proof that the node in `role` knows `secret`.
    pub fn proof(&self, secret: &[u8], role: Role) -> [u8; NONCE_BYTES] {
        self.mac(secret, role).finalize().into_bytes().into()
    }

    /// Whether `proof` shows that the node in `role` knows `secret` (constant time).
    pub fn verify(&self, secret: &[u8], role: Role, proof: &[u8; NONCE_BYTES]) -> bool {
        self.mac(secret, role).verify_slice(proof).is_ok()
    }
}

/// Fresh random bytes for a challenge.
pub fn nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_hold_only_for_the_same_secret_role_and_transcript() {
        let (a, b) = (nonce(), nonce());
        let t = Transcript {
            dialer: "n1@h",
            acceptor: "n2@h",
            dialer_nonce: &a,
            acceptor_nonce: &b,
        };
        let p = t.proof(b"s3cret", Role::Dialer);
        assert!(t.verify(b"s3cret", Role::Dialer, &p));
        assert!(!t.verify(b"other", Role::Dialer, &p), "other secret");
        assert!(!t.verify(b"s3cret", Role::Acceptor, &p), "other role");
        let c = nonce();
        let replay = Transcript {
            dialer_nonce: &c,
            ..t.clone()
        };
        assert!(!replay.verify(b"s3cret", Role::Dialer, &p), "other nonce");
        let swapped = Transcript {
            dialer: "n2@h",
            acceptor: "n1@h",
            ..t
        };
        assert!(!swapped.verify(b"s3cret", Role::Dialer, &p), "other names");
    }
}
