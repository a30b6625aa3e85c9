//! The AMQP 0-9-1 wire: frames in, frames out, over amq-protocol's method and
//! property codecs. Knows nothing of queues or exchanges.
//!
//! Frames are cut out of the read buffer by hand so that a body travels as a
//! `bytes::Bytes` slice of that buffer, never copied, and a content header keeps its raw
//! property bytes so that properties are passed on bit-exact.

pub mod codec;
#[cfg(test)]
mod codec_props;
pub mod content;
pub mod fieldtable;
mod hot_methods;
pub mod reply;

pub use amq_protocol::protocol::{AMQPClass, BasicProperties};
pub use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
pub use codec::{ContentHeader, FrameDecoder, InFrame, encode};
pub use reply::{AmqpError, ReplyCode};
