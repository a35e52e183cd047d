//! How a type is consumed: group, buffer, backpressure, retries, dead
//! letters, and optionally a dedicated poll service of its own.

use std::time::Duration;

use crate::config::{ConsumerSettings, OffsetReset};
use crate::model::inbox::{InboxBuilder, InboxSpec};

/// What a poll service does when a type's buffer is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backpressure {
    /// Stop taking the type's records until its buffer drains to the low
    /// mark (half the buffer). Nothing is dropped. If other topics of the
    /// poll service still flow, the type's partitions are paused and polling
    /// goes on; if every lane is full, the poll thread waits for room
    /// (bounded, so the group membership stays alive) rather than pausing,
    /// which would make librdkafka discard and refetch its prefetched
    /// records. The default.
    #[default]
    Apply,
    /// Discard the oldest buffered message to make room. Counted and logged;
    /// the discarded message's offset is committed as if it was handled.
    DropOldest,
    /// Discard the incoming message. Counted and logged; its offset is
    /// committed as if it was handled.
    DropNewest,
}

/// In-process retries of a failing handler, with exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included. Defaults to 3.
    pub max_attempts: u32,
    /// Pause before the second attempt. Defaults to 100 ms.
    pub initial_backoff: Duration,
    /// Longest pause between attempts. Defaults to 10 s.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries: the first failure dead-letters.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The pause after failed attempt `attempt` (1-based): doubles each time,
    /// capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        crate::backoff::Backoff::new(self.initial_backoff, self.max_backoff).delay(attempt)
    }
}

/// Which records of a lane may be handled at the same time when the lane has
/// [workers](ConsumerBuilder::workers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Distribution {
    /// Records with the same key run one at a time, in their partition's
    /// order; different keys run in parallel. Records without a key are
    /// ordered by partition. The default.
    #[default]
    ByKey,
    /// A partition's records run one at a time, in order; partitions run in
    /// parallel.
    ByPartition,
    /// No order: any record may run beside any other. For handlers that do
    /// not care which of two messages lands first.
    Free,
}

/// How many handler invocations of a lane may run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSpec {
    /// Fewest workers (the start value).
    pub min: usize,
    /// Most workers.
    pub max: usize,
    /// Records waiting in the lane above which the count grows (`None`: a
    /// fixed pool of `max`).
    pub lag_threshold: Option<usize>,
    /// Which records may run together.
    pub distribution: Distribution,
}

impl WorkerSpec {
    /// The size a pool starts at: `min` when it follows the lag.
    pub fn initial(&self) -> usize {
        let n = if self.lag_threshold.is_some() {
            self.min
        } else {
            self.max
        };
        n.max(1)
    }

    /// A fixed pool of `n`.
    pub fn fixed(n: usize) -> Self {
        WorkerSpec {
            min: n,
            max: n,
            lag_threshold: None,
            distribution: Distribution::default(),
        }
    }
}

/// Default buffer size per type.
pub const DEFAULT_MAX_BUFFERED: usize = 1_000;

/// Declares how a type is consumed; obtained in
/// [`TopicBuilder::consumer`](crate::TopicBuilder::consumer).
#[derive(Debug, Clone, Default)]
pub struct ConsumerBuilder {
    pub(crate) spec: ConsumerSpec,
}

/// The frozen consumer declaration of a type.
#[derive(Debug, Clone, Default)]
pub struct ConsumerSpec {
    pub(crate) group: Option<String>,
    pub(crate) max_buffered: Option<usize>,
    pub(crate) backpressure: Option<Backpressure>,
    pub(crate) auto_offset_reset: Option<OffsetReset>,
    pub(crate) retry: RetryPolicy,
    pub(crate) handler_timeout: Option<Duration>,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) dedicated: Option<DedicatedSpec>,
    pub(crate) inbox: Option<InboxSpec>,
    pub(crate) workers: Option<WorkerSpec>,
}

