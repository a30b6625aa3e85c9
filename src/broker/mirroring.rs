//! RabbitMQ's classic mirrored-queue policy keys (`ha-mode`, `ha-params`, `ha-sync-mode`,
//! `ha-promote-on-failure`, `ha-promote-on-shutdown`, `ha-sync-batch-size`): checked as
//! RabbitMQ checks them (with its texts), and turned into the replicas a matched classic
//! queue gets. Warren serves them with the replicated queues' Raft groups, so the
//! promotion settings need no behaviour of their own: Raft never elects a replica that
//! lacks committed entries (what `when-synced` asks for), and a new member always catches
//! up by itself (what `automatic` sync does).

use serde_json::Value;

/// How many replicas a mirroring policy asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirroring {
    /// `ha-mode: all`: every node of the cluster.
    All,
    /// `ha-mode: exactly` with `ha-params: N`: N replicas (or the cluster size).
    Exactly(usize),
    /// `ha-mode: nodes` with `ha-params: [names]`: the named nodes that are members.
    Nodes(Vec<String>),
}

/// The mirroring a policy definition asks for, if any (the definition has been
/// validated).
pub fn of_definition(definition: &Value) -> Option<Mirroring> {
    let params = definition.get("ha-params");
    match definition.get("ha-mode")?.as_str()? {
        "all" => Some(Mirroring::All),
        "exactly" => Some(Mirroring::Exactly(usize::try_from(params?.as_u64()?).ok()?)),
        "nodes" => Some(Mirroring::Nodes(
            params?
                .as_array()?
                .iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect(),
        )),
        _ => None,
    }
}

