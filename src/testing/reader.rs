//! Reads back what landed on a topic, independent of kontext's consumer
//! runtime, so tests check the wire format rather than kontext against itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::broker::Broker;
use crate::client::raw_headers::{self, RawHeaders};
use crate::error::{Error, Result};

/// One record as stored by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMessage {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes, if any.
    pub key: Option<Vec<u8>>,
    /// Payload bytes; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers in wire order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Record timestamp in milliseconds, if set.
    pub timestamp: Option<i64>,
}

impl RecordedMessage {
    /// The first header called `name`, as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The key as UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

/// Reads every partition of `topic` from the beginning until `expected`
/// records arrived or `timeout` passed, and returns them ordered by
/// partition and offset. Fewer than `expected` means the timeout hit.
pub async fn read_topic(
    broker: &Broker,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<RecordedMessage>> {
    let servers = broker.bootstrap_servers().to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_blocking(&servers, &topic, expected, timeout))
        .await
        .map_err(|e| Error::Internal(format!("the topic reader did not finish: {e}")))?
}

fn read_blocking(
    servers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<RecordedMessage>> {
    let client_err = |source| Error::Client {
        role: "consumer",
        source,
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", super::unique_name("kontext-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(client_err)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(client_err)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(client_err)?;
    }
    consumer.assign(&assignment).map_err(client_err)?;

    let mut out: BTreeMap<(i32, i64), RecordedMessage> = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while out.len() < expected && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                // Names as text, lossily: a name that is not UTF-8 shows
                // its bytes rather than failing the read.
                let headers = RawHeaders::of(&m)
                    .map(|(name, value)| (raw_headers::lossy(name), value.map(<[u8]>::to_vec)))
                    .collect();
                out.insert(
                    (m.partition(), m.offset()),
                    RecordedMessage {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers,
                        timestamp: m.timestamp().to_millis(),
                    },
                );
            }
            Some(Err(e)) => tracing::debug!(error = %e, "topic reader poll error"),
            None => {}
        }
    }
    Ok(out.into_values().collect())
}
