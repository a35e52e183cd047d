//! Operator controls on a running `Kontext`: pause, resume and seek of
//! consumed lanes, dead-letter replay. Each is logged with who issued it
//! and counted in `kontext_admin_commands_total`.

use std::sync::Arc;

use super::Kontext;
use crate::admin::{Aim, Command, ControlReport, FleetReport, Outcome, SeekTo, Target};
use crate::error::{Error, Result};

impl Kontext {
    /// Holds `target`'s lane (or its named partitions) paused until
    /// [`resume`](Self::resume), also across rebalances: a held partition
    /// that comes to this member later starts paused. Kafka stops fetching
    /// them at once; records already handed to the lane's worker (at most
    /// its buffer) are still handled, later ones wait. A paused lane is not
    /// unhealthy; the registry shows it (`TypeStatus::held`,
    /// `ServiceStatus::held_partitions`).
    pub async fn pause(&self, target: Target) -> Result<Vec<ControlReport>> {
        self.control(target, Command::Pause).await
    }

    /// Lets what [`pause`](Self::pause) held flow again, from where it
    /// stopped.
    pub async fn resume(&self, target: Target) -> Result<Vec<ControlReport>> {
        self.control(target, Command::Resume).await
    }

    /// Moves the group's position on `target`'s partitions owned here.
    /// Records of them in flight are fenced as on a revoke (a handler
    /// running may finish; its offset is not committed), consumption
    /// restarts at the new position, and that position is committed, so a
    /// rebalance right after does not lose it. A partition owned by another
    /// member is reported [`NotOwned`](crate::admin::Outcome::NotOwned):
    /// seek there (or, for a fleet, on every instance).
    pub async fn seek(&self, target: Target, to: SeekTo) -> Result<Vec<ControlReport>> {
        self.control(target, Command::Seek(to)).await
    }

    /// [`pause`](Self::pause) on every instance of the fleet (see
    /// [`KontextBuilder::fleet`](crate::KontextBuilder::fleet)), held also
    /// by instances that start later; the report lists each instance's
    /// answers, and those that did not answer in time.
    pub async fn fleet_pause(&self, target: Target) -> Result<FleetReport> {
        self.fleet_command(target, Command::Pause).await
    }

    /// [`resume`](Self::resume) on every instance of the fleet.
    pub async fn fleet_resume(&self, target: Target) -> Result<FleetReport> {
        self.fleet_command(target, Command::Resume).await
    }

    /// [`seek`](Self::seek) on every instance of the fleet: each applies
    /// it to the partitions it owns, so together they move the group.
    pub async fn fleet_seek(&self, target: Target, to: SeekTo) -> Result<FleetReport> {
        self.fleet_command(target, Command::Seek(to)).await
    }

    /// The fleet's instances this one heard from within three heartbeats
    /// (itself included): those a fleet command waits for.
    pub fn fleet_members(&self) -> Result<Vec<String>> {
        Ok(self.fleet()?.members())
    }

    fn fleet(&self) -> Result<&super::fleet::Fleet> {
        self.fleet.as_deref().ok_or_else(|| {
            Error::config("this instance is in no fleet: start it with `KontextBuilder::fleet`")
        })
    }

    /// A seek to a time on librdkafka's mock cluster, which answers every
    /// lookup by time with the end of the partition: refused rather than
    /// skipping everything.
    fn refuse_time_seek_on_mock(&self, command: &Command) -> Result<()> {
        let mock = self.broker.as_embedded().is_some()
            || self.provisioned.as_ref().is_some_and(|r| r.mock_cluster);
        if mock && matches!(command, Command::Seek(SeekTo::Timestamp(_))) {
            return Err(Error::config(
                "a seek to a time needs a Kafka broker: the embedded broker (librdkafka's mock \
                 cluster) cannot look offsets up by time",
            ));
        }
        Ok(())
    }