/// A JSON value as RabbitMQ's error texts print it (Erlang terms: strings as binaries).
fn erlang(v: &Value) -> String {
    match v {
        Value::String(s) => format!("<<\"{s}\">>"),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(erlang).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// Checks the `ha-*` keys of a policy definition; the error is RabbitMQ's text.
pub fn validate(definition: &serde_json::Map<String, Value>) -> Result<(), String> {
    let params = definition.get("ha-params");
    match definition.get("ha-mode") {
        None => {
            let dependent = ["ha-params", "ha-sync-mode", "ha-promote-on-shutdown"];
            if dependent.iter().any(|k| definition.contains_key(*k)) {
                return Err("ha-mode must be specified to specify ha-params, ha-sync-mode or ha-promote-on-shutdown".into());
            }
        }
        Some(Value::String(mode)) if mode == "all" => {
            if params.is_some() {
                return Err("ha-mode=\"all\" does not take parameters".into());
            }
        }
        Some(Value::String(mode)) if mode == "exactly" => match params {
            None => return Err("ha-mode=\"exactly\" takes an integer, none given".into()),
            Some(n) if n.as_u64().is_none_or(|n| n == 0) => {
                return Err(format!(
                    "ha-mode=\"exactly\" takes an integer, {} given",
                    erlang(n)
                ));
            }
            Some(_) => {}
        },
        Some(Value::String(mode)) if mode == "nodes" => match params {
            None => return Err("ha-mode=\"nodes\" takes a list, none given".into()),
            Some(Value::Array(nodes)) if nodes.is_empty() => {
                return Err("ha-mode=\"nodes\" list must be non-empty".into());
            }
            Some(Value::Array(nodes)) => {
                if nodes.iter().any(|n| !n.is_string()) {
                    return Err(format!(
                        "ha-mode=\"nodes\" takes a list of strings, {} was not a string",
                        erlang(&Value::Array(nodes.clone()))
                    ));
                }
            }
            Some(other) => {
                return Err(format!(
                    "ha-mode=\"nodes\" takes a list, {} given",
                    erlang(other)
                ));
            }
        },
        Some(other) => return Err(format!("{} is not a valid ha-mode value", erlang(other))),
    }
    for (key, allowed) in [
        ("ha-sync-mode", ["manual", "automatic"]),
        ("ha-promote-on-failure", ["always", "when-synced"]),
        ("ha-promote-on-shutdown", ["always", "when-synced"]),
    ] {
        if let Some(v) = definition.get(key)
            && !v.as_str().is_some_and(|s| allowed.contains(&s))
        {
            return Err(format!(
                "{key} must be \"{}\" or \"{}\", got {}",
                allowed[0],
                allowed[1],
                erlang(v)
            ));
        }
    }
    if let Some(v) = definition.get("ha-sync-batch-size")
        && v.as_u64().is_none_or(|n| n == 0)
    {
        return Err(format!(
            "ha-sync-batch-size takes an integer greater than 0, {} given",
            erlang(v)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Result<(), String> {
        validate(v.as_object().expect("an object"))
    }

    #[test]
    fn rabbitmq_texts_for_bad_mirroring_settings() {
        // Each text as RabbitMQ 3.10's rabbitmqctl set_policy printed it.
        let cases = [
            (
                json!({"ha-mode": "foo"}),
                "<<\"foo\">> is not a valid ha-mode value",
            ),
            (
                json!({"ha-mode": "exactly"}),
                "ha-mode=\"exactly\" takes an integer, none given",
            ),
            (
                json!({"ha-mode": "exactly", "ha-params": 0}),
                "ha-mode=\"exactly\" takes an integer, 0 given",
            ),
            (
                json!({"ha-mode": "exactly", "ha-params": "x"}),
                "ha-mode=\"exactly\" takes an integer, <<\"x\">> given",
            ),
            (
                json!({"ha-mode": "exactly", "ha-params": -1}),
                "ha-mode=\"exactly\" takes an integer, -1 given",
            ),
            (
                json!({"ha-mode": "nodes", "ha-params": []}),
                "ha-mode=\"nodes\" list must be non-empty",
            ),
            (
                json!({"ha-mode": "nodes", "ha-params": "a"}),
                "ha-mode=\"nodes\" takes a list, <<\"a\">> given",
            ),
            (
                json!({"ha-mode": "nodes", "ha-params": [1]}),
                "ha-mode=\"nodes\" takes a list of strings, [1] was not a string",
            ),
            (
                json!({"ha-mode": "all", "ha-params": 2}),
                "ha-mode=\"all\" does not take parameters",
            ),
            (
                json!({"ha-params": 2}),
                "ha-mode must be specified to specify ha-params, ha-sync-mode or ha-promote-on-shutdown",
            ),
            (
                json!({"ha-sync-mode": "manual"}),
                "ha-mode must be specified to specify ha-params, ha-sync-mode or ha-promote-on-shutdown",
            ),
            (
                json!({"ha-mode": "all", "ha-sync-mode": "bad"}),
                "ha-sync-mode must be \"manual\" or \"automatic\", got <<\"bad\">>",
            ),
            (
                json!({"ha-mode": "all", "ha-promote-on-failure": "bad"}),
                "ha-promote-on-failure must be \"always\" or \"when-synced\", got <<\"bad\">>",
            ),
            (
                json!({"ha-mode": "all", "ha-promote-on-shutdown": "x"}),
                "ha-promote-on-shutdown must be \"always\" or \"when-synced\", got <<\"x\">>",
            ),
            (
                json!({"ha-mode": "all", "ha-sync-batch-size": 0}),
                "ha-sync-batch-size takes an integer greater than 0, 0 given",
            ),
        ];
        for (definition, text) in cases {
            assert_eq!(
                check(definition.clone()),
                Err(text.to_string()),
                "{definition}"
            );
        }
        let good = json!({"ha-mode": "all", "ha-sync-mode": "automatic",
            "ha-promote-on-failure": "when-synced", "ha-promote-on-shutdown": "always"});
        assert_eq!(check(good), Ok(()));
    }

    #[test]
    fn replicas_a_policy_asks_for() {
        assert_eq!(
            of_definition(&json!({"ha-mode": "all"})),
            Some(Mirroring::All)
        );
        assert_eq!(
            of_definition(&json!({"ha-mode": "exactly", "ha-params": 2})),
            Some(Mirroring::Exactly(2))
        );
        assert_eq!(
            of_definition(&json!({"ha-mode": "nodes", "ha-params": ["a", "b"]})),
            Some(Mirroring::Nodes(vec!["a".into(), "b".into()]))
        );
        assert_eq!(of_definition(&json!({"max-length": 1})), None);
    }
}
