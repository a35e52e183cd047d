//! Fleet-wide commands over a compacted control topic that every instance
//! reads from its beginning: at start it applies the pauses standing there
//! before its consumers first poll; then it applies each new command once
//! (by id), answers on the topic, and says every heartbeat that it is
//! alive. An issuer waits for the answers of the instances it heard from.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{
    Command, ControlReport, Envelope, FleetCommand, FleetReport, FleetSettings, Op,
};
use crate::broker::{Broker, TopicToCreate};
use crate::config::KafkaSettings;
use crate::consumer::{Controller, Standing};
use crate::error::{Error, Result};

/// Ids of commands applied, remembered to apply each once.
const SEEN: usize = 10_000;
/// Longest the start waits for the control topic's next record while it
/// reads what stands there.
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

fn sync_lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the reader and the issuers of one instance share.
#[derive(Default)]
struct Heard {
    alive: Mutex<HashMap<String, Instant>>,
    /// Answers to the commands this instance issued, by command id.
    answers: Mutex<HashMap<String, BTreeMap<String, Vec<ControlReport>>>>,
    changed: tokio::sync::Notify,
}

/// This instance's part in the fleet.
pub(crate) struct Fleet {
    settings: FleetSettings,
    instance: String,
    producer: FutureProducer,
    heard: Arc<Heard>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("instance", &self.instance)
            .field("settings", &self.settings)
            .finish()
    }
}

/// A fleet joined but not yet reading: the standing pauses are known.
pub(crate) struct Joining {
    fleet: Fleet,
    consumer: StreamConsumer,
    seen: Seen,
}

