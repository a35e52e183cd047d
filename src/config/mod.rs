//! Kafka client settings: in code, from a file (TOML or JSON) and from
//! environment variables, layered in that order.
//!
//! One section serves every deployment of a service: an API process that
//! only produces and a worker that only consumes read the same settings and
//! register only the role they need (see [`KontextBuilder`](crate::KontextBuilder)).
//!
//! ```toml
//! [kafka]
//! bootstrap_servers = "kafka-1:9092,kafka-2:9092"   # omit for the embedded broker
//! client_id = "orders-api"
//!
//! [kafka.topics.orders]          # keyed by the model's topic name
//! name = "orders-v2"              # physical name in this deployment
//! group = "order-processing"
//! partitions = 10
//!
//! [kafka.producer]
//! linger_ms = 10
//! compression = "lz4"
//!
//! [kafka.security]
//! protocol = "sasl_ssl"
//! sasl_mechanism = "SCRAM-SHA-512"
//! sasl_username = "orders"
//! sasl_password = "from-a-vault"
//!
//! [kafka.librdkafka]             # raw pass-through, wins over everything above
//! "socket.keepalive.enable" = "true"
//! ```
//!
//! Environment variables override the file: `KONTEXT_BOOTSTRAP_SERVERS`,
//! `KONTEXT_PRODUCER__LINGER_MS`, `KONTEXT_TOPICS__ORDERS__NAME` (`__`
//! separates levels).

mod secret;
mod service;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Json, Toml};
use rdkafka::ClientConfig;
use serde::Deserialize;

pub(crate) use secret::scrub_url;
pub use secret::{Properties, Secret, is_sensitive_property, redact_url};
pub use service::{DatabaseSettings, ServiceConfig};

use crate::error::{Error, Result};

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "KONTEXT_";

/// Everything kontext needs to talk to Kafka. Every field has a default, so
/// an empty file (or none) gives a working embedded setup.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list. `None` starts the embedded broker.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub bootstrap_servers: Option<String>,
    /// `client.id` of every client and the `ce_source` header of every
    /// message. Defaults to `kontext`.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub client_id: Option<String>,
    /// Whether an embedded broker may be started when `bootstrap_servers`
    /// names none. `None` (the default): yes, with a warning, except beside
    /// a PostgreSQL database, where it is refused (an outbox there would
    /// relay its rows into a broker inside the process and delete them).
    /// `Some(true)`: yes, also beside PostgreSQL. `Some(false)`: never; a
    /// missing `bootstrap_servers` is an error.
    pub embedded_broker: Option<bool>,
    /// Whether to create the model's missing topics at start-up. Defaults to `true`.
    pub provision_topics: Option<bool>,
    /// Per-topic settings, keyed by the model's topic name.
    pub topics: BTreeMap<String, TopicSettings>,
    /// Producer settings.
    pub producer: ProducerSettings,
    /// Consumer settings shared by every poll service unless overridden.
    pub consumer: ConsumerSettings,
    /// Transport security and authentication.
    pub security: SecuritySettings,
    /// Raw librdkafka properties for every client; they win over the typed settings.
    pub librdkafka: Properties,
}

/// Deployment settings of one topic of the model.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSettings {
    /// Physical topic name in this deployment; defaults to the model's name.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub name: Option<String>,
    /// Consumer group of this topic's consumers; defaults to `consumer.group_id`.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub group: Option<String>,
    /// Partitions to create the topic with; overrides the model.
    pub partitions: Option<i32>,
    /// Replication factor to create the topic with; overrides the model.
    pub replication: Option<i32>,
    /// Topic configs to create the topic with; merged over the model's.
    /// A number or boolean value is taken as text (`retention.ms = 604800000`).
    pub configs: Properties,
}

impl TopicSettings {
    /// Sets the physical topic name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets the partition count used for provisioning.
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Sets the replication factor used for provisioning.
    pub fn replication(mut self, replication: i32) -> Self {
        self.replication = Some(replication);
        self
    }
}

