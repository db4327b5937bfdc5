//! RabbitMQ for the tests: exchange and queue names of each test's own (removed afterwards), and a
//! capture consumer that records every message as a consumer would see it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kci_receiver::config::{AmqpSettings, Settings};
use kci_receiver::outbox::topology::Topology;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::helpers::amqp_url;

/// A message as a consumer received it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub kind: Option<String>,
    pub headers: Value,
    pub body: Value,
    /// The body's bytes as they arrived.
    pub raw: Vec<u8>,
}

impl Captured {
    /// The entity's (type, gateway id) and the KCI's sequence number, from the envelope.
    pub fn entity_and_sequence(&self) -> (String, i64) {
        let entity = format!(
            "{}:{}",
            self.body["entity"]["type"], self.body["entity"]["gatewayId"]
        );
        (
            entity,
            self.body["sequence"]["sequenceNumber"]
                .as_i64()
                .unwrap_or(-1),
        )
    }
}

fn header_value(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::Boolean(b) => json!(b),
        other => json!(format!("{other:?}")),
    }
}

/// Messages received so far.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    pub fn messages(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until at least `count` messages arrived (or `timeout`); returns what arrived.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Captured> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.0.lock().unwrap().len() < count && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.messages()
    }

    /// Waits until messages with `count` distinct message ids arrived (or `timeout`).
    pub async fn wait_for_distinct(&self, count: usize, timeout: Duration) -> Vec<Captured> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let messages = self.messages();
            let distinct: std::collections::HashSet<_> =
                messages.iter().map(|m| m.message_id.clone()).collect();
            if distinct.len() >= count || tokio::time::Instant::now() >= deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks real messages against `docs/asyncapi.yaml` with the AsyncAPI Initiative's parser and
/// the document's own payload and header schemas (`scripts/js/validate-asyncapi.mjs`, installed by
/// `scripts/test`); also validates the document itself. Fails, never skips, when Node.js or the
/// parser is missing.
pub fn assert_valid_by_asyncapi(messages: &[Captured]) {
    let root = env!("CARGO_MANIFEST_DIR");
    let file = std::env::temp_dir().join(format!("kci-amqp-messages-{}.json", Uuid::new_v4()));
    let real: Vec<Value> = messages
        .iter()
        .map(|m| json!({"message": "kciEvent", "headers": m.headers, "payload": m.body}))
        .collect();
    std::fs::write(&file, serde_json::to_vec(&real).unwrap()).unwrap();
    let output = std::process::Command::new("node")
        .arg(format!("{root}/scripts/js/validate-asyncapi.mjs"))
        .arg(format!("{root}/docs/asyncapi.yaml"))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "Node.js is needed for the AsyncAPI check (run the tests with scripts/test): {e}"
            )
        });
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "docs/asyncapi.yaml or the messages against it are not valid (the parser is installed by \
         scripts/test):\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("{} real message(s) match", messages.len())),
        "{stdout}"
    );
}

/// The broker as one test sees it.
pub struct TestBroker {
    pub amqp: AmqpSettings,
    connection: Connection,
    channel: Channel,
}

