//! Queue `x-` arguments: parsed once at declare into typed settings, each invalid value
//! rejected with a message naming the argument (RabbitMQ's wording), so that handlers
//! can answer 406 PRECONDITION_FAILED. Unknown arguments are ignored, as in RabbitMQ.

use amq_protocol::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

/// What happens when a length limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Overflow {
    /// Drop (dead-letter) the oldest messages.
    #[default]
    DropHead,
    /// Refuse new messages (basic.nack with confirms).
    RejectPublish,
    /// Refuse and dead-letter new messages.
    RejectPublishDlx,
}

/// How a replicated queue hands its dead letters on (`x-dead-letter-strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DeadLetterStrategy {
    /// Republished once, without waiting for the targets (RabbitMQ's default): a target
    /// that is missing, full or unreachable loses the message.
    #[default]
    AtMostOnce,
    /// Kept by the source until every target queue has taken it durably, republished
    /// until then (RabbitMQ's quorum queues; only with `x-overflow: reject-publish`).
    AtLeastOnce,
}

/// A queue's typed settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueArgs {
    /// x-message-ttl (ms).
    pub message_ttl: Option<u64>,
    /// x-expires (ms unused before the queue is deleted).
    pub expires: Option<u64>,
    /// x-max-length (ready messages).
    pub max_length: Option<u64>,
    /// x-max-length-bytes (ready body bytes).
    pub max_length_bytes: Option<u64>,
    /// x-overflow.
    pub overflow: Overflow,
    /// x-dead-letter-exchange.
    pub dead_letter_exchange: Option<String>,
    /// x-dead-letter-routing-key.
    pub dead_letter_routing_key: Option<String>,
    /// x-max-priority (1..=255).
    pub max_priority: Option<u8>,
    /// x-single-active-consumer.
    pub single_active_consumer: bool,
    /// x-delivery-limit.
    pub delivery_limit: Option<u64>,
    /// x-dead-letter-strategy.
    pub dead_letter_strategy: DeadLetterStrategy,
}

/// A signed integer of any AMQP width.
pub fn int_value(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => *x as i64,
        AMQPValue::ShortShortUInt(x) => *x as i64,
        AMQPValue::ShortInt(x) => *x as i64,
        AMQPValue::ShortUInt(x) => *x as i64,
        AMQPValue::LongInt(x) => *x as i64,
        AMQPValue::LongUInt(x) => *x as i64,
        AMQPValue::LongLongInt(x) => *x,
        AMQPValue::Timestamp(x) => *x as i64,
        _ => return None,
    })
}

/// A string value (long or short string).
pub fn str_value(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "longstr",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "double",
        AMQPValue::Void => "void",
        _ => "signedint",
    }
}

impl QueueArgs {
    /// Whether dead letters go at least once: asked for, and possible, which (as in
    /// RabbitMQ) needs `x-overflow: reject-publish` (a drop-head queue over its limit
    /// would have to drop messages it still holds for the dead-letter targets) and a
    /// dead-letter exchange. The queue must be replicated too (the caller's to know).
    pub fn dead_letters_at_least_once(&self) -> bool {
        self.dead_letter_strategy == DeadLetterStrategy::AtLeastOnce
            && self.overflow == Overflow::RejectPublish
            && self.dead_letter_exchange.is_some()
    }

