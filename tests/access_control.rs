//! Users, vhosts and permissions: logins checked against stored hashes, vhost access at
//! connection.open, configure / write / read permissions on every method that touches a
//! resource with RabbitMQ's 403 texts (checked against RabbitMQ 3.10), changes that take
//! effect on open channels, and all of it surviving a restart.

mod common;
mod util;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use util::within;
use warren::auth::{AccessChange, PermissionRecord, VHostRecord};
use warren::{Broker, Config};

/// (reply code, reply text) of a lapin protocol error.
fn reply(e: &lapin::Error) -> (u16, String) {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => (amqp.get_id(), amqp.get_message().to_string()),
        other => panic!("expected an AMQP error, got {other:?}"),
    }
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: lapin::Result<T>, text: &str) {
    match r {
        Ok(v) => panic!("expected 403 '{text}', got success: {v:?}"),
        Err(e) => assert_eq!(reply(&e), (403, format!("ACCESS_REFUSED - {text}"))),
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "warren-access-{name}-{}-{}",
        std::process::id(),
        util::uniq("d")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn url(b: &Broker, user: &str, pass: &str, vhost: &str) -> String {
    format!("amqp://{user}:{pass}@{}/{vhost}", b.local_addr())
}

async fn connect(url: &str) -> lapin::Result<Connection> {
    within(Connection::connect(url, ConnectionProperties::default())).await
}

async fn add_vhost(b: &Broker, name: &str) {
    b.state()
        .add_vhost(VHostRecord {
            name: name.into(),
            description: String::new(),
            tags: vec![],
        })
        .await
        .expect("vhost added");
}

async fn set_permissions(b: &Broker, user: &str, vhost: &str, c: &str, w: &str, r: &str) {
    b.state()
        .access
        .change(AccessChange::SetPermissions(PermissionRecord {
            user: user.into(),
            vhost: vhost.into(),
            configure: c.into(),
            write: w.into(),
            read: r.into(),
        }))
        .await
        .expect("permissions set");
}

/// A broker with vhost `v1`, user `bob` (`^bob-` everywhere in v1) and user `carol`
/// (empty patterns in v1), and `bob-q` bound to `bob-x` declared by guest.
async fn two_users() -> (common::TestBroker, Connection, Channel) {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    add_vhost(b, "v1").await;
    for user in ["bob", "carol"] {
        b.state()
            .access
            .put_user(user, "pw", vec![])
            .await
            .expect("user added");
    }
    set_permissions(b, "bob", "v1", "^bob-", "^bob-", "^bob-").await;
    set_permissions(b, "carol", "v1", "", "", "").await;
    set_permissions(b, "guest", "v1", ".*", ".*", ".*").await;
    let admin = connect(&url(b, "guest", "guest", "v1"))
        .await
        .expect("guest");
    let ch = admin.create_channel().await.expect("channel");
    ch.queue_declare("bob-q".into(), Default::default(), FieldTable::default())
        .await
        .expect("bob-q");
    ch.exchange_declare(
        "bob-x".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("bob-x");
    (t, admin, ch)
}

async fn channel_as(t: &common::TestBroker, user: &str) -> (Connection, Channel) {
    let b = t.broker.as_ref().expect("broker");
    let conn = connect(&url(b, user, "pw", "v1")).await.expect("login");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

fn args(key: &str, value: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        key.into(),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
    t
}

#[tokio::test]
async fn logins_and_vhost_access_are_refused_as_rabbitmq_refuses_them() {
    let (t, _admin, _) = two_users().await;
    let b = t.broker.as_ref().expect("broker");
    let e = connect(&url(b, "bob", "wrong", "v1"))
        .await
        .expect_err("bad password");
    assert_eq!(
        reply(&e),
        (
            403,
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.".into()
        )
    );
    let e = connect(&url(b, "nobody", "pw", "v1"))
        .await
        .expect_err("unknown user");
    assert_eq!(reply(&e).0, 403);
    let e = connect(&url(b, "bob", "pw", "%2f"))
        .await
        .expect_err("no permissions on /");
    assert_eq!(
        reply(&e),
        (
            530,
            "NOT_ALLOWED - access to vhost '/' refused for user 'bob'".into()
        )
    );
    let e = connect(&url(b, "bob", "pw", "nope"))
        .await
        .expect_err("no such vhost");
    assert_eq!(
        reply(&e),
        (530, "NOT_ALLOWED - vhost nope not found".into())
    );
    connect(&url(b, "bob", "pw", "v1"))
        .await
        .expect("bob may use v1");
}

#[tokio::test]
async fn configure_permission_guards_declare_and_delete() {
    let (t, _admin, _) = two_users().await;
    let (_c, ch) = channel_as(&t, "bob").await;
    assert_refused(
        ch.queue_declare("other".into(), Default::default(), FieldTable::default())
            .await,
        "access to queue 'other' in vhost 'v1' refused for user 'bob'",
    );
    let (_c, ch) = channel_as(&t, "bob").await;
    ch.queue_declare("bob-2".into(), Default::default(), FieldTable::default())
        .await
        .expect("bob may declare bob-2");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare("bob-q".into(), passive, FieldTable::default())
        .await
        .expect("a passive declare needs no permission");
    assert_refused(
        ch.exchange_declare(
            "other".into(),
            ExchangeKind::Fanout,
            Default::default(),
            FieldTable::default(),
        )
        .await,
        "access to exchange 'other' in vhost 'v1' refused for user 'bob'",
    );
    let (_c, ch) = channel_as(&t, "carol").await;
    let r = ch
        .queue_declare("".into(), Default::default(), FieldTable::default())
        .await;
    let (code, text) = reply(&r.expect_err("carol may declare nothing"));
    assert_eq!(code, 403);
    assert!(
        text.starts_with("ACCESS_REFUSED - access to queue 'amq.gen-")
            && text.ends_with("' in vhost 'v1' refused for user 'carol'"),
        "{text}"
    );
    let (_c, ch) = channel_as(&t, "carol").await;
    assert_refused(
        ch.queue_delete("bob-q".into(), Default::default()).await,
        "access to queue 'bob-q' in vhost 'v1' refused for user 'carol'",
    );
    let (_c, ch) = channel_as(&t, "carol").await;
    assert_refused(
        ch.exchange_delete("bob-x".into(), Default::default()).await,
        "access to exchange 'bob-x' in vhost 'v1' refused for user 'carol'",
    );
}

#[tokio::test]
async fn dead_letter_and_alternate_exchanges_need_write_on_them() {
    let (t, _admin, _) = two_users().await;
    let (_c, ch) = channel_as(&t, "bob").await;
    assert_refused(
        ch.queue_declare(
            "bob-d".into(),
            Default::default(),
            args("x-dead-letter-exchange", "amq.direct"),
        )
        .await,
        "access to exchange 'amq.direct' in vhost 'v1' refused for user 'bob'",
    );
    let (_c, ch) = channel_as(&t, "bob").await;
    assert_refused(
        ch.exchange_declare(
            "bob-ae".into(),
            ExchangeKind::Fanout,
            Default::default(),
            args("alternate-exchange", "amq.direct"),
        )
        .await,
        "access to exchange 'amq.direct' in vhost 'v1' refused for user 'bob'",
    );
    let (_c, ch) = channel_as(&t, "bob").await;
    ch.queue_declare(
        "bob-d".into(),
        Default::default(),
        args("x-dead-letter-exchange", "bob-x"),
    )
    .await
    .expect("a dead-letter exchange bob may write to");
}

#[tokio::test]
async fn read_permission_guards_consume_get_and_purge() {
    let (t, _admin, _) = two_users().await;
    let text = "access to queue 'bob-q' in vhost 'v1' refused for user 'carol'";
    let (_c, ch) = channel_as(&t, "carol").await;
    assert_refused(
        ch.basic_consume(
            "bob-q".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
        text,
    );
    let (_c, ch) = channel_as(&t, "carol").await;
    assert_refused(ch.basic_get("bob-q".into(), Default::default()).await, text);
    let (_c, ch) = channel_as(&t, "carol").await;
    assert_refused(
        ch.queue_purge("bob-q".into(), Default::default()).await,
        text,
    );
    let (_c, ch) = channel_as(&t, "bob").await;
    ch.basic_get("bob-q".into(), Default::default())
        .await
        .expect("bob may read bob-q");
}

#[tokio::test]
async fn binding_needs_write_on_the_destination_and_read_on_the_source() {
    let (t, _admin, _) = two_users().await;
    let (_c, ch) = channel_as(&t, "bob").await;
    assert_refused(
        ch.queue_bind(
            "bob-q".into(),
            "amq.direct".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
        "access to exchange 'amq.direct' in vhost 'v1' refused for user 'bob'",
    );
    let (_c, ch) = channel_as(&t, "bob").await;
    ch.queue_bind(
        "bob-q".into(),
        "bob-x".into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("bob may bind bob-q to bob-x");
    assert_refused(
        ch.exchange_bind(
            "amq.direct".into(),
            "bob-x".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
        "access to exchange 'amq.direct' in vhost 'v1' refused for user 'bob'",
    );
    let (_c, ch) = channel_as(&t, "carol").await;
    assert_refused(
        ch.queue_unbind(
            "bob-q".into(),
            "bob-x".into(),
            "k".into(),
            FieldTable::default(),
        )
        .await,
        "access to queue 'bob-q' in vhost 'v1' refused for user 'carol'",
    );
}

/// Publishes on `ch` with the raw client and returns the reply text of the
/// channel.close that follows within a short wait, or None when the channel stays open.
async fn raw_publish_refusal(raw: &mut util::raw::Raw, ch: u16, exchange: &str) -> Option<String> {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{AMQPClass, channel};
    raw.send(&util::raw::publish_frames(
        ch, exchange, "k", false, false, b"x",
    ))
    .await;
    // A queue.declare behind the publish: its declare-ok proves the publish passed.
    raw.send_method(
        ch,
        AMQPClass::Queue(amq_protocol::protocol::queue::AMQPMethod::Declare(
            amq_protocol::protocol::queue::Declare {
                queue: "".into(),
                exclusive: true,
                ..Default::default()
            },
        )),
    )
    .await;
    loop {
        match raw.read_frame(std::time::Duration::from_secs(10)).await {
            util::raw::Read::Frame(AMQPFrame::Method(
                _,
                AMQPClass::Channel(channel::AMQPMethod::Close(c)),
            )) => {
                raw.send_method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                )
                .await;
                return Some(format!("{} {}", c.reply_code, c.reply_text.as_str()));
            }
            util::raw::Read::Frame(AMQPFrame::Method(_, AMQPClass::Queue(_))) => return None,
            util::raw::Read::Frame(_) => {}
            other => panic!("expected channel.close or declare-ok, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn publishing_needs_write_on_the_exchange_and_a_change_applies_to_open_channels() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let mut raw = util::raw::Raw::connect(&b.local_addr().to_string()).await;
    raw.handshake(|t| t).await;
    raw.open_channel(1).await;
    assert_eq!(raw_publish_refusal(&mut raw, 1, "amq.fanout").await, None);
    set_permissions(b, "guest", "/", ".*", "^amq\\.fanout$", ".*").await;
    assert_eq!(
        raw_publish_refusal(&mut raw, 1, "").await.as_deref(),
        Some(
            "403 ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' refused for user 'guest'"
        )
    );
    raw.open_channel(2).await;
    assert_eq!(raw_publish_refusal(&mut raw, 2, "amq.fanout").await, None);
    // The channel has amq.fanout in its cache: revoking must still apply at once.
    set_permissions(b, "guest", "/", ".*", "^$", ".*").await;
    assert_eq!(
        raw_publish_refusal(&mut raw, 2, "amq.fanout")
            .await
            .as_deref(),
        Some(
            "403 ACCESS_REFUSED - access to exchange 'amq.fanout' in vhost '/' refused for user 'guest'"
        )
    );
}

#[tokio::test]
async fn deleting_a_vhost_or_user_closes_its_connections_with_320() {
    let (t, _admin, _) = two_users().await;
    let b = t.broker.as_ref().expect("broker");
    let (bob, _ch) = channel_as(&t, "bob").await;
    let (carol, _ch2) = channel_as(&t, "carol").await;
    b.state().delete_user("carol").await.expect("deleted");
    within(async {
        while carol.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(connect(&url(b, "carol", "pw", "v1")).await.is_err());
    b.state().delete_vhost("v1").await.expect("deleted");
    within(async {
        while bob.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let e = connect(&url(b, "bob", "pw", "v1"))
        .await
        .expect_err("v1 is gone");
    assert_eq!(reply(&e), (530, "NOT_ALLOWED - vhost v1 not found".into()));
    assert!(b.state().vhost("v1").is_none());
}

#[tokio::test]
async fn users_vhosts_permissions_and_a_deleted_vhosts_queues_survive_a_restart_as_they_were() {
    let dir = temp_dir("restart");
    let config = Config::for_tests(&dir);
    {
        let b = Broker::start(config.clone()).await.expect("start");
        add_vhost(&b, "kept").await;
        add_vhost(&b, "dropped").await;
        let access = &b.state().access;
        access
            .put_user("ops", "s3cret", vec!["monitoring".into()])
            .await
            .expect("user");
        set_permissions(&b, "ops", "kept", "^ops", ".*", ".*").await;
        set_permissions(&b, "guest", "dropped", ".*", ".*", ".*").await;
        let conn = connect(&url(&b, "guest", "guest", "dropped"))
            .await
            .expect("guest");
        let ch = conn.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare("lost".into(), durable, FieldTable::default())
            .await
            .expect("queue");
        drop(conn);
        b.state().delete_vhost("dropped").await.expect("deleted");
        b.shutdown().await;
    }
    let b = Broker::start(config.clone()).await.expect("restart");
    let ops = b.state().access.user("ops").expect("ops is back");
    assert_eq!(ops.tags, vec!["monitoring"]);
    let conn = connect(&url(&b, "ops", "s3cret", "kept"))
        .await
        .expect("ops logs in");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare("ops-q".into(), Default::default(), FieldTable::default())
        .await
        .expect("configure ^ops is back");
    assert_refused(
        ch.queue_declare("other".into(), Default::default(), FieldTable::default())
            .await,
        "access to queue 'other' in vhost 'kept' refused for user 'ops'",
    );
    assert!(b.state().vhost("dropped").is_none());
    add_vhost(&b, "dropped").await;
    set_permissions(&b, "guest", "dropped", ".*", ".*", ".*").await;
    let conn = connect(&url(&b, "guest", "guest", "dropped"))
        .await
        .expect("guest");
    let ch = conn.create_channel().await.expect("channel");
    let r = ch
        .queue_declare(
            "lost".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_eq!(reply(&r.expect_err("the queue went with its vhost")).0, 404);
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
