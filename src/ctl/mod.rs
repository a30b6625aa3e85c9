//! `warren ctl`: the rabbitmqctl commands people script, talking to a node through its
//! management API (so it works against any node it can reach, and against RabbitMQ).
//! Output follows rabbitmqctl's: a header row of column names, then tab-separated rows.
//! Policies and cluster commands will join when the cluster lands.

mod client;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use client::{Api, segment};

/// Options shared by every `warren ctl` command.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The node's management API.
    #[arg(long, env = "WARREN_CTL_URL", default_value = "http://127.0.0.1:15672")]
    pub url: String,
    /// User to authenticate as (needs the administrator tag for most commands).
    #[arg(long, short = 'u', env = "WARREN_CTL_USER", default_value = "guest")]
    pub user: String,
    /// Its password.
    #[arg(long, env = "WARREN_CTL_PASSWORD", default_value = "guest")]
    pub password: String,
    /// Virtual host for the commands that take one.
    #[arg(long = "vhost", short = 'p', global = true, default_value = "/")]
    pub vhost: String,
    /// The command.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// rabbitmqctl's commands, with its names.
#[derive(Debug, Subcommand)]
#[command(rename_all = "snake_case")]
pub enum CtlCommand {
    /// Node status: versions, listeners, object and message totals, alarms.
    Status,
    /// Stops the node as SIGTERM does (connections closed with 320 CONNECTION_FORCED,
    /// the store committed and closed, exit 0) and waits until it has stopped.
    Stop {
        /// How long to wait for the node to go away, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Puts the node into maintenance mode, as `rabbitmq-upgrade drain`: client
    /// connections closed and refused, replicated queues' leaderships handed over.
    Drain,
    /// Takes the node out of maintenance mode, as `rabbitmq-upgrade revive`.
    Revive,
    /// The cluster as this node sees it: members, which of them it reaches, the
    /// metadata leader, alarms.
    ClusterStatus,
    /// Removes a node from the cluster (run on any other member).
    ForgetClusterNode {
        /// The node's name (name@host).
        node: String,
    },
    /// Makes this node (the one --url names) a member again, through a member.
    JoinCluster {
        /// A member's name (name@host).
        node: String,
    },
    /// Adds a replica of a replicated queue of the vhost (-p) on a node, as
    /// `rabbitmq-queues add_member`: it copies the queue's log and then votes.
    AddMember {
        /// The queue.
        queue: String,
        /// The node (name@host).
        node: String,
    },
    /// Removes a node's replica of a replicated queue of the vhost (-p), as
    /// `rabbitmq-queues delete_member`.
    DeleteMember {
        /// The queue.
        queue: String,
        /// The node (name@host).
        node: String,
    },
    /// Moves the leadership of a replicated queue of the vhost (-p) to one of its
    /// members (the leader hands over once the member has its whole log).
    TransferLeadership {
        /// The queue.
        queue: String,
        /// The member to lead it (name@host).
        node: String,
    },
    /// Adds a replica on a node to every replicated queue that lacks one, as
    /// `rabbitmq-queues grow` (`even`: only to queues with an even number of replicas).
    Grow {
        /// The node (name@host).
        node: String,
        /// all or even.
        strategy: String,
        /// Only queues whose name matches.
        #[arg(long = "queue-pattern", default_value = ".*")]
        queue_pattern: String,
        /// Only queues of vhosts whose name matches.
        #[arg(long = "vhost-pattern", default_value = ".*")]
        vhost_pattern: String,
    },
    /// Moves replicated queues' leaders so that every node leads its share, as
    /// `rabbitmq-queues rebalance` (`all` or `quorum`: Warren's replicated queues are
    /// all of one kind).
    Rebalance {
        /// all or quorum.
        #[arg(default_value = "all")]
        kind: String,
        /// Only queues whose name matches.
        #[arg(long = "queue-pattern", default_value = ".*")]
        queue_pattern: String,
        /// Only queues of vhosts whose name matches.
        #[arg(long = "vhost-pattern", default_value = ".*")]
        vhost_pattern: String,
    },
    /// Removes a node's replica from every replicated queue, as `rabbitmq-queues shrink`.
    Shrink {
        /// The node (name@host).
        node: String,
    },
    /// Queues of the vhost, with the columns asked for (default: name messages).
    ListQueues {
        /// Columns, e.g. name messages messages_ready messages_unacknowledged consumers.
        columns: Vec<String>,
    },
    /// Exchanges of the vhost (default columns: name type).
    ListExchanges {
        /// Columns, e.g. name type durable auto_delete internal.
        columns: Vec<String>,
    },
    /// Bindings of the vhost.
    ListBindings {
        /// Columns (default: source_name source_kind destination_name destination_kind
        /// routing_key arguments).
        columns: Vec<String>,
    },
    /// Open connections (default columns: user peer_host peer_port state).
    ListConnections {
        /// Columns, e.g. name user vhost channels.
        columns: Vec<String>,
    },
    /// Open channels (default columns: connection number user vhost).
    ListChannels {
        /// Columns.
        columns: Vec<String>,
    },
    /// Consumers of the vhost.
    ListConsumers {
        /// Columns (default: queue_name channel_pid consumer_tag ack_required
        /// prefetch_count active arguments).
        columns: Vec<String>,
    },
    /// Users and their tags.
    ListUsers,
    /// Virtual hosts.
    ListVhosts,
    /// Creates a user.
    AddUser {
        /// User name.
        name: String,
        /// Password.
        password: String,
    },
    /// Deletes a user (its connections are closed).
    DeleteUser {
        /// User name.
        name: String,
    },
    /// Sets a user's password.
    ChangePassword {
        /// User name.
        name: String,
        /// New password.
        password: String,
    },
    /// Replaces a user's tags (none: no tags).
    SetUserTags {
        /// User name.
        name: String,
        /// Tags: administrator, monitoring, policymaker, management, or others.
        tags: Vec<String>,
    },
    /// Creates a virtual host.
    AddVhost {
        /// Its name.
        name: String,
    },
    /// Deletes a virtual host with everything in it.
    DeleteVhost {
        /// Its name.
        name: String,
    },
    /// Sets a user's permissions in the vhost (-p).
    SetPermissions {
        /// User name.
        user: String,
        /// Configure pattern.
        configure: String,
        /// Write pattern.
        write: String,
        /// Read pattern.
        read: String,
    },
    /// Removes a user's permissions in the vhost (-p).
    ClearPermissions {
        /// User name.
        user: String,
    },
    /// Permissions in the vhost (-p).
    ListPermissions,
    /// Sets a user's topic permission on a topic exchange of the vhost (-p): patterns
    /// over routing keys, `{username}` and `{vhost}` expanded.
    SetTopicPermissions {
        /// User name.
        user: String,
        /// The topic exchange.
        exchange: String,
        /// Routing keys the user may publish with.
        write: String,
        /// Binding keys the user may bind with.
        read: String,
    },
    /// Removes a user's topic permissions in the vhost (-p), or only on one exchange.
    ClearTopicPermissions {
        /// User name.
        user: String,
        /// Only the permission on this exchange.
        exchange: Option<String>,
    },
    /// Topic permissions in the vhost (-p).
    ListTopicPermissions,
    /// Sets a policy in the vhost (-p): settings (a JSON object) for the queues and/or
    /// exchanges whose names match PATTERN.
    SetPolicy {
        /// Policy name.
        name: String,
        /// Regular expression over queue or exchange names.
        pattern: String,
        /// The settings, as JSON, e.g. '{"max-length":1000}'.
        definition: String,
        /// Higher wins when several policies match.
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// queues, exchanges or all.
        #[arg(long = "apply-to", default_value = "all")]
        apply_to: String,
    },
    /// Deletes a policy of the vhost (-p).
    ClearPolicy {
        /// Policy name.
        name: String,
    },
    /// Policies of the vhost (-p).
    ListPolicies,
    /// Deletes a queue of the vhost.
    DeleteQueue {
        /// Queue name.
        name: String,
        /// Only if it has no consumers.
        #[arg(long)]
        if_unused: bool,
        /// Only if it is empty.
        #[arg(long)]
        if_empty: bool,
    },
    /// Purges a queue of the vhost.
    PurgeQueue {
        /// Queue name.
        name: String,
    },
    /// Writes every definition (RabbitMQ's JSON) to a file, or to stdout with "-".
    ExportDefinitions {
        /// Path, or "-".
        path: String,
    },
    /// Creates what a definitions file (RabbitMQ's JSON) names; "-" reads stdin.
    ImportDefinitions {
        /// Path, or "-".
        path: String,
    },
    /// Closes a connection (320 CONNECTION_FORCED with the reason).
    CloseConnection {
        /// The connection's name as list_connections name shows it.
        name: String,
        /// Reason given to the client.
        reason: String,
    },
}

/// Runs a `warren ctl` command; the exit status follows rabbitmqctl's (0 ok, 1 error,
/// 64 usage is left to clap).
pub fn run(args: CtlArgs) -> std::process::ExitCode {
    let api = Api::new(&args.url, &args.user, &args.password);
    match execute(&api, &args.vhost, args.command) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Renders objects as rabbitmqctl does: a header of column names, then one
/// tab-separated row per object. API names stand in for rabbitmqctl's where they differ.
fn table(items: &Value, columns: &[String], aliases: &[(&str, &str)]) -> String {
    let mut out = columns.join("\t");
    out.push('\n');
    for item in items.as_array().into_iter().flatten() {
        let row: Vec<String> = columns
            .iter()
            .map(|c| {
                let key = aliases
                    .iter()
                    .find(|(ctl, _)| ctl == c)
                    .map_or(c.as_str(), |(_, api)| *api);
                let v = key.split('.').fold(item, |v, k| &v[k]);
                match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    Value::Array(a) if a.is_empty() => "[]".into(),
                    other => other.to_string(),
                }
            })
            .collect();
        out.push_str(&row.join("\t"));
        out.push('\n');
    }
    out
}

fn or_default(columns: Vec<String>, default: &[&str]) -> Vec<String> {
    if columns.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        columns
    }
}

