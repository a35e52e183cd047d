//! Dead letters back to their original topic: a bounded scan of a
//! dead-letter topic (up to its end when the replay began), filtered,
//! rate-limited, each replayed record marked as a replay of its dead-letter
//! coordinates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::client::raw_headers::{self, RawHeaders};
use crate::error::{Error, Result};
use crate::headers;

/// Dead-letter headers (the same names as `consumer::dlq_headers`, which
/// sits above this module).
const ORIGINAL_TOPIC: &[u8] = b"dlq-original-topic";
const REASON: &[u8] = b"dlq-reason";
const TRUNCATED: &[u8] = b"dlq-truncated";
const DLQ_PREFIX: &[u8] = b"dlq-";

/// Which dead letters to replay, and how fast. Every filter left `None`
/// matches all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayFilter {
    /// Only dead letters with this `dlq-reason` (`handler`,
    /// `retries-exhausted`, `decode`...).
    pub reason: Option<String>,
    /// Only records of this type (their `ce_type`).
    pub message_type: Option<String>,
    /// Only records with this key.
    pub key: Option<Vec<u8>>,
    /// Only dead letters written at or after this time.
    pub from: Option<SystemTime>,
    /// Only dead letters written before this time.
    pub until: Option<SystemTime>,
    /// At most this many replayed records a second (`None`: as fast as the
    /// producer takes them).
    pub per_second: Option<u32>,
    /// Count what would be replayed, replaying nothing.
    pub dry_run: bool,
}

impl ReplayFilter {
    /// Every dead letter, as fast as the producer takes them.
    pub fn all() -> Self {
        ReplayFilter::default()
    }

    /// Only dead letters with this `dlq-reason`.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Only records of this `ce_type`.
    pub fn message_type(mut self, message_type: impl Into<String>) -> Self {
        self.message_type = Some(message_type.into());
        self
    }

    /// Only records with this key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Only dead letters written in `[from, until)`.
    pub fn between(mut self, from: SystemTime, until: SystemTime) -> Self {
        self.from = Some(from);
        self.until = Some(until);
        self
    }

    /// At most `n` replayed records a second.
    pub fn per_second(mut self, n: u32) -> Self {
        self.per_second = Some(n);
        self
    }