    async fn fleet_command(&self, target: Target, command: Command) -> Result<FleetReport> {
        let fleet = self.fleet()?;
        self.refuse_time_seek_on_mock(&command)?;
        // A type names its topic and its group here; the fleet shares the model.
        let (topic, group) = match &target.what {
            Aim::Type(id, type_name) => {
                let (topic, service) = self
                    .registry
                    .lane_of(*id)
                    .ok_or(Error::NotConsumed { type_name })?;
                let group = self.registry.service(&service).map(|s| s.group_id);
                (topic, target.group.clone().or(group))
            }
            Aim::Topic(topic) => (topic.clone(), target.group.clone()),
        };
        crate::telemetry::admin_command(command.name(), &target.issuer);
        tracing::info!(
            command = command.name(),
            issuer = %target.issuer,
            %topic,
            group = ?group,
            partitions = ?target.partitions,
            "fleet command issued"
        );
        let seek = matches!(command, Command::Seek(_));
        let mut report = fleet
            .issue(
                &target.issuer,
                topic.clone(),
                group.clone(),
                target.partitions.clone(),
                &command,
            )
            .await?;
        if seek {
            // The partitions named, else the topic's as the model declares
            // them and every one an answer names (a topic grown outside
            // the model has more).
            let all: Vec<i32> = match &target.partitions {
                Some(named) => named.clone(),
                None => {
                    let declared = self
                        .model
                        .topics()
                        .iter()
                        .find(|t| t.name() == topic)
                        .map_or(0, |t| t.partitions());
                    let mut all: Vec<i32> =
                        (0..declared)
                            .chain(report.instances.values().flatten().flat_map(
                                |r| match &r.outcome {
                                    Outcome::Applied {
                                        partitions,
                                        not_applied,
                                        ..
                                    } => partitions.iter().chain(not_applied).copied().collect(),
                                    Outcome::NotOwned { partitions } => partitions.clone(),
                                    _ => Vec::new(),
                                },
                            ))
                            .collect();
                    all.sort_unstable();
                    all.dedup();
                    all
                }
            };
            report.unapplied = report.unmoved(&all, group.as_deref());
        }
        Ok(report)
    }

    async fn control(&self, target: Target, command: Command) -> Result<Vec<ControlReport>> {
        let consumers = self
            .consumers
            .as_ref()
            .ok_or(Error::RoleNotRegistered { role: "consumers" })?;
        let (topic, service) = match &target.what {
            Aim::Type(id, type_name) => {
                let (topic, service) = self
                    .registry
                    .lane_of(*id)
                    .ok_or(Error::NotConsumed { type_name })?;
                (topic, Some(service))
            }
            Aim::Topic(topic) => (topic.clone(), None),
        };
        self.refuse_time_seek_on_mock(&command)?;
        crate::telemetry::admin_command(command.name(), &target.issuer);
        tracing::info!(
            command = command.name(),
            issuer = %target.issuer,
            %topic,
            group = ?target.group,
            partitions = ?target.partitions,
            "operator command"
        );
        let reports = consumers
            .controller()
            .control(
                &topic,
                target.group.as_deref(),
                service.as_deref(),
                target.partitions.as_deref(),
                command,
            )
            .await;
        if reports.is_empty() {
            return Err(Error::config(format!(
                "no poll service of this process reads topic `{topic}`{}",
                target
                    .group
                    .as_deref()
                    .map(|g| format!(" in group `{g}`"))
                    .unwrap_or_default()
            )));
        }
        Ok(reports)
    }

    /// Sends the dead letters of `dead_letter_topic` that `filter` matches
    /// back to their original topics (`dlq-original-topic`), with their
    /// key, payload and headers as consumed, without the `dlq-*` headers,
    /// and with [`REPLAYED_FROM`](crate::admin::REPLAYED_FROM) naming the
    /// dead letter's topic, partition and offset. Reads the topic up to its
    /// end when the replay began; a dead letter whose payload was cut to
    /// fit (`dlq-truncated`) is counted, not replayed. A dry run counts.
    ///
    /// The dead letters stay on their topic: a replay that fails halfway
    /// (the error says how many were not delivered) can be run again, at
    /// the cost of sending the delivered ones twice.
    pub async fn replay_dead_letters(
        &self,
        dead_letter_topic: &str,
        filter: crate::admin::ReplayFilter,
    ) -> Result<crate::admin::Replayed> {
        // Only this model's dead letters go back, to its own topics.
        if !self
            .dead_letter_topics()
            .iter()
            .any(|d| d == dead_letter_topic)
        {
            return Err(Error::config(format!(
                "`{dead_letter_topic}` is not a dead-letter topic of this model's types"
            )));
        }
        let servers = self.broker.bootstrap_servers().to_owned();
        let config = self.settings.client_config(&servers);
        let topic = dead_letter_topic.to_owned();
        let issuer = filter.issued_by.as_deref().unwrap_or("api");
        crate::telemetry::admin_command("replay", issuer);
        tracing::info!(topic = %topic, %issuer, filter = ?filter, "replaying dead letters");
        // The blocking scan stops (flushing what it sent) when this call's
        // future is dropped or kontext shuts down.
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _guard = OnDrop(Arc::clone(&dropped));
        let cancel = self.cancel.clone();
        let originals: Vec<String> = self
            .model
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .collect();
        // Owned by kontext: its shutdown stops the scan and waits for it.
        let replayed = self
            .tasks
            .spawn_blocking(move || {
                let stopped =
                    || cancel.is_cancelled() || dropped.load(std::sync::atomic::Ordering::Acquire);
                crate::admin::replay_blocking(
                    &config, &servers, &topic, &filter, &originals, &stopped,
                )
            })
            .await
            .map_err(|e| {
                Error::Internal(format!("the dead-letter replay did not finish: {e}"))
            })??;
        tracing::info!(topic = %dead_letter_topic, replayed = ?replayed, "dead letters replayed");
        Ok(replayed)
    }

