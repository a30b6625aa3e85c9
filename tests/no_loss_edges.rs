//! Edges of the no-loss promise where a message changes hands: auto-ack deliveries that
//! never left the broker, and transaction commits racing each other.

mod common;
mod node;
mod util;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use node::{KillOnDrop, connect, free_port, start};
use util::raw::{Raw, method};

async fn ready_count(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = ch.close(200, "bye".into()).await;
    q.message_count()
}

/// A raw connection to the in-process broker `t` with channel 1 open.
async fn open_raw(t: &common::TestBroker) -> Raw {
    let addr = t.broker.as_ref().expect("in-process broker").local_addr();
    let mut raw = Raw::connect(&addr.to_string()).await;
    raw.handshake(|t| t).await;
    raw.open_channel(1).await;
    raw
}

/// A no-ack consumer whose connection dies with deliveries still waiting to be written:
/// those go back to the queue, and must still be on disk when the node is killed.
#[tokio::test]
async fn unwritten_auto_ack_deliveries_keep_their_stored_copy() {
    let dir = std::env::temp_dir().join(format!("warren-autoack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port();
    let total = 200u32;
    let before = {
        let _node = KillOnDrop(start(&dir, port, &[]));
        let conn = connect(port).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        ch.queue_declare(
            "autoack".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        let body = vec![7u8; 1024];
        for _ in 0..total {
            ch.basic_publish(
                "".into(),
                "autoack".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
        }
        // A no-ack consumer that cancels in the same write as it consumes: the queue
        // hands deliveries over at once, the cancel is read before they are written, so
        // every one of them goes back unwritten.
        let mut raw = Raw::connect(&format!("127.0.0.1:{port}")).await;
        raw.handshake(|t| t).await;
        raw.open_channel(1).await;
        let mut both = method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "autoack".into(),
                consumer_tag: "gone-at-once".into(),
                no_local: false,
                no_ack: true,
                exclusive: false,
                nowait: true,
                arguments: FieldTable::default(),
            })),
        );
        both.extend(method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "gone-at-once".into(),
                nowait: false,
            })),
        ));
        raw.send(&both).await;
        match raw.recv_method().await {
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(_)) => {}
            other => panic!("expected cancel-ok, got {other:?}"),
        }
        let back = ready_count(&conn, "autoack").await;
        assert_eq!(back, total, "nothing was written, so everything is back");
        // A later confirmed publish commits everything the store was handed before it.
        ch.queue_declare(
            "autoack-later".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        ch.basic_publish(
            "".into(),
            "autoack-later".into(),
            BasicPublishOptions::default(),
            b"later",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
        back
    }; // SIGKILL
    let _node = KillOnDrop(start(&dir, port, &[]));
    let conn = connect(port).await;
    let after = ready_count(&conn, "autoack").await;
    assert!(
        after >= before,
        "{before} messages were back in the queue before the crash, {after} after"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two commits pipelined on one channel: the first stores a persistent message, the
/// second has nothing to store. With the store writer held, neither commit-ok may go out
/// (the second would otherwise overtake the first, and a client would count the first
/// as durable).
#[tokio::test]
async fn a_commit_ok_never_overtakes_an_earlier_commit() {
    use amq_protocol::protocol::tx;
    let t = common::TestBroker::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "tx-durable".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let mut raw = open_raw(&t).await;
    raw.send_method(1, AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})))
        .await;
    match raw.recv_method().await {
        AMQPClass::Tx(tx::AMQPMethod::SelectOk(_)) => {}
        other => panic!("expected select-ok, got {other:?}"),
    }
    let hold = t
        .broker
        .as_ref()
        .and_then(|b| b.pause_store_writer())
        .expect("a store");
    let commit = method(1, AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})));
    let mut frames = util::raw::publish_frames(1, "", "tx-durable", false, true, b"durable");
    frames.extend(&commit);
    frames.extend(util::raw::publish_frames(
        1,
        "",
        "no-such-queue",
        false,
        false,
        b"x",
    ));
    frames.extend(&commit);
    raw.send(&frames).await;
    match raw.read_frame(Duration::from_millis(500)).await {
        util::raw::Read::Timeout => {}
        other => panic!("a commit-ok went out while the first commit was not stored: {other:?}"),
    }
    drop(hold);
    for _ in 0..2 {
        match raw.recv_method().await {
            AMQPClass::Tx(tx::AMQPMethod::CommitOk(_)) => {}
            other => panic!("expected commit-ok, got {other:?}"),
        }
    }
}

/// declare-ok for a durable queue goes out only once its definition is on disk (as
/// RabbitMQ answers): with the store writer held, no answer comes.
#[tokio::test]
async fn a_durable_declare_is_answered_once_stored() {
    use amq_protocol::protocol::queue;
    let t = common::TestBroker::start().await;
    let mut raw = open_raw(&t).await;
    let hold = t
        .broker
        .as_ref()
        .and_then(|b| b.pause_store_writer())
        .expect("a store");
    raw.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "stored-first".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    match raw.read_frame(Duration::from_millis(500)).await {
        util::raw::Read::Timeout => {}
        other => panic!("declare-ok went out before the definition was stored: {other:?}"),
    }
    drop(hold);
    match raw.recv_method().await {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => {
            assert_eq!(ok.queue.as_str(), "stored-first")
        }
        other => panic!("expected declare-ok, got {other:?}"),
    }
}