    /// Counts what would be replayed, replaying nothing.
    pub fn dry_run(mut self) -> Self {
        self.dry_run = true;
        self
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Replayed {
    /// Dead letters read (the topic up to its end when the replay began).
    pub scanned: u64,
    /// Of those, how many the filter matched.
    pub matched: u64,
    /// Of those, how many were sent back (0 on a dry run).
    pub replayed: u64,
    /// Matched but not replayed: their payload was cut to fit the
    /// dead-letter topic (`dlq-truncated`), or they name no original topic.
    pub not_replayable: u64,
    /// Replayed (or, on a dry run, replayable) records per original topic.
    pub by_topic: BTreeMap<String, u64>,
}

/// Header on a replayed record: `<dead-letter topic>/<partition>/<offset>`
/// of the dead letter it came from.
pub const REPLAYED_FROM: &str = "kontext-replayed-from";

/// Scans `topic` and sends what `filter` matches back to its original
/// topics. Blocking: run it off the async runtime's workers.
pub(crate) fn replay_blocking(
    config: &ClientConfig,
    topic: &str,
    filter: &ReplayFilter,
) -> Result<Replayed> {
    let client_err = |role: &'static str| move |source| Error::Client { role, source };
    let mut consumer_config = config.clone();
    consumer_config
        .set(
            "group.id",
            format!("kontext-replay-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = consumer_config.create().map_err(client_err("consumer"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(client_err("consumer"))?;
    // Each partition's end now: records dead-lettered during the replay
    // wait for the next one (a replayed record failing again among them).
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions())
    {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .map_err(client_err("consumer"))?;
        if high > low {
            ends.insert(p.id(), high);
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(client_err("consumer"))?;
        }
    }
    let servers: Arc<str> = Arc::from(config.get("bootstrap.servers").unwrap_or_default());
    let mut out = Replayed::default();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer
        .assign(&assignment)
        .map_err(client_err("consumer"))?;
    let producer: Option<ThreadedProducer<Deliveries>> = if filter.dry_run {
        None
    } else {
        Some(
            config
                .create_with_context(Deliveries::default())
                .map_err(client_err("producer"))?,
        )
    };
    let gap = filter
        .per_second
        .filter(|n| *n > 0)
        .map(|n| Duration::from_secs(1) / n);
    let mut next_send = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "replaying `{topic}`: partitions {:?} not read to their end within 60 s",
                ends.keys().collect::<Vec<_>>()
            )));
        }
        let m = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(topic, error = %e, "dead-letter scan poll error");
                continue;
            }
            None => continue,
        };
        let (partition, offset) = (m.partition(), m.offset());
        let Some(&end) = ends.get(&partition) else {
            continue;
        };
        if offset + 1 >= end {
            ends.remove(&partition);
        }
        if offset >= end {
            continue;
        }
        out.scanned += 1;
        let headers: Vec<(&[u8], Option<&[u8]>)> = RawHeaders::of(&m).collect();
        let header = |name: &[u8]| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| *v)
        };
        fn text(v: Option<&[u8]>) -> Option<std::borrow::Cow<'_, str>> {
            v.map(String::from_utf8_lossy)
        }
        let written_at = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let matches = filter
            .reason
            .as_deref()
            .is_none_or(|r| text(header(REASON)).as_deref() == Some(r))
            && filter.message_type.as_deref().is_none_or(|t| {
                text(header(headers::MESSAGE_TYPE.as_bytes())).as_deref() == Some(t)
            })
            && filter.key.as_deref().is_none_or(|k| m.key() == Some(k))
            && filter
                .from
                .is_none_or(|from| written_at.is_some_and(|w| w >= from))
            && filter
                .until
                .is_none_or(|until| written_at.is_some_and(|w| w < until));
        if !matches {
            continue;
        }
        out.matched += 1;
        let original = match text(header(ORIGINAL_TOPIC)) {
            Some(t) if header(TRUNCATED).is_none() && !t.is_empty() => t.into_owned(),
            _ => {
                out.not_replayable += 1;
                continue;
            }
        };
        let Some(producer) = &producer else {
            *out.by_topic.entry(original).or_default() += 1;
            continue;
        };
        if let Some(gap) = gap {
            let now = Instant::now();
            if next_send > now {
                std::thread::sleep(next_send - now);
            }
            next_send = next_send.max(now) + gap;
        }
        // The record as it was consumed: its own headers, without the
        // dead-letter ones, and where it was replayed from.
        let mut replay_headers = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers.iter().filter(|(n, _)| !n.starts_with(DLQ_PREFIX)) {
            replay_headers = raw_headers::add(replay_headers, name, *value);
        }
        let from = format!("{topic}/{partition}/{offset}");
        replay_headers = raw_headers::add(
            replay_headers,
            REPLAYED_FROM.as_bytes(),
            Some(from.as_bytes()),
        );
        let counted = Box::new((
            Arc::clone(&servers),
            original.clone(),
            text(header(headers::MESSAGE_TYPE.as_bytes())).map(|t| t.into_owned()),
        ));
        let mut record: BaseRecord<'_, [u8], [u8], Counted> =
            BaseRecord::with_opaque_to(&original, counted).headers(replay_headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                    record = back;
                }
                Err((e, _)) => {
                    return Err(Error::Produce {
                        topic: original,
                        source: e,
                    });
                }
            }
        }
        out.replayed += 1;
        *out.by_topic.entry(original).or_default() += 1;
    }
    if let Some(producer) = producer {
        producer
            .flush(Duration::from_secs(30))
            .map_err(|source| Error::Flush { source })?;
        let failed = producer.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = producer
                .context()
                .first_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .unwrap_or_default();
            return Err(Error::Internal(format!(
                "replaying `{topic}`: {failed} of {} records were not delivered (first: {first}); the dead letters stay where they are, replay again",
                out.replayed
            )));
        }
    }
    Ok(out)
}

/// A replayed record's cluster, original topic and type, for the ledger.
type Counted = Box<(Arc<str>, String, Option<String>)>;

/// Counts what the replay's producer could not deliver; counts what it did
/// in the ledger (`telemetry::ledger`), for tracked test sessions.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Counted;

    fn delivery(&self, result: &DeliveryResult<'_>, counted: Counted) {
        match result {
            Ok(_) => {
                if let (servers, topic, Some(message_type)) = &*counted {
                    crate::telemetry::ledger::produced(servers, topic, message_type, 1);
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}
