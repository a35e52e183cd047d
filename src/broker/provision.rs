//! Topic provisioning: create the model's missing topics, idempotently.
//!
//! Real brokers get an admin CreateTopics request; the embedded cluster does
//! not implement it, so its topics are created through the mock API. An
//! existing topic is never altered: if its partition count, replication
//! factor or a declared config differs from the model, that is reported (and
//! logged) rather than "fixed": adding partitions moves keys to other
//! partitions and breaks per-key order, and a config another team set on a
//! shared topic is theirs to change.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
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
    /// Existing topics whose replication factor or a declared topic config
    /// differs from the model (real brokers only; the embedded cluster
    /// cannot describe configs).
    pub config_mismatches: Vec<ConfigMismatch>,
    /// The cluster is librdkafka's mock (the embedded broker, or a dev
    /// broker in another process): consumers get the embedded broker's
    /// short timeouts, since the mock answers a waiting fetch only when
    /// its wait expires.
    pub mock_cluster: bool,
}

/// A declared setting an existing topic does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMismatch {
    /// The topic.
    pub topic: String,
    /// The setting: a topic config name, or `replication.factor`.
    pub setting: String,
    /// What the model declares.
    pub declared: String,
    /// What the broker has; `None` if it does not report the setting.
    pub actual: Option<String>,
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
            report.mock_cluster = true;
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
            // Metadata requests block the calling thread.
            let (admin, checked) = {
                let (servers, wanted) = (bootstrap_servers.clone(), topics.to_vec());
                tokio::task::spawn_blocking(move || {
                    let checked = refuse_without_create_topics(&admin, &servers, &wanted);
                    (admin, checked)
                })
                .await
                .map_err(|e| Error::Provision {
                    topic: String::new(),
                    reason: format!("the broker check did not finish: {e}"),
                    source: None,
                })?
            };
            let (topics, existing, mock) = checked?;
            report.mock_cluster = mock;
            for topic in &existing {
                record(&mut report, topic, false);
            }
            if topics.is_empty() {
                // A mock with every topic: it cannot describe configs, but
                // partition counts it reports.
                check_partitions(admin, &existing, &mut report).await?;
                return Ok(report);
            }
            let topics = &topics;
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
            check_configs(&admin, topics, &options, &mut report).await?;
            check_partitions(admin, topics, &mut report).await?;
        }
    }
    Ok(report)
}

/// The mock cluster (the embedded broker, or kontext's dev broker in
/// another process) names itself `mockCluster…` in metadata.
const MOCK_CLUSTER_ID_PREFIX: &str = "mockCluster";

