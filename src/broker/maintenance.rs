//! Maintenance mode, as `rabbitmq-upgrade drain` and `revive`: a drained node takes no
//! client connections (those open are closed with 320 CONNECTION_FORCED), hands the
//! leadership of its replicated queues over and stands for none, so that it can be
//! upgraded or rebooted without its queues' clients waiting for an election. It keeps
//! its replicas (it still votes and stores their logs). Reviving undoes it.

use std::sync::atomic::Ordering;

use super::BrokerState;
use crate::protocol::ReplyCode;

/// RabbitMQ's reason for the connections a drain closes.
const DRAIN_REASON: &str = "Node was put into maintenance mode";

impl BrokerState {
    /// Puts the node into maintenance mode; returns once its connections are told to
    /// close and its leaderships are handed over (or could not be in time).
    pub async fn drain(&self) {
        self.drained.store(true, Ordering::Release);
        let closed = self.close_connections(
            |_| true,
            &crate::protocol::AmqpError::new(ReplyCode::ConnectionForced, DRAIN_REASON),
        );
        tracing::info!(connections = closed, "maintenance mode: draining this node");
        if let Some(link) = self.cluster_link() {
            link.replicas.allow_leadership(false);
            link.replicas.hand_over_all().await;
        }
    }

    /// Takes the node out of maintenance mode.
    pub fn revive(&self) {
        self.drained.store(false, Ordering::Release);
        if let Some(link) = self.cluster_link() {
            link.replicas.allow_leadership(true);
        }
        tracing::info!("maintenance mode: revived, serving clients again");
    }

    /// Whether the node is in maintenance mode (it refuses client connections).
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }
}