/// How many replicas must acknowledge a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "AcksRepr")]
pub enum Acks {
    /// All in-sync replicas (`acks=all`). The default, and required for idempotence.
    #[default]
    All,
    /// The partition leader only (`acks=1`).
    Leader,
    /// No acknowledgement (`acks=0`); messages may be lost silently.
    None,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AcksRepr {
    Int(i64),
    Str(String),
}

impl TryFrom<AcksRepr> for Acks {
    type Error = String;
    fn try_from(value: AcksRepr) -> std::result::Result<Self, String> {
        match value {
            AcksRepr::Int(-1) => Ok(Acks::All),
            AcksRepr::Int(1) => Ok(Acks::Leader),
            AcksRepr::Int(0) => Ok(Acks::None),
            AcksRepr::Str(s) => match s.to_ascii_lowercase().as_str() {
                "all" | "-1" => Ok(Acks::All),
                "leader" | "1" => Ok(Acks::Leader),
                "none" | "0" => Ok(Acks::None),
                other => Err(format!(
                    "unknown acks `{other}`; expected all, leader or none"
                )),
            },
            AcksRepr::Int(n) => Err(format!("unknown acks `{n}`; expected -1, 1 or 0")),
        }
    }
}

impl Acks {
    fn as_property(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

/// Compression codec of produced batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression (the default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4: cheap on CPU, a good default for busy topics.
    Lz4,
    /// Zstandard; needs a librdkafka built with zstd.
    Zstd,
}

impl Compression {
    fn as_property(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Producer client settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerSettings {
    /// Defaults to [`Acks::All`].
    pub acks: Acks,
    /// Idempotent producer (no duplicates or reordering from retries).
    /// Defaults to `true`; needs `acks = all`.
    pub idempotence: bool,
    /// Defaults to [`Compression::None`].
    pub compression: Compression,
    /// How long to wait to fill a batch. Defaults to 5 ms.
    pub linger_ms: u64,
    /// Most bytes in one batch; `None` keeps librdkafka's default (1 MB).
    pub batch_size: Option<u64>,
    /// How long a message may wait for delivery, retries included, before it
    /// fails; `None` keeps librdkafka's default (300 s).
    pub message_timeout_ms: Option<u64>,
    /// Raw librdkafka properties for the producer only.
    pub librdkafka: Properties,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            acks: Acks::All,
            idempotence: true,
            compression: Compression::None,
            linger_ms: 5,
            batch_size: None,
            message_timeout_ms: None,
            librdkafka: Properties::default(),
        }
    }
}

/// Where a consumer group without committed offsets starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// From the oldest retained record (the default: a new group sees every event).
    #[default]
    Earliest,
    /// From new records only.
    Latest,
    /// Fail instead of guessing.
    Error,
}

impl OffsetReset {
    /// The librdkafka value.
    pub fn as_property(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
            OffsetReset::Error => "error",
        }
    }
}

/// Which records of transactions a consumer reads (`isolation.level`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// Only records of committed transactions (and records written outside
    /// transactions), up to the first open transaction: librdkafka's and
    /// kontext's default.
    #[default]
    ReadCommitted,
    /// Every record, aborted transactions' included.
    ReadUncommitted,
}

impl IsolationLevel {
    /// The librdkafka value.
    pub fn as_property(self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "read_committed",
            IsolationLevel::ReadUncommitted => "read_uncommitted",
        }
    }
}

