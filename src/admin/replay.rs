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

use crate::headers::{REPLAYED_FROM, dlq};

/// Which dead letters to replay, and how fast. Every filter left `None`
/// matches all.
#[derive(Clone, Default, PartialEq, Eq)]
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
    /// Who asked for the replay, for the log line and the
    /// `kontext_admin_commands_total` metric (`api` when unnamed).
    pub issued_by: Option<String>,
}

/// Shows a key's length, not its bytes: keys can be personal data, and
/// the filter is logged with every replay.
impl std::fmt::Debug for ReplayFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayFilter")
            .field("reason", &self.reason)
            .field("message_type", &self.message_type)
            .field(
                "key",
                &self.key.as_ref().map(|k| format!("<{} bytes>", k.len())),
            )
            .field("from", &self.from)
            .field("until", &self.until)
            .field("per_second", &self.per_second)
            .field("dry_run", &self.dry_run)
            .field("issued_by", &self.issued_by)
            .finish()
    }
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

    /// Names who asked for the replay (logged and counted).
    pub fn by(mut self, issuer: impl Into<String>) -> Self {
        self.issued_by = Some(issuer.into());
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
    /// dead-letter topic (`dlq-truncated`), or they name no original topic
    /// of the model.
    pub not_replayable: u64,
    /// Replayed (or, on a dry run, replayable) records per original topic.
    pub by_topic: BTreeMap<String, u64>,
}

/// A scan that sees no record and no partition move on for this long
/// gives up (saying how far it got).
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// Scans `topic` of the cluster `servers` and sends what `filter` matches
/// back to its original topics, those of `originals` only. Blocking: run
/// it off the async runtime's workers. Stops, flushing what it handed over,
/// when `stopped` says so.
pub(crate) fn replay_blocking(
    config: &ClientConfig,
    servers: &str,
    topic: &str,
    filter: &ReplayFilter,
    originals: &[String],
    stopped: &dyn Fn() -> bool,
) -> Result<Replayed> {
    let client_err = |role: &'static str| move |source| Error::Client { role, source };
    let (consumer, mut ends) = open_scan(config, topic)?;
    let mut out = Replayed::default();
    if ends.is_empty() {
        return Ok(out);
    }
    let producer: Option<ThreadedProducer<Deliveries>> = if filter.dry_run {
        None
    } else {
        Some(
            config
                .create_with_context(Deliveries::default())
                .map_err(client_err("producer"))?,
        )
    };
    let servers: Arc<str> = Arc::from(servers);
    let scanned = scan(
        &consumer,
        &mut ends,
        (producer.as_ref(), &servers, originals),
        topic,
        filter,
        stopped,
        &mut out,
    );
    // Whatever stopped the scan, what was handed over is delivered (or
    // known to have failed) before this returns.
    let mut cause = scanned.err();
    if let Some(producer) = producer {
        if let Err(e) = producer.flush(Duration::from_secs(30)) {
            cause.get_or_insert(format!("flushing the replayed records: {e}"));
        }
        let failed = producer.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = producer
                .context()
                .first_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .unwrap_or_default();
            out.replayed = out.replayed.saturating_sub(failed);
            cause.get_or_insert(format!(
                "{failed} replayed records were not delivered (first: {first})"
            ));
        }
    }
    match cause {
        None => Ok(out),
        Some(cause) => Err(Error::Replay {
            topic: topic.to_owned(),
            replayed: out.replayed,
            cause,
        }),
    }
}

/// A consumer assigned to every non-empty partition of `topic` from its
/// beginning, and each such partition's end now: records dead-lettered
/// during the replay wait for the next one (a replayed record failing
/// again among them).
fn open_scan(config: &ClientConfig, topic: &str) -> Result<(BaseConsumer, BTreeMap<i32, i64>)> {
    let client_err = |source| Error::Client {
        role: "consumer",
        source,
    };
    let mut consumer_config = config.clone();
    consumer_config
        .set(
            "group.id",
            format!("kontext-replay-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Retention may remove the first records meanwhile.
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = consumer_config.create().map_err(client_err)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(client_err)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(Error::config(format!(
            "no dead-letter topic `{topic}` on the cluster"
        )));
    };
    if let Some(e) = t.error() {
        return Err(Error::config(format!(
            "dead-letter topic `{topic}` cannot be read: {:?}",
            rdkafka::types::RDKafkaErrorCode::from(e)
        )));
    }
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .map_err(client_err)?;
        if high > low {
            ends.insert(p.id(), high);
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(client_err)?;
        }
    }
    if !ends.is_empty() {
        consumer.assign(&assignment).map_err(client_err)?;
    }
    Ok((consumer, ends))
}