/// `cluster_status`, laid out as rabbitmqctl's.
fn cluster_status(api: &Api) -> Result<String, String> {
    let nodes = api.get("/nodes")?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    let me = nodes
        .iter()
        .find(|n| n.get("metadata_leader").is_some())
        .or_else(|| nodes.first())
        .cloned()
        .unwrap_or(Value::Null);
    let name = |n: &Value| n["name"].as_str().unwrap_or_default().to_string();
    let mut out = format!("Cluster status of node {}\n\nDisk Nodes\n\n", name(&me));
    for n in &nodes {
        out.push_str(&format!("{}\n", name(n)));
    }
    out.push_str("\nRunning Nodes\n\n");
    for n in nodes
        .iter()
        .filter(|n| n["running"].as_bool() == Some(true))
    {
        out.push_str(&format!("{}\n", name(n)));
    }
    out.push_str(&format!(
        "\nMetadata leader: {}\n",
        me["metadata_leader"].as_str().unwrap_or("(none known)")
    ));
    let alarms = api.get("/health/checks/alarms").unwrap_or(Value::Null);
    let alarm_list: Vec<String> = alarms["alarms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let resource = a["resource"].as_str()?;
            Some(format!("{resource} alarm on node {}", a["node"].as_str()?))
        })
        .collect();
    out.push_str("\nAlarms\n\n");
    out.push_str(&if alarm_list.is_empty() {
        "(none)\n".to_string()
    } else {
        alarm_list.join("\n") + "\n"
    });
    Ok(out)
}

