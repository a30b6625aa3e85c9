//! Queues: declare (passive, durable, exclusive, auto-delete, server-named, counts,
//! equivalence), bind/unbind, purge and delete.

mod common;
mod util;

use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use util::raw::Raw;
use util::*;

fn opts(durable: bool, exclusive: bool, auto_delete: bool) -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable,
        exclusive,
        auto_delete,
        ..Default::default()
    }
}

async fn declare(ch: &Channel, name: &str, o: QueueDeclareOptions) -> lapin::Result<lapin::Queue> {
    within(ch.queue_declare(name.into(), o, FieldTable::default())).await
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Declare

#[tokio::test]
async fn passive_declare_of_a_missing_queue_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    assert_code(declare(&ch, &uniq("missing"), passive()).await, 404);
}

#[tokio::test]
async fn passive_declare_of_an_existing_queue_reports_it() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let ok = declare(&ch, &q, passive()).await.expect("exists");
    assert_eq!(ok.name().as_str(), q);
    assert_eq!(ok.message_count(), 0);
    assert_eq!(ok.consumer_count(), 0);
}

#[tokio::test]
async fn server_named_queues_get_unique_amq_gen_names() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let a = temp_queue(&ch).await;
    let b = temp_queue(&ch).await;
    assert!(a.starts_with("amq.gen-"), "{a}");
    assert!(b.starts_with("amq.gen-"), "{b}");
    assert_ne!(a, b);
    // And they are real queues.
    publish(&ch, "", &a, b"x").await;
    assert_eq!(wait_message_count(&ch, &a, 1).await, 1);
}

#[tokio::test]
async fn declare_ok_reports_ready_messages_and_consumers() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    for i in 0..5u8 {
        publish_confirmed(&ch, "", &q, &[i]).await;
    }
    let ok = declare(&ch, &q, QueueDeclareOptions::default())
        .await
        .unwrap();
    assert_eq!(ok.message_count(), 5);
    assert_eq!(ok.consumer_count(), 0);

    // Two consumers with prefetch 1 each take one message (unacked: not counted).
    let (_c2, ch2) = t.channel().await;
    within(ch2.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c1 = consume(&ch2, &q, "c1").await;
    let mut c2 = consume(&ch2, &q, "c2").await;
    next(&mut c1).await;
    next(&mut c2).await;
    let ok = declare(&ch, &q, passive()).await.unwrap();
    assert_eq!(ok.message_count(), 3);
    assert_eq!(ok.consumer_count(), 2);
}

#[tokio::test]
async fn redeclaring_with_other_durability_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare(&ch, &q, opts(true, false, false)).await.unwrap();
    assert_code(declare(&ch, &q, opts(false, false, false)).await, 406);
    let (_conn2, ch2) = t.channel().await;
    // Equivalent redeclare is fine, and the queue is still there.
    declare(&ch2, &q, opts(true, false, false)).await.unwrap();
    within(ch2.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
}

#[tokio::test]
async fn redeclaring_with_other_auto_delete_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare(&ch, &q, opts(false, false, false)).await.unwrap();
    assert_code(declare(&ch, &q, opts(false, false, true)).await, 406);
}

#[tokio::test]
async fn redeclaring_with_other_arguments_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(10));
    within(ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), args))
        .await
        .unwrap();
    let mut other = FieldTable::default();
    other.insert("x-max-length".into(), AMQPValue::LongInt(20));
    let r =
        within(ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), other)).await;
    assert_code(r, 406);
}

#[tokio::test]
async fn passive_declare_ignores_the_other_flags() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("q");
    declare(&ch, &q, opts(true, false, false)).await.unwrap();
    let r = declare(
        &ch,
        &q,
        QueueDeclareOptions {
            passive: true,
            durable: false,
            auto_delete: true,
            ..Default::default()
        },
    )
    .await;
    assert!(r.is_ok(), "{r:?}");
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
}

