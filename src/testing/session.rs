//! Tracked sessions: run a test's action and wait until everything it
//! caused in the named `Kontext` instances is done, then report what
//! happened, per type.
//!
//! Built on what kontext already counts: every record its producers,
//! transactions and outbox relays put on a topic (`telemetry::ledger`,
//! process-wide), and every record each consumer finished (the registry's
//! counters). The session is done when, for every consumer group of the
//! named instances, the records finished since the action began are at
//! least the records produced to the group's topics since then, no buffer
//! holds a record (a retry waiting included) and no outbox row is pending;
//! checked twice around the outbox's count, so a handler that commits an
//! outbox row between two reads is not missed.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::registry::{ServiceStatus, TypeStatus};
use crate::runtime::Kontext;
use crate::telemetry::ledger;

/// How often a session looks again.
const CHECK_EVERY: Duration = Duration::from_millis(5);

/// Starts a tracked session over `instances`: the `Kontext` instances
/// whose consumers, producers and outbox relays the test's action may
/// reach (every member, in this process, of each consumer group
/// involved). Run the action with [`Tracker::run`].
///
/// ```no_run
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { id: u64 }
/// # async fn run(api: &kontext::Kontext, worker: &kontext::Kontext) -> kontext::Result<()> {
/// use kontext::testing::track;
/// let tracked = track([api, worker])
///     .run(|| async { api.producer()?.produce(&OrderPlaced { id: 7 }).await })
///     .await?;
/// let delivery = tracked.value?;
/// // Handled, and whatever its handler produced handled in turn.
/// let placed = tracked.activity.of::<OrderPlaced>(worker)?;
/// assert_eq!((placed.produced, placed.handled), (1, 1));
/// # Ok(()) }
/// ```
pub fn track<'a>(instances: impl IntoIterator<Item = &'a Kontext>) -> Tracker<'a> {
    Tracker {
        instances: instances.into_iter().collect(),
        timeout: Duration::from_secs(10),
    }
}

/// A tracked session being set up ([`track`]).
#[derive(Debug)]
pub struct Tracker<'a> {
    instances: Vec<&'a Kontext>,
    timeout: Duration,
}

