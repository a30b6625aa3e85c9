//! Warren: an AMQP 0-9-1 broker that RabbitMQ clients use unchanged.
//!
//! The library's face is [`Broker`]: start a node in-process (the binary and the
//! integration tests both do), read the address it listens on, shut it down.

pub mod alloc;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod ctl;
pub mod growth;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod perf;
pub mod protocol;
pub mod queue;
pub mod replica;
pub mod server;
pub mod store;
pub mod tls;

pub use config::{Config, FlushMode, LogFormat};
pub use server::Broker;
