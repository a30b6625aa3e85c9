//! Policies, as RabbitMQ's: a named pattern over queue and/or exchange names in a
//! vhost with a definition (settings such as `max-length`) and a priority. This module
//! validates a policy the way RabbitMQ does (with its texts) and picks the policy that
//! applies to an object: the matching one of highest priority.

use regex::Regex;
use serde_json::Value;

use crate::auth::PolicyRecord;

/// What a policy applies to (`apply-to`).
pub const APPLY_TO: [&str; 3] = ["queues", "exchanges", "all"];

/// Settings RabbitMQ 3.10 recognises in a policy definition. Warren applies those its
/// queues and exchanges support (see `applied_keys`; the ha-* keys decide where a new
/// classic queue is replicated, see `mirroring`) and keeps the others (queue-mode,
/// federation, ...) so that definitions from RabbitMQ load unchanged.
const KNOWN_KEYS: &[&str] = &[
    "alternate-exchange",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "dead-letter-strategy",
    "delivery-limit",
    "expires",
    "federation-upstream",
    "federation-upstream-set",
    "ha-mode",
    "ha-params",
    "ha-promote-on-failure",
    "ha-promote-on-shutdown",
    "ha-sync-batch-size",
    "ha-sync-mode",
    "initial-cluster-size",
    "max-age",
    "max-in-memory-bytes",
    "max-in-memory-length",
    "max-length",
    "max-length-bytes",
    "message-ttl",
    "overflow",
    "queue-leader-locator",
    "queue-master-locator",
    "queue-mode",
    "queue-version",
    "stream-max-segment-size-bytes",
];

/// The definition keys Warren's queues and exchanges act on.
pub fn applied_keys() -> &'static [&'static str] {
    &[
        "message-ttl",
        "expires",
        "max-length",
        "max-length-bytes",
        "overflow",
        "dead-letter-exchange",
        "dead-letter-routing-key",
        "dead-letter-strategy",
        "delivery-limit",
        "alternate-exchange",
    ]
}

fn failed(why: String) -> String {
    format!("Validation failed\n\n{why}\n")
}

fn non_negative(v: &Value) -> bool {
    v.as_u64().is_some()
}

/// Checks a policy as RabbitMQ does before storing it; the error is RabbitMQ's text.
pub fn validate(p: &PolicyRecord) -> Result<(), String> {
    if !APPLY_TO.contains(&p.apply_to.as_str()) {
        return Err(failed(format!(
            "apply-to '{}' unrecognised; should be 'queues', 'exchanges' or 'all'",
            p.apply_to
        )));
    }
    if let Err(e) = Regex::new(&p.pattern) {
        return Err(failed(format!(
            "pattern should be regular expression but is invalid: {e}"
        )));
    }
    let Some(definition) = p.definition.as_object() else {
        return Err(failed("definition must be a JSON object".into()));
    };
    if definition.is_empty() {
        return Err(failed("no policy provided".into()));
    }
    let unknown: Vec<String> = definition
        .iter()
        .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
        .map(|(k, v)| format!("{{<<\"{k}\">>,{v}}}"))
        .collect();
    if !unknown.is_empty() {
        return Err(failed(format!(
            "[{}] are not recognised policy settings",
            unknown.join(",")
        )));
    }
    super::mirroring::validate(definition).map_err(failed)?;
    for (key, value) in definition {
        let what = match key.as_str() {
            "message-ttl" if !non_negative(value) => "message-ttl",
            "expires" if value.as_u64().is_none_or(|v| v == 0) => "expires",
            "max-length" if !non_negative(value) => "maximum length",
            "max-length-bytes" if !non_negative(value) => "maximum length in bytes",
            "delivery-limit" if !non_negative(value) => "delivery-limit",
            "overflow"
                if !matches!(
                    value.as_str(),
                    Some("drop-head" | "reject-publish" | "reject-publish-dlx")
                ) =>
            {
                "overflow"
            }
            "dead-letter-strategy"
                if !matches!(value.as_str(), Some("at-most-once" | "at-least-once")) =>
            {
                "dead letter strategy"
            }
            "dead-letter-exchange" | "dead-letter-routing-key" | "alternate-exchange"
                if !value.is_string() =>
            {
                key.as_str()
            }
            _ => continue,
        };
        return Err(failed(format!("{value} is not a valid {what}")));
    }
    Ok(())
}

/// Whether `p` applies to an object of this kind and name.
fn applies(p: &PolicyRecord, queue: bool, name: &str) -> bool {
    let kind = if queue { "queues" } else { "exchanges" };
    (p.apply_to == "all" || p.apply_to == kind)
        && Regex::new(&p.pattern).is_ok_and(|r| r.is_match(name))
}

/// The policy in force for a queue (`queue`) or exchange named `name`: of the matching
/// ones, the highest priority (as RabbitMQ); between equal priorities, which RabbitMQ
/// leaves open, the one whose name sorts last, so the choice is stable.
pub fn in_force<'a>(
    policies: &'a [PolicyRecord],
    queue: bool,
    name: &str,
) -> Option<&'a PolicyRecord> {
    policies
        .iter()
        .filter(|p| applies(p, queue, name))
        .max_by(|a, b| a.priority.cmp(&b.priority).then(a.name.cmp(&b.name)))
}
