//! The fault checker (tests/fault_checker) run against a cluster of the harness: the short
//! run CI takes, the proof that the checker can fail, and the long run of `tests/faults/run`.

mod cluster;
mod fault_checker;

use std::time::Duration;

use cluster::Cluster;
use fault_checker::{FaultKind, QueueType, Settings};

/// The short run on 3 nodes with `queue_type` queues, persistent messages, confirms:
/// every fault kind at least once, and not one confirmed message lost.
async fn every_kind_of_fault_loses_nothing(queue_type: QueueType) {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    let settings = Settings::short(queue_type);
    let report = fault_checker::run(&mut c, &settings).await;
    eprintln!("{}", report.summary());
    for kind in FaultKind::ALL {
        assert!(
            report.faults.iter().any(|f| f.record.kind == kind),
            "{kind:?} injected"
        );
    }
    assert!(
        report.confirmed > 100,
        "the producers got confirms: {}",
        report.confirmed
    );
    assert!(report.delivered_live > 0 && report.delivered_drain > 0);
    assert!(report.passed(), "{}", report.summary());
}

/// Classic durable queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_is_lost_under_every_kind_of_fault() {
    every_kind_of_fault_loses_nothing(QueueType::Classic).await;
}

/// The same faults on quorum queues (3 replicas): not one confirmed message lost, and the
/// killed leaders of the queues are replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirmed_message_of_a_quorum_queue_is_lost_under_every_kind_of_fault() {
    every_kind_of_fault_loses_nothing(QueueType::Quorum).await;
}

/// The checker can fail: transient messages are confirmed but die with their node's
/// process, so kill -9 loses confirmed messages, and the checker must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_reports_confirmed_messages_that_a_kill_loses() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    let settings = Settings {
        persistent: false,
        faults: vec![FaultKind::KillLeader],
        hold: Duration::from_secs(1),
        ..Settings::short(QueueType::Classic)
    };
    let report = fault_checker::run(&mut c, &settings).await;
    eprintln!("{}", report.summary());
    assert!(report.confirmed > 0);
    assert!(
        !report.confirmed_lost.is_empty() && !report.passed(),
        "transient messages confirmed before a kill -9 are gone, and the checker says so:\n{}",
        report.summary()
    );
}

/// The long run, for anyone (`tests/faults/run --nodes 5 --minutes 30`): settings from
/// FAULTS_NODES (3), FAULTS_MINUTES (10), FAULTS_QUEUE_TYPE (classic or quorum), the backend
/// from WARREN_TEST_CLUSTER_BACKEND (warren or rabbitmq).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by tests/faults/run"]
async fn long_run() {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let nodes: usize = var("FAULTS_NODES", "3")
        .parse()
        .expect("FAULTS_NODES: a number");
    let minutes: f64 = var("FAULTS_MINUTES", "10")
        .parse()
        .expect("FAULTS_MINUTES: a number");
    let queue_type = match var("FAULTS_QUEUE_TYPE", "classic").as_str() {
        "classic" => QueueType::Classic,
        "quorum" => QueueType::Quorum,
        other => panic!("FAULTS_QUEUE_TYPE={other}: classic or quorum"),
    };
    let Some(mut c) = Cluster::start(nodes) else {
        return;
    };
    let settings = Settings {
        run_for: Duration::from_secs_f64(minutes * 60.0),
        hold: Duration::from_secs(8),
        quiet: Duration::from_secs(5),
        ..Settings::short(queue_type)
    };
    let report = fault_checker::run(&mut c, &settings).await;
    println!("{}", report.summary());
    assert!(report.passed(), "confirmed messages lost");
}