impl Tracker<'_> {
    /// How long [`run`](Self::run) waits for the consequences (10 s by
    /// default) before failing with [`Error::Pending`], which names what
    /// was still pending.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `action` (a request to the application, a produce, an outbox
    /// commit), then waits until every record it caused, and every record
    /// those caused in turn, was handled, dead-lettered, dropped or
    /// recognised as a duplicate by the named instances' consumers, and
    /// their outboxes hold no pending row. Returns the action's value and
    /// what happened.
    ///
    /// Counted: records produced by kontext's producers, transactions (once
    /// committed) and outbox relays in this process. A record written by
    /// another process or a plain rdkafka producer is handled, but not
    /// waited for. Start the session once earlier work is done: records
    /// still on their way from before it count as its own.
    pub async fn run<F, Fut, R>(self, action: F) -> Result<Tracked<R>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = R>,
    {
        let before = Snapshot::take(&self.instances);
        let value = action().await;
        let deadline = Instant::now() + self.timeout;
        loop {
            let first = Snapshot::take(&self.instances);
            let outbox = pending_outbox_rows(&self.instances).await;
            let second = Snapshot::take(&self.instances);
            let pending = second.pending_since(&before, &outbox);
            if first.counts() == second.counts() && pending.is_empty() {
                return Ok(Tracked {
                    value,
                    activity: second.activity_since(&before),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Pending {
                    what: "tracked session",
                    timeout: self.timeout,
                    pending: pending.join("; "),
                });
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}

/// The outcome of a tracked session: the action's value and what
/// happened, per type.
#[derive(Debug)]
pub struct Tracked<R> {
    /// What the action returned.
    pub value: R,
    /// What happened, per (topic, type).
    pub activity: Activity,
}

/// What happened during a tracked session, per (topic, `ce_type`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    types: BTreeMap<(String, String), TypeActivity>,
}

/// What happened to one type during a tracked session. Consumer counts
/// add up over every consumer group of the named instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TypeActivity {
    /// Records put on the topic (producers, committed transactions, outbox
    /// relays).
    pub produced: u64,
    /// Of those, outbox rows the relays sent.
    pub outbox_sent: u64,
    /// Records handled (or skipped on the handler's word).
    pub handled: u64,
    /// Handler attempts: handled plus failed.
    pub attempts: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Dead letters by `dlq-reason`.
    pub dead_letter_reasons: BTreeMap<&'static str, u64>,
    /// Redelivered records the inbox acknowledged without handling.
    pub duplicates: u64,
    /// Records dropped by a drop mode.
    pub dropped: u64,
}

impl Activity {
    /// What happened to `T` (its topic and `ce_type` as `kontext`'s model
    /// declares them); all zero if nothing did.
    pub fn of<T: 'static>(&self, kontext: &Kontext) -> Result<TypeActivity> {
        let spec = kontext.model().spec::<T>()?;
        Ok(self.get(spec.topic(), spec.type_name()))
    }

    /// What happened to type `message_type` (its `ce_type`) on `topic`.
    pub fn get(&self, topic: &str, message_type: &str) -> TypeActivity {
        self.types
            .get(&(topic.to_owned(), message_type.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Every (topic, type) something happened to.
    pub fn types(&self) -> impl Iterator<Item = (&str, &str, &TypeActivity)> {
        self.types
            .iter()
            .map(|((topic, t), a)| (topic.as_str(), t.as_str(), a))
    }
}

/// The counters a session compares.
struct Snapshot {
    /// The ledger, for the named instances' clusters only.
    produced: HashMap<(String, String, String), ledger::Counts>,
    /// Per instance: its cluster, client id, poll services and types.
    instances: Vec<Instance>,
}

struct Instance {
    cluster: String,
    name: String,
    services: Vec<ServiceStatus>,
    types: Vec<TypeStatus>,
}

/// What one consumer group (of one cluster) must finish, per topic.
#[derive(Default)]
struct Group {
    /// Per topic: records finished by its types, and their Rust names.
    topics: BTreeMap<String, (u64, Vec<&'static str>)>,
    /// Records its services finished without a type (rejected, skipped)
    /// whose topic is not known (a service of several topics).
    unplaced: u64,
    /// Types that hold records, with how many.
    holding: Vec<String>,
}

impl Snapshot {
    fn take(instances: &[&Kontext]) -> Snapshot {
        let clusters: Vec<String> = instances
            .iter()
            .map(|k| k.broker().bootstrap_servers().to_owned())
            .collect();
        Snapshot {
            produced: ledger::snapshot()
                .into_iter()
                .filter(|((cluster, _, _), _)| clusters.contains(cluster))
                .collect(),
            instances: instances
                .iter()
                .map(|k| Instance {
                    cluster: k.broker().bootstrap_servers().to_owned(),
                    name: k.settings().effective_client_id().to_owned(),
                    services: k.registry().services(),
                    types: k.registry().types(),
                })
                .collect(),
        }
    }

    /// The counts that move while work goes on (not the clocks): what
    /// was produced to the topics the named instances consume (not other
    /// tests' topics), and what their consumers did.
    fn counts(&self) -> Vec<u64> {
        let consumed: Vec<(&str, &str)> = self
            .instances
            .iter()
            .flat_map(|i| {
                i.types
                    .iter()
                    .map(|t| (i.cluster.as_str(), t.topic.as_str()))
            })
            .collect();
        let mut counts: Vec<u64> = self
            .produced
            .iter()
            .filter(|((c, t, _), _)| consumed.contains(&(c.as_str(), t.as_str())))
            .map(|(_, c)| c.produced)
            .collect();
        counts.sort_unstable();
        for i in &self.instances {
            counts.extend(i.services.iter().map(|s| s.rejected + s.skipped));
            for t in &i.types {
                counts.extend([finished(t), t.buffered as u64, t.failed, t.retried]);
            }
        }
        counts
    }

    /// Records put on `topic` of `cluster` since `before`.
    fn produced_since(&self, before: &Snapshot, cluster: &str, topic: &str) -> u64 {
        self.produced
            .iter()
            .filter(|((c, t, _), _)| c == cluster && t == topic)
            .map(|(key, c)| {
                let was = before.produced.get(key).map_or(0, |c| c.produced);
                c.produced.saturating_sub(was)
            })
            .sum()
    }

    /// The type `t` of instance `i` as it was in `before`.
    fn type_before<'b>(before: &'b Snapshot, i: usize, t: &TypeStatus) -> Option<&'b TypeStatus> {
        before.instances.get(i).and_then(|b| {
            b.types
                .iter()
                .find(|b| b.service == t.service && b.rust_type == t.rust_type)
        })
    }

    /// Each consumer group's progress since `before`, by (cluster, group).
    fn groups_since(&self, before: &Snapshot) -> BTreeMap<(String, String), Group> {
        let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
        for (i, inst) in self.instances.iter().enumerate() {
            for s in &inst.services {
                let was = before
                    .instances
                    .get(i)
                    .and_then(|b| b.services.iter().find(|b| b.name == s.name));
                let untyped = (s.rejected + s.skipped)
                    .saturating_sub(was.map_or(0, |b| b.rejected + b.skipped));
                let topics: Vec<&str> = {
                    let mut t: Vec<&str> = inst
                        .types
                        .iter()
                        .filter(|t| t.service == s.name)
                        .map(|t| t.topic.as_str())
                        .collect();
                    t.dedup();
                    t
                };
                let g = groups
                    .entry((inst.cluster.clone(), s.group_id.clone()))
                    .or_default();
                match topics.as_slice() {
                    [topic] => {
                        g.topics.entry((*topic).to_owned()).or_default().0 += untyped;
                    }
                    _ => g.unplaced += untyped,
                }
            }
            for t in &inst.types {
                let Some(s) = inst.services.iter().find(|s| s.name == t.service) else {
                    continue;
                };
                let g = groups
                    .entry((inst.cluster.clone(), s.group_id.clone()))
                    .or_default();
                let was = Self::type_before(before, i, t);
                let entry = g.topics.entry(t.topic.clone()).or_default();
                entry.0 += finished(t).saturating_sub(was.map_or(0, finished));
                if !entry.1.contains(&t.rust_type) {
                    entry.1.push(t.rust_type);
                }
                if t.buffered > 0 {
                    g.holding.push(format!(
                        "`{}` holds {} in `{}`{}",
                        t.rust_type,
                        t.buffered,
                        inst.name,
                        match t.stalled_for {
                            Some(d) => format!(", unfinished for {d:?}"),
                            None => String::new(),
                        }
                    ));
                }
            }
        }
        groups
    }

    /// What is not done yet, one line each; empty when all is.
    fn pending_since(&self, before: &Snapshot, outbox: &[(usize, Result<u64>)]) -> Vec<String> {
        let mut pending = Vec::new();
        for (i, rows) in outbox {
            let name = self
                .instances
                .get(*i)
                .map_or("?", |inst| inst.name.as_str());
            match rows {
                Ok(0) => {}
                Ok(n) => pending.push(format!("`{name}`: {n} outbox rows not sent yet")),
                Err(e) => pending.push(format!("`{name}`: its outbox cannot be read: {e}")),
            }
        }
        for ((cluster, group), g) in self.groups_since(before) {
            let mut unplaced = g.unplaced;
            for (topic, (finished, types)) in &g.topics {
                let produced = self.produced_since(before, &cluster, topic);
                let short = produced.saturating_sub(*finished);
                // A record finished without its topic known covers one
                // record of any of the group's topics.
                let covered = short.min(unplaced);
                unplaced -= covered;
                if short > covered {
                    pending.push(format!(
                        "group `{group}` finished {finished} of {produced} records produced to `{topic}` since the action began (types {})",
                        types
                            .iter()
                            .map(|t| format!("`{t}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            for h in g.holding {
                pending.push(format!("group `{group}`: {h}"));
            }
        }
        pending
    }

    fn activity_since(&self, before: &Snapshot) -> Activity {
        let mut types: BTreeMap<(String, String), TypeActivity> = BTreeMap::new();
        for (key, c) in &self.produced {
            let (_, topic, message_type) = key;
            let was = before.produced.get(key).copied().unwrap_or_default();
            let produced = c.produced.saturating_sub(was.produced);
            if produced > 0 {
                let a = types
                    .entry((topic.clone(), message_type.clone()))
                    .or_default();
                a.produced += produced;
                a.outbox_sent += c.outbox_sent.saturating_sub(was.outbox_sent);
            }
        }
        for (i, inst) in self.instances.iter().enumerate() {
            for t in &inst.types {
                let was = Self::type_before(before, i, t);
                let d = |f: fn(&TypeStatus) -> u64| f(t).saturating_sub(was.map_or(0, f));
                let handled = d(|s| s.handled);
                let failed = d(|s| s.failed);
                let delta = TypeActivity {
                    handled,
                    attempts: handled + failed,
                    failed,
                    retried: d(|s| s.retried),
                    dead_lettered: d(|s| s.dead_lettered),
                    duplicates: d(|s| s.duplicates),
                    dropped: d(|s| s.dropped),
                    ..TypeActivity::default()
                };
                let reasons: Vec<(&'static str, u64)> = t
                    .dead_letter_reasons
                    .iter()
                    .map(|(r, n)| {
                        let was = was
                            .and_then(|b| b.dead_letter_reasons.iter().find(|(br, _)| br == r))
                            .map_or(0, |(_, n)| *n);
                        (*r, n.saturating_sub(was))
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect();
                if delta == TypeActivity::default() && reasons.is_empty() {
                    continue;
                }
                let a = types
                    .entry((t.topic.clone(), t.discriminator.clone()))
                    .or_default();
                a.handled += delta.handled;
                a.attempts += delta.attempts;
                a.failed += delta.failed;
                a.retried += delta.retried;
                a.dead_lettered += delta.dead_lettered;
                a.duplicates += delta.duplicates;
                a.dropped += delta.dropped;
                for (r, n) in reasons {
                    *a.dead_letter_reasons.entry(r).or_default() += n;
                }
            }
        }
        Activity { types }
    }
}

/// Records a type's consumer is done with.
fn finished(t: &TypeStatus) -> u64 {
    t.handled + t.dead_lettered + t.dead_letters_refused + t.dropped + t.duplicates
}

/// Each instance's pending outbox rows (instances without a database have
/// none).
async fn pending_outbox_rows(instances: &[&Kontext]) -> Vec<(usize, Result<u64>)> {
    let mut rows = Vec::new();
    for (i, k) in instances.iter().enumerate() {
        if let Ok(outbox) = k.outbox() {
            rows.push((i, outbox.pending().await));
        }
    }
    rows
}