/// Consumer client settings shared by the poll services.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Default consumer group; topics may set their own.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub group_id: Option<String>,
    /// Where a group without committed offsets starts. Unset: the shared
    /// section's value for a dedicated connection, else
    /// [`OffsetReset::Earliest`] (unless `librdkafka` sets
    /// `auto.offset.reset` itself).
    pub auto_offset_reset: Option<OffsetReset>,
    /// Which records of Kafka transactions are read. Unset: the shared
    /// section's value for a dedicated connection, else
    /// [`IsolationLevel::ReadCommitted`] (aborted transactions' records
    /// are never handled).
    pub isolation_level: Option<IsolationLevel>,
    /// `session.timeout.ms`; `None` keeps librdkafka's default (45 s).
    pub session_timeout_ms: Option<u64>,
    /// `heartbeat.interval.ms`; `None` keeps librdkafka's default (3 s).
    pub heartbeat_interval_ms: Option<u64>,
    /// `max.poll.interval.ms`; `None` keeps librdkafka's default (300 s).
    pub max_poll_interval_ms: Option<u64>,
    /// When partitions are revoked, how long the rebalance waits for a
    /// handler already running on one of them to finish, so its offset is
    /// committed before the next owner starts; past it, that record is
    /// handled again by the next owner. `None` means 10 s. Keep it well
    /// below `max.poll.interval.ms`, which bounds the whole rebalance.
    pub revoke_timeout_ms: Option<u64>,
    /// How long a consumed topic may hold records without finishing one (a
    /// handler that hangs, with no `handler_timeout`) before its poll
    /// service reports unhealthy. `None` means 120 s. The registry shows
    /// the stall (`stalled_for`) from the first 100 ms on.
    pub stall_limit_ms: Option<u64>,
    /// Exactly-once handlers: the most records one Kafka transaction
    /// takes. `None` means 1000.
    pub transaction_max_records: Option<usize>,
    /// Exactly-once handlers: how long one Kafka transaction takes records
    /// before it commits (it commits sooner when no record waits). `None`
    /// means 100 ms. Longer transactions cost less per record and delay
    /// what `read_committed` consumers see by as much.
    pub transaction_interval_ms: Option<u64>,
    /// Dead-letter topic of consumers that do not name their own; `None`
    /// means `<topic>.dlq` per source topic.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub dead_letter_topic: Option<String>,
    /// Raw librdkafka properties for consumers only.
    pub librdkafka: Properties,
}

/// `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    fn as_property(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// Transport security and authentication. Passwords are [`Secret`]s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecuritySettings {
    /// `security.protocol`; `None` keeps plaintext.
    pub protocol: Option<SecurityProtocol>,
    /// `sasl.mechanism`: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER`...
    #[serde(deserialize_with = "secret::lenient_string")]
    pub sasl_mechanism: Option<String>,
    /// `sasl.username`.
    pub sasl_username: Option<Secret>,
    /// `sasl.password`.
    pub sasl_password: Option<Secret>,
    /// `ssl.ca.location`.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub ssl_ca_location: Option<String>,
    /// `ssl.certificate.location`.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub ssl_certificate_location: Option<String>,
    /// `ssl.key.location`.
    #[serde(deserialize_with = "secret::lenient_string")]
    pub ssl_key_location: Option<String>,
    /// `ssl.key.password`.
    pub ssl_key_password: Option<Secret>,
}

/// Top-level keys, so only `KONTEXT_<known key>` variables are read as
/// settings and other variables with the prefix (a test's broker address,
/// say) are left alone.
const TOP_LEVEL_KEYS: &[&str] = &[
    "bootstrap_servers",
    "client_id",
    "embedded_broker",
    "provision_topics",
    "topics",
    "producer",
    "consumer",
    "security",
    "librdkafka",
];

impl KafkaSettings {
    /// Default settings: embedded broker, client id `kontext`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Settings from `KONTEXT_*` environment variables over the defaults.
    pub fn from_env() -> Result<Self> {
        warn_near_misses();
        Self::from_figment(&Figment::new().merge(env_provider()), "")
    }

