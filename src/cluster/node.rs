//! This node's part in the cluster: its membership and its links to the other members,
//! started by [`crate::Broker::start`] when `cluster_nodes` is set. The public functions
//! here are what `warren ctl` and the management side read (`cluster_status`).

use std::net::SocketAddr;

use anyhow::Context;

use super::membership::Membership;
use super::meta::MetaGroup;
use super::meta::proposals::Proposals;
use super::meta::storage::DefinitionsObserver;
use super::transport::{PeerAddr, PeerStatus, Transport, TransportConfig};

/// The running cluster side of a node (clones share it).
#[derive(Debug, Clone)]
pub struct ClusterNode {
    membership: Membership,
    transport: Transport,
    listen: SocketAddr,
    meta: MetaGroup,
    proposals: Proposals,
}

/// What `cluster_status` shows, as RabbitMQ's `rabbitmqctl cluster_status` does: the
/// members, and which of them this node can reach now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// This node's name.
    pub node: String,
    /// Every member, sorted by name.
    pub members: Vec<String>,
    /// This node's link to each other member.
    pub peers: Vec<PeerStatus>,
    /// The leader of the metadata group, as far as this node knows.
    pub metadata_leader: Option<String>,
}

impl ClusterNode {
    /// Listens for peers on this member's address and `cluster_port`, starts dialing, and
    /// starts this node's member of the metadata group from what `store` recovered.
    pub async fn start(
        membership: Membership,
        store: crate::store::Store,
        recovered: crate::store::RecoveredRaftGroup,
        observer: Option<std::sync::Arc<dyn DefinitionsObserver>>,
    ) -> anyhow::Result<ClusterNode> {
        let me = membership.this_node().clone();
        let listen = me
            .address(membership.port)
            .with_context(|| format!("the address of this node ('{}')", me.name))?;
        let listener = crate::server::bind(listen)
            .with_context(|| format!("cannot listen for cluster peers on {listen}"))?;
        let listen = listener.local_addr()?;
        let mut peers = Vec::new();
        for peer in membership.peers() {
            // (Looked up on every dial: see PeerAddr.)
            let host = peer.host.trim_start_matches('[').trim_end_matches(']');
            peers.push((
                peer.name.clone(),
                PeerAddr {
                    host: host.to_string(),
                    port: membership.port,
                },
            ));
        }
        tracing::info!("listening for cluster peers on {listen} as {}", me.name);
        let config = TransportConfig::new(me.name.clone(), peers, membership.secret.clone());
        let transport = Transport::start(config, listener);
        let meta =
            MetaGroup::start(&membership, transport.clone(), store, recovered, observer).await?;
        let proposals = Proposals::start(meta.clone());
        Ok(ClusterNode {
            membership,
            transport,
            listen,
            meta,
            proposals,
        })
    }

    /// The members and the links to them.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            node: self.membership.this_node().name.clone(),
            members: {
                // The voters as Raft knows them (a forgotten member is not one); the
                // configured list until the group has a membership.
                let mut voters = self.meta.voters();
                if voters.is_empty() {
                    voters = self
                        .membership
                        .members
                        .iter()
                        .map(|m| m.name.clone())
                        .collect();
                }
                voters.sort();
                voters
            },
            peers: self.transport.status(),
            metadata_leader: self.meta.leader(),
        }
    }

    /// The links to the other members.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Where this node listens for its peers.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The metadata group.
    pub fn meta(&self) -> &MetaGroup {
        &self.meta
    }

    /// This node's proposer of definition changes (the broker's vhosts submit to it).
    pub fn proposals(&self) -> &Proposals {
        &self.proposals
    }

    /// `forget_cluster_node`: `name` stops being a member of the metadata group (it must
    /// be reset before it can join again, as in RabbitMQ).
    pub async fn forget(&self, name: &str) -> Result<(), String> {
        let id = self
            .meta
            .id_of(name)
            .ok_or_else(|| format!("{name} is not a cluster node"))?;
        // A leader removing itself trips openraft 0.9 (its leader state is torn down
        // while it appends the change). RabbitMQ asks for the node to be stopped first;
        // once it is, another member leads and the removal is ordinary.
        if self.meta.leader().as_deref() == Some(name) {
            return Err(format!(
                "{name} is the metadata leader: stop it (another member then leads) before \
                 forgetting it"
            ));
        }
        self.meta
            .change_members(super::meta::network::MembersChange::Remove(id), None)
            .await
    }

    /// `join_cluster`: this node becomes a member again, asking `via` (a member) to add
    /// it; it catches up as a learner first.
    pub async fn join(&self, via: &str) -> Result<(), String> {
        let me = self.membership.this_node().name.clone();
        let id = self
            .meta
            .id_of(&me)
            .ok_or_else(|| format!("{me} is not in cluster_nodes"))?;
        if self.meta.id_of(via).is_none() {
            return Err(format!("{via} is not in cluster_nodes"));
        }
        self.meta
            .change_members(super::meta::network::MembersChange::Add(id, me), Some(via))
            .await
    }

    /// Stops the metadata group and closes every link.
    pub async fn shutdown(&self) {
        self.meta.shutdown().await;
        self.transport.shutdown();
    }
}