fn execute(api: &Api, vhost: &str, command: CtlCommand) -> Result<String, String> {
    let v = segment(vhost);
    match command {
        CtlCommand::ClusterStatus => cluster_status(api),
        CtlCommand::ForgetClusterNode { node } => {
            api.delete(&format!("/cluster/nodes/{}", segment(&node)), &[])?;
            Ok(format!("Removing node {node} from the cluster\n"))
        }
        CtlCommand::AddMember { queue, node } => {
            let path = format!("/queues/quorum/{v}/{}/replicas/add", segment(&queue));
            api.post(&path, &serde_json::json!({ "node": node }))?;
            Ok(format!(
                "Adding a replica for queue {queue} on node {node}...\n"
            ))
        }
        CtlCommand::DeleteMember { queue, node } => {
            let path = format!("/queues/quorum/{v}/{}/replicas/delete", segment(&queue));
            api.delete_json(&path, &serde_json::json!({ "node": node }))?;
            Ok(format!(
                "Removing a replica of queue {queue} on node {node}...\n"
            ))
        }
        CtlCommand::TransferLeadership { queue, node } => {
            let path = format!("/queues/quorum/{v}/{}/leader", segment(&queue));
            api.post(&path, &serde_json::json!({ "node": node }))?;
            Ok(format!(
                "Transferring the leadership of queue {queue} to node {node}...
"
            ))
        }
        CtlCommand::Grow {
            node,
            strategy,
            queue_pattern,
            vhost_pattern,
        } => {
            let body = serde_json::json!({
                "strategy": strategy,
                "queue_pattern": queue_pattern,
                "vhost_pattern": vhost_pattern,
            });
            let report = api.post(
                &format!("/queues/quorum/replicas/on/{}/grow", segment(&node)),
                &body,
            )?;
            let columns: Vec<String> = ["vhost", "name", "size", "result"].map(String::from).into();
            Ok(format!(
                "Growing queues onto {node}...\n{}",
                table(&report, &columns, &[])
            ))
        }
        CtlCommand::Rebalance {
            kind,
            queue_pattern,
            vhost_pattern,
        } => {
            if kind != "all" && kind != "quorum" {
                return Err(format!(
                    "unknown queue type {kind}: Warren rebalances all or quorum"
                ));
            }
            let body = serde_json::json!({
                "queue_pattern": queue_pattern,
                "vhost_pattern": vhost_pattern,
            });
            let report = api.post("/rebalance/queues", &body)?;
            let columns: Vec<String> = ["node", "queue_leaders"].map(String::from).into();
            Ok(format!(
                "Re-balancing leaders of replicated queues...\n{}",
                table(&report, &columns, &[])
            ))
        }
        CtlCommand::Shrink { node } => {
            let report = api.delete(
                &format!("/queues/quorum/replicas/on/{}/shrink", segment(&node)),
                &[],
            )?;
            let columns: Vec<String> = ["vhost", "name", "size", "result"].map(String::from).into();
            Ok(format!(
                "Shrinking queues on {node}...\n{}",
                table(&report, &columns, &[])
            ))
        }
        CtlCommand::JoinCluster { node } => {
            api.post("/cluster/join", &serde_json::json!({ "node": node }))?;
            Ok(format!("Clustering node with {node}\n"))
        }
        CtlCommand::Status => {
            let o = api.get("/overview")?;
            let alarms = api.get("/health/checks/alarms").unwrap_or(Value::Null);
            let mut out = format!(
                "Status of node {}\nProduct: {} {} (RabbitMQ {} compatible)\n",
                o["node"].as_str().unwrap_or_default(),
                o["product_name"].as_str().unwrap_or_default(),
                o["product_version"].as_str().unwrap_or_default(),
                o["rabbitmq_version"].as_str().unwrap_or_default()
            );
            out.push_str("Listeners:\n");
            for l in o["listeners"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  {}:{} {}\n",
                    l["ip_address"].as_str().unwrap_or_default(),
                    l["port"],
                    l["protocol"].as_str().unwrap_or_default()
                ));
            }
            let t = &o["object_totals"];
            out.push_str(&format!(
                "Totals: connections {}, channels {}, queues {}, exchanges {}, consumers {}\n",
                t["connections"], t["channels"], t["queues"], t["exchanges"], t["consumers"]
            ));
            let q = &o["queue_totals"];
            out.push_str(&format!(
                "Messages: {} ({} ready, {} unacknowledged)\n",
                q["messages"], q["messages_ready"], q["messages_unacknowledged"]
            ));
            let alarm_list: Vec<String> = alarms["alarms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["resource"].as_str().map(String::from))
                .collect();
            out.push_str(&format!(
                "Alarms: {}\n",
                if alarm_list.is_empty() {
                    "(none)".to_string()
                } else {
                    alarm_list.join(", ")
                }
            ));
            Ok(out)
        }
        CtlCommand::ListQueues { columns } => {
            let columns = or_default(columns, &["name", "messages"]);
            Ok(table(&api.get(&format!("/queues/{v}"))?, &columns, &[]))
        }
        CtlCommand::ListExchanges { columns } => {
            let columns = or_default(columns, &["name", "type"]);
            Ok(table(&api.get(&format!("/exchanges/{v}"))?, &columns, &[]))
        }
        CtlCommand::ListBindings { columns } => {
            let columns = or_default(
                columns,
                &[
                    "source_name",
                    "source_kind",
                    "destination_name",
                    "destination_kind",
                    "routing_key",
                    "arguments",
                ],
            );
            let mut list = api.get(&format!("/bindings/{v}"))?;
            for b in list.as_array_mut().into_iter().flatten() {
                b["source_kind"] = json!("exchange");
            }
            let aliases = [
                ("source_name", "source"),
                ("destination_name", "destination"),
                ("destination_kind", "destination_type"),
            ];
            Ok(table(&list, &columns, &aliases))
        }
        CtlCommand::ListConnections { columns } => {
            let columns = or_default(columns, &["user", "peer_host", "peer_port", "state"]);
            Ok(table(&api.get("/connections")?, &columns, &[]))
        }
        CtlCommand::ListChannels { columns } => {
            let columns = or_default(columns, &["connection", "number", "user", "vhost"]);
            let aliases = [("connection", "connection_details.name")];
            Ok(table(&api.get("/channels")?, &columns, &aliases))
        }
        CtlCommand::ListConsumers { columns } => {
            let columns = or_default(
                columns,
                &[
                    "queue_name",
                    "channel_pid",
                    "consumer_tag",
                    "ack_required",
                    "prefetch_count",
                    "active",
                    "arguments",
                ],
            );
            let aliases = [
                ("queue_name", "queue.name"),
                ("channel_pid", "channel_details.name"),
            ];
            Ok(table(
                &api.get(&format!("/consumers/{v}"))?,
                &columns,
                &aliases,
            ))
        }
        CtlCommand::ListUsers => {
            let cols = ["user".to_string(), "tags".to_string()];
            Ok(table(&api.get("/users")?, &cols, &[("user", "name")]))
        }
        CtlCommand::ListVhosts => {
            let cols = ["name".to_string()];
            Ok(table(&api.get("/vhosts")?, &cols, &[]))
        }
        CtlCommand::AddUser { name, password } => {
            api.put(
                &format!("/users/{}", segment(&name)),
                &json!({"password": password, "tags": ""}),
            )?;
            Ok(format!("Adding user \"{name}\" ...\n"))
        }
        CtlCommand::DeleteUser { name } => {
            api.delete(&format!("/users/{}", segment(&name)), &[])?;
            Ok(format!("Deleting user \"{name}\" ...\n"))
        }
        CtlCommand::ChangePassword { name, password } => {
            let path = format!("/users/{}", segment(&name));
            let user = api.get(&path)?;
            api.put(&path, &json!({"password": password, "tags": user["tags"]}))?;
            Ok(format!("Changing password for user \"{name}\" ...\n"))
        }
        CtlCommand::SetUserTags { name, tags } => {
            let path = format!("/users/{}", segment(&name));
            let user = api.get(&path)?;
            api.put(
                &path,
                &json!({"password_hash": user["password_hash"],
                        "hashing_algorithm": user["hashing_algorithm"], "tags": tags}),
            )?;
            Ok(format!(
                "Setting tags for user \"{name}\" to [{}] ...\n",
                tags.join(", ")
            ))
        }
        CtlCommand::AddVhost { name } => {
            api.put(&format!("/vhosts/{}", segment(&name)), &json!({}))?;
            Ok(format!("Adding vhost \"{name}\" ...\n"))
        }
        CtlCommand::DeleteVhost { name } => {
            api.delete(&format!("/vhosts/{}", segment(&name)), &[])?;
            Ok(format!("Deleting vhost \"{name}\" ...\n"))
        }
        CtlCommand::SetPermissions {
            user,
            configure,
            write,
            read,
        } => {
            api.put(
                &format!("/permissions/{v}/{}", segment(&user)),
                &json!({"configure": configure, "write": write, "read": read}),
            )?;
            Ok(format!(
                "Setting permissions for user \"{user}\" in vhost \"{vhost}\" ...\n"
            ))
        }
        CtlCommand::ClearPermissions { user } => {
            api.delete(&format!("/permissions/{v}/{}", segment(&user)), &[])?;
            Ok(format!(
                "Clearing permissions for user \"{user}\" in vhost \"{vhost}\" ...\n"
            ))
        }
        CtlCommand::ListPermissions => {
            let cols: Vec<String> = ["user", "configure", "write", "read"]
                .map(String::from)
                .to_vec();
            Ok(table(
                &api.get(&format!("/vhosts/{v}/permissions"))?,
                &cols,
                &[],
            ))
        }
        CtlCommand::SetTopicPermissions {
            user,
            exchange,
            write,
            read,
        } => {
            api.put(
                &format!("/topic-permissions/{v}/{}", segment(&user)),
                &json!({"exchange": exchange, "write": write, "read": read}),
            )?;
            Ok(format!(
                "Setting topic permissions on \"{exchange}\" for user \"{user}\" in vhost \"{vhost}\" ...\n"
            ))
        }
        CtlCommand::ClearTopicPermissions { user, exchange } => {
            let query = exchange
                .as_ref()
                .map(|x| format!("?exchange={}", segment(x)))
                .unwrap_or_default();
            api.delete(
                &format!("/topic-permissions/{v}/{}{query}", segment(&user)),
                &[],
            )?;
            Ok(format!(
                "Clearing topic permissions for user \"{user}\" in vhost \"{vhost}\" ...\n"
            ))
        }
        CtlCommand::ListTopicPermissions => {
            let cols: Vec<String> = ["user", "exchange", "write", "read"]
                .map(String::from)
                .to_vec();
            Ok(table(
                &api.get(&format!("/vhosts/{v}/topic-permissions"))?,
                &cols,
                &[],
            ))
        }
        CtlCommand::SetPolicy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
        } => {
            let definition: Value = serde_json::from_str(&definition)
                .map_err(|e| format!("the definition is not JSON: {e}"))?;
            api.put(
                &format!("/policies/{v}/{}", segment(&name)),
                &json!({"pattern": pattern, "definition": definition,
                        "priority": priority, "apply-to": apply_to}),
            )?;
            Ok(format!(
                "Setting policy \"{name}\" for pattern \"{pattern}\" to \"{definition}\" with priority \"{priority}\" for vhost \"{vhost}\" ...\n"
            ))
        }
        CtlCommand::ClearPolicy { name } => {
            api.delete(&format!("/policies/{v}/{}", segment(&name)), &[])?;
            Ok(format!(
                "Clearing policy \"{name}\" on vhost \"{vhost}\" ...\n"
            ))
        }
        CtlCommand::ListPolicies => {
            let cols: Vec<String> = [
                "vhost",
                "name",
                "pattern",
                "apply-to",
                "definition",
                "priority",
            ]
            .map(String::from)
            .to_vec();
            Ok(table(&api.get(&format!("/policies/{v}"))?, &cols, &[]))
        }
        CtlCommand::DeleteQueue {
            name,
            if_unused,
            if_empty,
        } => {
            let path = format!(
                "/queues/{v}/{}?if-unused={if_unused}&if-empty={if_empty}",
                segment(&name)
            );
            api.delete(&path, &[])?;
            Ok(format!("Deleting queue '{name}' on vhost '{vhost}' ...\n"))
        }
        CtlCommand::PurgeQueue { name } => {
            api.delete(&format!("/queues/{v}/{}/contents", segment(&name)), &[])?;
            Ok(format!("Purging queue '{name}' in vhost '{vhost}' ...\n"))
        }
        CtlCommand::ExportDefinitions { path } => {
            let defs = api.get("/definitions")?;
            let text = serde_json::to_string_pretty(&defs).map_err(|e| e.to_string())?;
            if path == "-" {
                Ok(format!("{text}\n"))
            } else {
                std::fs::write(&path, text).map_err(|e| format!("writing {path}: {e}"))?;
                Ok(format!("Exported definitions to \"{path}\"\n"))
            }
        }
        CtlCommand::ImportDefinitions { path } => {
            let text = if path == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| format!("reading stdin: {e}"))?
            } else {
                std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?
            };
            let defs: Value =
                serde_json::from_str(&text).map_err(|e| format!("{path} is not JSON: {e}"))?;
            api.post("/definitions", &defs)?;
            Ok(format!("Imported definitions from \"{path}\"\n"))
        }
        CtlCommand::Stop { timeout } => {
            let node = api.get("/overview")?["node"]
                .as_str()
                .map(String::from)
                .ok_or("the node did not say its name")?;
            api.post(&format!("/nodes/{}/stop", segment(&node)), &Value::Null)?;
            // As rabbitmqctl stop: return once the node no longer answers.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
            loop {
                match api.get("/overview") {
                    Err(e) if e.starts_with("cannot reach") => break,
                    _ => {}
                }
                if std::time::Instant::now() >= deadline {
                    return Err(format!("{node} still answers after {timeout} s"));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(format!("Stopping and halting node {node} ...\n"))
        }
        CtlCommand::Drain | CtlCommand::Revive => {
            let node = api.get("/overview")?["node"]
                .as_str()
                .map(String::from)
                .ok_or("the node did not say its name")?;
            let (action, doing) = match command {
                CtlCommand::Drain => ("drain", "Will put node {node} into maintenance mode"),
                _ => ("revive", "Will take node {node} out of maintenance mode"),
            };
            api.post(&format!("/nodes/{}/{action}", segment(&node)), &Value::Null)?;
            Ok(format!("{}\n", doing.replace("{node}", &node)))
        }
        CtlCommand::CloseConnection { name, reason } => {
            api.delete(
                &format!("/connections/{}", segment(&name)),
                &[("X-Reason", &reason)],
            )?;
            Ok(format!("Closing connection {name}, reason: {reason}...\n"))
        }
    }
}
