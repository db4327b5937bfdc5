//! A CP back-office consumer of kci-receiver's events, as a starting point.
//!
//! It binds a durable queue to the KCI exchange, processes each message, de-duplicates by
//! `message_id` (delivery is at least once) and acknowledges only after processing, so that a
//! crash mid-processing gets the message redelivered.
//!
//! ```sh
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QUEUE=crm.kci BINDING='kci.#' \
//!   cargo run --example consumer
//! ```
//!
//! A real consumer keeps the processed ids in its own database, in the same transaction as the
//! processing; the in-memory set here only lasts as long as the process.

use std::collections::HashSet;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let exchange = std::env::var("EXCHANGE").unwrap_or_else(|_| "fibrecafe.kci".to_owned());
    let queue = std::env::var("QUEUE").unwrap_or_else(|_| "example.kci-consumer".to_owned());
    let binding = std::env::var("BINDING").unwrap_or_else(|_| "kci.#".to_owned());

    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    // A bounded number of unacknowledged messages at a time.
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            binding.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "example-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("consuming {queue} (bound to {exchange} with {binding})");

    let mut processed: HashSet<String> = HashSet::new();
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default();
        if processed.contains(&message_id) {
            println!("duplicate {message_id}: already processed, acknowledging");
        } else {
            let envelope: Value = serde_json::from_slice(&delivery.data)?;
            process(&delivery.routing_key.to_string(), &envelope);
            processed.insert(message_id);
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// What the back-office does with one event: here, print it.
fn process(routing_key: &str, envelope: &Value) {
    let entity = &envelope["entity"];
    let correlation = &envelope["correlation"];
    println!(
        "{routing_key}: {} {} {} -> {} (sequence {}, {}, request {})",
        entity["type"].as_str().unwrap_or("?"),
        entity["gatewayId"].as_str().unwrap_or("?"),
        entity["previousStatus"].as_str().unwrap_or("(new)"),
        entity["newStatus"].as_str().unwrap_or("?"),
        envelope["sequence"]["sequenceNumber"],
        correlation["status"].as_str().unwrap_or("?"),
        correlation["originalRequest"]["operation"]
            .as_str()
            .unwrap_or("unknown"),
    );
}