/// The mock cluster does not implement CreateTopics: librdkafka would wait
/// out the whole admin timeout and report a bare `OperationTimedOut`. Ask
/// for the cluster id first (one metadata round trip) and, on a mock,
/// record the topics that exist and refuse the missing ones by name.
/// Returns the topics still to create through CreateTopics, those found
/// to exist, and whether the cluster is a mock.
fn refuse_without_create_topics(
    admin: &AdminClient<DefaultClientContext>,
    bootstrap_servers: &str,
    topics: &[TopicToCreate],
) -> Result<(Vec<TopicToCreate>, Vec<TopicToCreate>, bool)> {
    let names = || {
        topics
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let client = admin.inner();
    let cluster_id = client.fetch_cluster_id(ADMIN_TIMEOUT);
    let Some(cluster_id) = cluster_id else {
        return Err(Error::Provision {
            topic: names(),
            reason: format!("no broker at `{bootstrap_servers}` answered within {ADMIN_TIMEOUT:?}"),
            source: None,
        });
    };
    if !cluster_id.starts_with(MOCK_CLUSTER_ID_PREFIX) {
        return Ok((topics.to_vec(), Vec::new(), false));
    }
    // Listing every topic never auto-creates one.
    let metadata = client
        .fetch_metadata(None, ADMIN_TIMEOUT)
        .map_err(|source| Error::Provision {
            topic: names(),
            reason: "could not list the broker's topics".into(),
            source: Some(Box::new(source)),
        })?;
    let (existing, missing): (Vec<TopicToCreate>, Vec<TopicToCreate>) = topics
        .iter()
        .cloned()
        .partition(|topic| metadata.topics().iter().any(|t| t.name() == topic.name));
    if missing.is_empty() {
        return Ok((Vec::new(), existing, true));
    }
    let missing: Vec<&str> = missing.iter().map(|t| t.name.as_str()).collect();
    Err(Error::Provision {
        topic: missing.join(","),
        reason: format!(
            "the broker at `{bootstrap_servers}` is librdkafka's mock cluster (cluster id \
             `{cluster_id}`, e.g. kontext's dev broker), which does not support \
             CreateTopics; create the topics there (`DevBroker::create_topics`) or \
             set `provision_topics = false`"
        ),
        source: None,
    })
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
    let expected: Vec<(String, i32, Option<i32>)> = topics
        .iter()
        .filter(|t| report.existing.contains(&t.name))
        .map(|t| (t.name.clone(), t.partitions, t.replication))
        .collect();
    // Metadata requests block the calling thread.
    let mismatches = tokio::task::spawn_blocking(move || {
        let (mut out, mut replication) = (Vec::new(), Vec::new());
        for (name, declared, declared_replication) in expected {
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
                    out.push((name.clone(), declared, actual));
                }
                let replicas = t.partitions().first().map(|p| p.replicas().len());
                if let (Some(want), Some(have)) = (declared_replication, replicas) {
                    if usize::try_from(want).ok() != Some(have) {
                        replication.push(mismatch(
                            &name,
                            "replication.factor",
                            &want.to_string(),
                            Some(have.to_string()),
                        ));
                    }
                }
            }
        }
        Ok::<_, Error>((out, replication))
    })
    .await
    .map_err(|e| Error::Provision {
        topic: String::new(),
        reason: format!("metadata check did not finish: {e}"),
        source: None,
    })??;
    report.partition_mismatches = mismatches.0;
    report.config_mismatches.extend(mismatches.1);
    Ok(())
}

fn mismatch(topic: &str, setting: &str, declared: &str, actual: Option<String>) -> ConfigMismatch {
    tracing::warn!(
        topic,
        setting,
        declared,
        actual = actual.as_deref().unwrap_or("(not reported)"),
        "existing topic differs from the model; left unchanged"
    );
    ConfigMismatch {
        topic: topic.to_owned(),
        setting: setting.to_owned(),
        declared: declared.to_owned(),
        actual,
    }
}

/// Compares the configs the model declares for existing topics with what
/// the broker reports (DescribeConfigs).
async fn check_configs(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[TopicToCreate],
    options: &AdminOptions,
    report: &mut ProvisionReport,
) -> Result<()> {
    let declared: Vec<&TopicToCreate> = topics
        .iter()
        .filter(|t| report.existing.contains(&t.name) && !t.configs.is_empty())
        .collect();
    if declared.is_empty() {
        return Ok(());
    }
    let specifiers: Vec<ResourceSpecifier<'_>> = declared
        .iter()
        .map(|t| ResourceSpecifier::Topic(&t.name))
        .collect();
    let described = admin
        .describe_configs(&specifiers, options)
        .await
        .map_err(|source| Error::Provision {
            topic: declared
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            reason: "the DescribeConfigs request failed".into(),
            source: Some(Box::new(source)),
        })?;
    for (topic, result) in declared.iter().zip(described) {
        let resource = result.map_err(|code| Error::Provision {
            topic: topic.name.clone(),
            reason: format!("describing its configs, the broker answered {code}"),
            source: Some(Box::new(rdkafka::error::KafkaError::AdminOp(code))),
        })?;
        for (key, want) in &topic.configs {
            let have = resource.get(key).and_then(|e| e.value.clone());
            if have.as_deref() != Some(want.as_str()) {
                report
                    .config_mismatches
                    .push(mismatch(&topic.name, key, want, have));
            }
        }
    }
    Ok(())
}
