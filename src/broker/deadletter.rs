//! Dead-lettering as RabbitMQ does it: a message that leaves a queue rejected, expired,
//! dropped by a length limit or past its delivery limit is republished to the queue's
//! `x-dead-letter-exchange` (with `x-dead-letter-routing-key` or its own routing key),
//! carrying the `x-death` history and the `x-first-death-*` / `x-last-death-*` headers.
//! For durable queues, the removal from the source and the new copies go to the store
//! in one request, so a crash neither loses nor duplicates the move. A replicated queue
//! that dead-letters at least once (`crate::queue::dead_letters`) publishes each dead
//! letter here and waits until every target took it (`dead_letter_confirmed`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};

use super::vhost::VHost;
use crate::protocol::codec::encode;
use crate::queue::journal::{Journal, Writes};
use crate::queue::{DeadLetterRouter, DeathReason, Entry, Message, Queue, now_ms};

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn table_str(t: &FieldTable, key: &str) -> Option<String> {
    t.inner().get(key).and_then(crate::queue::args::str_value)
}

/// The routing keys a message was published with: its own and those of its CC header
/// (sender-selected distribution; BCC keys are not kept with the message).
fn published_keys(msg: &Message) -> Vec<String> {
    let mut keys = vec![msg.routing_key.clone()];
    if let Ok((cc, _)) = super::sender_selected::extra_routing_keys(&msg.properties) {
        keys.extend(cc);
    }
    keys
}

