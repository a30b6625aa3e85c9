//! Assembling a basic.publish from its frames: the method, one content header, then body
//! frames until the announced size is reached. One small state machine, owned by the
//! channel, with the errors RabbitMQ sends for frames out of order.
//!
//! A body that arrives in one frame stays a slice of the read buffer; only bodies split
//! over several frames are copied into one buffer (never more than the header announced,
//! which the channel has checked against `max_message_size`).

use amq_protocol::protocol::basic;
use bytes::{Bytes, BytesMut};

use super::codec::ContentHeader;
use super::reply::{AmqpError, amqp_err};

/// A publish waiting for its content.
#[derive(Debug)]
pub struct ContentAssembly {
    method: basic::Publish,
    header: Option<Box<ContentHeader>>,
    body: BytesMut,
    first_chunk: Option<Bytes>,
    received: u64,
}

/// A publish whose content is complete.
#[derive(Debug)]
pub struct Assembled {
    /// The basic.publish method.
    pub method: basic::Publish,
    /// Its content header.
    pub header: Box<ContentHeader>,
    /// The whole body.
    pub body: Bytes,
}

/// Whether the content is complete after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More frames are expected.
    Partial,
    /// Every announced byte arrived: call [`ContentAssembly::finish`].
    Complete,
}

impl ContentAssembly {
    /// Starts with the basic.publish method.
    pub fn new(method: basic::Publish) -> ContentAssembly {
        ContentAssembly {
            method,
            header: None,
            body: BytesMut::new(),
            first_chunk: None,
            received: 0,
        }
    }

    /// Whether the content header arrived (a method frame now interrupts the body).
    pub fn has_header(&self) -> bool {
        self.header.is_some()
    }

    /// Takes the content header.
    pub fn header(&mut self, header: Box<ContentHeader>) -> Result<Progress, AmqpError> {
        if self.header.is_some() {
            return Err(amqp_err!(
                UnexpectedFrame,
                "expected content body, got non content body frame instead"
            ));
        }
        if header.class_id != 60 {
            return Err(amqp_err!(
                UnexpectedFrame,
                "expected content header for class 60, got one for class {} instead",
                header.class_id
            ));
        }
        let done = header.body_size == 0;
        self.header = Some(header);
        Ok(if done {
            Progress::Complete
        } else {
            Progress::Partial
        })
    }

    /// Takes a body frame.
    pub fn body(&mut self, body: Bytes) -> Result<Progress, AmqpError> {
        let Some(header) = &self.header else {
            return Err(amqp_err!(
                UnexpectedFrame,
                "expected content header for class 60, got non content header frame instead"
            ));
        };
        self.received += body.len() as u64;
        if self.received > header.body_size {
            return Err(amqp_err!(
                FrameError,
                "content body frame exceeds remaining content size"
            ));
        }
        match (&self.first_chunk, self.body.is_empty()) {
            (None, true) => self.first_chunk = Some(body),
            _ => {
                if let Some(first) = self.first_chunk.take() {
                    self.body.extend_from_slice(&first);
                }
                self.body.extend_from_slice(&body);
            }
        }
        Ok(if self.received == header.body_size {
            Progress::Complete
        } else {
            Progress::Partial
        })
    }

    /// The assembled publish, once complete (`None` before).
    pub fn finish(self) -> Option<Assembled> {
        let header = self.header?;
        if self.received != header.body_size {
            return None;
        }
        let body = match self.first_chunk {
            Some(b) => b,
            None => self.body.freeze(),
        };
        Some(Assembled {
            method: self.method,
            header,
            body,
        })
    }
}