impl TestBroker {
    /// Names of this test's own; with `declare`, the topology is declared up front (as the
    /// relay would), so that capture queues can bind before anything is published.
    pub async fn new(declare: bool) -> TestBroker {
        let prefix = format!("kci-test-{}", Uuid::new_v4().simple());
        let amqp = AmqpSettings {
            url: SecretString::from(amqp_url()),
            exchange: prefix.clone(),
            alternate_exchange: format!("{prefix}.unrouted"),
            unrouted_queue: format!("{prefix}.unrouted"),
            queue_type: "classic".to_owned(),
            declare_topology: true,
            connect_timeout_ms: 5000,
            cloudevents: false,
            cloudevents_source: "urn:kci-receiver".to_owned(),
        };
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ is required for these tests and is not reachable at {}: {e}",
                    amqp_url()
                )
            });
        let channel = connection.create_channel().await.expect("a channel");
        if declare {
            Topology::from_settings(&amqp)
                .declare(&channel)
                .await
                .expect("declare the topology");
        }
        TestBroker {
            amqp,
            connection,
            channel,
        }
    }

    /// Turns the relay on in `settings`, publishing to this test's exchange, with short delays.
    pub fn apply(&self, settings: &mut Settings) {
        settings.amqp = self.amqp.clone();
        settings.relay.enabled = true;
        fast_relay(settings);
    }

    /// A queue bound to `binding_key` that refuses everything routed to it (maximum length 0,
    /// `reject-publish`): the broker nacks those publishes. Returns its name.
    pub async fn refusing_queue(&self, binding_key: &str) -> String {
        let name = format!("{}-refusing", self.amqp.exchange);
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: false,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .expect("declare the refusing queue");
        self.channel
            .queue_bind(
                name.as_str().into(),
                self.amqp.exchange.as_str().into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the refusing queue");
        name
    }

    pub async fn delete_queue(&self, name: &str) {
        self.channel
            .queue_delete(name.into(), Default::default())
            .await
            .expect("delete the queue");
    }

    pub async fn declare_topology(&self) {
        Topology::from_settings(&self.amqp)
            .declare(&self.channel)
            .await
            .expect("declare the topology");
    }

    /// A capture queue bound to the exchange with `binding_key` (e.g. `kci.#`).
    pub async fn capture(&self, binding_key: &str) -> Capture {
        let queue = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("a capture queue");
        self.channel
            .queue_bind(
                queue.name().clone(),
                self.amqp.exchange.as_str().into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the capture queue");
        self.consume(queue.name().as_str()).await
    }

    /// Captures what lands in the alternate exchange's queue.
    pub async fn capture_unrouted(&self) -> Capture {
        self.consume(&self.amqp.unrouted_queue.clone()).await
    }

    async fn consume(&self, queue: &str) -> Capture {
        let channel = self.connection.create_channel().await.expect("a channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("capture-{}", Uuid::new_v4().simple())
                    .as_str()
                    .into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let capture = Capture::default();
        let messages = capture.0.clone();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let properties = &delivery.properties;
                let headers = properties
                    .headers()
                    .as_ref()
                    .map(|table| {
                        table
                            .inner()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), header_value(v)))
                            .collect::<Map<String, Value>>()
                    })
                    .unwrap_or_default();
                let short = |s: &Option<lapin::types::ShortString>| {
                    s.as_ref().map(|s| s.as_str().to_owned())
                };
                messages.lock().unwrap().push(Captured {
                    routing_key: delivery.routing_key.as_str().to_owned(),
                    message_id: short(properties.message_id()),
                    correlation_id: short(properties.correlation_id()),
                    content_type: short(properties.content_type()),
                    delivery_mode: *properties.delivery_mode(),
                    timestamp: *properties.timestamp(),
                    kind: short(properties.kind()),
                    headers: Value::Object(headers),
                    body: serde_json::from_slice(&delivery.data).unwrap_or(Value::Null),
                    raw: delivery.data.clone(),
                });
            }
        });
        capture
    }
}

/// Short delays, so that retries and reconnects happen within a test's patience.
fn fast_relay(settings: &mut Settings) {
    settings.relay.poll_interval_ms = 200;
    settings.relay.retry_initial_ms = 50;
    settings.relay.retry_max_ms = 500;
    settings.relay.reconnect_initial_ms = 100;
    settings.relay.reconnect_max_ms = 1000;
    settings.relay.confirm_timeout_ms = 5000;
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let amqp = self.amqp.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let connection =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
                let channel = connection.create_channel().await?;
                let _ = channel
                    .queue_delete(amqp.unrouted_queue.as_str().into(), Default::default())
                    .await;
                for exchange in [&amqp.exchange, &amqp.alternate_exchange] {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), Default::default())
                        .await;
                }
                connection.close(200, "test done".into()).await
            })?;
            Ok::<_, anyhow::Error>(())
        })
        .join();
    }
}