    /// Settings from a TOML or JSON file (by extension), section `section`
    /// (`""` for the whole file, `"kafka"` for a `[kafka]` table), with
    /// `KONTEXT_*` environment variables on top. A missing file is an error.
    pub fn from_file(path: impl AsRef<Path>, section: &str) -> Result<Self> {
        warn_near_misses();
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::config(format!(
                "settings file `{}` does not exist",
                path.display()
            )));
        }
        let file = file_figment(path);
        let focused = if section.is_empty() {
            file
        } else {
            file.focus(section)
        };
        Self::from_figment(&focused.merge(env_provider()), "")
    }

    /// Settings from a figment the application already assembles, e.g. one
    /// that also holds its own configuration; `section` as in [`from_file`](Self::from_file).
    pub fn from_figment(figment: &Figment, section: &str) -> Result<Self> {
        // Lossy: a number or a boolean may come as text (the environment).
        let settings: KafkaSettings = if section.is_empty() {
            figment.extract_lossy()
        } else {
            figment.extract_inner_lossy(section)
        }
        .map_err(|e| Error::Config {
            message: e.to_string(),
            source: Some(Box::new(e)),
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks combinations librdkafka would reject later with a vaguer message.
    pub fn validate(&self) -> Result<()> {
        if self.producer.idempotence && self.producer.acks != Acks::All {
            return Err(Error::config(
                "`producer.idempotence = true` requires `producer.acks = \"all\"`",
            ));
        }
        if let Some(servers) = &self.bootstrap_servers {
            if servers.trim().is_empty() {
                return Err(Error::config(
                    "`bootstrap_servers` is empty; omit it to use the embedded broker",
                ));
            }
        }
        Ok(())
    }

    /// Sets the bootstrap servers (`host:port,host:port`).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap_servers = Some(servers.into());
        self
    }

    /// Sets the client id.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Turns topic provisioning at start-up on or off.
    pub fn provision_topics(mut self, enabled: bool) -> Self {
        self.provision_topics = Some(enabled);
        self
    }

    /// Sets a raw librdkafka property for every client.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.librdkafka.set(key, value);
        self
    }

    /// Edits the settings of the model topic `name`.
    pub fn topic(
        mut self,
        name: impl Into<String>,
        f: impl FnOnce(TopicSettings) -> TopicSettings,
    ) -> Self {
        let name = name.into();
        let current = self.topics.remove(&name).unwrap_or_default();
        self.topics.insert(name, f(current));
        self
    }

    /// Edits the producer settings.
    pub fn producer(mut self, f: impl FnOnce(&mut ProducerSettings)) -> Self {
        f(&mut self.producer);
        self
    }

    /// Edits the consumer settings.
    pub fn consumer(mut self, f: impl FnOnce(&mut ConsumerSettings)) -> Self {
        f(&mut self.consumer);
        self
    }

    /// Edits the security settings.
    pub fn security(mut self, f: impl FnOnce(&mut SecuritySettings)) -> Self {
        f(&mut self.security);
        self
    }

    /// The client id in effect.
    pub fn effective_client_id(&self) -> &str {
        self.client_id.as_deref().unwrap_or("kontext")
    }

    /// Whether provisioning runs at start-up.
    pub fn provisioning_enabled(&self) -> bool {
        self.provision_topics.unwrap_or(true)
    }

    /// Settings every client shares: servers, client id, security, raw properties.
    pub fn client_config(&self, bootstrap_servers: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("client.id", self.effective_client_id());
        let s = &self.security;
        if let Some(p) = s.protocol {
            config.set("security.protocol", p.as_property());
        }
        let optional = [
            ("sasl.mechanism", s.sasl_mechanism.as_deref()),
            (
                "sasl.username",
                s.sasl_username.as_ref().map(Secret::expose),
            ),
            (
                "sasl.password",
                s.sasl_password.as_ref().map(Secret::expose),
            ),
            ("ssl.ca.location", s.ssl_ca_location.as_deref()),
            (
                "ssl.certificate.location",
                s.ssl_certificate_location.as_deref(),
            ),
            ("ssl.key.location", s.ssl_key_location.as_deref()),
            (
                "ssl.key.password",
                s.ssl_key_password.as_ref().map(Secret::expose),
            ),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                config.set(key, value);
            }
        }
        for (k, v) in self.librdkafka.iter() {
            config.set(k, v);
        }
        config
    }

    /// The producer's client configuration, as kontext will create it.
    /// Its `Debug` hides passwords; log it with care all the same.
    pub fn producer_config(&self, bootstrap_servers: &str) -> ClientConfig {
        let mut config = self.client_config(bootstrap_servers);
        let p = &self.producer;
        config
            // Java clients hash keys with murmur2; using the same partitioner
            // puts a key on the same partition whichever language produced it.
            .set("partitioner", "murmur2_random")
            .set("acks", p.acks.as_property())
            .set("enable.idempotence", p.idempotence.to_string())
            .set("compression.type", p.compression.as_property())
            .set("linger.ms", p.linger_ms.to_string());
        if let Some(b) = p.batch_size {
            config.set("batch.size", b.to_string());
        }
        if let Some(t) = p.message_timeout_ms {
            config.set("message.timeout.ms", t.to_string());
        }
        // Raw properties apply last so they can override anything above.
        for (k, v) in self.librdkafka.iter().chain(p.librdkafka.iter()) {
            config.set(k, v);
        }
        config
    }

    /// These settings for the outbox relay's producer: the same, with the
    /// message timeout capped at `cap` (the relay must know that every
    /// message it hands over is settled before its lease can expire), and
    /// that timeout. Raw `message.timeout.ms` / `delivery.timeout.ms`
    /// properties count as the configured value and are capped too.
    pub(crate) fn with_message_timeout_cap(&self, cap: Duration) -> (KafkaSettings, Duration) {
        const RAW: [&str; 2] = ["message.timeout.ms", "delivery.timeout.ms"];
        let mut s = self.clone();
        let raw = RAW.iter().find_map(|k| {
            s.producer
                .librdkafka
                .get(k)
                .or_else(|| s.librdkafka.get(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        for k in RAW {
            s.librdkafka.remove(k);
            s.producer.librdkafka.remove(k);
        }
        // 0 means "no timeout" to librdkafka.
        let configured = match raw.or(s.producer.message_timeout_ms).unwrap_or(300_000) {
            0 => cap,
            ms => Duration::from_millis(ms).min(cap),
        };
        let timeout = configured.max(Duration::from_millis(1));
        s.producer.message_timeout_ms =
            Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        (s, timeout)
    }

    /// The message timeout in effect, for callers that wait on deliveries.
    pub(crate) fn message_timeout(&self) -> Duration {
        Duration::from_millis(self.producer.message_timeout_ms.unwrap_or(300_000))
    }
}

/// `KONTEXT_*` variables, `__` between levels, known top-level keys only.
/// A settings file as a figment: JSON by extension, TOML otherwise.
pub(crate) fn file_figment(path: &Path) -> Figment {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Figment::from(Json::file(path)),
        _ => Figment::from(Toml::file(path)),
    }
}

fn env_provider() -> RawEnv {
    RawEnv {
        prefix: ENV_PREFIX.to_owned(),
        keys: TOP_LEVEL_KEYS,
    }
}

/// Environment variables `<prefix><KEY>[__<KEY>...]` whose first key is one
/// of `keys`, as settings (`__` between levels, keys lowercased).
///
/// Unlike figment's `Env`, values stay text: `Env` parses them as TOML-like
/// values, so a password `0073019284` became the number 73019284 (and lost
/// its zeros), `[x]` a list. Settings that want a number or a boolean read
/// it from the text (`Figment::extract_lossy`).
pub(crate) struct RawEnv {
    pub(crate) prefix: String,
    pub(crate) keys: &'static [&'static str],
}

impl figment::Provider for RawEnv {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("`{}` environment variable(s)", self.prefix))
    }

    fn data(
        &self,
    ) -> std::result::Result<
        figment::value::Map<figment::Profile, figment::value::Dict>,
        figment::Error,
    > {
        let mut dict = figment::value::Dict::new();
        for (name, value) in std::env::vars_os() {
            let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else {
                continue;
            };
            let Some(rest) = name
                .get(..self.prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(&self.prefix))
                .and_then(|_| name.get(self.prefix.len()..))
            else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) || !self.keys.contains(&path[0].as_str()) {
                continue;
            }
            insert_path(&mut dict, &path, value.to_owned());
        }
        let mut out = figment::value::Map::new();
        out.insert(figment::Profile::Default, dict);
        Ok(out)
    }
}