impl ConsumerBuilder {
    /// The consumer group, e.g. `identity-api-shipmentcreated-consumer`.
    /// Defaults to the topic's `group` in the settings, then to
    /// `consumer.group_id`, then to the client id. Types on the shared poll
    /// service with different groups get one shared poll service per group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.spec.group = Some(group.into());
        self
    }

    /// Most messages of this type between the poll loop and the end of
    /// their handling: waiting in the buffer or being handled. When it is
    /// reached the backpressure mode applies. Defaults to 1000.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.spec.max_buffered = Some(n);
        self
    }

    /// What happens when the buffer is full. Defaults to [`Backpressure::Apply`].
    pub fn backpressure(mut self, mode: Backpressure) -> Self {
        self.spec.backpressure = Some(mode);
        self
    }

    /// Where a new group starts. Types sharing a poll service must agree.
    pub fn auto_offset_reset(mut self, reset: OffsetReset) -> Self {
        self.spec.auto_offset_reset = Some(reset);
        self
    }

    /// Retries of a failing handler. Defaults to [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.spec.retry = policy;
        self
    }

    /// Longest one handler invocation may run. An invocation that overruns
    /// is cancelled (its future dropped, its transaction rolled back) and
    /// counts as a failed attempt (`dlq-reason: timeout` once retries are
    /// used up), so a handler that hangs cannot hold its partition. Off by
    /// default: a handler's own time limits (HTTP, database) know best.
    pub fn handler_timeout(mut self, limit: Duration) -> Self {
        self.spec.handler_timeout = Some(limit);
        self
    }

    /// Dead-letter topic for messages that cannot be handled. Defaults to
    /// `consumer.dead_letter_topic` in the settings, then to `<topic>.dlq`.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.spec.dead_letter_topic = Some(topic.into());
        self
    }

    /// De-duplicates this type with the inbox: a message already processed
    /// is acknowledged without running the handler again. Needs a
    /// transactional handler, whose transaction the inbox row joins.
    pub fn inbox(mut self, f: impl FnOnce(InboxBuilder) -> InboxBuilder) -> Self {
        self.spec.inbox = Some(f(InboxBuilder::default()).build());
        self
    }

    /// Runs up to `n` handler invocations of this type's topic at once, in
    /// the [`Distribution`] chosen (by key unless told otherwise). Each
    /// partition then proceeds on its own: a record waiting to be retried
    /// holds back only the later records of its key (or partition), and the
    /// stored offset of a partition never passes a record that is not
    /// finished. Without it, the topic's records are handled one at a time
    /// in delivery order (the cheapest path, for fast handlers).
    ///
    /// The invocations run concurrently on the lane's task: for handlers
    /// that wait (a database, an HTTP call). CPU-heavy work belongs in
    /// `tokio::task::spawn_blocking`.
    pub fn workers(mut self, n: usize) -> Self {
        let distribution = self.distribution_or_default();
        self.spec.workers = Some(WorkerSpec {
            distribution,
            ..WorkerSpec::fixed(n)
        });
        self
    }

    /// A worker pool that follows the lane's lag (records waiting to
    /// start): every second it doubles, up to `max`, while more than
    /// `lag_threshold` records wait, and halves, down to `min`, once fewer
    /// than half of `lag_threshold` wait. Starts at `min`.
    pub fn workers_by_lag(mut self, min: usize, max: usize, lag_threshold: usize) -> Self {
        let distribution = self.distribution_or_default();
        self.spec.workers = Some(WorkerSpec {
            min,
            max,
            lag_threshold: Some(lag_threshold),
            distribution,
        });
        self
    }

    /// Which records may run together (see [`Distribution`]); implies
    /// `workers(1)` when no pool is declared.
    pub fn distribution(mut self, distribution: Distribution) -> Self {
        let workers = self.spec.workers.unwrap_or_else(|| WorkerSpec::fixed(1));
        self.spec.workers = Some(WorkerSpec {
            distribution,
            ..workers
        });
        self
    }

    fn distribution_or_default(&self) -> Distribution {
        self.spec
            .workers
            .map(|w| w.distribution)
            .unwrap_or_default()
    }

    /// Gives this type its own poll service: its own Kafka consumer, thread,
    /// group, buffer and client settings (see `DEDICATED_CONNECTIONS.md`).
    pub fn dedicated(mut self, f: impl FnOnce(DedicatedBuilder) -> DedicatedBuilder) -> Self {
        self.spec.dedicated = Some(f(DedicatedBuilder::default()).spec);
        self
    }
}

/// Settings of a dedicated poll service. Offers the same consumer settings as
/// the shared `[kafka.consumer]` section, plus its own buffer and lifecycle.
#[derive(Debug, Clone, Default)]
pub struct DedicatedBuilder {
    spec: DedicatedSpec,
}

/// The frozen dedicated poll service declaration.
#[derive(Debug, Clone)]
pub struct DedicatedSpec {
    pub(crate) start_immediately: bool,
    pub(crate) max_buffered: Option<usize>,
    pub(crate) backpressure: Option<Backpressure>,
    /// Same shape as the shared consumer section; `group_id` is required.
    pub(crate) settings: ConsumerSettings,
}

impl Default for DedicatedSpec {
    fn default() -> Self {
        DedicatedSpec {
            start_immediately: true,
            max_buffered: None,
            backpressure: None,
            settings: ConsumerSettings::default(),
        }
    }
}

