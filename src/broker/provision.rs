//! Topic provisioning: create the model's missing topics, idempotently.
//!
//! Real brokers get an admin CreateTopics request; the embedded cluster does
//! not implement it, so its topics are created through the mock API. An
//! existing topic is never altered: if its partition count differs from the
//! model, that is reported (and logged) rather than "fixed", because adding
//! partitions moves keys to other partitions and breaks per-key order.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::broker::Broker;
use crate::config::KafkaSettings;
use crate::error::{Error, Result};
use crate::model::Model;

/// What provisioning found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    /// Topics created by this run.
    pub created: Vec<String>,
    /// Topics that already existed.
    pub existing: Vec<String>,
    /// Existing topics whose partition count differs from the model:
    /// `(topic, declared, actual)`.
    pub partition_mismatches: Vec<(String, i32, i32)>,
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A topic to create if missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicToCreate {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Replication factor; `None` means the broker's default.
    pub replication: Option<i32>,
    /// Topic configs.
    pub configs: BTreeMap<String, String>,
}

impl TopicToCreate {
    /// A topic with default replication and no configs.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        TopicToCreate {
            name: name.into(),
            partitions,
            replication: None,
            configs: BTreeMap::new(),
        }
    }
}

/// Creates every topic of `model` that does not exist yet.
pub async fn provision_topics(
    broker: &Broker,
    settings: &KafkaSettings,
    model: &Model,
) -> Result<ProvisionReport> {
    let topics: Vec<TopicToCreate> = model
        .topics()
        .iter()
        .map(|t| TopicToCreate {
            name: t.name().to_owned(),
            partitions: t.partitions(),
            replication: t.replication(),
            configs: t.configs().clone(),
        })
        .collect();
    provision(broker, settings, &topics).await
}

/// Creates every topic in `topics` that does not exist yet.
pub async fn provision(
    broker: &Broker,
    settings: &KafkaSettings,
    topics: &[TopicToCreate],
) -> Result<ProvisionReport> {
    let mut report = ProvisionReport::default();
    if topics.is_empty() {
        return Ok(report);
    }
    match broker {
        Broker::Embedded(embedded) => {
            for topic in topics {
                let created = embedded.create_topic(
                    &topic.name,
                    topic.partitions,
                    topic.replication.unwrap_or(1),
                )?;
                record(&mut report, topic, created);
            }
        }
        Broker::External { bootstrap_servers } => {
            let admin: AdminClient<DefaultClientContext> = settings
                .client_config(bootstrap_servers)
                .create()
                .map_err(|source| Error::Client {
                    role: "admin",
                    source,
                })?;
            let new_topics: Vec<NewTopic<'_>> = topics
                .iter()
                .map(|t| {
                    let replication = TopicReplication::Fixed(t.replication.unwrap_or(-1));
                    t.configs.iter().fold(
                        NewTopic::new(&t.name, t.partitions, replication),
                        |nt, (k, v)| nt.set(k, v),
                    )
                })
                .collect();
            let options = AdminOptions::new()
                .operation_timeout(Some(ADMIN_TIMEOUT))
                .request_timeout(Some(ADMIN_TIMEOUT));
            let results = admin
                .create_topics(&new_topics, &options)
                .await
                .map_err(|source| Error::Provision {
                    topic: topics
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    reason: "the CreateTopics request failed".into(),
                    source: Some(Box::new(source)),
                })?;
            for (topic, result) in topics.iter().zip(results) {
                match result {
                    Ok(_) => record(&mut report, topic, true),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        record(&mut report, topic, false)
                    }
                    Err((name, code)) => {
                        return Err(Error::Provision {
                            topic: name,
                            reason: format!("the broker answered {code}"),
                            source: Some(Box::new(rdkafka::error::KafkaError::AdminOp(code))),
                        });
                    }
                }
            }
            check_partitions(admin, topics, &mut report).await?;
        }
    }
    Ok(report)
}

fn record(report: &mut ProvisionReport, topic: &TopicToCreate, created: bool) {
    if created {
        tracing::info!(topic = %topic.name, partitions = topic.partitions, "created topic");
        report.created.push(topic.name.clone());
    } else {
        tracing::debug!(topic = %topic.name, "topic already exists");
        report.existing.push(topic.name.clone());
    }
}

/// Compares existing topics' partition counts with the model.
async fn check_partitions(
    admin: AdminClient<DefaultClientContext>,
    topics: &[TopicToCreate],
    report: &mut ProvisionReport,
) -> Result<()> {
    if report.existing.is_empty() {
        return Ok(());
    }
    let expected: Vec<(String, i32)> = topics
        .iter()
        .filter(|t| report.existing.contains(&t.name))
        .map(|t| (t.name.clone(), t.partitions))
        .collect();
    // Metadata requests block the calling thread.
    let mismatches = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (name, declared) in expected {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&name), ADMIN_TIMEOUT)
                .map_err(|source| Error::Provision {
                    topic: name.clone(),
                    reason: "could not read its metadata".into(),
                    source: Some(Box::new(source)),
                })?;
            if let Some(t) = metadata.topics().iter().find(|t| t.name() == name) {
                let actual = i32::try_from(t.partitions().len()).unwrap_or(i32::MAX);
                if actual != declared {
                    tracing::warn!(
                        topic = %name,
                        declared,
                        actual,
                        "existing topic has a different partition count than the model; left unchanged"
                    );
                    out.push((name, declared, actual));
                }
            }
        }
        Ok::<_, Error>(out)
    })
    .await
    .map_err(|e| Error::Provision {
        topic: String::new(),
        reason: format!("metadata check did not finish: {e}"),
        source: None,
    })??;
    report.partition_mismatches = mismatches;
    Ok(())
}
