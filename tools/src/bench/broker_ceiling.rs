//! The broker's own confirmed-publish rate: what a plain lapin publisher gets from the same
//! RabbitMQ, for messages of the relay's size and shape, in rounds of the relay's window
//! (publish a round, await every confirm, publish the next), into a queue set up like the
//! benchmark consumer's and drained by a consumer like it. The relay's backlog drain is measured
//! against this, in the same run.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};

/// Confirmed publishes per second: `messages` messages of `message_bytes` bytes each, in rounds
/// of `window`.
pub async fn confirmed_publishes_per_second(
    amqp_url: &str,
    exchange: &str,
    message_bytes: usize,
    window: usize,
    messages: usize,
) -> anyhow::Result<f64> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // The consumer's side, as the benchmark's consumer has it.
    let consuming = connection.create_channel().await?;
    let (queue, mut consumer) =
        crate::delivery::consume_everything(&consuming, exchange, "kci-tools-ceiling").await?;
    let draining = tokio::spawn(async move { while let Some(Ok(_)) = consumer.next().await {} });

    // A payload of the relay's size, and the relay's properties and headers.
    let payload = format!(
        "{{\"filler\":\"{}\"}}",
        "x".repeat(message_bytes.saturating_sub(13))
    );
    let mut headers = FieldTable::default();
    for (key, value) in [
        ("x-request-id", "5f0c9d1e-8a7b-4c3d-9e2f-1a2b3c4d5e6f"),
        ("x-conversation-id", "conv-ceiling"),
        ("supplier", "FIBRECO"),
        ("entity-type", "PROVIDE_ORDER"),
        ("entity-id", "12345"),
        ("previous-status", "ACKNOWLEDGED"),
        ("new-status", "IN_PROGRESS"),
        ("x-kci-source", "DELIVERY"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-5c1f0e2d3a4b6c7d-01",
        ),
    ] {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    headers.insert(
        ShortString::from("sequence-number"),
        AMQPValue::LongLongInt(3),
    );

    let started = Instant::now();
    let mut sent = 0usize;
    while sent < messages {
        let round = window.min(messages - sent);
        let publishes = (0..round).map(|i| {
            let properties = BasicProperties::default()
                .with_message_id(ShortString::from(uuid::Uuid::new_v4().to_string()))
                .with_correlation_id(ShortString::from("conv-ceiling"))
                .with_content_type(ShortString::from("application/json"))
                .with_delivery_mode(2)
                .with_timestamp(0)
                .with_type(ShortString::from("PROVIDE_ORDER"))
                .with_app_id(ShortString::from("kci-tools"))
                .with_headers(headers.clone());
            let channel = &channel;
            let payload = payload.as_bytes();
            async move {
                let confirm = channel
                    .basic_publish(
                        exchange.into(),
                        format!("kci.provide_order.informational.n{}", i % 8)
                            .as_str()
                            .into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        payload,
                        properties,
                    )
                    .await?;
                confirm.await
            }
        });
        for confirmation in join_all(publishes).await {
            match confirmation? {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                other => anyhow::bail!("the broker did not confirm a plain publish: {other:?}"),
            }
        }
        sent += round;
    }
    let seconds = started.elapsed().as_secs_f64();

    // Let the consumer empty the queue before it goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !queue_is_drained(&consuming, queue.name().as_str()).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    draining.abort();
    Ok(messages as f64 / seconds.max(1e-9))
}

async fn queue_is_drained(channel: &lapin::Channel, queue: &str) -> bool {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok_and(|q| q.message_count() == 0)
}
