//! Direct reply-to: the `amq.rabbitmq.reply-to` pseudo-queue that RPC helpers of many
//! clients are built on, with RabbitMQ's rules for consuming from it, publishing with
//! it as `reply_to`, and replies to consumers that are gone.

mod common;
mod util;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};
use util::*;

const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";

/// A no-ack consumer of the pseudo-queue on `ch`.
async fn consume_replies(ch: &Channel, tag: &str) -> Consumer {
    within(ch.basic_consume(
        PSEUDO_QUEUE.into(),
        tag.into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("basic.consume from amq.rabbitmq.reply-to")
}

/// Publishes a request to `queue` with `reply_to` = the pseudo-queue.
async fn publish_request(ch: &Channel, queue: &str, body: &[u8]) -> lapin::Result<()> {
    within(
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_reply_to(PSEUDO_QUEUE.into())
                .with_correlation_id("req-1".into()),
        ),
    )
    .await
    .map(|_| ())
}

/// The `reply_to` the server side of an RPC sees on the request in `queue`.
async fn request_reply_to(ch: &Channel, queue: &str) -> String {
    for _ in 0..100 {
        if let Some(m) = get(ch, queue).await {
            return m
                .delivery
                .properties
                .reply_to()
                .as_ref()
                .expect("request has a reply_to")
                .to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("request did not arrive in {queue}");
}

/// Publishes a reply to `reply_to` on the default exchange; returns the confirmation.
async fn publish_reply(
    ch: &Channel,
    reply_to: &str,
    body: &[u8],
    mandatory: bool,
) -> lapin::Confirmation {
    let c = within(ch.basic_publish(
        "".into(),
        reply_to.into(),
        BasicPublishOptions {
            mandatory,
            ..Default::default()
        },
        body,
        BasicProperties::default().with_correlation_id("req-1".into()),
    ))
    .await
    .expect("basic.publish");
    within(c).await.expect("confirm")
}

async fn confirm_channel(t: &Target) -> (lapin::Connection, Channel) {
    let (conn, ch) = t.channel().await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    (conn, ch)
}

async fn passive_declare(ch: &Channel, name: &str) -> lapin::Result<lapin::Queue> {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

#[tokio::test]
async fn a_reply_to_the_rewritten_reply_to_reaches_the_requesting_consumer() {
    let t = Target::start().await;
    let (_client_conn, client) = t.channel().await;
    let mut replies = consume_replies(&client, "rpc-client").await;
    let requests = temp_queue(&client).await;
    publish_request(&client, &requests, b"what time is it?")
        .await
        .expect("request published");

    // The server side: another connection, as an RPC server would be.
    let (_server_conn, server) = confirm_channel(&t).await;
    let reply_to = request_reply_to(&server, &requests).await;
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to.") && reply_to.len() > PSEUDO_QUEUE.len() + 1,
        "reply_to rewritten to a private name, got {reply_to:?}"
    );
    let c = publish_reply(&server, &reply_to, b"noon", false).await;
    assert!(c.is_ack());

    let d = next(&mut replies).await;
    assert_eq!(d.data, b"noon");
    assert_eq!(d.exchange.as_str(), "");
    assert_eq!(d.routing_key.as_str(), reply_to);
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("req-1")
    );
    // A second reply to the same name arrives too.
    publish_reply(&server, &reply_to, b"still noon", false).await;
    assert_eq!(next(&mut replies).await.data, b"still noon");
}

#[tokio::test]
async fn the_pseudo_queue_and_a_live_reply_name_exist_for_queue_declare() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let q = passive_declare(&ch, PSEUDO_QUEUE)
        .await
        .expect("passive declare of amq.rabbitmq.reply-to");
    assert_eq!(q.name().as_str(), PSEUDO_QUEUE);
    assert_eq!(q.message_count(), 0);

    let _replies = consume_replies(&ch, "rpc-client").await;
    let requests = temp_queue(&ch).await;
    publish_request(&ch, &requests, b"ping").await.unwrap();
    let reply_to = request_reply_to(&ch, &requests).await;
    // An RPC server may check that the client is still there before working for it.
    let (_c2, other) = t.channel().await;
    let q = passive_declare(&other, &reply_to)
        .await
        .expect("passive declare of a live reply name");
    assert_eq!(q.consumer_count(), 1);

    within(ch.basic_cancel("rpc-client".into(), BasicCancelOptions::default()))
        .await
        .expect("basic.cancel");
    assert_code(passive_declare(&other, &reply_to).await, 404);
}

#[tokio::test]
async fn consuming_the_pseudo_queue_with_acks_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let r = within(ch.basic_consume(
        PSEUDO_QUEUE.into(),
        "acking".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn a_second_reply_consumer_on_one_channel_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let _first = consume_replies(&ch, "first").await;
    let r = within(ch.basic_consume(
        PSEUDO_QUEUE.into(),
        "second".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    assert_code(r, 406);
}

#[tokio::test]
async fn publishing_with_the_pseudo_queue_as_reply_to_without_consuming_it_fails_with_406() {
    let t = Target::start().await;
    let (_conn, ch) = t.channel().await;
    let mut closed = sentinel(&ch).await;
    let requests = temp_queue(&ch).await;
    let _ = publish_request(&ch, &requests, b"who answers?").await;
    assert_eq!(channel_closed_with(&mut closed).await, Some(406));

    // A reply consumer on another channel does not count.
    let (_conn2, other) = t.channel().await;
    let _replies = consume_replies(&other, "elsewhere").await;
    let ch3 = within(_conn.create_channel()).await.unwrap();
    let mut closed = sentinel(&ch3).await;
    let _ = publish_request(&ch3, &requests, b"who answers?").await;
    assert_eq!(channel_closed_with(&mut closed).await, Some(406));
}

#[tokio::test]
async fn a_reply_to_a_consumer_that_is_gone_is_dropped_or_returned_if_mandatory() {
    let t = Target::start().await;
    let (client_conn, client) = t.channel().await;
    let _replies = consume_replies(&client, "rpc-client").await;
    let requests = temp_queue(&client).await;
    publish_request(&client, &requests, b"ping").await.unwrap();
    let (_server_conn, server) = confirm_channel(&t).await;
    let reply_to = request_reply_to(&server, &requests).await;

    // The client goes away.
    within(client.close(200, "bye".into())).await.unwrap();
    drop(client_conn);

    let c = publish_reply(&server, &reply_to, b"too late", false).await;
    assert!(c.is_ack(), "a dropped reply is still confirmed");
    let c = publish_reply(&server, &reply_to, b"too late", true).await;
    assert!(c.is_ack());
    let returned = c.take_message().expect("mandatory reply returned");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.delivery.routing_key.as_str(), reply_to);
    // An unknown reply name is unroutable the same way.
    let c = publish_reply(&server, "amq.rabbitmq.reply-to.nobody", b"?", true).await;
    assert!(
        c.take_message().is_some(),
        "reply to an unknown name returned"
    );
    assert_channel_works(&server).await;
}

#[tokio::test]
async fn a_cancelled_reply_consumer_gets_no_more_replies_and_a_new_one_gets_a_new_name() {
    let t = Target::start().await;
    let (_conn, client) = t.channel().await;
    let mut replies = consume_replies(&client, "first").await;
    let requests = temp_queue(&client).await;
    publish_request(&client, &requests, b"one").await.unwrap();
    let (_server_conn, server) = confirm_channel(&t).await;
    let first_name = request_reply_to(&server, &requests).await;
    within(client.basic_cancel("first".into(), BasicCancelOptions::default()))
        .await
        .unwrap();
    let c = publish_reply(&server, &first_name, b"late", true).await;
    assert!(
        c.take_message().is_some(),
        "reply to a cancelled consumer returned"
    );
    assert_no_delivery(&mut replies).await;

    let mut replies = consume_replies(&client, "second").await;
    publish_request(&client, &requests, b"two").await.unwrap();
    let second_name = request_reply_to(&server, &requests).await;
    assert_ne!(first_name, second_name);
    publish_reply(&server, &second_name, b"answer", false).await;
    let d = next(&mut replies).await;
    assert_eq!(d.data, b"answer");
}