    /// Why at-least-once dead-lettering was asked for but falls back to at-most-once,
    /// for the log (RabbitMQ logs it too).
    pub fn at_least_once_fallback(&self) -> Option<&'static str> {
        (self.dead_letter_strategy == DeadLetterStrategy::AtLeastOnce
            && self.overflow != Overflow::RejectPublish)
            .then_some("at-least-once dead-lettering needs x-overflow reject-publish")
    }

    /// Parses and checks the arguments; the error names the argument and the problem.
    pub fn parse(args: &FieldTable) -> Result<QueueArgs, (String, String)> {
        let mut out = QueueArgs::default();
        for (key, value) in args.inner() {
            let name = key.as_str();
            let bad = |why: String| (name.to_string(), why);
            let non_negative = |min: i64| -> Result<u64, (String, String)> {
                let n = int_value(value)
                    .ok_or_else(|| bad(format!("{{unacceptable_type,{}}}", type_name(value))))?;
                if n < min {
                    let what = if n < 0 {
                        "value_negative"
                    } else {
                        "value_zero"
                    };
                    return Err(bad(format!("{{{what},{n}}}")));
                }
                Ok(n as u64)
            };
            let string = || {
                str_value(value)
                    .ok_or_else(|| bad(format!("{{unacceptable_type,{}}}", type_name(value))))
            };
            // Exchange names and routing keys are short strings on the wire: a longer
            // one could never be routed, delivered or stored as one.
            let short_string = || {
                let s = string()?;
                if s.len() > 255 {
                    return Err(bad(format!("{{value_too_long,{},255}}", s.len())));
                }
                Ok(s)
            };
            match name {
                "x-message-ttl" => out.message_ttl = Some(non_negative(0)?),
                "x-expires" => out.expires = Some(non_negative(1)?),
                "x-max-length" => out.max_length = Some(non_negative(0)?),
                "x-max-length-bytes" => out.max_length_bytes = Some(non_negative(0)?),
                "x-delivery-limit" => out.delivery_limit = Some(non_negative(0)?),
                "x-max-priority" => {
                    let n = non_negative(0)?;
                    if n > 255 {
                        return Err(bad(format!("{{value_too_large,{n},255}}")));
                    }
                    out.max_priority = Some(n as u8);
                }
                "x-overflow" => {
                    out.overflow = match string()?.as_str() {
                        "drop-head" => Overflow::DropHead,
                        "reject-publish" => Overflow::RejectPublish,
                        "reject-publish-dlx" => Overflow::RejectPublishDlx,
                        other => {
                            return Err(bad(format!("{{unknown_overflow_mode,<<\"{other}\">>}}")));
                        }
                    }
                }
                "x-dead-letter-exchange" => out.dead_letter_exchange = Some(short_string()?),
                "x-dead-letter-routing-key" => out.dead_letter_routing_key = Some(short_string()?),
                "x-dead-letter-strategy" => {
                    out.dead_letter_strategy = match string()?.as_str() {
                        "at-most-once" => DeadLetterStrategy::AtMostOnce,
                        "at-least-once" => DeadLetterStrategy::AtLeastOnce,
                        _ => return Err(bad("invalid_dlx_strategy".into())),
                    }
                }
                "x-single-active-consumer" => match value {
                    AMQPValue::Boolean(b) => out.single_active_consumer = *b,
                    other => {
                        return Err(bad(format!("{{unacceptable_type,{}}}", type_name(other))));
                    }
                },
                "x-queue-type" => match string()?.as_str() {
                    "classic" | "quorum" => {}
                    other => {
                        return Err(bad(format!("{{unsupported_queue_type,<<\"{other}\">>}}")));
                    }
                },
                _ => {}
            }
        }
        if out.dead_letter_routing_key.is_some() && out.dead_letter_exchange.is_none() {
            return Err((
                "x-dead-letter-routing-key".into(),
                "x-dead-letter-routing-key is set but x-dead-letter-exchange is not".into(),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn valid_and_invalid_arguments() {
        let a = QueueArgs::parse(&table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-max-priority", AMQPValue::ShortShortUInt(10)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            ("x-unknown", AMQPValue::Boolean(true)),
        ]))
        .unwrap();
        assert_eq!(
            (a.message_ttl, a.max_priority, a.overflow),
            (Some(100), Some(10), Overflow::RejectPublish)
        );
        let e = QueueArgs::parse(&table(&[("x-message-ttl", AMQPValue::LongInt(-1))])).unwrap_err();
        assert_eq!(e.0, "x-message-ttl");
        let e =
            QueueArgs::parse(&table(&[("x-max-priority", AMQPValue::LongInt(256))])).unwrap_err();
        assert_eq!(e.0, "x-max-priority");
        let e = QueueArgs::parse(&table(&[("x-expires", AMQPValue::LongInt(0))])).unwrap_err();
        assert_eq!(e.0, "x-expires");
        let e = QueueArgs::parse(&table(&[("x-overflow", AMQPValue::LongString("x".into()))]))
            .unwrap_err();
        assert_eq!(e.0, "x-overflow");
    }

    #[test]
    fn the_dead_letter_strategy_is_one_of_two_words() {
        let strategy = |v: AMQPValue| QueueArgs::parse(&table(&[("x-dead-letter-strategy", v)]));
        assert_eq!(
            strategy(AMQPValue::LongString("at-least-once".into()))
                .unwrap()
                .dead_letter_strategy,
            DeadLetterStrategy::AtLeastOnce
        );
        assert_eq!(
            strategy(AMQPValue::LongString("at-most-once".into()))
                .unwrap()
                .dead_letter_strategy,
            DeadLetterStrategy::AtMostOnce
        );
        let e = strategy(AMQPValue::LongString("At-Least-Once".into())).unwrap_err();
        assert_eq!(
            e,
            (
                "x-dead-letter-strategy".into(),
                "invalid_dlx_strategy".into()
            )
        );
        let e = strategy(AMQPValue::LongInt(1)).unwrap_err();
        assert_eq!(e.1, "{unacceptable_type,signedint}");
    }

    #[test]
    fn at_least_once_needs_reject_publish_and_an_exchange() {
        let args = |overflow: &str, dlx: bool| {
            let mut pairs = vec![
                (
                    "x-dead-letter-strategy",
                    AMQPValue::LongString("at-least-once".into()),
                ),
                ("x-overflow", AMQPValue::LongString(overflow.into())),
            ];
            if dlx {
                pairs.push((
                    "x-dead-letter-exchange",
                    AMQPValue::LongString("dlx".into()),
                ));
            }
            QueueArgs::parse(&table(&pairs)).unwrap()
        };
        assert!(args("reject-publish", true).dead_letters_at_least_once());
        assert!(!args("drop-head", true).dead_letters_at_least_once());
        assert!(args("drop-head", true).at_least_once_fallback().is_some());
        assert!(!args("reject-publish", false).dead_letters_at_least_once());
    }
}

impl QueueArgs {
    /// These settings (parsed from `declared`, the queue's own arguments) with a policy's
    /// `definition` applied as RabbitMQ applies one: for the limits and TTLs (message-ttl,
    /// expires, max-length, max-length-bytes, delivery-limit) the lower value wins; for
    /// overflow and dead-lettering the queue's own argument wins, the policy fills in.
    pub fn with_policy(&self, declared: &FieldTable, definition: &serde_json::Value) -> QueueArgs {
        let mut args = self.clone();
        let number = |key: &str| definition.get(key).and_then(serde_json::Value::as_u64);
        let text = |key: &str| {
            definition
                .get(key)
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        let lower = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let declares = |key: &str| declared.inner().iter().any(|(k, _)| k.as_str() == key);
        args.message_ttl = lower(args.message_ttl, number("message-ttl"));
        args.expires = lower(args.expires, number("expires"));
        args.max_length = lower(args.max_length, number("max-length"));
        args.max_length_bytes = lower(args.max_length_bytes, number("max-length-bytes"));
        args.delivery_limit = lower(args.delivery_limit, number("delivery-limit"));
        if !declares("x-overflow") {
            match text("overflow").as_deref() {
                Some("reject-publish") => args.overflow = Overflow::RejectPublish,
                Some("reject-publish-dlx") => args.overflow = Overflow::RejectPublishDlx,
                Some("drop-head") => args.overflow = Overflow::DropHead,
                _ => {}
            }
        }
        if !declares("x-dead-letter-exchange")
            && let Some(x) = text("dead-letter-exchange")
        {
            args.dead_letter_exchange = Some(x);
        }
        if !declares("x-dead-letter-routing-key")
            && let Some(k) = text("dead-letter-routing-key")
        {
            args.dead_letter_routing_key = Some(k);
        }
        if !declares("x-dead-letter-strategy") {
            match text("dead-letter-strategy").as_deref() {
                Some("at-least-once") => {
                    args.dead_letter_strategy = DeadLetterStrategy::AtLeastOnce
                }
                Some("at-most-once") => args.dead_letter_strategy = DeadLetterStrategy::AtMostOnce,
                _ => {}
            }
        }
        args
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use amq_protocol::types::ShortString;

    #[test]
    fn a_policy_lowers_limits_and_fills_in_what_the_queue_did_not_declare() {
        let mut declared = FieldTable::default();
        declared.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(10));
        declared.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString("mine".into()),
        );
        let base = QueueArgs::parse(&declared).unwrap();
        let policy = serde_json::json!({
            "max-length": 5, "message-ttl": 1000, "dead-letter-exchange": "policy",
            "overflow": "reject-publish"
        });
        let args = base.with_policy(&declared, &policy);
        assert_eq!(args.max_length, Some(5), "the lower limit");
        assert_eq!(args.message_ttl, Some(1000), "filled in");
        assert_eq!(
            args.dead_letter_exchange.as_deref(),
            Some("mine"),
            "the queue's wins"
        );
        assert_eq!(args.overflow, Overflow::RejectPublish);
        let looser = serde_json::json!({"max-length": 50});
        assert_eq!(base.with_policy(&declared, &looser).max_length, Some(10));
    }
}
