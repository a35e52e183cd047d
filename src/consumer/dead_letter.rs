//! Publishing messages that cannot be handled to a dead-letter topic, with
//! the original key, payload and headers plus headers that say where the
//! message came from and why it failed.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::TracingContext;
use crate::client::raw_headers;
use crate::client::{ClientGuard, ClientKind, ClientTracker};
use crate::config::KafkaSettings;
use crate::consumer::context::Record;
use crate::error::{Error, Result};
use crate::headers::HeaderList as _;

/// Header names on dead-lettered records (defined with the other
/// standard headers, which the dead-letter replay reads too).
pub use crate::headers::dlq as dlq_headers;

/// Why a message could not be handled: the `dlq-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureReason {
    /// The payload does not decode as the type.
    Decode,
    /// Its `ce_type` names no type of the topic.
    UnknownType,
    /// No `ce_type`, and several types share the topic.
    MissingType,
    /// No payload.
    Tombstone,
    /// A type of the model this group neither consumes nor leaves to another.
    NotConsumed,
    /// The handler asked for it (`HandlerError` with `Action::DeadLetter`).
    Handler,
    /// The handler panicked, on its last attempt.
    Panic,
    /// The handler overran its time limit, on its last attempt.
    Timeout,
    /// The handler failed on every attempt.
    RetriesExhausted,
    /// A header name is not UTF-8.
    BadHeader,
}

impl FailureReason {
    /// How many reasons there are.
    pub(crate) const COUNT: usize = 10;
    /// Every reason, in `index` order.
    pub(crate) const ALL: [FailureReason; Self::COUNT] = [
        FailureReason::Decode,
        FailureReason::UnknownType,
        FailureReason::MissingType,
        FailureReason::Tombstone,
        FailureReason::NotConsumed,
        FailureReason::Handler,
        FailureReason::Panic,
        FailureReason::Timeout,
        FailureReason::RetriesExhausted,
        FailureReason::BadHeader,
    ];

    /// Its place in [`FailureReason::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The header value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailureReason::Decode => "decode",
            FailureReason::UnknownType => "unknown-type",
            FailureReason::MissingType => "missing-type",
            FailureReason::Tombstone => "tombstone",
            FailureReason::NotConsumed => "not-consumed",
            FailureReason::Handler => "handler",
            FailureReason::Panic => "panic",
            FailureReason::Timeout => "timeout",
            FailureReason::RetriesExhausted => "retries-exhausted",
            FailureReason::BadHeader => "bad-header",
        }
    }
}

/// A failure to record on a dead-lettered message.
pub(crate) struct Failure {
    pub(crate) reason: FailureReason,
    pub(crate) error: String,
    pub(crate) attempts: u32,
}

/// The dead-letter producer of a consumer runtime.
///
/// Created on the first dead letter, not at start: most services never
/// dead-letter, and an idle librdkafka producer is not free (a connection,
/// threads, and its polling thread wakes every 100 ms, measured at about 1%
/// of a core). Its settings are checked at start all the same.
pub(crate) struct DeadLetters {
    config: ClientConfig,
    clients: ClientTracker,
    producer: OnceLock<(FutureProducer<TracingContext>, ClientGuard)>,
    /// One creation at a time.
    creating: Mutex<()>,
}

const ROLE: &str = "dead-letter producer";

/// `message.max.bytes` of the dead-letter producer: librdkafka's default
/// `fetch.max.bytes`, the most a consumer takes in one fetch.
const DEAD_LETTER_MAX_BYTES: usize = 52_428_800;

/// What is kept of a payload the broker refused for its size.
const TRUNCATED_PAYLOAD_BYTES: usize = 16 * 1024;

/// What became of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// On the dead-letter topic.
    Published,
    /// Refused for good (topic missing, not authorized, too large even cut
    /// down) after [`REFUSED_ATTEMPTS`] attempts: the record is given up on,
    /// counted and logged with its coordinates, so its lane moves on.
    Refused,
    /// Stopped by a shutdown before it was sent: not acknowledged.
    Cancelled,
}

/// Attempts at a dead letter the broker refuses for good before giving up:
/// a few, with pauses of 0.1-0.4 s, in case the topic is being created.
const REFUSED_ATTEMPTS: u32 = 4;

/// Whether the broker refused the record in a way sending it again will not
/// change: the topic does not exist (and may not be created), or this
/// client may not write to it.
fn refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// Whether the broker (or the local producer) refused a record for its size:
/// sending it again unchanged can never succeed.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

