//! Prometheus metrics in the text exposition format on `prometheus_port`, named as
//! RabbitMQ's rabbitmq_prometheus plugin names them where the same thing exists (so
//! dashboards built for RabbitMQ keep working), plus Warren's own store metrics:
//! commit latency, group-commit size, fsyncs. `/metrics` aggregates queues as
//! RabbitMQ does by default; `/metrics/per-object` labels each queue.
//!
//! Everything is read on demand from counters the broker keeps anyway: nothing here
//! runs per message.

mod text;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::broker::BrokerState;
use crate::broker::definitions::RABBITMQ_VERSION;
use text::{Kind, Text};

/// The content type Prometheus expects for the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` and `/metrics/per-object` on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<BrokerState>,
    mut stop: broadcast::Receiver<()>,
) {
    let app = Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .with_state(broker);
    let shutdown = async move {
        let _ = stop.recv().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("metrics listener stopped: {e}");
    }
}

async fn aggregated(State(broker): State<Arc<BrokerState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&broker, false),
    )
}

async fn per_object(State(broker): State<Arc<BrokerState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&broker, true),
    )
}

/// The whole exposition; with `per_object`, queue metrics carry vhost and queue labels.
pub fn render(broker: &BrokerState, per_object: bool) -> String {
    let mut t = Text::default();
    let node = crate::http::node_name();
    t.family(
        "rabbitmq_identity_info",
        Kind::Gauge,
        "RabbitMQ node & cluster identity info",
    );
    t.sample_labels(
        "rabbitmq_identity_info",
        &[("rabbitmq_node", &node), ("rabbitmq_cluster", &node)],
        1.0,
    );
    t.family(
        "rabbitmq_build_info",
        Kind::Gauge,
        "RabbitMQ & Erlang/OTP version info",
    );
    t.sample_labels(
        "rabbitmq_build_info",
        &[
            ("rabbitmq_version", RABBITMQ_VERSION),
            ("product", "Warren"),
            ("product_version", env!("CARGO_PKG_VERSION")),
        ],
        1.0,
    );

    let connections = broker.connections();
    let channels: usize = connections.iter().map(|c| c.channel_count()).sum();
    let mut queues = Vec::new();
    for v in broker.vhost_list() {
        for q in v.queues() {
            queues.push((v.name.clone(), q.name().to_string(), q.snapshot()));
        }
    }
    let consumers: u64 = queues.iter().map(|(_, _, s)| s.consumers).sum();
    t.gauge(
        "rabbitmq_connections",
        "Connections currently open",
        connections.len() as f64,
    );
    t.gauge(
        "rabbitmq_channels",
        "Channels currently open",
        channels as f64,
    );
    t.gauge(
        "rabbitmq_consumers",
        "Consumers currently connected",
        consumers as f64,
    );
    t.gauge("rabbitmq_queues", "Queues available", queues.len() as f64);
    t.counter(
        "rabbitmq_connections_opened_total",
        "Total number of connections opened",
        broker
            .connections_opened
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    t.counter(
        "rabbitmq_connections_closed_total",
        "Total number of connections closed or terminated",
        broker
            .connections_closed
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );

    type Pick = fn(&crate::queue::QueueSnapshot) -> u64;
    let queue_metrics: [(&str, &str, Pick); 5] = [
        (
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            |s| s.ready,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            |s| s.unacked,
        ),
        (
            "rabbitmq_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            |s| s.ready + s.unacked,
        ),
        ("rabbitmq_queue_consumers", "Consumers on a queue", |s| {
            s.consumers
        }),
        (
            "rabbitmq_queue_process_memory_bytes",
            "Memory in bytes used by the queue's messages (estimate)",
            |s| s.memory,
        ),
    ];
    for (name, help, pick) in queue_metrics {
        t.family(name, Kind::Gauge, help);
        if per_object {
            for (vhost, queue, s) in &queues {
                t.sample_labels(name, &[("vhost", vhost), ("queue", queue)], pick(s) as f64);
            }
        } else {
            let sum: u64 = queues.iter().map(|(_, _, s)| pick(s)).sum();
            t.sample(name, sum as f64);
        }
    }
    if per_object {
        t.family(
            "rabbitmq_queue_messages_published_total",
            Kind::Counter,
            "Total number of messages published to queues",
        );
        for (vhost, queue, s) in &queues {
            t.sample_labels(
                "rabbitmq_queue_messages_published_total",
                &[("vhost", vhost), ("queue", queue)],
                s.counters.publish as f64,
            );
        }
    }

    let totals = broker.message_totals();
    let channel_counters: [(&str, &str); 10] = [
        (
            "rabbitmq_channel_messages_published_total",
            "Total number of messages published into an exchange on a channel",
        ),
        (
            "rabbitmq_channel_messages_confirmed_total",
            "Total number of messages published into an exchange and confirmed on the channel",
        ),
        (
            "rabbitmq_channel_messages_unroutable_returned_total",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
        ),
        (
            "rabbitmq_channel_messages_unroutable_dropped_total",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
        ),
        (
            "rabbitmq_channel_messages_delivered_ack_total",
            "Total number of messages delivered to consumers in manual acknowledgement mode",
        ),
        (
            "rabbitmq_channel_messages_delivered_total",
            "Total number of messages delivered to consumers in automatic acknowledgement mode",
        ),
        (
            "rabbitmq_channel_get_ack_total",
            "Total number of messages fetched with basic.get in manual acknowledgement mode",
        ),
        (
            "rabbitmq_channel_get_total",
            "Total number of messages fetched with basic.get in automatic acknowledgement mode",
        ),
        (
            "rabbitmq_channel_messages_redelivered_total",
            "Total number of messages redelivered to consumers",
        ),
        (
            "rabbitmq_channel_messages_acked_total",
            "Total number of messages acknowledged by consumers",
        ),
    ];
    for ((name, help), value) in channel_counters.iter().zip(totals) {
        t.counter(name, help, value as f64);
    }

    let alarms = broker.alarms.current();
    let resident = crate::broker::memory::resident_bytes().unwrap_or(0);
    t.gauge(
        "rabbitmq_process_resident_memory_bytes",
        "Memory used in bytes",
        resident as f64,
    );
    let limit = broker.alarms.memory_limit_bytes();
    if limit != u64::MAX {
        t.gauge(
            "rabbitmq_resident_memory_limit_bytes",
            "Memory high watermark in bytes",
            limit as f64,
        );
    }
    t.gauge(
        "rabbitmq_alarms_memory_used_watermark",
        "is 1 if VM memory watermark threshold was reached",
        f64::from(u8::from(alarms.memory)),
    );
    t.gauge(
        "rabbitmq_alarms_free_disk_space_watermark",
        "is 1 if free disk space watermark threshold was reached",
        f64::from(u8::from(alarms.disk)),
    );
    if broker.store().is_some() {
        if let Some(free) = crate::broker::disk::free_bytes(&broker.config.data_dir) {
            t.gauge(
                "rabbitmq_disk_space_available_bytes",
                "Disk space available in bytes",
                free as f64,
            );
        }
        t.gauge(
            "rabbitmq_disk_space_available_limit_bytes",
            "Free disk space low watermark in bytes",
            broker.config.disk_free_limit as f64,
        );
    }

    if let Some(store) = broker.store() {
        let stats = store.stats();
        let h = store.histograms();
        t.histogram(
            "warren_store_commit_seconds",
            "Time from the start of a store write transaction to the end of its commit, fsync included",
            &h.commit_seconds,
        );
        t.histogram(
            "warren_store_group_commit_requests",
            "Requests (publishes, acks, definition changes) committed together in one transaction",
            &h.batch_requests,
        );
        t.counter(
            "warren_store_fsyncs_total",
            "Store commits made durable with fsync",
            stats.durable_commits as f64,
        );
        t.counter(
            "warren_store_transactions_total",
            "Store write transactions committed",
            stats.transactions as f64,
        );
        t.counter(
            "warren_store_ops_total",
            "Store operations applied",
            stats.ops as f64,
        );
        t.gauge(
            "warren_store_queued_ops",
            "Store operations waiting for the writer",
            stats.queued_ops as f64,
        );
    }
    t.finish()
}