#[tokio::test]
async fn declaring_an_amq_prefixed_queue_is_refused_with_403() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    assert_code(
        declare(&ch, &uniq("amq.mine"), QueueDeclareOptions::default()).await,
        403,
    );
}

#[tokio::test]
async fn durable_queue_is_declared_durable() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("durable");
    declare(&ch, &q, opts(true, false, false)).await.unwrap();
    // It outlives its declaring connection.
    conn.close(200, "bye".into()).await.unwrap();
    let conn2 = t.connect().await;
    assert!(queue_exists(&conn2, &q).await);
    let ch2 = conn2.create_channel().await.unwrap();
    within(ch2.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Exclusive queues

async fn exclusive_queue(t: &Target) -> (lapin::Connection, Channel, String) {
    let (conn, ch) = t.channel().await;
    let q = uniq("excl");
    declare(&ch, &q, opts(false, true, false)).await.unwrap();
    (conn, ch, q)
}

#[tokio::test]
async fn exclusive_queue_is_usable_by_its_own_connection() {
    let t = Target::start().await;
    let (conn, ch, q) = exclusive_queue(&t).await;
    let ch2 = conn.create_channel().await.unwrap();
    publish(&ch2, "", &q, b"mine").await;
    let mut c = consume(&ch2, &q, "c").await;
    assert_eq!(next(&mut c).await.data, b"mine");
    declare(&ch, &q, passive()).await.unwrap();
}

#[tokio::test]
async fn exclusive_queue_is_locked_405_for_other_connections() {
    let t = Target::start().await;
    let (_owner, _och, q) = exclusive_queue(&t).await;
    let other = t.connect().await;

    let ch = other.create_channel().await.unwrap();
    assert_code(declare(&ch, &q, opts(false, true, false)).await, 405);

    let ch = other.create_channel().await.unwrap();
    assert_code(declare(&ch, &q, passive()).await, 405);

    let ch = other.create_channel().await.unwrap();
    let r = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 405);

    let ch = other.create_channel().await.unwrap();
    let r = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await;
    assert_code(r, 405);

    let ch = other.create_channel().await.unwrap();
    let r = ch
        .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
        .await;
    assert_code(r, 405);

    let ch = other.create_channel().await.unwrap();
    let r = ch
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
    assert_code(r, 405);

    let ch = other.create_channel().await.unwrap();
    let r = ch
        .queue_bind(
            q.as_str().into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 405);
}

#[tokio::test]
async fn other_connections_may_publish_to_an_exclusive_queue() {
    let t = Target::start().await;
    let (_owner, och, q) = exclusive_queue(&t).await;
    let (_other, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    publish_confirmed(&ch, "", &q, b"from outside").await;
    let m = get(&och, &q).await.expect("message");
    assert_eq!(m.delivery.data, b"from outside");
}

#[tokio::test]
async fn exclusive_queue_is_deleted_when_its_connection_closes() {
    let t = Target::start().await;
    let (owner, _och, q) = exclusive_queue(&t).await;
    let observer = t.connect().await;
    owner.close(200, "bye".into()).await.unwrap();
    assert!(
        wait_queue_gone(&observer, &q).await,
        "exclusive queue survived its connection"
    );
}

#[tokio::test]
async fn exclusive_queue_is_deleted_when_its_connection_drops() {
    let t = Target::start().await;
    let observer = t.connect().await;
    let (mut raw, _) = Raw::open(&t.addr(), 0).await;
    raw.open_channel(1).await;
    let q = uniq("excl-raw");
    raw.send_method(
        1,
        amq_protocol::protocol::AMQPClass::Queue(
            amq_protocol::protocol::queue::AMQPMethod::Declare(
                amq_protocol::protocol::queue::Declare {
                    queue: q.as_str().into(),
                    passive: false,
                    durable: false,
                    exclusive: true,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                },
            ),
        ),
    )
    .await;
    raw.recv_method().await; // declare-ok
    assert!(queue_exists_from_other_connection(&observer, &q).await);
    drop(raw); // no close handshake
    assert!(
        wait_queue_gone(&observer, &q).await,
        "exclusive queue survived its dropped connection"
    );
}

/// An exclusive queue of another connection answers a passive declare with 405, which
/// still proves that it exists.
async fn queue_exists_from_other_connection(conn: &lapin::Connection, q: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    match declare(&ch, q, passive()).await {
        Ok(_) => true,
        Err(e) => reply_code(&e) == Some(405),
    }
}

// ---------------------------------------------------------------------------------------
// Auto-delete

#[tokio::test]
async fn auto_delete_queue_without_consumers_yet_stays() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("ad");
    declare(&ch, &q, opts(false, false, true)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(queue_exists(&conn, &q).await);
}

#[tokio::test]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("ad");
    declare(&ch, &q, opts(false, false, true)).await.unwrap();
    let _c1 = consume(&ch, &q, "c1").await;
    let _c2 = consume(&ch, &q, "c2").await;
    within(ch.basic_cancel("c1".into(), BasicCancelOptions::default()))
        .await
        .unwrap();
    assert!(queue_exists(&conn, &q).await, "one consumer left");
    within(ch.basic_cancel("c2".into(), BasicCancelOptions::default()))
        .await
        .unwrap();
    assert!(wait_queue_gone(&conn, &q).await, "last consumer cancelled");
}