impl DedicatedBuilder {
    /// The dedicated consumer group (required).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.spec.settings.group_id = Some(group.into());
        self
    }

    /// Whether the service starts polling with kontext. Defaults to `true`;
    /// when `false` it starts on [`Kontext::start_service`](crate::Kontext::start_service).
    pub fn start_immediately(mut self, yes: bool) -> Self {
        self.spec.start_immediately = yes;
        self
    }

    /// Buffer size; overrides the consumer's `max_buffered`.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.spec.max_buffered = Some(n);
        self
    }

    /// Backpressure mode; overrides the consumer's.
    pub fn backpressure(mut self, mode: Backpressure) -> Self {
        self.spec.backpressure = Some(mode);
        self
    }

    /// Where a new group starts.
    pub fn auto_offset_reset(mut self, reset: OffsetReset) -> Self {
        self.spec.settings.auto_offset_reset = Some(reset);
        self
    }

    /// `session.timeout.ms`.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.spec.settings.session_timeout_ms = Some(millis(timeout));
        self
    }

    /// `heartbeat.interval.ms`.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.spec.settings.heartbeat_interval_ms = Some(millis(interval));
        self
    }

    /// `max.poll.interval.ms`.
    pub fn max_poll_interval(mut self, interval: Duration) -> Self {
        self.spec.settings.max_poll_interval_ms = Some(millis(interval));
        self
    }

    /// How long a revocation waits for running handlers of the revoked
    /// partitions (see [`ConsumerSettings::revoke_timeout_ms`]).
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.spec.settings.revoke_timeout_ms = Some(millis(timeout));
        self
    }

    /// Edits all consumer settings at once, in the shape of the shared section.
    pub fn settings(mut self, f: impl FnOnce(&mut ConsumerSettings)) -> Self {
        f(&mut self.spec.settings);
        self
    }

    /// Any librdkafka consumer property: fetch sizes, `security.protocol`,
    /// SASL credentials, `debug` contexts...
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.settings.librdkafka.set(key, value);
        self
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ConsumerSpec {
    /// The consumer group the model gives the type, if it gives one (a
    /// dedicated connection's group, else the consumer's).
    pub(crate) fn declared_group(&self) -> Option<&str> {
        self.dedicated
            .as_ref()
            .and_then(|d| d.settings.group_id.as_deref())
            .or(self.group.as_deref())
    }

    /// Buffer size in effect.
    pub fn max_buffered(&self) -> usize {
        self.dedicated
            .as_ref()
            .and_then(|d| d.max_buffered)
            .or(self.max_buffered)
            .unwrap_or(DEFAULT_MAX_BUFFERED)
    }

    /// Backpressure mode in effect.
    pub fn backpressure(&self) -> Backpressure {
        self.dedicated
            .as_ref()
            .and_then(|d| d.backpressure)
            .or(self.backpressure)
            .unwrap_or_default()
    }

    /// Whether the type has its own poll service.
    pub fn is_dedicated(&self) -> bool {
        self.dedicated.is_some()
    }

    /// The retry policy.
    pub fn retry(&self) -> RetryPolicy {
        self.retry
    }

    /// The handler time limit, if any.
    pub fn handler_timeout(&self) -> Option<Duration> {
        self.handler_timeout
    }

    /// The worker pool, if one is declared.
    pub fn workers(&self) -> Option<WorkerSpec> {
        self.workers
    }

    /// Problems that make this declaration unusable.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(w) = &self.workers {
            if w.min == 0 || w.max == 0 {
                out.push("workers must be at least 1".to_owned());
            }
            if w.min > w.max {
                out.push(format!(
                    "workers_by_lag: min ({}) is above max ({})",
                    w.min, w.max
                ));
            }
            if w.lag_threshold == Some(0) {
                out.push("workers_by_lag: lag_threshold must be at least 1".to_owned());
            }
        }
        if self.max_buffered() == 0 {
            out.push("max_buffered must be at least 1".to_owned());
        }
        if self.retry.max_attempts == 0 {
            out.push("retry.max_attempts must be at least 1".to_owned());
        }
        if let Some(d) = &self.dedicated {
            match d.settings.group_id.as_deref() {
                None => out.push(
                    "a dedicated consumer needs a group: `.dedicated(|d| d.group(\"...\"))`"
                        .to_owned(),
                ),
                Some(g) if g.trim().is_empty() => {
                    out.push("the dedicated consumer group is empty".to_owned())
                }
                Some(_) => {}
            }
        }
        if let Some(t) = &self.dead_letter_topic {
            if let Err(reason) = crate::model::name::validate_topic_name(t) {
                out.push(format!("illegal dead-letter topic `{t}`: {reason}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(700),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(4), Duration::from_millis(700));
        assert_eq!(p.backoff(60), Duration::from_millis(700));
    }

    #[test]
    fn dedicated_settings_override_and_need_a_group() {
        let spec = ConsumerBuilder::default()
            .max_buffered(10)
            .backpressure(Backpressure::DropNewest)
            .dedicated(|d| d.max_buffered(50))
            .spec;
        assert_eq!(spec.max_buffered(), 50);
        assert_eq!(spec.backpressure(), Backpressure::DropNewest);
        assert!(spec.problems().iter().any(|p| p.contains("needs a group")));

        let ok = ConsumerBuilder::default().dedicated(|d| d.group("g")).spec;
        assert!(ok.problems().is_empty());
    }
}
