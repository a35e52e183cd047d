//! The standard headers kontext writes on every message.
//!
//! They follow the CloudEvents Kafka protocol binding (binary content mode),
//! so any CloudEvents-aware consumer, in any language, can read the id, type,
//! source and time of a kontext message without knowing kontext. A type may
//! choose the [lean](HeaderProfile::Lean) set instead, for topics where the
//! headers would cost more than the event.

/// CloudEvents spec version; always `1.0`.
pub const SPEC_VERSION: &str = "ce_specversion";
/// Unique message id: a UUID v7, so ids sort by creation time.
pub const MESSAGE_ID: &str = "ce_id";
/// Type discriminator; tells apart types sharing one topic.
pub const MESSAGE_TYPE: &str = "ce_type";
/// The producing service: the client id.
pub const SOURCE: &str = "ce_source";
/// When the message was produced, RFC 3339 with milliseconds, UTC.
pub const TIME: &str = "ce_time";
/// Correlation id, when the caller gives one (a CloudEvents extension attribute).
pub const CORRELATION_ID: &str = "ce_correlationid";
/// Media type of the payload, from the topic's codec.
pub const CONTENT_TYPE: &str = "content-type";

/// Header names on dead-lettered records (`consumer::dlq_headers`).
pub mod dlq {
    /// Prefix of every dead-letter header.
    pub const PREFIX: &str = "dlq-";
    /// Topic the message was consumed from.
    pub const ORIGINAL_TOPIC: &str = "dlq-original-topic";
    /// Its partition.
    pub const ORIGINAL_PARTITION: &str = "dlq-original-partition";
    /// Its offset.
    pub const ORIGINAL_OFFSET: &str = "dlq-original-offset";
    /// What went wrong: `decode`, `unknown-type`, `missing-type`, `tombstone`,
    /// `not-consumed`, `handler`, `panic`, `timeout`, `retries-exhausted`.
    pub const REASON: &str = "dlq-reason";
    /// The error text.
    pub const ERROR: &str = "dlq-error";
    /// Handler attempts made (0 if the handler never ran).
    pub const ATTEMPTS: &str = "dlq-attempts";
    /// When it was dead-lettered, RFC 3339 UTC.
    pub const FAILED_AT: &str = "dlq-failed-at";
    /// The consumer group that gave up on it.
    pub const GROUP: &str = "dlq-group";
    /// Set when the broker refused the record for its size and the payload
    /// was cut: `kept/original` bytes (the original is still at its
    /// topic, partition and offset while retention keeps it).
    pub const TRUNCATED: &str = "dlq-truncated";
}

/// On a record a dead-letter replay sent back to its topic:
/// `<dead-letter topic>/<partition>/<offset>` of the dead letter it came
/// from.
pub const REPLAYED_FROM: &str = "kontext-replayed-from";

/// Value of [`SPEC_VERSION`].
pub const SPEC_VERSION_VALUE: &str = "1.0";

/// Headers kontext owns; user headers with these names are rejected so a
/// message can never carry two ids or two types.
/// (The list lives in `kontext-names`, which the derive shares, so both
/// refuse the same names.)
pub const RESERVED: &[&str] = kontext_names::RESERVED_HEADERS;

/// Which of the standard headers a type's messages carry; set per type with
/// [`TopicBuilder::header_profile`](crate::TopicBuilder::header_profile).
///
/// Consumers read both: a record without the optional headers is handled
/// the same way, its context's missing fields empty. Per-call and declared
/// headers, the correlation id and trace context are written in both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HeaderProfile {
    /// The CloudEvents binary-mode set: [`SPEC_VERSION`], [`MESSAGE_ID`],
    /// [`MESSAGE_TYPE`], [`SOURCE`], [`TIME`] and [`CONTENT_TYPE`].
    #[default]
    CloudEvents,
    /// Only what kontext needs to route and de-duplicate: [`MESSAGE_ID`]
    /// and [`MESSAGE_TYPE`]. The record's Kafka timestamp still says when
    /// it was produced.
    Lean,
}

/// A header list being built, one pair at a time: librdkafka's list when
/// producing, dead-lettering or relaying, a plain list for an outbox row.
/// Every header kontext writes goes through it.
pub(crate) trait HeaderList: Sized {
    fn with(self, key: &str, value: &str) -> Self;
}

impl HeaderList for rdkafka::message::OwnedHeaders {
    fn with(self, key: &str, value: &str) -> Self {
        self.insert(rdkafka::message::Header {
            key,
            value: Some(value),
        })
    }
}

impl HeaderList for Vec<(String, String)> {
    fn with(mut self, key: &str, value: &str) -> Self {
        self.push((key.to_owned(), value.to_owned()));
        self
    }
}