#[tokio::test]
async fn auto_delete_queue_goes_when_its_consumers_channel_closes() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = uniq("ad");
    declare(&ch, &q, opts(false, false, true)).await.unwrap();
    let cch = conn.create_channel().await.unwrap();
    let _c = consume(&cch, &q, "c").await;
    cch.close(200, "bye".into()).await.unwrap();
    assert!(wait_queue_gone(&conn, &q).await);
}

// ---------------------------------------------------------------------------------------
// Bind and unbind

#[tokio::test]
async fn bind_and_unbind_control_routing() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let x = uniq("x");
    within(ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let q = temp_queue(&ch).await;
    publish_confirmed(&ch, &x, "k", b"before bind").await;
    within(ch.queue_bind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, &x, "k", b"bound").await;
    within(ch.queue_unbind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, &x, "k", b"after unbind").await;
    assert_eq!(drain(&ch, &q).await, vec![b"bound".to_vec()]);
}

#[tokio::test]
async fn binding_twice_is_idempotent() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let q = temp_queue(&ch).await;
    let key = uniq("k");
    for _ in 0..2 {
        within(ch.queue_bind(
            q.as_str().into(),
            "amq.direct".into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .unwrap();
    }
    publish_confirmed(&ch, "amq.direct", &key, b"one").await;
    assert_eq!(drain(&ch, &q).await.len(), 1);
    within(ch.queue_unbind(
        q.as_str().into(),
        "amq.direct".into(),
        key.as_str().into(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, "amq.direct", &key, b"none").await;
    assert!(drain(&ch, &q).await.is_empty());
}

#[tokio::test]
async fn binding_to_a_missing_exchange_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    let r = ch
        .queue_bind(
            q.as_str().into(),
            uniq("missing").as_str().into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn binding_a_missing_queue_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .queue_bind(
            uniq("missing").as_str().into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn unbinding_a_binding_that_does_not_exist_succeeds() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    within(ch.queue_unbind(
        q.as_str().into(),
        "amq.direct".into(),
        uniq("never-bound").as_str().into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind is idempotent");
    assert_channel_works(&ch).await;
}

// ---------------------------------------------------------------------------------------
// Purge and delete

#[tokio::test]
async fn purge_removes_ready_messages_and_reports_how_many() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    for i in 0..7u8 {
        publish_confirmed(&ch, "", &q, &[i]).await;
    }
    // One message is unacked: purge leaves it alone.
    let held = get(&ch, &q).await.expect("a message");
    let n = within(ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()))
        .await
        .unwrap();
    assert_eq!(n, 6);
    assert_eq!(message_count(&ch, &q).await, 0);
    within(held.delivery.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(wait_message_count(&ch, &q, 1).await, 1);
    let n = within(ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()))
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn purging_a_missing_queue_fails_with_404() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = ch
        .queue_purge(
            uniq("missing").as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await;
    assert_code(r, 404);
}

#[tokio::test]
async fn delete_reports_the_message_count_and_removes_the_queue() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    for i in 0..3u8 {
        publish_confirmed(&ch, "", &q, &[i]).await;
    }
    let n = within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert!(!queue_exists(&conn, &q).await);
}

#[tokio::test]
async fn deleting_a_missing_queue_succeeds_with_zero() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let n = within(ch.queue_delete(
        uniq("missing").as_str().into(),
        QueueDeleteOptions::default(),
    ))
    .await
    .expect("queue.delete is idempotent");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn delete_if_unused_fails_with_406_while_consumed() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let (_cc, cch) = t.channel().await;
    let _c = consume(&cch, &q, "c").await;
    let r = ch
        .queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await;
    assert_code(r, 406);
    assert!(queue_exists(&conn, &q).await);
}

#[tokio::test]
async fn delete_if_unused_succeeds_without_consumers() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"m").await;
    within(ch.queue_delete(
        q.as_str().into(),
        QueueDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert!(!queue_exists(&conn, &q).await);
}

#[tokio::test]
async fn delete_if_empty_fails_with_406_while_messages_are_ready() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    publish(&ch, "", &q, b"m").await;
    assert_eq!(wait_message_count(&ch, &q, 1).await, 1);
    let r = ch
        .queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await;
    assert_code(r, 406);
    assert!(queue_exists(&conn, &q).await);
}

#[tokio::test]
async fn delete_if_empty_succeeds_on_an_empty_queue() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    within(ch.queue_delete(
        q.as_str().into(),
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert!(!queue_exists(&conn, &q).await);
}

#[tokio::test]
async fn deleting_a_queue_removes_its_bindings() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let q = uniq("q");
    declare_queue(&ch, &q).await;
    let key = uniq("k");
    within(ch.queue_bind(
        q.as_str().into(),
        "amq.direct".into(),
        key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
    // Same name again: no binding carried over.
    declare_queue(&ch, &q).await;
    publish_confirmed(&ch, "amq.direct", &key, b"m").await;
    assert!(drain(&ch, &q).await.is_empty());
}

#[tokio::test]
async fn delete_if_empty_counts_ready_messages_only() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("if-empty");
    declare(&ch, &q, opts(false, false, false)).await.unwrap();
    publish(&ch, "", &q, b"taken").await;
    wait_message_count(&ch, &q, 1).await;
    let _unacked = get(&ch, &q).await.expect("a message");
    let deleted = within(ch.queue_delete(
        q.as_str().into(),
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    ))
    .await
    .expect("an unacked message does not block if-empty");
    assert_eq!(deleted, 0);
}

#[tokio::test]
async fn unbinding_with_a_missing_queue_or_exchange_succeeds() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = temp_queue(&ch).await;
    for (queue, exchange) in [
        (q.as_str(), "no-such-exchange"),
        ("no-such-queue", "amq.direct"),
        ("no-such-queue", "no-such-exchange"),
    ] {
        within(ch.queue_unbind(
            queue.into(),
            exchange.into(),
            "k".into(),
            FieldTable::default(),
        ))
        .await
        .unwrap_or_else(|e| panic!("unbind {queue} from {exchange}: {e}"));
    }
    within(ch.exchange_unbind(
        "no-such-destination".into(),
        "no-such-source".into(),
        "k".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.unbind of missing exchanges");
    assert_channel_works(&ch).await;
}

#[tokio::test]
async fn a_passive_declare_restarts_the_x_expires_timer() {
    let t = Target::start().await;
    let (conn, ch) = t.channel().await;
    let q = uniq("expires-passive");
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(1500));
    within(ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), args))
        .await
        .unwrap();
    // Used every 500 ms by passive declares only, for 3 s: twice its x-expires.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        declare(&ch, &q, passive())
            .await
            .expect("still there: passive declares keep it alive");
    }
    // Left alone (a passive declare would keep it alive), it expires after all.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(!queue_exists(&conn, &q).await, "unused, it expired");
}

