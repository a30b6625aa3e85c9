//! Who is in the cluster: the members named by `cluster_nodes`, which one of them this
//! node is, and where each listens for its peers. Parsed and checked once at start, so
//! that a typo in the list stops the node with a clear message instead of a cluster that
//! never forms.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, bail};

use crate::config::Config;

/// One member of the cluster, `name@host` as in `cluster_nodes`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    /// The full node name, `name@host` (RabbitMQ's node names have this shape).
    pub name: String,
    /// The part after `@`: a host name or an IP address.
    pub host: String,
}

impl Member {
    /// Parses `name@host`.
    pub fn parse(text: &str) -> anyhow::Result<Member> {
        let text = text.trim();
        let Some((name, host)) = text.split_once('@') else {
            bail!("cluster node '{text}' is not of the form name@host");
        };
        if name.is_empty() || host.is_empty() || host.contains('@') {
            bail!("cluster node '{text}' is not of the form name@host");
        }
        Ok(Member {
            name: text.to_string(),
            host: host.to_string(),
        })
    }

    /// The inter-node address of this member on `port` (resolving a host name if needed).
    pub fn address(&self, port: u16) -> std::io::Result<SocketAddr> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        (host, port).to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no address for host '{}'", self.host),
            )
        })
    }
}

/// The cluster as this node sees it at start: every member, sorted by name, and which
/// one is this node.
#[derive(Debug, Clone)]
pub struct Membership {
    /// Every member, sorted by name (the order every node agrees on).
    pub members: Vec<Member>,
    /// Index of this node in `members`.
    pub me: usize,
    /// The inter-node port every member listens on.
    pub port: u16,
    /// The shared secret peers prove to each other.
    pub secret: Vec<u8>,
}

impl Membership {
    /// The cluster described by `config`, or `None` for a single node (`cluster_nodes`
    /// empty). Errors name the setting that is wrong.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Membership>> {
        let listed: Vec<&String> = config
            .cluster_nodes
            .iter()
            .filter(|n| !n.trim().is_empty())
            .collect();
        if listed.is_empty() {
            return Ok(None);
        }
        let mut members = listed
            .into_iter()
            .map(|n| Member::parse(n))
            .collect::<anyhow::Result<Vec<_>>>()
            .context("cluster_nodes")?;
        members.sort();
        if let Some(w) = members.windows(2).find(|w| w[0].name == w[1].name) {
            bail!("cluster_nodes names '{}' twice", w[0].name);
        }
        let me_name = config.node_name();
        let Some(me) = members.iter().position(|m| m.name == me_name) else {
            bail!(
                "node_name '{me_name}' is not one of cluster_nodes ({})",
                config.cluster_nodes.join(", ")
            );
        };
        if config.cluster_secret.is_empty() {
            bail!("cluster_secret must be set when cluster_nodes is");
        }
        Ok(Some(Membership {
            members,
            me,
            port: config.cluster_port,
            secret: config.cluster_secret.as_bytes().to_vec(),
        }))
    }

    /// This node.
    pub fn this_node(&self) -> &Member {
        &self.members[self.me]
    }

    /// Every member but this node.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != self.me)
            .map(|(_, m)| m)
    }

    /// A member by name.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: &[&str], me: &str, secret: &str) -> Config {
        Config {
            cluster_nodes: nodes.iter().map(|s| s.to_string()).collect(),
            node_name: me.into(),
            cluster_secret: secret.into(),
            ..Config::defaults()
        }
    }

    #[test]
    fn no_cluster_nodes_is_a_single_node() {
        assert!(
            Membership::from_config(&Config::defaults())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn members_are_sorted_and_this_node_found() {
        let c = config(
            &["c@10.0.0.3", "a@10.0.0.1", "b@10.0.0.2"],
            "b@10.0.0.2",
            "s",
        );
        let m = Membership::from_config(&c).unwrap().unwrap();
        let names: Vec<&str> = m.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a@10.0.0.1", "b@10.0.0.2", "c@10.0.0.3"]);
        assert_eq!(m.this_node().host, "10.0.0.2");
        assert_eq!(m.peers().count(), 2);
        assert_eq!(
            m.this_node().address(25672).unwrap(),
            "10.0.0.2:25672".parse().unwrap()
        );
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        let err = |c: Config| format!("{:#}", Membership::from_config(&c).unwrap_err());
        assert!(err(config(&["a@h", "nohost"], "a@h", "s")).contains("name@host"));
        assert!(err(config(&["a@h", "a@h"], "a@h", "s")).contains("twice"));
        assert!(err(config(&["a@h", "b@h"], "c@h", "s")).contains("not one of"));
        assert!(err(config(&["a@h", "b@h"], "a@h", "")).contains("cluster_secret"));
    }
}
