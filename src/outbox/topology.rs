//! The broker topology, described as data and declared again on every (re)connect
//! (design.md, AMQP contract): a durable topic exchange whose alternate exchange (fanout) feeds a
//! durable queue, so nothing unroutable is dropped.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpSettings;

#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeKind,
    pub alternate_exchange: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    pub queue_type: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BindingSpec {
    pub queue: String,
    pub exchange: String,
    pub routing_key: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<BindingSpec>,
}

impl Topology {
    pub fn from_settings(amqp: &AmqpSettings) -> Topology {
        Topology {
            // The alternate exchange first: the main exchange names it.
            exchanges: vec![
                ExchangeSpec {
                    name: amqp.alternate_exchange.clone(),
                    kind: ExchangeKind::Fanout,
                    alternate_exchange: None,
                },
                ExchangeSpec {
                    name: amqp.exchange.clone(),
                    kind: ExchangeKind::Topic,
                    alternate_exchange: Some(amqp.alternate_exchange.clone()),
                },
            ],
            queues: vec![QueueSpec {
                name: amqp.unrouted_queue.clone(),
                queue_type: amqp.queue_type.clone(),
            }],
            bindings: vec![BindingSpec {
                queue: amqp.unrouted_queue.clone(),
                exchange: amqp.alternate_exchange.clone(),
                routing_key: String::new(),
            }],
        }
    }

    /// Declares everything, durable. Idempotent on the broker's side.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for exchange in &self.exchanges {
            let mut arguments = FieldTable::default();
            if let Some(alternate) = &exchange.alternate_exchange {
                arguments.insert(
                    "alternate-exchange".into(),
                    AMQPValue::LongString(alternate.as_str().into()),
                );
            }
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    exchange.kind.clone(),
                    durable,
                    arguments,
                )
                .await?;
        }
        for queue in &self.queues {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(queue.queue_type.as_str().into()),
            );
            let options = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.name.as_str().into(), options, arguments)
                .await?;
        }
        for binding in &self.bindings {
            channel
                .queue_bind(
                    binding.queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}
