//! Clustering: several Warren nodes that know each other from `cluster_nodes`.
//!
//! - [`membership`]: the members and which one this node is, checked at start.
//!
//! With `cluster_nodes` empty nothing here runs: a single node works exactly as before.

pub mod membership;

pub use membership::{Member, Membership};
