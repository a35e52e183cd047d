//! The keyed registry: the one place that says which poll service, buffer
//! and handler serve a message type, and how each poll service is doing.

use std::any::TypeId;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::error::{Error, Result};
use crate::model::Backpressure;

/// Registered consumer types and poll services. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    types: Arc<DashMap<TypeId, TypeEntry>>,
    services: Arc<DashMap<String, Arc<dyn ServiceProbe>>>,
}

/// What the registry reads of a running poll service. The consumer
/// implements it, so the registry needs nothing of the consumer's insides
/// (and sits below it).
pub(crate) trait ServiceProbe: Send + Sync {
    /// The service's name.
    fn name(&self) -> &str;
    /// Its status; [`ServiceStatus::types`] and
    /// [`ServiceStatus::stalled_for`] are the registry's to fill.
    fn status(&self) -> ServiceStatus;
    /// Lets a `start_immediately(false)` service begin polling.
    fn start(&self);
}

/// What the registry reads of a consumed type's lane and counters.
pub(crate) trait TypeProbe: Send + Sync {
    /// Fills the buffer and counter fields of `status`.
    fn fill(&self, status: &mut TypeStatus);
}

/// Where a consumer group stands on one partition, as its member here
/// last saw it (librdkafka's statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// The partition's end (high watermark), if known.
    pub end: Option<i64>,
    /// Records between the last offset stored for commit and the end:
    /// records fetched but not finished count as lag.
    pub lag: Option<i64>,
}

/// Lifecycle of a poll service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceState {
    /// Declared with `start_immediately(false)` and not started yet.
    Waiting,
    /// Polling.
    Running,
    /// Shutting down: no new records, buffers draining.
    Draining,
    /// Stopped cleanly.
    Stopped,
    /// Died; the reason is logged too. Other services keep running.
    Failed(String),
}

pub(crate) struct TypeEntry {
    pub(crate) rust_type: &'static str,
    pub(crate) topic: String,
    pub(crate) discriminator: String,
    pub(crate) service: String,
    pub(crate) stream: bool,
    pub(crate) backpressure: Backpressure,
    pub(crate) dead_letter_topic: String,
    /// Its lane's buffer (shared with types on the same topic) and counters.
    pub(crate) probe: Arc<dyn TypeProbe>,
}

