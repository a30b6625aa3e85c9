//! Raft traffic of one group over the node's inter-node links: openraft's network
//! traits on the sending side, and the task that hands arriving requests to the local
//! Raft node on the receiving side. Every replicated queue's group uses this; the
//! metadata group has its own requests besides Raft's (see `meta::network`).

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, Raft, RaftTypeConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::meta::NodeId;
use super::transport::{Incoming, Transport, TransportError};
use super::wire::GroupId;

/// A Raft request between two members of a group.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum RaftRequest<C: RaftTypeConfig<NodeId = NodeId>>
where
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    InstallSnapshotRequest<C>: Serialize + DeserializeOwned,
{
    /// Log replication and heartbeat.
    Append(AppendEntriesRequest<C>),
    /// Election.
    Vote(VoteRequest<NodeId>),
    /// Snapshot transfer (one chunk).
    Snapshot(InstallSnapshotRequest<C>),
}

/// The answer to a [`RaftRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    /// To `Append`.
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
}

/// Builds one [`GroupClient`] per peer for openraft.
#[derive(Debug, Clone)]
pub struct GroupNetwork {
    /// The node's links.
    pub transport: Transport,
    /// The group whose traffic this is.
    pub group: GroupId,
}

impl<C> RaftNetworkFactory<C> for GroupNetwork
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    InstallSnapshotRequest<C>: Serialize + DeserializeOwned,
{
    type Network = GroupClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GroupClient {
        GroupClient {
            transport: self.transport.clone(),
            group: self.group,
            target,
            peer: node.addr.clone(),
        }
    }
}

/// Sends one group's requests to one peer.
#[derive(Debug)]
pub struct GroupClient {
    transport: Transport,
    group: GroupId,
    target: NodeId,
    /// The peer's node name (openraft's `BasicNode::addr` carries it).
    peer: String,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

fn network_error<E: std::error::Error>(e: impl std::error::Error + 'static) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&AnyError::error(e)))
}

impl GroupClient {
    async fn call<C, E>(
        &self,
        request: RaftRequest<C>,
        limit: Duration,
    ) -> Result<RaftResponse, RpcErr<E>>
    where
        C: RaftTypeConfig<NodeId = NodeId>,
        AppendEntriesRequest<C>: Serialize + DeserializeOwned,
        InstallSnapshotRequest<C>: Serialize + DeserializeOwned,
        E: std::error::Error,
    {
        let body = postcard::to_stdvec(&request).map_err(network_error)?;
        match self
            .transport
            .call(&self.peer, self.group, body, limit)
            .await
        {
            Ok(answer) => postcard::from_bytes(&answer).map_err(network_error),
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

impl<C> RaftNetwork<C> for GroupClient
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    InstallSnapshotRequest<C>: Serialize + DeserializeOwned,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self
            .call(RaftRequest::Append(rpc), option.hard_ttl())
            .await?
        {
            RaftResponse::Append(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected("append")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self
            .call(RaftRequest::Snapshot(rpc), option.hard_ttl())
            .await?
        {
            RaftResponse::Snapshot(r) => {
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
        match self
            .call::<C, _>(RaftRequest::Vote(rpc), option.hard_ttl())
            .await?
        {
            RaftResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected("vote")),
        }
    }
}

/// One-way signals between the members of a queue group (Raft's own traffic is always
/// a request with an answer), each one byte.
const NUDGE: u8 = 0;
const STAND: u8 = 1;

/// Asks member `peer` of `group` to send a heartbeat if it leads the group: a member
/// that knows no leader learns it (and is caught up) without standing for election.
/// Harmless to repeat; a member that does not lead ignores it.
pub async fn nudge(transport: &Transport, peer: &str, group: GroupId) {
    let _ = transport.send(peer, group, vec![NUDGE]).await;
}

/// Asks member `peer` of `group` to stand for election now (its leader hands the
/// leadership over to it). A leader, or a member that is not a voter, ignores it.
pub async fn ask_to_stand(transport: &Transport, peer: &str, group: GroupId) {
    let _ = transport.send(peer, group, vec![STAND]).await;
}

/// Serves one group's requests from peers until the inbox closes.
pub async fn serve<C>(raft: Raft<C>, mut inbox: mpsc::Receiver<Incoming>)
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
    AppendEntriesRequest<C>: Serialize + DeserializeOwned,
    InstallSnapshotRequest<C>: Serialize + DeserializeOwned,
{
    while let Some(message) = inbox.recv().await {
        let Some(reply) = message.reply else {
            match message.body.as_slice() {
                // (openraft ignores a heartbeat asked of a member that does not lead.)
                [NUDGE] => {
                    let _ = raft.trigger().heartbeat().await;
                }
                [STAND] => {
                    let _ = raft.trigger().elect().await;
                }
                _ => {}
            }
            continue;
        };
        let request: RaftRequest<C> = match postcard::from_bytes(&message.body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "cluster: unreadable Raft request from {}: {e}",
                    message.from
                );
                continue;
            }
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            let response = match request {
                RaftRequest::Append(rpc) => RaftResponse::Append(raft.append_entries(rpc).await),
                RaftRequest::Vote(rpc) => RaftResponse::Vote(raft.vote(rpc).await),
                RaftRequest::Snapshot(rpc) => {
                    RaftResponse::Snapshot(raft.install_snapshot(rpc).await)
                }
            };
            match postcard::to_stdvec(&response) {
                Ok(body) => reply.reply(body).await,
                Err(e) => tracing::error!("cluster: cannot encode a Raft answer: {e}"),
            }
        });
    }
}