#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// Whether `id` is new (and remembers it).
    fn first(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > SEEN {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

/// A record of the control topic that is not kontext's: logged, skipped.
fn malformed(topic: &str, e: &serde_json::Error) {
    crate::telemetry::admin_command("refused", "unknown");
    tracing::warn!(%topic, error = %e, "malformed record on the control topic: ignored");
}

fn client_error(role: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    move |source| Error::Client { role, source }
}

impl Fleet {
    /// Joins the fleet: makes sure the control topic exists, reads it to
    /// its end, and returns the pauses standing there (in order).
    pub(crate) async fn join(
        settings: FleetSettings,
        kafka: &KafkaSettings,
        broker: &Broker,
    ) -> Result<(Joining, Vec<Standing>)> {
        if kafka.provisioning_enabled() {
            let mut topic = TopicToCreate::new(settings.topic.clone(), 1);
            // Compacted, with segments that roll hourly, so answers and
            // heartbeats (tombstoned once read) do not pile up in the active
            // segment that compaction never cleans.
            for (k, v) in [
                ("cleanup.policy", "compact"),
                ("segment.ms", "3600000"),
                ("min.cleanable.dirty.ratio", "0.1"),
                ("delete.retention.ms", "86400000"),
            ] {
                topic.configs.insert(k.into(), v.into());
            }
            crate::broker::provision(broker, kafka, &[topic]).await?;
        }
        let servers = broker.bootstrap_servers();
        let instance = settings.instance.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                kafka.effective_client_id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        let mut config = kafka.client_config(servers);
        config
            .set("group.id", format!("kontext-fleet-{instance}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let consumer: StreamConsumer = config.create().map_err(client_error("fleet reader"))?;
        let producer: FutureProducer = kafka
            .client_config(servers)
            .create()
            .map_err(client_error("fleet producer"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&settings.topic, 0, Offset::Beginning)
            .map_err(client_error("fleet reader"))?;
        consumer
            .assign(&tpl)
            .map_err(client_error("fleet reader"))?;
        let (consumer, end) = {
            let topic = settings.topic.clone();
            tokio::task::spawn_blocking(move || {
                let end = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10));
                (consumer, end)
            })
            .await
            .map_err(|e| Error::Internal(format!("the fleet reader did not start: {e}")))?
        };
        let (_, end) = end.map_err(client_error("fleet reader"))?;
        let mut seen = Seen::default();
        let mut standing = Vec::new();
        let fleet = Fleet {
            settings,
            instance,
            producer,
            heard: Arc::default(),
        };
        // Everything up to the end when it joined: pauses and resumes stand
        // (in order); seeks were for the instances of their time.
        let mut next = 0;
        while next < end {
            let m = tokio::time::timeout(CATCH_UP_WAIT, consumer.recv())
                .await
                .map_err(|_| {
                    Error::config(format!(
                        "the fleet's control topic `{}` did not deliver its records up to offset {end} within {CATCH_UP_WAIT:?}",
                        fleet.settings.topic
                    ))
                })?
                .map_err(client_error("fleet reader"))?;
            next = m.offset() + 1;
            if let Some(age) = fleet.alive_in(&m) {
                fleet.heard_alive(age.0, age.1);
                continue;
            }
            if let Some(command) = fleet.command_in(m.payload()) {
                if !seen.first(&command.id) {
                    continue;
                }
                if matches!(command.op, Op::Pause | Op::Resume) {
                    standing.push(Standing {
                        topic: command.topic,
                        group: command.group,
                        partitions: command.partitions,
                        command: command.op.command(),
                    });
                }
            }
        }
        tracing::info!(
            instance = %fleet.instance,
            topic = %fleet.settings.topic,
            standing = standing.len(),
            "joined the fleet"
        );
        Ok((
            Joining {
                fleet,
                consumer,
                seen,
            },
            standing,
        ))
    }

    /// An instance's heartbeat in a record read at start, with its age.
    fn alive_in(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Option<(String, Duration)> {
        let Ok(Envelope::Alive { instance }) = serde_json::from_slice(m.payload()?) else {
            return None;
        };
        let at = m.timestamp().to_millis()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis();
        let age = u64::try_from(now.saturating_sub(u128::try_from(at.max(0)).ok()?)).ok()?;
        Some((instance, Duration::from_millis(age)))
    }

    /// Notes `instance` alive as of `age` ago; forgets instances silent
    /// for long (a restarted instance has a new name).
    fn heard_alive(&self, instance: String, age: Duration) {
        let Some(at) = Instant::now().checked_sub(age) else {
            return;
        };
        let forget = self.settings.heartbeat * 10;
        let mut alive = sync_lock(&self.heard.alive);
        alive.retain(|_, seen| seen.elapsed() <= forget);
        if age <= forget {
            alive.insert(instance, at);
        }
        drop(alive);
        self.heard.changed.notify_waiters();
    }

    /// Forgets an instance that said it stopped.
    fn heard_gone(&self, instance: &str) {
        sync_lock(&self.heard.alive).remove(instance);
        self.heard.changed.notify_waiters();
    }

    /// Instances heard from within three heartbeats, this one included.
    pub(crate) fn members(&self) -> Vec<String> {
        let recent = self.settings.heartbeat * 3;
        let mut e: Vec<String> = sync_lock(&self.heard.alive)
            .iter()
            .filter(|(_, at)| at.elapsed() <= recent)
            .map(|(i, _)| i.clone())
            .collect();
        if !e.contains(&self.instance) {
            e.push(self.instance.clone());
        }
        e.sort();
        e
    }

    /// The command in a control record, if it is one that opens: a
    /// malformed or badly signed one is logged and refused.
    fn command_in(&self, payload: Option<&[u8]>) -> Option<FleetCommand> {
        let envelope: Envelope = match serde_json::from_slice(payload?) {
            Ok(e) => e,
            Err(e) => {
                malformed(&self.settings.topic, &e);
                return None;
            }
        };
        let Envelope::Command { body, sig } = envelope else {
            return None;
        };
        match FleetCommand::open(&body, sig.as_deref(), self.settings.secret.as_ref()) {
            Ok(c) => Some(c),
            Err(why) => {
                crate::telemetry::admin_command("refused", "unknown");
                tracing::warn!(topic = %self.settings.topic, %why, "command on the control topic refused");
                None
            }
        }
    }

    async fn send(&self, key: &str, envelope: &Envelope) -> Result<()> {
        let payload = serde_json::to_vec(envelope)
            .map_err(|e| Error::Internal(format!("a control record did not serialize: {e}")))?;
        self.put(key, Some(&payload)).await
    }

    /// Writes `payload` under `key`; `None` is a tombstone, which the
    /// compaction then removes with the key.
    async fn put(&self, key: &str, payload: Option<&[u8]>) -> Result<()> {
        let mut record = FutureRecord::<str, [u8]>::to(&self.settings.topic).key(key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer
            .send(record, self.settings.answer_wait)
            .await
            .map_err(|(e, _)| Error::Client {
                role: "fleet producer",
                source: e,
            })?;
        Ok(())
    }

    /// Sends `command` to the fleet and gathers the answers of every
    /// instance heard from lately (this one included).
    pub(crate) async fn issue(
        &self,
        issuer: &str,
        topic: String,
        group: Option<String>,
        partitions: Option<Vec<i32>>,
        command: &Command,
    ) -> Result<FleetReport> {
        let c = FleetCommand {
            id: uuid::Uuid::now_v7().to_string(),
            issuer: issuer.to_owned(),
            issued_by: self.instance.clone(),
            op: Op::of(command),
            topic,
            group,
            partitions,
        };
        let envelope = c
            .seal(self.settings.secret.as_ref())
            .map_err(|e| Error::Internal(format!("a command did not serialize: {e}")))?;
        sync_lock(&self.heard.answers).insert(c.id.clone(), BTreeMap::new());
        let sent = self.send(&c.key(), &envelope).await;
        if let Err(e) = sent {
            sync_lock(&self.heard.answers).remove(&c.id);
            return Err(e);
        }
        let deadline = tokio::time::Instant::now() + self.settings.answer_wait;
        // The instances to wait for: those alive when it was sent (one
        // busy applying it may miss a heartbeat meanwhile).
        let expected = self.members();
        loop {
            let changed = self.heard.changed.notified();
            let got = sync_lock(&self.heard.answers)
                .get(&c.id)
                .cloned()
                .unwrap_or_default();
            let silent: Vec<String> = expected
                .iter()
                .filter(|i| !got.contains_key(*i))
                .cloned()
                .collect();
            if silent.is_empty() || tokio::time::Instant::now() >= deadline {
                sync_lock(&self.heard.answers).remove(&c.id);
                // Read: the answers (and a seek, which is one-off) leave
                // the compacted topic.
                for instance in got.keys() {
                    let _ = self.put(&format!("answer/{}/{instance}", c.id), None).await;
                }
                if matches!(c.op, Op::Seek(_)) {
                    let _ = self.put(&c.key(), None).await;
                }
                return Ok(FleetReport {
                    id: c.id,
                    instances: got,
                    silent,
                    unapplied: BTreeMap::new(),
                });
            }
            let _ = tokio::time::timeout_at(deadline, changed).await;
        }
    }
}

impl Joining {
    /// Reads the control topic until `cancel`: applies commands through
    /// `controller`, answers them, and beats.
    pub(crate) fn run(
        self,
        controller: Controller,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Fleet> {
        let Joining {
            fleet,
            consumer,
            mut seen,
        } = self;
        let fleet = Arc::new(fleet);
        // Heartbeats on their own task: a reader busy applying a command
        // (a seek waits for handlers) still says it is alive. The last one
        // is a tombstone, so a stopped instance leaves the topic.
        let beating = Arc::clone(&fleet);
        let stop = cancel.clone();
        tasks.spawn(async move {
            let fleet = beating;
            let key = format!("alive/{}", fleet.instance);
            let alive = Envelope::Alive {
                instance: fleet.instance.clone(),
            };
            let mut beat = tokio::time::interval(fleet.settings.heartbeat);
            // A slow send is not made up for with a burst.
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = beat.tick() => {}
                }
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    sent = fleet.send(&key, &alive) => if let Err(e) = sent {
                        tracing::warn!(error = %e, "could not say this instance is alive on the control topic");
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), fleet.put(&key, None)).await;
        });
        let reader = Arc::clone(&fleet);
        tasks.spawn(async move {
            let fleet = reader;
            loop {
                let payload = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = consumer.recv() => match m {
                        Ok(m) => {
                            // A stopped instance's heartbeat tombstone: it
                            // is no longer waited for.
                            if m.payload().is_none() {
                                if let Some(gone) = m.key().and_then(|k| k.strip_prefix(b"alive/")) {
                                    fleet.heard_gone(&String::from_utf8_lossy(gone));
                                }
                            }
                            m.payload().map(<[u8]>::to_vec)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the control topic");
                            continue;
                        }
                    },
                };
                // Whatever it waits on (the broker, a poll thread), the work
                // ends with the shutdown.
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = fleet.handle(payload.as_deref(), &controller, &mut seen) => {}
                }
            }
            drop(consumer);
        });
        fleet
    }
}

impl Fleet {
    async fn handle(&self, payload: Option<&[u8]>, controller: &Controller, seen: &mut Seen) {
        let Some(bytes) = payload else { return };
        match serde_json::from_slice::<Envelope>(bytes) {
            Ok(Envelope::Alive { instance }) => self.heard_alive(instance, Duration::ZERO),
            Ok(Envelope::Answer {
                id,
                instance,
                reports,
            }) => {
                if let Some(answers) = sync_lock(&self.heard.answers).get_mut(&id) {
                    answers.insert(instance, reports);
                }
                self.heard.changed.notify_waiters();
            }
            Ok(Envelope::Command { .. }) => {
                let Some(c) = self.command_in(Some(bytes)) else {
                    return;
                };
                if !seen.first(&c.id) {
                    return;
                }
                let command = c.op.command();
                crate::telemetry::admin_command(command.name(), &c.issuer);
                tracing::info!(
                    id = %c.id,
                    issuer = %c.issuer,
                    from = %c.issued_by,
                    command = command.name(),
                    topic = %c.topic,
                    "fleet command"
                );
                let reports = controller
                    .control(
                        &c.topic,
                        c.group.as_deref(),
                        None,
                        c.partitions.as_deref(),
                        command,
                    )
                    .await;
                let answer = Envelope::Answer {
                    id: c.id.clone(),
                    instance: self.instance.clone(),
                    reports,
                };
                let key = format!("answer/{}/{}", c.id, self.instance);
                if let Err(e) = self.send(&key, &answer).await {
                    tracing::warn!(error = %e, id = %c.id, "could not answer a fleet command");
                }
            }
            Err(e) => malformed(&self.settings.topic, &e),
        }
    }
}
