//! The inter-node wire format: length-delimited frames (tokio-util's codec) whose bodies
//! are [`Frame`] values in postcard, a compact serde encoding (varints, no field names).
//!
//! One connection per pair of nodes carries every Raft group's traffic: group messages
//! name their group, so one socket, one handshake and one failure detector serve them all.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Identifies a Raft group (or any other user of the link) on the wire. Group 0 is the
/// metadata group.
pub type GroupId = u64;

/// Largest frame a node accepts: a bigger length prefix closes the connection.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Bytes of a handshake nonce and of an HMAC-SHA256 proof.
pub const NONCE_BYTES: usize = 32;

/// Everything that crosses an inter-node connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Dialer -> acceptor, first frame: who calls whom, and the dialer's challenge.
    Hello {
        /// The dialer's node name.
        from: String,
        /// The node name the dialer means to reach.
        to: String,
        /// Fresh random bytes the acceptor must answer with its proof.
        nonce: [u8; NONCE_BYTES],
    },
    /// Acceptor -> dialer: its own challenge, and its proof that it knows the secret.
    Challenge {
        /// Fresh random bytes the dialer must answer.
        nonce: [u8; NONCE_BYTES],
        /// HMAC-SHA256 over both nonces and both names, acceptor's label.
        proof: [u8; NONCE_BYTES],
    },
    /// Dialer -> acceptor: the dialer's proof.
    Proof {
        /// HMAC-SHA256 over both nonces and both names, dialer's label.
        proof: [u8; NONCE_BYTES],
    },
    /// Acceptor -> dialer: the proof holds; the link is up.
    Welcome,
    /// Either side: the handshake failed, and why (then the connection closes).
    Refused {
        /// A sentence for the other node's log.
        reason: String,
    },
    /// Keeps an idle link provably alive (any frame does; this one is sent when idle).
    Ping,
    /// A one-way message to a group.
    Send {
        /// The group it is for.
        group: GroupId,
        /// The group's own encoding.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// A message to a group that expects an answer ([`Frame::Reply`] with the same id).
    Request {
        /// Chosen by the sender, unique on this link.
        id: u64,
        /// The group it is for.
        group: GroupId,
        /// The group's own encoding.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// The answer to [`Frame::Request`] `id`; `None` when no such group runs on the node.
    Reply {
        /// The request's id.
        id: u64,
        /// The group's answer.
        #[serde(with = "serde_bytes")]
        body: Option<Vec<u8>>,
    },
}

/// Frames over a byte stream: a 4-byte length prefix, then postcard.
#[derive(Debug)]
pub struct WireCodec {
    frames: LengthDelimitedCodec,
}

impl Default for WireCodec {
    fn default() -> Self {
        WireCodec {
            frames: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME_BYTES)
                .new_codec(),
        }
    }
}

impl Decoder for WireCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        let Some(bytes) = self.frames.decode(src)? else {
            return Ok(None);
        };
        postcard::from_bytes(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("undecodable inter-node frame: {e}"),
            )
        })
    }
}

impl Encoder<Frame> for WireCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let body = postcard::to_stdvec(&frame).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unencodable inter-node frame: {e}"),
            )
        })?;
        self.frames.encode(Bytes::from(body), dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_compactly() {
        let mut codec = WireCodec::default();
        let mut buf = BytesMut::new();
        let frames = vec![
            Frame::Ping,
            Frame::Send {
                group: 3,
                body: b"abc".to_vec(),
            },
            Frame::Request {
                id: 1,
                group: 0,
                body: vec![9; 10],
            },
            Frame::Reply { id: 1, body: None },
        ];
        for f in frames.clone() {
            codec.encode(f, &mut buf).unwrap();
        }
        // Prefix 4 + tag 1 + group 1 + len 1 + 3 bytes.
        assert!(buf.len() < 4 + 1 + 4 + 10 + 4 + 1 + 1 + 1 + 10 + 4 + 4 + 4 + 6);
        let mut back = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            back.push(f);
        }
        assert_eq!(back, frames);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut codec = WireCodec::default();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 250, 250][..]);
        assert!(codec.decode(&mut buf).is_err());
        let mut huge = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(codec.decode(&mut huge).is_err());
    }
}