impl DeadLetters {
    pub(crate) fn new(
        settings: &KafkaSettings,
        bootstrap_servers: &str,
        clients: &ClientTracker,
    ) -> Result<DeadLetters> {
        let mut config = settings.producer_config(bootstrap_servers);
        // Whatever a consumer can receive must fit: librdkafka's default
        // (1 MB) is below what consumers fetch (`fetch.max.bytes`, 50 MB),
        // and a dead letter that cannot be sent would stall its lane.
        if config.get("message.max.bytes").is_none() {
            config.set("message.max.bytes", DEAD_LETTER_MAX_BYTES.to_string());
        }
        // A topic that does not exist fails its messages after this long
        // (librdkafka's default is 30 s) rather than stalling the lane that
        // much per attempt.
        if config.get("topic.metadata.propagation.max.ms").is_none() {
            config.set("topic.metadata.propagation.max.ms", "5000");
        }
        // Rejects unknown properties and bad values now, without a client.
        config
            .create_native_config()
            .map_err(|source| Error::Client { role: ROLE, source })?;
        Ok(DeadLetters {
            config,
            clients: clients.clone(),
            producer: OnceLock::new(),
            creating: Mutex::new(()),
        })
    }

    /// The producer, created on first use.
    fn producer(&self) -> Result<&FutureProducer<TracingContext>> {
        if let Some((p, _)) = self.producer.get() {
            return Ok(p);
        }
        let _one = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, _)) = self.producer.get() {
            return Ok(p);
        }
        let created: FutureProducer<TracingContext> = self
            .config
            .create_with_context(TracingContext::new(ROLE))
            .map_err(|source| Error::Client { role: ROLE, source })?;
        let (p, _) = self
            .producer
            .get_or_init(|| (created, self.clients.track(ClientKind::Producer)));
        Ok(p)
    }

    /// Publishes `record` to `topic`, retrying with backoff until the broker
    /// takes it, refuses it for good ([`Sent::Refused`]) or `cancel` fires.
    /// A record that was not published, nor given up on, must not be
    /// acknowledged.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        group: &str,
        source: &str,
        record: &Record,
        failure: &Failure,
        cancel: &CancellationToken,
    ) -> Sent {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failures = 0u32;
        // Set once the broker refused the full record for its size.
        let mut truncated: Option<String> = None;
        let mut refused = 0;
        loop {
            let partition = record.partition.to_string();
            let offset = record.offset.to_string();
            let attempts = failure.attempts.to_string();
            let failed_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            let mut headers = OwnedHeaders::new();
            for (name, value) in record.headers() {
                // The original's names as they were; one that is not UTF-8
                // (the `bad-header` reason) is copied as its bytes.
                headers = raw_headers::add(headers, name, value);
            }
            for (key, value) in [
                (dlq_headers::ORIGINAL_TOPIC, source),
                (dlq_headers::ORIGINAL_PARTITION, partition.as_str()),
                (dlq_headers::ORIGINAL_OFFSET, offset.as_str()),
                (dlq_headers::REASON, failure.reason.as_str()),
                (dlq_headers::ERROR, failure.error.as_str()),
                (dlq_headers::ATTEMPTS, attempts.as_str()),
                (dlq_headers::FAILED_AT, failed_at.as_str()),
                (dlq_headers::GROUP, group),
            ] {
                headers = headers.with(key, value);
            }
            if let Some(t) = &truncated {
                headers = headers.with(dlq_headers::TRUNCATED, t);
            }
            let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(k) = record.key() {
                out = out.key(k);
            }
            if let Some(p) = record.payload() {
                let kept = if truncated.is_some() {
                    &p[..p.len().min(TRUNCATED_PAYLOAD_BYTES)]
                } else {
                    p
                };
                out = out.payload(kept);
            }
            let sent = match self.producer() {
                Ok(producer) => tokio::select! {
                    r = producer.send(out, Duration::from_secs(5)) => r.map_err(|(e, _)| (too_large(&e), refused_for_good(&e), e.to_string())),
                    () = cancel.cancelled() => return Sent::Cancelled,
                },
                Err(e) => Err((false, false, e.to_string())),
            };
            match sent {
                Ok(_) => {
                    tracing::warn!(
                        dead_letter_topic = topic,
                        source,
                        record = ?record,
                        reason = failure.reason.as_str(),
                        error = %failure.error,
                        "message dead-lettered"
                    );
                    return Sent::Published;
                }
                Err((true, _, e)) if truncated.is_none() => {
                    let size = record.payload().map_or(0, <[u8]>::len);
                    tracing::error!(dead_letter_topic = topic, source, record = ?record, error = %e, size, "dead letter refused for its size; sending it with its payload cut");
                    truncated = Some(format!("{}/{size}", size.min(TRUNCATED_PAYLOAD_BYTES)));
                }
                Err((_, for_good, e)) => {
                    if for_good {
                        refused += 1;
                        if refused >= REFUSED_ATTEMPTS {
                            tracing::error!(dead_letter_topic = topic, source, record = ?record, reason = failure.reason.as_str(), error = %e, attempts = refused, "dead letter refused for good; the record is given up on (still at its source topic, partition and offset)");
                            return Sent::Refused;
                        }
                    }
                    tracing::error!(dead_letter_topic = topic, source, record = ?record, error = %e, "dead-letter publish failed; retrying");
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff.delay(failures)) => {}
                        () = cancel.cancelled() => return Sent::Cancelled,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FailureReason;

    #[test]
    fn every_reason_sits_at_its_index() {
        for (i, reason) in FailureReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{}", reason.as_str());
        }
    }
}
