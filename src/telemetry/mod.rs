//! The metrics kontext reports through the `metrics` facade: their names,
//! labels and descriptions. The application installs a recorder (before
//! `start()`, so the handles kontext registers reach it) and chooses the
//! exporter; without one every metric is a no-op.
//!
//! Labels are bounded by the model: topic, type, group, service and, for
//! consumer lag, partition. Never a key or a message id.

pub(crate) mod ledger;
pub mod trace;

use std::sync::atomic::{AtomicBool, Ordering};

use metrics::{Counter, Gauge, Histogram, Unit};

/// Messages a producer had acknowledged.
pub const PRODUCED: &str = "kontext_produced_total";
/// Messages a producer could not deliver.
pub const PRODUCE_ERRORS: &str = "kontext_produce_errors_total";
/// Kafka transactions ended, by `outcome`: `committed`, `aborted`,
/// `fenced`, `failed` (a fatal client error), `in_doubt` (a commit not
/// confirmed in time).
pub const TRANSACTIONS: &str = "kontext_transactions_total";
/// Enqueue to acknowledgement, per message.
pub const PRODUCE_LATENCY: &str = "kontext_produce_latency_seconds";
/// Records that reached a type's buffer (dropped ones included).
pub const CONSUMED: &str = "kontext_consumed_total";
/// Records handled (or deliberately skipped by the handler).
pub const HANDLED: &str = "kontext_handled_total";
/// Failed handler attempts.
pub const FAILED: &str = "kontext_failed_total";
/// Retries scheduled.
pub const RETRIED: &str = "kontext_retried_total";
/// Records dead-lettered.
pub const DEAD_LETTERED: &str = "kontext_dead_lettered_total";
/// Records dropped by a drop mode.
pub const DROPPED: &str = "kontext_dropped_total";
/// Records of types this group does not consume, committed unhandled.
pub const SKIPPED: &str = "kontext_skipped_total";
/// Records no type could take, dead-lettered (tombstones, unknown types).
pub const REJECTED: &str = "kontext_rejected_total";
/// Redelivered records the inbox acknowledged without handling.
pub const INBOX_DUPLICATES: &str = "kontext_inbox_duplicates_total";
/// One handler invocation.
pub const HANDLER_DURATION: &str = "kontext_handler_duration_seconds";
/// Record timestamp to handled.
pub const END_TO_END: &str = "kontext_end_to_end_latency_seconds";
/// Records in a topic's buffer, waiting or being handled.
pub const BUFFERED: &str = "kontext_buffered";
/// Partitions a poll service has paused.
pub const PAUSED_PARTITIONS: &str = "kontext_paused_partitions";
/// Records of a partition after the last one stored for commit.
pub const CONSUMER_LAG: &str = "kontext_consumer_lag";
/// Outbox rows the relay (or an immediate commit) sent.
pub const OUTBOX_PUBLISHED: &str = "kontext_outbox_published_total";
/// Outbox send attempts that failed.
pub const OUTBOX_FAILED: &str = "kontext_outbox_failed_total";
/// Outbox rows waiting to be sent.
pub const OUTBOX_BACKLOG: &str = "kontext_outbox_backlog";
/// Age of the oldest outbox row waiting to be sent.
pub const OUTBOX_OLDEST_AGE: &str = "kontext_outbox_oldest_age_seconds";
/// Outbox rows that used up their attempts.
pub const OUTBOX_FAILED_ROWS: &str = "kontext_outbox_failed_rows";
/// Operator commands (pause, resume, seek, replay, outbox retry and
/// discard), by command and by who issued them.
pub const ADMIN_COMMANDS: &str = "kontext_admin_commands_total";

/// Describes every metric to the recorder once (units and help texts).
pub(crate) fn describe() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::AcqRel) {
        return;
    }
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PRODUCED, "Messages a producer had acknowledged");
    describe_counter!(PRODUCE_ERRORS, "Messages a producer could not deliver");
    describe_histogram!(PRODUCE_LATENCY, Unit::Seconds, "Enqueue to acknowledgement");
    describe_counter!(CONSUMED, "Records that reached a type's buffer");
    describe_counter!(HANDLED, "Records handled");
    describe_counter!(FAILED, "Failed handler attempts");
    describe_counter!(RETRIED, "Retries scheduled");
    describe_counter!(DEAD_LETTERED, "Records dead-lettered");
    describe_counter!(DROPPED, "Records dropped by a drop mode");
    describe_counter!(SKIPPED, "Records of types this group does not consume");
    describe_counter!(REJECTED, "Records no type could take, dead-lettered");
    describe_counter!(
        INBOX_DUPLICATES,
        "Redelivered records the inbox acknowledged"
    );
    describe_histogram!(HANDLER_DURATION, Unit::Seconds, "One handler invocation");
    describe_histogram!(END_TO_END, Unit::Seconds, "Record timestamp to handled");
    describe_gauge!(BUFFERED, "Records in a topic's buffer");
    describe_gauge!(PAUSED_PARTITIONS, "Partitions a poll service has paused");
    describe_gauge!(
        CONSUMER_LAG,
        "Records of a partition after the last one stored for commit"
    );
    describe_counter!(TRANSACTIONS, "Kafka transactions ended, by outcome");
    describe_counter!(OUTBOX_PUBLISHED, "Outbox rows sent");
    describe_counter!(OUTBOX_FAILED, "Outbox send attempts that failed");
    describe_gauge!(OUTBOX_BACKLOG, "Outbox rows waiting to be sent");
    describe_gauge!(
        OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest waiting outbox row"
    );
    describe_gauge!(
        OUTBOX_FAILED_ROWS,
        "Outbox rows that used up their attempts"
    );
    describe_counter!(ADMIN_COMMANDS, "Operator commands, by command and issuer");
}

