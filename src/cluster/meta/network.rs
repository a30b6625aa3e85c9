//! The metadata group's Raft traffic over the node's inter-node links (group
//! [`META_GROUP`]): openraft's network traits on the sending side, and the task that hands
//! arriving requests to the local Raft node on the receiving side. Proposals from nodes
//! that are not the leader travel the same way.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, Raft};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use openraft::error::ClientWriteError;

use super::storage::META_GROUP;
use super::{MetaCommand, MetaReply, NodeId, TypeConfig};
use crate::cluster::transport::{Incoming, Transport, TransportError};

/// A request of the metadata group between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum MetaRequest {
    /// Raft's log replication and heartbeat.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft's election.
    Vote(VoteRequest<NodeId>),
    /// Raft's snapshot transfer (one chunk).
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A definition change proposed on a node that is not the leader.
    Propose(MetaCommand),
    /// A change of the group's voters, asked of the leader.
    Members(MembersChange),
}

/// A change of the metadata group's voters (`warren ctl join_cluster` /
/// `forget_cluster_node`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembersChange {
    /// This member (id, name) becomes a voter again.
    Add(NodeId, String),
    /// This member stops being part of the group.
    Remove(NodeId),
}

/// The answer to a [`MetaRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum MetaResponse {
    /// To [`MetaRequest::Append`].
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`MetaRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`MetaRequest::Snapshot`].
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To [`MetaRequest::Propose`]: the committed reply and the entry's log index, or why
    /// not.
    Propose(Result<(MetaReply, u64), String>),
    /// To [`MetaRequest::Members`]: done, or why not.
    Members(Result<(), String>),
}

/// Carries out a change of voters on this node, which must be the leader: a member added
/// back is first brought up to date as a learner.
pub async fn change_members(raft: &Raft<TypeConfig>, change: MembersChange) -> Result<(), String> {
    use openraft::ChangeMembers;
    use std::collections::BTreeSet;
    let result = match change {
        MembersChange::Add(id, name) => {
            match raft
                .add_learner(id, openraft::BasicNode { addr: name }, true)
                .await
            {
                Ok(_) => {
                    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                        .await
                }
                Err(e) => Err(e),
            }
        }
        MembersChange::Remove(id) => {
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
        }
    };
    match result {
        Ok(_) => Ok(()),
        Err(openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(format!(
                "{FORWARD_TO}{}",
                f.leader_node.map(|n| n.addr).unwrap_or_default()
            ))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// How a member that is not the leader answers a [`MetaRequest::Members`]: this, then
/// the leader's name (empty when it knows none).
pub const FORWARD_TO: &str = "not the leader; ask ";

/// Builds one [`MetaClient`] per peer for openraft.
#[derive(Debug, Clone)]
pub struct MetaNetwork {
    /// The node's links.
    pub transport: Transport,
}

impl RaftNetworkFactory<TypeConfig> for MetaNetwork {
    type Network = MetaClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> MetaClient {
        MetaClient {
            transport: self.transport.clone(),
            target,
            peer: node.addr.clone(),
        }
    }
}

/// Sends the metadata group's requests to one peer.
#[derive(Debug)]
pub struct MetaClient {
    transport: Transport,
    target: NodeId,
    /// The peer's node name (openraft's `BasicNode::addr` carries it).
    peer: String,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl MetaClient {
    async fn call<E: std::error::Error>(
        &self,
        request: MetaRequest,
        limit: Duration,
    ) -> Result<MetaResponse, RpcErr<E>> {
        let body = postcard::to_stdvec(&request)
            .map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e))))?;
        match self
            .transport
            .call(&self.peer, META_GROUP, body, limit)
            .await
        {
            Ok(answer) => postcard::from_bytes(&answer)
                .map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e)))),
            Err(e @ (TransportError::Unreachable(_) | TransportError::UnknownPeer(_))) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

fn unexpected<E: std::error::Error>(what: &str) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&AnyError::error(format!(
        "unexpected answer to {what}"
    ))))
}

impl RaftNetwork<TypeConfig> for MetaClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self
            .call(MetaRequest::Append(rpc), option.hard_ttl())
            .await?
        {
            MetaResponse::Append(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected("append")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self
            .call(MetaRequest::Snapshot(rpc), option.hard_ttl())
            .await?
        {
            MetaResponse::Snapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected("snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(MetaRequest::Vote(rpc), option.hard_ttl()).await? {
            MetaResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected("vote")),
        }
    }
}

/// Serves the metadata group's requests from peers until the inbox closes.
pub async fn serve(raft: Raft<TypeConfig>, mut inbox: mpsc::Receiver<Incoming>) {
    while let Some(message) = inbox.recv().await {
        let Some(reply) = message.reply else {
            continue;
        };
        let request: MetaRequest = match postcard::from_bytes(&message.body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "cluster: unreadable metadata request from {}: {e}",
                    message.from
                );
                continue;
            }
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            let response = match request {
                MetaRequest::Append(rpc) => MetaResponse::Append(raft.append_entries(rpc).await),
                MetaRequest::Vote(rpc) => MetaResponse::Vote(raft.vote(rpc).await),
                MetaRequest::Snapshot(rpc) => {
                    MetaResponse::Snapshot(raft.install_snapshot(rpc).await)
                }
                MetaRequest::Members(change) => {
                    MetaResponse::Members(change_members(&raft, change).await)
                }
                MetaRequest::Propose(command) => MetaResponse::Propose(
                    raft.client_write(command)
                        .await
                        .map(|r| (r.data, r.log_id.index))
                        .map_err(|e| e.to_string()),
                ),
            };
            match postcard::to_stdvec(&response) {
                Ok(body) => reply.reply(body).await,
                Err(e) => tracing::error!("cluster: cannot encode a metadata answer: {e}"),
            }
        });
    }
}
