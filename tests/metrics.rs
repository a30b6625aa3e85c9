//! The Prometheus endpoint: RabbitMQ's metric names with values that follow what
//! clients did (publishes, deliveries, acks, queue depths, connections), Warren's store
//! metrics (commit latency histogram, group-commit size, fsyncs), per-queue series on
//! /metrics/per-object, and a well-formed text format.

mod common;
mod util;

use std::collections::HashMap;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use util::http::request;
use util::within;

/// Samples by their full series name (`name{labels}`), checking the format on the way:
/// every sample belongs to a family announced by `# TYPE`.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut families = Vec::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("a name").to_string();
            let kind = parts.next().expect("a type");
            assert!(matches!(kind, "gauge" | "counter" | "histogram"), "{line}");
            families.push(name);
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let name = series.split('{').next().unwrap_or(series);
        assert!(
            families.iter().any(|f| name == f
                || name
                    .strip_prefix(f.as_str())
                    .is_some_and(|s| matches!(s, "_bucket" | "_sum" | "_count"))),
            "sample without a TYPE line: {line}"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

async fn scrape(addr: std::net::SocketAddr, path: &str) -> HashMap<String, f64> {
    let r = request(addr, "GET", path, None, None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    parse(&String::from_utf8_lossy(&r.body))
}

#[tokio::test]
async fn metrics_follow_publishes_deliveries_acks_and_store_commits() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let addr = b.prometheus_addr().expect("metrics listener");
    let conn = Connection::connect(&t.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("metered".into(), durable, FieldTable::default())
        .await
        .expect("queue");
    for i in 0..10u8 {
        ch.basic_publish(
            "".into(),
            "metered".into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    }
    ch.basic_publish(
        "".into(),
        "nowhere".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
    ch.basic_qos(4, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "metered".into(),
            "m".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in 0..3 {
        let d = within(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // The acks travel asynchronously; wait until the broker has applied them.
    let m = within(async {
        loop {
            let m = scrape(addr, "/metrics").await;
            if m.get("rabbitmq_channel_messages_acked_total") == Some(&3.0) {
                return m;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(m["rabbitmq_connections"], 1.0);
    assert_eq!(m["rabbitmq_channels"], 1.0);
    assert_eq!(m["rabbitmq_queues"], 1.0);
    assert_eq!(m["rabbitmq_consumers"], 1.0);
    assert_eq!(m["rabbitmq_channel_messages_published_total"], 11.0);
    assert_eq!(m["rabbitmq_channel_messages_confirmed_total"], 11.0);
    assert_eq!(m["rabbitmq_channel_messages_unroutable_dropped_total"], 1.0);
    // 10 published, 3 acked, prefetch 4: 4 out unacked, 3 ready.
    assert_eq!(m["rabbitmq_channel_messages_delivered_ack_total"], 7.0);
    assert_eq!(m["rabbitmq_queue_messages_unacked"], 4.0);
    assert_eq!(m["rabbitmq_queue_messages_ready"], 3.0);
    assert_eq!(m["rabbitmq_queue_messages"], 7.0);
    assert_eq!(m["rabbitmq_connections_opened_total"], 1.0);
    assert!(m["warren_store_fsyncs_total"] >= 1.0);
    let commits = m["warren_store_commit_seconds_count"];
    assert!(
        commits >= 10.0,
        "each confirmed publish waited for a commit: {commits}"
    );
    assert_eq!(
        m["warren_store_commit_seconds_bucket{le=\"+Inf\"}"],
        commits
    );
    assert!(m["warren_store_group_commit_requests_sum"] >= 10.0);
    assert!(m.contains_key("rabbitmq_process_resident_memory_bytes"));
    assert!(m.keys().any(|k| k.starts_with("rabbitmq_identity_info{")));

    let per = scrape(addr, "/metrics/per-object").await;
    assert_eq!(
        per["rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"metered\"}"],
        3.0
    );
    assert_eq!(
        per["rabbitmq_queue_messages_published_total{vhost=\"/\",queue=\"metered\"}"],
        10.0
    );

    // Totals never go down when a connection closes.
    conn.close(200, "bye".into()).await.expect("close");
    let m = within(async {
        loop {
            let m = scrape(addr, "/metrics").await;
            if m["rabbitmq_connections"] == 0.0 {
                return m;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(m["rabbitmq_channel_messages_published_total"], 11.0);
    assert_eq!(m["rabbitmq_connections_closed_total"], 1.0);
    assert_eq!(m["rabbitmq_queue_messages_ready"], 7.0);
}