/// Reads until every partition passed its end, replaying what matches.
/// `Err` says why it stopped early.
fn scan(
    consumer: &BaseConsumer,
    ends: &mut BTreeMap<i32, i64>,
    (producer, servers, originals): (Option<&ThreadedProducer<Deliveries>>, &Arc<str>, &[String]),
    topic: &str,
    filter: &ReplayFilter,
    stopped: &dyn Fn() -> bool,
    out: &mut Replayed,
) -> std::result::Result<(), String> {
    let gap = filter
        .per_second
        .filter(|n| *n > 0)
        .map(|n| Duration::from_secs(1) / n);
    let mut next_send = Instant::now();
    let mut progress = Instant::now();
    let mut since_position = 0u32;
    while !ends.is_empty() {
        if stopped() {
            return Err("stopped: its caller went away, or kontext is shutting down".into());
        }
        if progress.elapsed() > IDLE_LIMIT {
            return Err(format!(
                "partitions {:?} made no progress for {IDLE_LIMIT:?}",
                ends.keys().collect::<Vec<_>>()
            ));
        }
        let polled = consumer.poll(Duration::from_millis(100));
        since_position += 1;
        let m = match polled {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                use rdkafka::types::RDKafkaErrorCode as Code;
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        Code::TopicAuthorizationFailed
                            | Code::GroupAuthorizationFailed
                            | Code::ClusterAuthorizationFailed
                            | Code::UnknownTopicOrPartition
                            | Code::UnknownTopic
                    )
                ) {
                    return Err(format!("reading the dead-letter topic failed: {e}"));
                }
                tracing::warn!(topic, error = %e, "dead-letter scan: poll error (retried)");
                continue;
            }
            None => {
                passed_ends(consumer, topic, ends, &mut progress);
                since_position = 0;
                continue;
            }
        };
        progress = Instant::now();
        // Transaction markers and compacted offsets are never delivered:
        // the consumer's position says when a partition is read through.
        if since_position >= 256 {
            passed_ends(consumer, topic, ends, &mut progress);
            since_position = 0;
        }
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
        let text = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
        let written_at = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let message_type = text(header(headers::MESSAGE_TYPE.as_bytes()));
        if !filter.matches(
            text(header(dlq::REASON.as_bytes())).as_deref(),
            message_type.as_deref(),
            m.key(),
            written_at,
        ) {
            continue;
        }
        out.matched += 1;
        let original = match text(header(dlq::ORIGINAL_TOPIC.as_bytes())) {
            Some(t) if header(dlq::TRUNCATED.as_bytes()).is_none() && originals.contains(&t) => t,
            _ => {
                out.not_replayable += 1;
                continue;
            }
        };
        let Some(producer) = producer else {
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
        // dead-letter ones (and an earlier replay's mark), and where this
        // replay comes from.
        let mut replay_headers = OwnedHeaders::new_with_capacity(headers.len() + 1);
        for (name, value) in headers.iter().filter(|(n, _)| {
            !n.starts_with(dlq::PREFIX.as_bytes()) && *n != REPLAYED_FROM.as_bytes()
        }) {
            replay_headers = raw_headers::add(replay_headers, name, *value);
        }
        let from = format!("{topic}/{partition}/{offset}");
        replay_headers = raw_headers::add(
            replay_headers,
            REPLAYED_FROM.as_bytes(),
            Some(from.as_bytes()),
        );
        let counted = Box::new((Arc::clone(servers), original.clone(), message_type));
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
                Err((e, _)) => return Err(format!("sending to `{original}` failed: {e}")),
            }
        }
        progress = Instant::now();
        out.replayed += 1;
        *out.by_topic.entry(original).or_default() += 1;
    }
    Ok(())
}

/// Drops the partitions the consumer has read past their end.
fn passed_ends(
    consumer: &BaseConsumer,
    topic: &str,
    ends: &mut BTreeMap<i32, i64>,
    progress: &mut Instant,
) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for e in positions.elements_for_topic(topic) {
        if let Offset::Offset(position) = e.offset()
            && ends.get(&e.partition()).is_some_and(|end| position >= *end)
        {
            ends.remove(&e.partition());
            *progress = Instant::now();
        }
    }
}

impl ReplayFilter {
    /// Whether a dead letter with this reason, type, key and write time is
    /// one to replay.
    fn matches(
        &self,
        reason: Option<&str>,
        message_type: Option<&str>,
        key: Option<&[u8]>,
        written_at: Option<SystemTime>,
    ) -> bool {
        self.reason.as_deref().is_none_or(|r| reason == Some(r))
            && self
                .message_type
                .as_deref()
                .is_none_or(|t| message_type == Some(t))
            && self.key.as_deref().is_none_or(|k| key == Some(k))
            && self
                .from
                .is_none_or(|from| written_at.is_some_and(|w| w >= from))
            && self
                .until
                .is_none_or(|until| written_at.is_some_and(|w| w < until))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_matches_reason_type_key_and_time_range() {
        let t = |s: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let all = ReplayFilter::all();
        assert!(all.matches(None, None, None, None));
        let f = ReplayFilter::all()
            .reason("handler")
            .message_type("OrderPlaced")
            .key(b"k1".to_vec())
            .between(
                SystemTime::UNIX_EPOCH + Duration::from_secs(10),
                SystemTime::UNIX_EPOCH + Duration::from_secs(20),
            );
        let ok = (
            Some("handler"),
            Some("OrderPlaced"),
            Some(&b"k1"[..]),
            t(10),
        );
        assert!(f.matches(ok.0, ok.1, ok.2, ok.3));
        assert!(!f.matches(Some("decode"), ok.1, ok.2, ok.3), "reason");
        assert!(!f.matches(ok.0, Some("Other"), ok.2, ok.3), "type");
        assert!(!f.matches(ok.0, None, ok.2, ok.3), "no type");
        assert!(!f.matches(ok.0, ok.1, Some(&b"k2"[..]), ok.3), "key");
        assert!(!f.matches(ok.0, ok.1, None, ok.3), "keyless");
        assert!(!f.matches(ok.0, ok.1, ok.2, t(9)), "before the range");
        assert!(
            !f.matches(ok.0, ok.1, ok.2, t(20)),
            "the range's end is out"
        );
        assert!(!f.matches(ok.0, ok.1, ok.2, None), "no timestamp");
    }

    #[test]
    fn a_logged_filter_shows_no_key_bytes() {
        let shown = format!(
            "{:?}",
            ReplayFilter::all().key(b"alice@example.com".to_vec())
        );
        assert!(!shown.contains("alice"), "{shown}");
        assert!(shown.contains("<17 bytes>"), "{shown}");
    }
}
