//! Password hashes in RabbitMQ's formats, so that a hash exported from RabbitMQ (a
//! definitions file) loads into Warren unchanged and the other way round.
//!
//! RabbitMQ's `rabbit_password_hashing_sha256` (and `_sha512`): four random salt bytes,
//! then the digest of `salt ++ utf8(password)`, the whole base64-encoded. Hashes made
//! by RabbitMQ before 3.6 (`rabbit_password_hashing_md5`, same layout with MD5) still
//! verify, as RabbitMQ keeps accepting them; Warren never makes new ones.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use md5::Md5;
use sha2::{Digest, Sha256, Sha512};

/// RabbitMQ's name of the default (and Warren's only generated) hashing algorithm.
pub const SHA256: &str = "rabbit_password_hashing_sha256";
/// RabbitMQ's name of the SHA-512 variant (accepted in imported definitions).
pub const SHA512: &str = "rabbit_password_hashing_sha512";
/// RabbitMQ's name of the MD5 variant of releases before 3.6 (accepted in imported
/// definitions, so users moved from an old cluster keep their passwords).
pub const MD5: &str = "rabbit_password_hashing_md5";

/// Bytes of salt in front of the digest, as RabbitMQ.
const SALT_LEN: usize = 4;

fn digest(algorithm: &str, salt: &[u8], password: &str) -> Option<Vec<u8>> {
    let mut data = Vec::with_capacity(salt.len() + password.len());
    data.extend_from_slice(salt);
    data.extend_from_slice(password.as_bytes());
    match algorithm {
        SHA256 => Some(Sha256::digest(&data).to_vec()),
        SHA512 => Some(Sha512::digest(&data).to_vec()),
        MD5 => Some(Md5::digest(&data).to_vec()),
        _ => None,
    }
}

/// Whether `algorithm` is one Warren can check passwords against.
pub fn is_supported(algorithm: &str) -> bool {
    matches!(algorithm, SHA256 | SHA512 | MD5)
}

/// A new salted SHA-256 hash of `password`, base64-encoded as RabbitMQ stores it.
pub fn hash(password: &str) -> String {
    let salt: [u8; SALT_LEN] = rand::random();
    let mut out = salt.to_vec();
    out.extend(digest(SHA256, &salt, password).unwrap_or_default());
    BASE64.encode(out)
}

/// Whether `password` matches `stored` (base64 of salt and digest) under `algorithm`.
/// An unreadable hash or unknown algorithm matches nothing.
pub fn verify(algorithm: &str, stored: &str, password: &str) -> bool {
    let Ok(raw) = BASE64.decode(stored) else {
        return false;
    };
    if raw.len() <= SALT_LEN {
        return false;
    }
    let (salt, expected) = raw.split_at(SALT_LEN);
    match digest(algorithm, salt, password) {
        // Compare without an early exit so timing tells nothing about the hash.
        Some(d) => {
            d.len() == expected.len()
                && d.iter()
                    .zip(expected)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        }
        None => false,
    }
}

/// Whether `stored` is well-formed base64 of a salt and a digest of `algorithm`.
pub fn is_well_formed(algorithm: &str, stored: &str) -> bool {
    let len = match algorithm {
        SHA256 => 32,
        SHA512 => 64,
        MD5 => 16,
        _ => return false,
    };
    BASE64
        .decode(stored)
        .is_ok_and(|raw| raw.len() == SALT_LEN + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_made_by_rabbitmq_verifies() {
        // `rabbitmqctl add_user bob pw` on RabbitMQ 3.10, then export_definitions.
        let from_rabbitmq = "LlEPgM1NARUs8BqNfme2D12lZvxRozoWot/cEeEk2rKFonzB";
        assert!(verify(SHA256, from_rabbitmq, "pw"));
        assert!(!verify(SHA256, from_rabbitmq, "pW"));
        assert!(!verify(SHA512, from_rabbitmq, "pw"));
        assert!(is_well_formed(SHA256, from_rabbitmq));
    }

    #[test]
    fn new_hashes_are_salted_and_verify() {
        let a = hash("secret");
        let b = hash("secret");
        assert_ne!(a, b, "two hashes of one password differ by their salt");
        assert!(verify(SHA256, &a, "secret"));
        assert!(verify(SHA256, &b, "secret"));
        assert!(!verify(SHA256, &a, "secret2"));
        assert!(!verify(SHA256, "not base64!", "secret"));
        assert!(!verify(SHA256, "", ""));
        assert!(!verify(MD5, &a, "secret"));
    }

    #[test]
    fn an_md5_hash_from_an_old_rabbitmq_verifies() {
        // Salt 01020304 and MD5(salt ++ "md5pw"); the reference RabbitMQ 3.10 imports
        // this user from a definitions file and authenticates "md5pw" against it.
        let old = "AQIDBI3Ab4iH1xcn+PIEm5vk1JM=";
        assert!(is_well_formed(MD5, old));
        assert!(verify(MD5, old, "md5pw"));
        assert!(!verify(MD5, old, "md5pW"));
        assert!(!verify(SHA256, old, "md5pw"));
        assert!(!is_well_formed(SHA256, old));
    }
}