/// The properties of the dead-lettered copy: `expiration` removed, x-death updated.
fn dead_properties(msg: &Message, queue: &str, reason: DeathReason, now: u64) -> BasicProperties {
    let p = &msg.properties;
    let mut headers = p.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = deaths.iter().position(|d| match d {
        AMQPValue::FieldTable(t) => {
            table_str(t, "queue").as_deref() == Some(queue)
                && table_str(t, "reason").as_deref() == Some(reason.as_str())
        }
        _ => false,
    });
    let entry = match same.map(|i| deaths.remove(i)) {
        Some(AMQPValue::FieldTable(mut t)) => {
            let count = t
                .inner()
                .get("count")
                .and_then(crate::queue::args::int_value)
                .unwrap_or(0);
            t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
            t
        }
        _ => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), text(reason.as_str()));
            t.insert("queue".into(), text(queue));
            t.insert("time".into(), AMQPValue::Timestamp(now / 1000));
            t.insert("exchange".into(), text(&msg.exchange));
            let keys: Vec<AMQPValue> = published_keys(msg).iter().map(|k| text(k)).collect();
            t.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(FieldArray::from(keys)),
            );
            if let Some(exp) = p.expiration() {
                t.insert("original-expiration".into(), text(exp.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !headers.contains_key("x-first-death-reason") {
        headers.insert("x-first-death-reason".into(), text(reason.as_str()));
        headers.insert("x-first-death-queue".into(), text(queue));
        headers.insert("x-first-death-exchange".into(), text(&msg.exchange));
    }
    headers.insert("x-last-death-reason".into(), text(reason.as_str()));
    headers.insert("x-last-death-queue".into(), text(queue));
    headers.insert("x-last-death-exchange".into(), text(&msg.exchange));

    let mut out = BasicProperties::default().with_headers(headers);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// RabbitMQ's cycle rule: a message that would return to a queue it already died in is
/// dropped there, unless one of the deaths since then was a rejection.
fn is_cycle(props: &BasicProperties, target: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death"))
    else {
        return false;
    };
    for d in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = d else {
            continue;
        };
        if table_str(t, "reason").as_deref() == Some("rejected") {
            return false;
        }
        if table_str(t, "queue").as_deref() == Some(target) {
            return true;
        }
    }
    false
}

impl VHost {
    /// The copy of `old` (dead in `from` for `reason`) that goes to the dead-letter
    /// exchange, and the queues it is routed to; `None` when it goes nowhere (no
    /// dead-letter exchange, the exchange is missing, or no queue takes it but those it
    /// would return to in a cycle).
    fn dead_copy(
        &self,
        from: &Queue,
        old: &Message,
        reason: DeathReason,
        now: u64,
    ) -> Option<(Vec<Arc<Queue>>, Message)> {
        let args = from.args();
        let dlx = args.dead_letter_exchange.as_deref()?;
        // x-dead-letter-routing-key, or every key the message was published with (its
        // CC keys too), as RabbitMQ.
        let keys = match &args.dead_letter_routing_key {
            Some(key) => vec![key.clone()],
            None => published_keys(old),
        };
        let routing_key = keys[0].clone();
        let properties = dead_properties(old, from.name(), reason, now);
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let Ok(mut queues) = self.route_keys(dlx, &key_refs, properties.headers().as_ref()) else {
            tracing::debug!(queue = from.name(), dlx, "dead-letter exchange missing");
            return None;
        };
        if reason != DeathReason::Rejected {
            queues.retain(|q| !is_cycle(&properties, q.name()));
        }
        if queues.is_empty() {
            return None;
        }
        let persistent = *properties.delivery_mode() == Some(2);
        let msg = Message {
            exchange: dlx.to_string(),
            routing_key,
            raw_properties: encode::properties(&properties),
            properties,
            body: old.body.clone(),
            store_id: persistent.then(|| self.next_msg_id()),
            published_ms: now,
        };
        Some((queues, msg))
    }
}

impl DeadLetterRouter for VHost {
    fn dead_letter(&self, from: &Queue, dead: Vec<(Entry, DeathReason)>) {
        let now = now_ms();
        let mut writes = Writes::default();
        let mut removals = Writes::default();
        let mut deliveries: Vec<(Vec<Arc<Queue>>, Arc<Message>)> = Vec::new();
        for (entry, reason) in dead {
            removals.forget(from, &entry);
            let Some((queues, msg)) = self.dead_copy(from, &entry.msg, reason, now) else {
                continue;
            };
            writes.publish(&queues, &msg);
            deliveries.push((queues, Arc::new(msg)));
        }
        // The new copies and the old ones' removal in one request, so that a crash
        // keeps one or the other.
        writes.append(removals);
        if let Some(store) = self.store() {
            Journal::new(store.clone()).append(writes);
        }
        for (queues, msg) in deliveries {
            for q in queues {
                q.enqueue(msg.clone());
            }
        }
    }

    fn dead_letter_confirmed(
        &self,
        from: &Queue,
        msg: &Message,
        reason: DeathReason,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let Some((queues, copy)) = self.dead_copy(from, msg, reason, now_ms()) else {
            return Box::pin(std::future::ready(false));
        };
        // Queues hosted here take it as a publish forwarded from another node would;
        // those homed elsewhere (a replicated queue's leader, a classic queue's home)
        // get it forwarded, as a publish through this node.
        let mut local = Vec::new();
        let mut remote: Vec<(String, Vec<String>)> = Vec::new();
        for q in &queues {
            match self.remote_home(q.name()) {
                None => local.push(q.name().to_string()),
                Some(home) => match remote.iter_mut().find(|(h, _)| *h == home) {
                    Some((_, names)) => names.push(q.name().to_string()),
                    None => remote.push((home, vec![q.name().to_string()])),
                },
            }
        }
        let mut answers = Vec::new();
        if !remote.is_empty() {
            let Some(link) = self.cluster_link() else {
                return Box::pin(std::future::ready(false));
            };
            let blob = copy.encode().to_vec();
            for (home, names) in remote {
                let (answered, answer) = tokio::sync::oneshot::channel();
                link.forwarder.publish(
                    &home,
                    &self.name,
                    names,
                    copy.store_id.is_some(),
                    blob.clone(),
                    Box::new(move |ok| {
                        let _ = answered.send(ok);
                    }),
                );
                answers.push(answer);
            }
        }
        let (refused, stored) = self.enqueue_forwarded(&local, copy);
        Box::pin(async move {
            let mut ok = !refused && stored.await;
            for a in answers {
                ok &= a.await.unwrap_or(false);
            }
            ok
        })
    }
}