/// A consumed type and its buffer's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TypeStatus {
    /// `std::any::type_name` of the type.
    pub rust_type: &'static str,
    /// Its topic.
    pub topic: String,
    /// Its `ce_type` discriminator.
    pub discriminator: String,
    /// Name of the poll service that serves it.
    pub service: String,
    /// Consumed as a stream rather than by a handler.
    pub stream: bool,
    /// Backpressure mode.
    pub backpressure: Backpressure,
    /// Dead-letter topic.
    pub dead_letter_topic: String,
    /// Messages in the buffer, waiting or being handled (at most
    /// `capacity`). Types sharing a topic share its buffer, so a partition
    /// is handled in order whatever the types.
    pub buffered: usize,
    /// Buffer capacity.
    pub capacity: usize,
    /// Whether its partitions are paused because the buffer is full.
    pub paused: bool,
    /// Whether an operator holds its lane (or some of its partitions)
    /// paused ([`Kontext::pause`](crate::Kontext::pause)); not unhealthy.
    pub held: bool,
    /// How long its lane (its topic in its poll service) has held records
    /// without finishing one: a hung or very slow handler, a long retry
    /// pause. `None` while records finish (or none wait).
    pub stalled_for: Option<Duration>,
    /// How long its lane's handler has been retrying a record whose
    /// attempts cannot reach the database (retried every 500 ms without
    /// spending attempts): the service is not ready meanwhile, but live, as
    /// a restart would not bring the database back. `None` once a record
    /// finishes.
    pub database_down_for: Option<Duration>,
    /// The last error of those attempts (connection errors carry no
    /// password).
    pub database_error: Option<String>,
    /// Handler invocations its topic may run at once: the worker pool's
    /// current size (it follows the lag under `workers_by_lag`), 1 without
    /// a pool.
    pub workers: usize,
    /// Of those, how many are running a handler right now.
    pub busy_workers: usize,
    /// Messages that entered the buffer (dropped ones included).
    pub received: u64,
    /// Messages handled (or deliberately skipped).
    pub handled: u64,
    /// Failed handler attempts.
    pub failed: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages whose dead letter the broker refused for good (topic
    /// missing, not authorized, too large even cut down): given up on and
    /// logged with their coordinates, so their partition moved on.
    pub dead_letters_refused: u64,
    /// Of those, how many for each `dlq-reason` (`handler`,
    /// `retries-exhausted`, `decode`, `panic`, `timeout`...): the reasons
    /// with a count above zero.
    pub dead_letter_reasons: Vec<(&'static str, u64)>,
    /// Messages dropped by `DropOldest`/`DropNewest`.
    pub dropped: u64,
    /// Redelivered messages the inbox recognised and acknowledged unhandled.
    pub duplicates: u64,
}

/// A poll service and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceStatus {
    /// `shared-<group>` or `dedicated-<Type>`.
    pub name: String,
    /// Its consumer group.
    pub group_id: String,
    /// Whether it is a dedicated connection.
    pub dedicated: bool,
    /// Lifecycle state.
    pub state: ServiceState,
    /// Partitions assigned to it by its group.
    pub assigned_partitions: Vec<(String, i32)>,
    /// Partitions paused by backpressure or by an operator.
    pub paused_partitions: Vec<(String, i32)>,
    /// Partitions an operator holds paused ([`Kontext::pause`](crate::Kontext::pause)),
    /// owned here now.
    pub held_partitions: Vec<(String, i32)>,
    /// Positions of the partitions it owns, from librdkafka's statistics
    /// (every `statistics.interval.ms`, 5 s by default): empty until the
    /// first.
    pub partitions: Vec<PartitionStatus>,
    /// Types it serves.
    pub types: Vec<&'static str>,
    /// Time since its loop last polled; `None` before the first poll.
    pub since_last_poll: Option<Duration>,
    /// Entries the service keeps to turn finished records into offsets
    /// (updated every 100 ms). Bounded by its lanes' capacity and the
    /// records in flight, in every backpressure mode, however long one
    /// record takes: records finished behind an unfinished one share one
    /// entry.
    pub tracked_entries: usize,
    /// Records none of its types could take (tombstones, missing or unknown
    /// `ce_type`): sent to the dead-letter topic, or given up on.
    pub rejected: u64,
    /// Records of types its group leaves to another group or ignores
    /// ([`Consumers::ignore`](crate::consumer::Consumers::ignore)),
    /// committed unhandled.
    pub skipped: u64,
    /// Dead letters the broker refused for good, over all its types (see
    /// [`TypeStatus::dead_letters_refused`]). Not zero means records were
    /// given up on: [`is_healthy`](Self::is_healthy) says `false`.
    pub dead_letters_refused: u64,
    /// Whether its consumer is a member of its group: it had an assignment
    /// (even an empty one) and has not lost it since.
    pub joined: bool,
    /// Times the consumer lost its assignment without a handover: the group
    /// went on without it (session or poll interval exceeded, fenced). It
    /// rejoins by itself; while it has not, it is not ready.
    pub assignments_lost: u64,
    /// How long librdkafka has reported every broker down, if it has.
    pub brokers_down_for: Option<Duration>,
    /// The longest [`TypeStatus::stalled_for`] of its topics.
    pub stalled_for: Option<Duration>,
    /// The longest [`TypeStatus::database_down_for`] of its topics, with
    /// that topic's error.
    pub database_down_for: Option<(Duration, String)>,
    /// How long a topic may stall before the service is unhealthy
    /// (`consumer.stall_limit_ms`, 120 s by default).
    pub stall_limit: Duration,
    /// Its consumer's librdkafka properties as kontext created it (every
    /// default and override applied; secrets shown as `<redacted>`).
    pub settings: Vec<(String, String)>,
}

