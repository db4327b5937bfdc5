//! The broker's own confirmed-publish rate: what a plain lapin publisher gets from the same
//! RabbitMQ, for messages of the relay's size and shape, into a queue set up like the benchmark
//! consumer's and drained by a consumer like it. Two shapes ([`Shape`]): in rounds (publish a
//! round, await every confirm, publish the next: the yardstick), and in per-entity chains
//! like the backlog's (each entity's messages one after the other, each once the one before is
//! confirmed, the entities side by side: what per-entity order allows at best). The relay's
//! backlog drain is measured against both, in the same run.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};

/// How the messages are published.
pub enum Shape {
    /// `messages` in rounds of `window`, each round's confirms awaited before the next.
    Rounds { window: usize, messages: usize },
    /// One chain per entity, of the given lengths: each message sent once the one before it in
    /// its chain is confirmed, all chains at once.
    Chains(Vec<usize>),
}

/// Confirmed publishes per second, for messages of `message_bytes` bytes each, in `shape`.
pub async fn confirmed_publishes_per_second(
    amqp_url: &str,
    exchange: &str,
    message_bytes: usize,
    shape: Shape,
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

    // One confirmed publish, with the relay's properties and a routing key like its own.
    let publish = |n: usize| {
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
                    format!("kci.provide_order.informational.n{}", n % 8)
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
            match confirm.await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                other => anyhow::bail!("the broker did not confirm a plain publish: {other:?}"),
            }
        }
    };
    let started = Instant::now();
    let messages = match shape {
        Shape::Rounds { window, messages } => {
            let mut sent = 0usize;
            while sent < messages {
                let round = window.min(messages - sent);
                for confirmed in join_all((0..round).map(publish)).await {
                    confirmed?;
                }
                sent += round;
            }
            messages
        }
        Shape::Chains(lengths) => {
            let chains = lengths
                .iter()
                .enumerate()
                .map(|(entity, length)| async move {
                    for _ in 0..*length {
                        publish(entity).await?;
                    }
                    Ok::<_, anyhow::Error>(())
                });
            for chain in join_all(chains).await {
                chain?;
            }
            lengths.iter().sum()
        }
    };
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