/// Returning a message to a full drop-head queue drops from the head again, as
/// RabbitMQ's requeue does: the requeued message goes back to its place at the head,
/// and is the one dropped.
#[tokio::test]
async fn requeue_into_a_full_drop_head_queue_drops_the_head() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = uniq("maxlen-requeue");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    within(ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            auto_delete: false,
            ..Default::default()
        },
        args,
    ))
    .await
    .expect("declare");
    publish(&ch, "", &q, b"first").await;
    let first = within(ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("get")
        .expect("first");
    publish(&ch, "", &q, b"second").await;
    first
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .expect("nack");
    assert_eq!(wait_message_count(&ch, &q, 1).await, 1);
    assert_eq!(drain(&ch, &q).await, vec![b"second".to_vec()]);
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn the_dead_letter_strategy_is_checked_as_rabbitmq_checks_it() {
    let t = Target::start().await;
    let conn = t.connect().await;
    let durable = opts(true, false, false);
    let with = |queue_type: Option<&str>, strategy: AMQPValue| {
        let mut args = FieldTable::default();
        if let Some(ty) = queue_type {
            args.insert("x-queue-type".into(), AMQPValue::LongString(ty.into()));
        }
        args.insert("x-dead-letter-strategy".into(), strategy);
        args
    };
    let text = |s: &str| AMQPValue::LongString(s.into());
    // Each refusal closes its channel: one channel per attempt.
    let refused = |q: String, args: FieldTable| {
        let conn = &conn;
        async move {
            let ch = conn.create_channel().await.unwrap();
            let err = within(ch.queue_declare(q.as_str().into(), durable, args))
                .await
                .expect_err("refused");
            assert_eq!(reply_code(&err), Some(406), "{err}");
            err.to_string()
        }
    };
    for bad in ["bogus", "At-Least-Once", ""] {
        let q = uniq("qq");
        let err = refused(q.clone(), with(Some("quorum"), text(bad))).await;
        assert!(
            err.contains(&format!(
                "invalid arg 'x-dead-letter-strategy' for queue '{q}' in vhost '/': \
                 invalid_dlx_strategy"
            )),
            "{bad}: {err}"
        );
    }
    let q = uniq("qq");
    let err = refused(q, with(Some("quorum"), AMQPValue::LongInt(1))).await;
    assert!(err.contains("{unacceptable_type,signedint}"), "{err}");
    // Only quorum queues know the argument.
    for queue_type in [None, Some("classic")] {
        let q = uniq("classic");
        let err = refused(q.clone(), with(queue_type, text("at-least-once"))).await;
        assert!(
            err.contains(&format!(
                "invalid arg 'x-dead-letter-strategy' for queue '{q}' in vhost '/' of queue \
                 type rabbit_classic_queue"
            )),
            "{err}"
        );
    }
    // Both words are taken, and a redeclare must name the same one.
    let ch = conn.create_channel().await.unwrap();
    let q = uniq("qq");
    within(ch.queue_declare(
        q.as_str().into(),
        durable,
        with(Some("quorum"), text("at-least-once")),
    ))
    .await
    .unwrap();
    let err = refused(q.clone(), with(Some("quorum"), text("at-most-once"))).await;
    assert!(
        err.contains("inequivalent arg 'x-dead-letter-strategy'"),
        "{err}"
    );
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .unwrap();
}