/// The counters of one consumed type, set from its statistics.
pub(crate) struct TypeCounters {
    pub(crate) consumed: Counter,
    pub(crate) handled: Counter,
    pub(crate) failed: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) dropped: Counter,
    pub(crate) duplicates: Counter,
}

/// The per-record measures of one consumed type.
#[derive(Clone)]
pub(crate) struct TypeTimings {
    pub(crate) handler: Histogram,
    pub(crate) end_to_end: Histogram,
}

/// The labels of a consumed type.
pub(crate) fn type_labels(
    topic: &str,
    rust_type: &str,
    group: &str,
    service: &str,
) -> Vec<metrics::Label> {
    vec![
        metrics::Label::new("topic", topic.to_owned()),
        metrics::Label::new("type", rust_type.to_owned()),
        metrics::Label::new("group", group.to_owned()),
        metrics::Label::new("service", service.to_owned()),
    ]
}

impl TypeCounters {
    pub(crate) fn new(labels: &[metrics::Label]) -> TypeCounters {
        let c = |name: &'static str| metrics::counter!(name, labels.iter());
        TypeCounters {
            consumed: c(CONSUMED),
            handled: c(HANDLED),
            failed: c(FAILED),
            retried: c(RETRIED),
            dead_lettered: c(DEAD_LETTERED),
            dropped: c(DROPPED),
            duplicates: c(INBOX_DUPLICATES),
        }
    }
}

impl TypeTimings {
    pub(crate) fn new(labels: &[metrics::Label]) -> TypeTimings {
        TypeTimings {
            handler: metrics::histogram!(HANDLER_DURATION, labels.iter()),
            end_to_end: metrics::histogram!(END_TO_END, labels.iter()),
        }
    }
}

/// A poll service's own measures.
pub(crate) struct ServiceMetrics {
    pub(crate) skipped: Counter,
    pub(crate) rejected: Counter,
    pub(crate) paused: Gauge,
}

impl ServiceMetrics {
    pub(crate) fn new(group: &str, service: &str) -> ServiceMetrics {
        let labels = [
            metrics::Label::new("group", group.to_owned()),
            metrics::Label::new("service", service.to_owned()),
        ];
        ServiceMetrics {
            skipped: metrics::counter!(SKIPPED, labels.iter()),
            rejected: metrics::counter!(REJECTED, labels.iter()),
            paused: metrics::gauge!(PAUSED_PARTITIONS, labels.iter()),
        }
    }
}

/// A topic's buffer gauge in a poll service.
pub(crate) fn buffered(topic: &str, service: &str) -> Gauge {
    metrics::gauge!(BUFFERED, "topic" => topic.to_owned(), "service" => service.to_owned())
}

/// A partition's lag gauge.
pub(crate) fn consumer_lag(topic: &str, partition: i32, group: &str) -> Gauge {
    metrics::gauge!(
        CONSUMER_LAG,
        "topic" => topic.to_owned(),
        "partition" => partition.to_string(),
        "group" => group.to_owned()
    )
}

/// A produced type's measures.
#[derive(Clone)]
pub(crate) struct ProduceMetrics {
    pub(crate) produced: Counter,
    pub(crate) errors: Counter,
    pub(crate) latency: Histogram,
    /// The process-wide count of this (topic, type), for tracked tests.
    pub(crate) tally: std::sync::Arc<ledger::Tally>,
    /// Whether a delivery counts in `tally` (a transaction's records
    /// count when it commits instead).
    pub(crate) tally_on_delivery: bool,
}

impl ProduceMetrics {
    /// The measures of `rust_type` (its `ce_type`) on `topic` of the
    /// cluster `servers`.
    pub(crate) fn new(servers: &str, topic: &str, rust_type: &str) -> ProduceMetrics {
        let labels = [
            metrics::Label::new("topic", topic.to_owned()),
            metrics::Label::new("type", rust_type.to_owned()),
        ];
        ProduceMetrics {
            produced: metrics::counter!(PRODUCED, labels.iter()),
            errors: metrics::counter!(PRODUCE_ERRORS, labels.iter()),
            latency: metrics::histogram!(PRODUCE_LATENCY, labels.iter()),
            tally: ledger::tally(servers, topic, rust_type),
            tally_on_delivery: true,
        }
    }
}

/// The outbox's counters for one topic.
pub(crate) fn outbox_published(topic: &str) -> Counter {
    metrics::counter!(OUTBOX_PUBLISHED, "topic" => topic.to_owned())
}

pub(crate) fn outbox_failed(topic: &str) -> Counter {
    metrics::counter!(OUTBOX_FAILED, "topic" => topic.to_owned())
}

/// Counts one operator command.
pub(crate) fn admin_command(command: &'static str, issuer: &str) {
    metrics::counter!(ADMIN_COMMANDS, "command" => command, "issuer" => issuer.to_owned())
        .increment(1);
}