    /// The newest records of `look`'s topic (or partition), newest first,
    /// at most [`MAX_RECENT`](crate::admin::MAX_RECENT): decoded with the
    /// model's codec as JSON, with credentials and
    /// [`sensitive`](crate::TopicBuilder::sensitive) fields, headers and
    /// keys redacted, and a payload the codec refuses shown by why (its
    /// values elided), never as bytes. Only the model's topics and its
    /// consumers' dead-letter topics can be read. Reads with a consumer of
    /// its own that joins no group and commits nothing, at most 8 MiB of
    /// payloads, and returns what it read within 10 s (all lookups
    /// included); [`shutdown`](Self::shutdown) waits for it and stops it.
    pub async fn recent_messages(
        &self,
        look: crate::admin::Look,
    ) -> Result<Vec<crate::admin::RecentRecord>> {
        let topic = look.topic.as_str();
        let known = self.model.topics().iter().any(|t| t.name() == topic)
            || self.dead_letter_topics().iter().any(|d| d == topic);
        if !known {
            return Err(Error::config(format!(
                "`{topic}` is neither a topic of the model nor a dead-letter topic of its consumers"
            )));
        }
        let issuer = look.issued_by.as_deref().unwrap_or("api");
        crate::telemetry::admin_command("messages", issuer);
        tracing::info!(%topic, %issuer, partition = ?look.partition, "recent records read");
        let limit = look.limit.clamp(1, crate::admin::MAX_RECENT);
        let config = self.settings.client_config(self.broker.bootstrap_servers());
        let (owned, partition) = (topic.to_owned(), look.partition);
        let cancel = self.cancel.clone();
        // The look stops when this call's future is dropped (its caller
        // went away) as when kontext shuts down.
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _guard = OnDrop(Arc::clone(&dropped));
        // Owned by kontext: its shutdown cancels the look and waits for it.
        let raw = self
            .tasks
            .spawn_blocking(move || {
                let stopped =
                    || cancel.is_cancelled() || dropped.load(std::sync::atomic::Ordering::Acquire);
                crate::admin::recent_blocking(&config, &owned, partition, limit, &stopped)
            })
            .await
            .map_err(|e| {
                Error::Internal(format!("reading recent records did not finish: {e}"))
            })??;
        // Only a dead letter's `dlq-original-topic` is trusted: any
        // producer can write that header on an ordinary topic.
        let dead_letters = self.dead_letter_topics().iter().any(|d| d == topic);
        Ok(raw
            .into_iter()
            .map(|r| crate::admin::view(&self.model, topic, dead_letters, r))
            .collect())
    }

    /// The dead-letter topics of the model's types (consumed here or not)
    /// and of this process's consumers.
    fn dead_letter_topics(&self) -> Vec<String> {
        let fallback = self.settings.consumer.dead_letter_topic.as_deref();
        let mut topics: Vec<String> = self
            .model
            .type_infos()
            .map(|info| info.dead_letter_topic(fallback))
            .chain(
                self.registry()
                    .types()
                    .into_iter()
                    .map(|t| t.dead_letter_topic),
            )
            .collect();
        topics.sort_unstable();
        topics.dedup();
        topics
    }
}

/// Raises its flag when dropped: a blocking admin job sees that its
/// caller's future went away.
struct OnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}