/// Puts `value` (text) at `path` in `dict`, making the tables on the way.
fn insert_path(dict: &mut figment::value::Dict, path: &[String], value: String) {
    use figment::value::{Dict, Value};
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), Value::from(value));
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// `KONTEXT_*` environment variables that are not kontext settings but
/// nearly spell one (`KONTEXT_BOOTSTRAP_SERVER`), with the setting meant:
/// the environment reader skips unknown names, so a typo would otherwise
/// go unnoticed.
pub fn env_near_misses() -> Vec<(String, String)> {
    let known: Vec<String> = TOP_LEVEL_KEYS
        .iter()
        .map(|k| k.to_ascii_uppercase())
        .chain(["DATABASE_URL".to_owned(), "DATABASE_MIGRATE".to_owned()])
        .collect();
    let mut out = Vec::new();
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let first = rest
            .split("__")
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if known.contains(&first) {
            continue;
        }
        // One `_` where levels need two: `KONTEXT_PRODUCER_LINGER_MS`.
        if let Some((section, key)) = TOP_LEVEL_KEYS.iter().find_map(|k| {
            let k = k.to_ascii_uppercase();
            first
                .strip_prefix(&format!("{k}_"))
                .filter(|rest| !rest.is_empty())
                .map(|rest| (k.clone(), rest.to_owned()))
        }) {
            out.push((name.to_owned(), format!("{ENV_PREFIX}{section}__{key}")));
            continue;
        }
        if let Some(meant) = known
            .iter()
            .filter(|k| strsim::damerau_levenshtein(k, &first) <= 2)
            .min_by_key(|k| strsim::damerau_levenshtein(k, &first))
        {
            out.push((name.to_owned(), format!("{ENV_PREFIX}{meant}")));
        }
    }
    out.sort();
    out
}

