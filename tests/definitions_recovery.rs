//! What a client declares survives a restart of the real binary bit for bit, and what
//! recovery cannot read it keeps: never accepted at declare and lost later.

mod common;
mod node;
mod util;

use std::path::{Path, PathBuf};

use lapin::options::*;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use node::{KillOnDrop, connect, free_port, start};
use redb::{Database, ReadableTable, TableDefinition};
use warren::config::FlushMode;
use warren::store::Store;

const DEFINITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("definitions");

/// The stored entries of each queue key, as the store reads them back (the node must be
/// stopped).
fn stored_entries(dir: &Path) -> std::collections::HashMap<String, usize> {
    let (store, recovered) =
        Store::open(dir, FlushMode::Sync, std::time::Duration::from_millis(100))
            .expect("open the store");
    store.close();
    recovered
        .queues
        .into_iter()
        .map(|(key, entries)| (key, entries.len()))
        .collect()
}

fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-defs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("warren.redb")
}

/// Arguments JSON could not carry: NaN and infinite floats, bytes, a decimal, unsigned
/// and signed integers of every width, a table nested 31 levels (the wire's limit).
fn awkward_arguments() -> FieldTable {
    let mut deep = AMQPValue::Void;
    for _ in 0..30 {
        deep = AMQPValue::FieldArray(FieldArray::from(vec![deep]));
    }
    let mut t = FieldTable::default();
    t.insert("x-custom-nan".into(), AMQPValue::Double(f64::NAN));
    t.insert("x-custom-inf".into(), AMQPValue::Float(f32::NEG_INFINITY));
    t.insert(
        "x-custom-bytes".into(),
        AMQPValue::ByteArray(vec![0, 255, 7].into()),
    );
    t.insert(
        "x-custom-decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    t.insert("x-custom-u8".into(), AMQPValue::ShortShortUInt(200));
    t.insert("x-custom-i16".into(), AMQPValue::ShortInt(-3));
    t.insert("x-custom-ts".into(), AMQPValue::Timestamp(1_700_000_000));
    t.insert("x-custom-deep".into(), deep);
    t.insert("x-max-length".into(), AMQPValue::LongInt(1000));
    t.insert(
        "x-queue-mode".into(),
        AMQPValue::LongString(LongString::from("lazy")),
    );
    t
}

async fn publish_persistent(ch: &Channel, queue: &str, bodies: &[&[u8]]) {
    for body in bodies {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    }
}

async fn confirming_channel(port: u16) -> (lapin::Connection, Channel) {
    let conn = connect(port).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (conn, ch)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn any_declared_arguments_come_back_after_kill_9() {
    let dir = data_dir("awkward");
    let port = free_port();
    let args = awkward_arguments();
    {
        let _node = KillOnDrop(start(&dir, port, &[]));
        let (_c, ch) = confirming_channel(port).await;
        ch.queue_declare("awkward".into(), durable(), args.clone())
            .await
            .expect("declare");
        ch.exchange_declare(
            "awkward-x".into(),
            lapin::ExchangeKind::Headers,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        )
        .await
        .expect("exchange declare");
        ch.queue_bind(
            "awkward".into(),
            "awkward-x".into(),
            "".into(),
            QueueBindOptions::default(),
            args.clone(),
        )
        .await
        .expect("bind");
        publish_persistent(&ch, "awkward", &[b"one", b"two"]).await;
    } // SIGKILL
    let _node = KillOnDrop(start(&dir, port, &[]));
    let (_c, ch) = confirming_channel(port).await;
    // Redeclaring with the very same arguments passes the equivalence check only if they
    // came back bit for bit (a NaN compares by its bits here).
    let q = ch
        .queue_declare("awkward".into(), durable(), args.clone())
        .await
        .expect("same arguments after restart");
    assert_eq!(q.message_count(), 2);
    ch.exchange_declare(
        "awkward-x".into(),
        lapin::ExchangeKind::Headers,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args.clone(),
    )
    .await
    .expect("same exchange arguments after restart");
    // The binding came back with its arguments: unbinding with them finds it, and a
    // message published to the exchange no longer reaches the queue.
    ch.queue_unbind(
        "awkward".into(),
        "awkward-x".into(),
        "".into(),
        args.clone(),
    )
    .await
    .expect("unbind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn unreadable_queue_definition_keeps_its_messages_and_is_reported_each_start() {
    let dir = data_dir("unreadable");
    let port = free_port();
    {
        let _node = KillOnDrop(start(&dir, port, &[]));
        let (_c, ch) = confirming_channel(port).await;
        ch.queue_declare("precious".into(), durable(), FieldTable::default())
            .await
            .expect("declare");
        publish_persistent(&ch, "precious", &[b"a", b"b", b"c"]).await;
    }
    let key = "q//\u{0}precious";
    let good = {
        let db = Database::create(db_path(&dir)).expect("open store");
        let txn = db.begin_write().expect("write");
        let good = {
            let mut defs = txn.open_table(DEFINITIONS).expect("definitions");
            let good = defs
                .get(key)
                .expect("read")
                .expect("stored")
                .value()
                .to_vec();
            defs.insert(key, &b"\xffnot a definition"[..])
                .expect("corrupt");
            good
        };
        txn.commit().expect("commit");
        good
    };
    for _ in 0..2 {
        let _node = KillOnDrop(start(&dir, port, &[]));
        let (_c, ch) = confirming_channel(port).await;
        let err = ch
            .queue_declare("precious".into(), passive(), FieldTable::default())
            .await
            .expect_err("the queue could not be restored");
        assert_eq!(util::reply_code(&err), Some(404));
    }
    assert_eq!(
        stored_entries(&dir).get(key).copied(),
        Some(3),
        "messages kept on disk"
    );
    {
        let db = Database::create(db_path(&dir)).expect("open store");
        let txn = db.begin_write().expect("write");
        {
            let mut defs = txn.open_table(DEFINITIONS).expect("definitions");
            assert_eq!(
                defs.get(key).expect("read").expect("kept").value(),
                b"\xffnot a definition",
                "the unreadable definition is kept as it was"
            );
            // The operator repairs it.
            defs.insert(key, good.as_slice()).expect("repair");
        }
        txn.commit().expect("commit");
    }
    let _node = KillOnDrop(start(&dir, port, &[]));
    let (_c, ch) = confirming_channel(port).await;
    let q = ch
        .queue_declare("precious".into(), passive(), FieldTable::default())
        .await
        .expect("restored after the repair");
    assert_eq!(q.message_count(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn entries_of_a_queue_without_definition_are_removed_at_recovery() {
    let dir = data_dir("orphans");
    let port = free_port();
    {
        let _node = KillOnDrop(start(&dir, port, &[]));
        let (_c, ch) = confirming_channel(port).await;
        for q in ["kept", "gone"] {
            ch.queue_declare(q.into(), durable(), FieldTable::default())
                .await
                .expect("declare");
            ch.queue_bind(
                q.into(),
                "amq.fanout".into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        }
        for body in [b"1", b"2"] {
            ch.basic_publish(
                "amq.fanout".into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
        }
    }
    // What a publish racing queue.delete could leave: entries, no definition.
    {
        let db = Database::create(db_path(&dir)).expect("open store");
        let txn = db.begin_write().expect("write");
        txn.open_table(DEFINITIONS)
            .expect("definitions")
            .remove("q//\u{0}gone")
            .expect("remove definition");
        txn.commit().expect("commit");
    }
    {
        let _node = KillOnDrop(start(&dir, port, &[]));
        let (_c, ch) = confirming_channel(port).await;
        let q = ch
            .queue_declare("kept".into(), passive(), FieldTable::default())
            .await
            .expect("kept is back");
        assert_eq!(q.message_count(), 2);
        // A confirmed publish after recovery: its commit comes after the clean-up's.
        publish_persistent(&ch, "kept", &[b"3"]).await;
    }
    let stored = stored_entries(&dir);
    assert_eq!(
        stored,
        [("q//\u{0}kept".to_string(), 3)].into_iter().collect(),
        "only the queue with a definition keeps entries"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
