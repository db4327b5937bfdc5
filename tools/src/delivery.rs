//! What reaches RabbitMQ: a consumer of everything published on an exchange, and the check that
//! every acknowledged KCI arrived, how often, and in per-entity order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kci_receiver::config::AmqpSettings;
use kci_receiver::outbox::topology::Topology;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use secrecy::SecretString;

/// A message as the consumer received it.
pub struct Arrival {
    pub at: Instant,
    pub kci_id: String,
    pub entity: String,
}

/// Topology names of a run's own (so that runs and tests never share messages).
pub fn amqp_settings(amqp_url: &str, prefix: &str) -> AmqpSettings {
    AmqpSettings {
        url: SecretString::from(amqp_url.to_owned()),
        exchange: prefix.to_owned(),
        alternate_exchange: format!("{prefix}.unrouted"),
        unrouted_queue: format!("{prefix}.unrouted"),
        queue_type: "classic".to_owned(),
        declare_topology: true,
        connect_timeout_ms: 5000,
        cloudevents: false,
        cloudevents_source: "urn:kci-receiver".to_owned(),
    }
}

/// The benchmark's way of consuming: a queue of its own (exclusive, deleted with its
/// connection) bound to `kci.#` on `exchange`, prefetch 1,000, no acknowledgements. Also what the
/// broker's own publish rate is measured against (`bench::broker_ceiling`), so both see the same.
pub async fn consume_everything(
    channel: &lapin::Channel,
    exchange: &str,
    tag: &str,
) -> anyhow::Result<(lapin::Queue, lapin::Consumer)> {
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            "kci.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((queue, consumer))
}

/// Every message published on the exchange, as it arrives.
pub struct Consumer {
    connection: Connection,
    amqp: AmqpSettings,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
}

impl Consumer {
    /// Declares the topology and binds a queue of its own to `kci.#`.
    pub async fn start(amqp_url: &str, amqp: &AmqpSettings) -> anyhow::Result<Consumer> {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        Topology::from_settings(amqp).declare(&channel).await?;
        let (_queue, mut consumer) =
            consume_everything(&channel, &amqp.exchange, "kci-tools").await?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let sink = arrivals.clone();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                let Ok(body) = serde_json::from_slice::<serde_json::Value>(&delivery.data) else {
                    continue;
                };
                let arrival = Arrival {
                    at,
                    kci_id: body["kci"]["id"].as_str().unwrap_or_default().to_owned(),
                    entity: format!("{}:{}", body["entity"]["type"], body["entity"]["gatewayId"]),
                };
                if let Ok(mut arrivals) = sink.lock() {
                    arrivals.push(arrival);
                }
            }
        });
        Ok(Consumer {
            connection,
            amqp: amqp.clone(),
            arrivals,
        })
    }

    /// Runs `look` on what arrived so far.
    pub fn with_arrivals<T>(&self, look: impl FnOnce(&[Arrival]) -> T) -> T {
        match self.arrivals.lock() {
            Ok(arrivals) => look(&arrivals),
            Err(poisoned) => look(&poisoned.into_inner()),
        }
    }

    /// How many distinct KCIs arrived.
    pub fn distinct(&self) -> usize {
        self.with_arrivals(|a| {
            a.iter()
                .map(|x| x.kci_id.as_str())
                .collect::<HashSet<_>>()
                .len()
        })
    }

    /// Waits until every KCI of `expected` arrived (or `timeout`); whether they all did.
    pub async fn wait_for(&self, expected: &HashMap<String, Instant>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.with_arrivals(|arrivals| {
                let arrived: HashSet<&str> = arrivals.iter().map(|a| a.kci_id.as_str()).collect();
                expected
                    .keys()
                    .filter(|id| !arrived.contains(id.as_str()))
                    .count()
            });
            if missing == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes the run's exchanges and queue, then disconnects.
    pub async fn close(self) {
        if let Ok(channel) = self.connection.create_channel().await {
            let _ = channel
                .queue_delete(self.amqp.unrouted_queue.as_str().into(), Default::default())
                .await;
            for exchange in [&self.amqp.exchange, &self.amqp.alternate_exchange] {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await;
            }
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// What the consumer saw of a set of acknowledged KCIs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivery {
    pub acknowledged: usize,
    pub arrived: usize,
    /// Messages beyond the first of each KCI (re-publishes: delivery is at least once).
    pub duplicates: usize,
    /// First arrivals that came before a KCI of the same entity acknowledged earlier.
    pub order_violations: usize,
}

impl Delivery {
    pub fn missing(&self) -> usize {
        self.acknowledged - self.arrived
    }
}

/// Checks `arrivals` against what was acknowledged (KCI id -> when its 204 came). Duplicates
/// and order are counted over the acknowledged KCIs only.
pub fn check(arrivals: &[Arrival], acknowledged: &HashMap<String, Instant>) -> Delivery {
    let mut first_arrival: HashMap<&str, usize> = HashMap::new();
    let mut duplicates = 0;
    for (index, arrival) in arrivals.iter().enumerate() {
        if !acknowledged.contains_key(&arrival.kci_id) {
            continue;
        }
        match first_arrival.entry(arrival.kci_id.as_str()) {
            std::collections::hash_map::Entry::Occupied(_) => duplicates += 1,
            std::collections::hash_map::Entry::Vacant(first) => {
                first.insert(index);
            }
        }
    }
    let mut last_accepted: HashMap<&str, Instant> = HashMap::new();
    let mut order_violations = 0;
    for (index, arrival) in arrivals.iter().enumerate() {
        if first_arrival.get(arrival.kci_id.as_str()) != Some(&index) {
            continue;
        }
        let Some(at) = acknowledged.get(&arrival.kci_id) else {
            continue;
        };
        if last_accepted
            .get(arrival.entity.as_str())
            .is_some_and(|previous| at < previous)
        {
            order_violations += 1;
        }
        last_accepted.insert(arrival.entity.as_str(), *at);
    }
    Delivery {
        acknowledged: acknowledged.len(),
        arrived: first_arrival.len(),
        duplicates,
        order_violations,
    }
}