/// Logs a warning for each of [`env_near_misses`].
fn warn_near_misses() {
    for (found, meant) in env_near_misses() {
        tracing::warn!(variable = %found, meant = %meant, "environment variable `{found}` is not a kontext setting and is ignored; did you mean `{meant}`?");
    }
}

/// [`env_near_misses`] as a sentence to append to a message, or nothing.
pub(crate) fn near_misses_hint() -> String {
    let misses = env_near_misses();
    if misses.is_empty() {
        return String::new();
    }
    let list: Vec<String> = misses
        .iter()
        .map(|(found, meant)| format!("`{found}` (did you mean `{meant}`?)"))
        .collect();
    format!(
        "; these environment variables are not kontext settings: {}",
        list.join(", ")
    )
}

/// The properties of a client configuration with secrets redacted, for logs.
pub(crate) fn redacted(config: &ClientConfig) -> Vec<(String, String)> {
    config
        .config_map()
        .iter()
        .map(|(k, v)| {
            let shown = if is_sensitive_property(k) {
                "<redacted>".to_owned()
            } else {
                // A URL property may carry credentials (`https://u:p@host`).
                redact_url(v)
            };
            (k.to_string(), shown)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        let s = KafkaSettings::new();
        let c = s.producer_config("localhost:9092");
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("client.id"), Some("kontext"));
        assert!(s.provisioning_enabled());
    }

    #[test]
    fn raw_properties_win_and_are_redacted_in_logs() {
        let s = KafkaSettings::new()
            .set("linger.ms", "50")
            .security(|sec| sec.sasl_password = Some("hunter2".into()))
            .producer(|p| p.librdkafka.set("batch.num.messages", "500"));
        let c = s.producer_config("b:9092");
        assert_eq!(c.get("linger.ms"), Some("50"));
        assert_eq!(c.get("batch.num.messages"), Some("500"));
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        let logged = format!("{:?}", redacted(&c));
        assert!(!logged.contains("hunter2"), "{logged}");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn idempotence_needs_acks_all() {
        let s = KafkaSettings::new().producer(|p| p.acks = Acks::Leader);
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("producer.acks"), "{err}");
    }
}