/// What [`Kontext::health`](crate::Kontext::health) says: whether the
/// process is alive (a restart would not help otherwise: `live == false`
/// means it should be restarted) and ready (it can do its work now), with
/// a reason for every check that failed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Health {
    /// Every poll loop runs and has polled recently; no topic is stalled
    /// past its limit (a handler that never returns, a dead letter that
    /// cannot be sent).
    pub live: bool,
    /// Live, every started poll service has joined its group, a broker is
    /// reachable (or has been within the session timeout), and no record
    /// was given up on because its dead letter was refused.
    pub ready: bool,
    /// Why not, one line per failed check, naming the service: summaries
    /// without error text, fit for an unauthenticated health endpoint.
    pub reasons: Vec<String>,
    /// The same failed checks with the errors behind them (a database's or
    /// a client's error text, which may name hosts and users): for logs
    /// and an authenticated status view, not for a public endpoint.
    pub details: Vec<String>,
    /// What an operator should know that fails no check (the broker is the
    /// embedded one, in this process).
    pub notes: Vec<String>,
}

impl Health {
    /// Live and ready.
    pub fn is_healthy(&self) -> bool {
        self.live && self.ready
    }

    /// Nothing failed yet.
    pub(crate) fn new() -> Self {
        Health {
            live: true,
            ready: true,
            reasons: Vec::new(),
            details: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A failed liveness check (which fails readiness too).
    pub(crate) fn not_live(&mut self, why: String) {
        self.live = false;
        self.ready = false;
        self.details.push(why.clone());
        self.reasons.push(why);
    }

    /// A failed liveness check whose cause carries error text: `why` for
    /// `reasons`, `why: detail` for `details`.
    pub(crate) fn not_live_because(&mut self, why: String, detail: &str) {
        self.not_live(why);
        if let Some(last) = self.details.last_mut() {
            last.push_str(": ");
            last.push_str(detail);
        }
    }

    /// A failed readiness check.
    pub(crate) fn not_ready(&mut self, why: String) {
        self.ready = false;
        self.details.push(why.clone());
        self.reasons.push(why);
    }

    /// A failed readiness check whose cause carries error text: `why` for
    /// `reasons`, `why: detail` for `details`.
    pub(crate) fn not_ready_because(&mut self, why: String, detail: &str) {
        self.not_ready(why);
        if let Some(last) = self.details.last_mut() {
            last.push_str(": ");
            last.push_str(detail);
        }
    }
}

/// How long a running poll loop may go without polling before it counts as
/// hung: it polls at least every second when it is well.
const POLL_SILENCE_LIMIT: Duration = Duration::from_secs(10);

impl ServiceStatus {
    /// Adds this service's failed checks to `health`.
    fn check(&self, health: &mut Health) {
        let name = &self.name;
        let not_live = |why: String, h: &mut Health| h.not_live(why);
        match &self.state {
            ServiceState::Failed(reason) => {
                health.not_live_because(format!("poll service {name} failed"), reason);
            }
            ServiceState::Running => {
                if let Some(d) = self.since_last_poll.filter(|d| *d > POLL_SILENCE_LIMIT) {
                    not_live(
                        format!("poll service {name} has not polled for {d:?}"),
                        health,
                    );
                }
            }
            _ => {}
        }
        if let Some(d) = self.stalled_for.filter(|d| *d > self.stall_limit) {
            not_live(
                format!(
                    "poll service {name}: a topic has finished no record for {d:?} (limit {:?}): a handler or dead letter is stuck",
                    self.stall_limit
                ),
                health,
            );
        }
        let not_ready = |why: String, h: &mut Health| h.not_ready(why);
        if self.state == ServiceState::Running && !self.joined {
            let why = if self.assignments_lost > 0 {
                format!(
                    "poll service {name} lost its assignment in group {} and has not rejoined yet",
                    self.group_id
                )
            } else {
                format!(
                    "poll service {name} has not joined group {} yet",
                    self.group_id
                )
            };
            not_ready(why, health);
        }
        let session = self
            .settings
            .iter()
            .find(|(k, _)| k == "session.timeout.ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(45), Duration::from_millis);
        if let Some(d) = self.brokers_down_for.filter(|d| *d > session) {
            not_ready(
                format!("poll service {name}: no broker reachable for {d:?}"),
                health,
            );
        }
        if let Some((d, error)) = &self.database_down_for {
            health.not_ready_because(
                format!(
                    "poll service {name}: a handler cannot reach its database (for {d:?}); its record is retried until it can"
                ),
                error,
            );
        }
        if self.dead_letters_refused > 0 {
            not_ready(
                format!(
                    "poll service {name}: {} record(s) given up on, their dead letters refused",
                    self.dead_letters_refused
                ),
                health,
            );
        }
    }
}

impl ServiceStatus {
    /// Alive and polling recently (or waiting for an explicit start), no
    /// topic stalled beyond [`stall_limit`](Self::stall_limit) (a handler
    /// that never returns), and no record given up on because its dead
    /// letter was refused. Meant for readiness and alerts: a restart does
    /// not clear what a refused dead letter says (a dead-letter topic
    /// missing or not writable).
    pub fn is_healthy(&self) -> bool {
        if self.dead_letters_refused > 0 {
            return false;
        }
        if self.stalled_for.is_some_and(|d| d > self.stall_limit) {
            return false;
        }
        match self.state {
            ServiceState::Waiting => true,
            ServiceState::Running => self
                .since_last_poll
                .is_none_or(|d| d < Duration::from_secs(10)),
            _ => false,
        }
    }
}

impl Registry {
    pub(crate) fn add_service(&self, service: Arc<dyn ServiceProbe>) {
        self.services.insert(service.name().to_owned(), service);
    }

    pub(crate) fn add_type(&self, id: TypeId, entry: TypeEntry) {
        self.types.insert(id, entry);
    }

    /// The status of the type `T`, or [`Error::NotConsumed`].
    pub fn type_status<T: 'static>(&self) -> Result<TypeStatus> {
        self.types
            .get(&TypeId::of::<T>())
            .map(|e| status_of(&e))
            .ok_or(Error::NotConsumed {
                type_name: std::any::type_name::<T>(),
            })
    }

    /// The poll service that serves `T`, or [`Error::NotConsumed`].
    pub fn service_of<T: 'static>(&self) -> Result<ServiceStatus> {
        let name = self
            .types
            .get(&TypeId::of::<T>())
            .map(|e| e.service.clone())
            .ok_or(Error::NotConsumed {
                type_name: std::any::type_name::<T>(),
            })?;
        self.service(&name).ok_or(Error::NotConsumed {
            type_name: std::any::type_name::<T>(),
        })
    }

    /// A poll service by name.
    pub fn service(&self, name: &str) -> Option<ServiceStatus> {
        let mut status = self.services.get(name)?.status();
        let mut types: Vec<&'static str> = Vec::new();
        for e in self.types.iter().filter(|e| e.service == name) {
            types.push(e.rust_type);
            let t = status_of(&e);
            status.stalled_for = status.stalled_for.max(t.stalled_for);
            if let (Some(d), Some(error)) = (t.database_down_for, t.database_error) {
                if status
                    .database_down_for
                    .as_ref()
                    .is_none_or(|(l, _)| d > *l)
                {
                    status.database_down_for = Some((d, error));
                }
            }
        }
        types.sort_unstable();
        status.types = types;
        Some(status)
    }

    /// Every poll service, by name.
    pub fn services(&self) -> Vec<ServiceStatus> {
        let mut names: Vec<String> = self.services.iter().map(|s| s.key().clone()).collect();
        names.sort();
        names.iter().filter_map(|n| self.service(n)).collect()
    }

    /// Every consumed type, by type name.
    pub fn types(&self) -> Vec<TypeStatus> {
        let mut out: Vec<TypeStatus> = self.types.iter().map(|e| status_of(&e)).collect();
        out.sort_by_key(|t| t.rust_type);
        out
    }

    /// Whether every poll service is alive and polling.
    pub fn is_healthy(&self) -> bool {
        self.services().iter().all(ServiceStatus::is_healthy)
    }

    /// Liveness and readiness of the consumers, with reasons (see
    /// [`Health`]).
    pub fn health(&self) -> Health {
        let mut health = Health::new();
        for s in self.services() {
            s.check(&mut health);
        }
        health
    }

    /// The topic and poll service of consumed type `id`.
    pub(crate) fn lane_of(&self, id: TypeId) -> Option<(String, String)> {
        self.types
            .get(&id)
            .map(|e| (e.topic.clone(), e.service.clone()))
    }

    pub(crate) fn shared_of(
        &self,
        id: TypeId,
        type_name: &'static str,
    ) -> Result<Arc<dyn ServiceProbe>> {
        let name = self
            .types
            .get(&id)
            .map(|e| e.service.clone())
            .ok_or(Error::NotConsumed { type_name })?;
        self.services
            .get(&name)
            .map(|s| Arc::clone(&s))
            .ok_or(Error::NotConsumed { type_name })
    }
}

fn status_of(e: &TypeEntry) -> TypeStatus {
    let mut status = TypeStatus {
        rust_type: e.rust_type,
        topic: e.topic.clone(),
        discriminator: e.discriminator.clone(),
        service: e.service.clone(),
        stream: e.stream,
        backpressure: e.backpressure,
        dead_letter_topic: e.dead_letter_topic.clone(),
        buffered: 0,
        capacity: 0,
        paused: false,
        held: false,
        stalled_for: None,
        database_down_for: None,
        database_error: None,
        workers: 0,
        busy_workers: 0,
        received: 0,
        handled: 0,
        failed: 0,
        retried: 0,
        dead_lettered: 0,
        dead_letters_refused: 0,
        dead_letter_reasons: Vec::new(),
        dropped: 0,
        duplicates: 0,
    };
    e.probe.fill(&mut status);
    status
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("services", &self.services())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(since_last_poll: Duration) -> ServiceStatus {
        ServiceStatus {
            name: "shared-orders".into(),
            group_id: "orders".into(),
            dedicated: false,
            state: ServiceState::Running,
            assigned_partitions: Vec::new(),
            paused_partitions: Vec::new(),
            held_partitions: Vec::new(),
            partitions: Vec::new(),
            types: vec!["OrderCreated"],
            since_last_poll: Some(since_last_poll),
            tracked_entries: 0,
            rejected: 0,
            skipped: 0,
            dead_letters_refused: 0,
            joined: true,
            assignments_lost: 0,
            brokers_down_for: None,
            stalled_for: None,
            database_down_for: None,
            stall_limit: Duration::from_secs(120),
            settings: Vec::new(),
        }
    }

    /// README: a running poll loop that has not polled for 10 s is hung
    /// (not live); one that polled within them is healthy. A stopped
    /// service is not judged by when it last polled.
    #[test]
    fn a_poll_loop_silent_past_10_s_is_not_live() {
        let check = |s: ServiceStatus| {
            let mut h = Health::new();
            s.check(&mut h);
            h
        };
        assert!(check(running(Duration::from_millis(9_900))).is_healthy());
        let hung = check(running(Duration::from_millis(10_100)));
        assert!(!hung.live, "{hung:?}");
        assert!(
            hung.reasons[0].starts_with("poll service shared-orders has not polled for 10.1"),
            "{hung:?}"
        );
        let stopped = ServiceStatus {
            state: ServiceState::Stopped,
            ..running(Duration::from_secs(60))
        };
        assert!(check(stopped).live);
    }

    /// A failed check's error text (a database's, a client's) goes to the
    /// details for logs and authenticated views; the reasons a public
    /// health endpoint shows carry only the summary.
    #[test]
    fn error_text_stays_out_of_the_reasons() {
        let mut h = Health::new();
        h.not_ready_because(
            "outbox relay: passes failing for 40s (limit 30s)".into(),
            "database: connect failed: password authentication failed for user \"app\" at db-7.internal",
        );
        h.not_live_because(
            "poll service shared-orders failed".into(),
            "the poll loop panicked",
        );
        assert!(!h.live && !h.ready);
        assert_eq!(
            h.reasons,
            [
                "outbox relay: passes failing for 40s (limit 30s)",
                "poll service shared-orders failed"
            ]
        );
        assert!(
            h.details[0].ends_with("at db-7.internal"),
            "{:?}",
            h.details
        );
        assert!(
            h.details[1].ends_with(": the poll loop panicked"),
            "{:?}",
            h.details
        );
    }
}
