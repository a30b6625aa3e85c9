//! Clustering: several Warren nodes that know each other from `cluster_nodes`.
//!
//! - [`membership`]: the members and which one this node is, checked at start.
//! - [`wire`]: the inter-node frame format; [`auth`]: proving the cluster secret;
//!   [`transport`]: one authenticated connection per pair of nodes, for every group.
//! - [`meta`]: the metadata Raft group (openraft): the definitions a majority agreed on.
//! - [`raft_log`]: any group's log in the node's store; [`raft_net`]: any group's Raft
//!   traffic on the links (replicated queues use both).
//! - [`node`]: all of it started for this node, and its `cluster_status`.
//!
//! With `cluster_nodes` empty nothing here runs: a single node works exactly as before.

pub mod auth;
pub mod membership;
pub mod meta;
pub mod node;
pub mod raft_log;
pub mod raft_net;
pub mod transport;
pub mod wire;

pub use membership::{Member, Membership};
pub use node::{ClusterNode, ClusterStatus};
pub use transport::{PeerAddr, PeerStatus, Transport, TransportConfig, TransportError};
