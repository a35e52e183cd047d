//! A topic's recent records for an operator's eyes: the last few of each
//! partition, read by a short-lived consumer that joins no group and
//! commits nothing, decoded with the model's codec, credentials redacted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Model;

/// The most records one look returns.
pub const MAX_RECENT: usize = 200;

/// How long one look may take, all in: it returns what it read by then.
pub(crate) const LOOK_LIMIT: Duration = Duration::from_secs(10);

/// Payload bytes one look reads at most, whatever the records' sizes.
const LOOK_BYTES: usize = 8 << 20;

/// What a redacted value reads as.
pub const REDACTED: &str = "<redacted>";

/// Name fragments that mark a credential, redacted in every view whether
/// declared [`sensitive`](crate::TopicBuilder::sensitive) or not (compared
/// as [`normal`] names).
const CREDENTIAL_NAMES: [&str; 9] = [
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "apikey",
    "cookie",
    "credential",
    "privatekey",
];

/// Which records [`Kontext::recent_messages`](crate::Kontext::recent_messages)
/// reads: the newest of a topic, or of one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Look {
    /// The topic: one of the model's, or a dead-letter topic of its
    /// consumers.
    pub topic: String,
    /// Only this partition.
    pub partition: Option<i32>,
    /// At most this many records (1 to [`MAX_RECENT`]; 20 by default).
    pub limit: usize,
    /// Who looks, for the log line and `kontext_admin_commands_total`
    /// (`api` when unnamed).
    pub issued_by: Option<String>,
}

impl Look {
    /// The newest 20 records of `topic`.
    pub fn topic(topic: impl Into<String>) -> Self {
        Look {
            topic: topic.into(),
            partition: None,
            limit: 20,
            issued_by: None,
        }
    }

    /// Only this partition's.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// At most `limit` records (clamped to 1 to [`MAX_RECENT`]).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Names who looks (logged and counted).
    pub fn by(mut self, issuer: impl Into<String>) -> Self {
        self.issued_by = Some(issuer.into());
        self
    }
}

/// One record as the status page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecentRecord {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Its key, as UTF-8 (lossy); `<redacted>` for a type whose key is
    /// [sensitive](crate::TopicBuilder::sensitive_key).
    pub key: Option<String>,
    /// Its headers, as UTF-8 (lossy), credentials and declared sensitive
    /// names redacted.
    pub headers: Vec<(String, String)>,
    /// The model type it decoded as (its `ce_type`).
    pub message_type: Option<String>,
    /// The payload decoded by its type's codec, as JSON, with credentials
    /// and declared sensitive fields redacted; `None` when it could not be
    /// decoded (the raw bytes are never shown: they could not be
    /// redacted).
    pub value: Option<Value>,
    /// Why the payload is not shown, when it is not.
    pub not_decoded: Option<String>,
    /// The payload's size in bytes.
    pub bytes: usize,
}

/// A record as read, before decoding.
pub(crate) struct Raw {
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    payload: Option<Vec<u8>>,
}

/// Reads up to `limit` of the newest records of `topic` (of `partition`
/// only, when given), newest first. Blocking: run it off the async
/// runtime's workers. `stopped` cuts it short.
pub(crate) fn recent_blocking(
    config: &ClientConfig,
    topic: &str,
    partition: Option<i32>,
    limit: usize,
    stopped: &dyn Fn() -> bool,
) -> Result<Vec<Raw>> {
    let client_err = |source| Error::Client {
        role: "consumer",
        source,
    };
    // One deadline for the whole look, the lookups included.
    let deadline = Instant::now() + LOOK_LIMIT;
    let left = || deadline.saturating_duration_since(Instant::now());
    let out_of_time =
        || Error::config(format!("reading `{topic}` took longer than {LOOK_LIMIT:?}"));
    let mut consumer_config = config.clone();
    // A group id is required to create a consumer; it never joins (assign)
    // and never commits.
    consumer_config
        .set("group.id", format!("kontext-view-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        // What librdkafka fetches ahead stays near what the look keeps
        // (its fetch size follows, never below `message.max.bytes`).
        .set("queued.max.messages.kbytes", (LOOK_BYTES >> 10).to_string());
    let consumer: BaseConsumer = consumer_config.create().map_err(client_err)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), left())
        .map_err(client_err)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(Error::config(format!("no topic `{topic}` on the cluster")));
    };
    if let Some(e) = t.error() {
        return Err(Error::config(format!(
            "topic `{topic}` cannot be read: {:?}",
            rdkafka::types::RDKafkaErrorCode::from(e)
        )));
    }
    if let Some(wanted) = partition
        && !t.partitions().iter().any(|p| p.id() == wanted)
    {
        return Err(Error::config(format!(
            "topic `{topic}` has no partition {wanted}"
        )));
    }
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in t.partitions() {
        if partition.is_some_and(|wanted| wanted != p.id()) {
            continue;
        }
        if stopped() || left().is_zero() {
            return Err(out_of_time());
        }
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), left())
            .map_err(client_err)?;
        if high > low {
            let from = low.max(high - limit as i64);
            ends.insert(p.id(), high);
            assignment
                .add_partition_offset(topic, p.id(), Offset::Offset(from))
                .map_err(client_err)?;
        }
    }
    let mut read = Vec::new();
    if ends.is_empty() {
        return Ok(read);
    }
    consumer.assign(&assignment).map_err(client_err)?;
    let mut bytes = 0usize;
    while !ends.is_empty() && !left().is_zero() && !stopped() && bytes < LOOK_BYTES {
        match consumer.poll(left().min(Duration::from_millis(100))) {
            Some(Ok(m)) => {
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    ends.remove(&m.partition());
                }
                bytes += m.payload_len();
                read.push(Raw {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    payload: m.payload().map(<[u8]>::to_vec),
                });
            }
            // Transient; the deadline bounds the look.
            Some(Err(e)) => tracing::debug!(topic, error = %e, "recent records: poll error"),
            None => {
                // Control records (transaction markers) end some
                // partitions: the position passes the end with no record.
                if let Ok(positions) = consumer.position() {
                    for e in positions.elements_for_topic(topic) {
                        if let Offset::Offset(at) = e.offset()
                            && ends.get(&e.partition()).is_some_and(|end| at >= *end)
                        {
                            ends.remove(&e.partition());
                        }
                    }
                }
            }
        }
    }
    // Newest first, across partitions by time.
    read.sort_by(|a, b| {
        (b.timestamp_ms, b.partition, b.offset).cmp(&(a.timestamp_ms, a.partition, a.offset))
    });
    read.truncate(limit);
    Ok(read)
}

/// `raw` decoded by `model` for `topic`, redacted; `dead_letters` when
/// `topic` is a dead-letter topic (only then is the record's
/// `dlq-original-topic` its home).
pub(crate) fn view(model: &Model, topic: &str, dead_letters: bool, raw: Raw) -> RecentRecord {
    let header = |name: &str| {
        raw.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let named_type = header(crate::headers::MESSAGE_TYPE);
    let viewed = model.decode_for_view(
        topic,
        header(crate::headers::dlq::ORIGINAL_TOPIC).filter(|_| dead_letters),
        named_type,
        raw.payload.as_deref(),
    );
    let sensitive = &viewed.sensitive;
    let (value, not_decoded) = match (&raw.payload, viewed.value) {
        (None, _) => (None, Some("no payload (a tombstone)".to_owned())),
        (Some(_), None) => (None, Some("no type of the model matches it".to_owned())),
        (Some(_), Some(Err(e))) => (None, Some(format!("the codec refused it: {e}"))),
        (Some(_), Some(Ok(mut v))) => {
            redact(&mut v, sensitive);
            (Some(v), None)
        }
    };
    let key = raw.key.map(|k| {
        if viewed.sensitive_key {
            REDACTED.to_owned()
        } else {
            String::from_utf8_lossy(&k).into_owned()
        }
    });
    RecentRecord {
        partition: raw.partition,
        offset: raw.offset,
        timestamp_ms: raw.timestamp_ms,
        key,
        message_type: viewed.message_type.or(named_type).map(str::to_owned),
        headers: raw
            .headers
            .iter()
            .map(|(k, v)| {
                let v = if is_sensitive(k, sensitive) {
                    REDACTED.to_owned()
                } else if k == crate::headers::dlq::ERROR {
                    // A handler's error text may quote what it handled.
                    crate::codec::elide_values(&String::from_utf8_lossy(v))
                } else {
                    String::from_utf8_lossy(v).into_owned()
                };
                (k.clone(), v)
            })
            .collect(),
        value,
        not_decoded,
        bytes: raw.payload.as_ref().map_or(0, Vec::len),
    }
}

/// A name as names are compared: lower case, without `_` and `-`.
fn normal(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_' && *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether a field or header of this name is never shown.
fn is_sensitive(name: &str, declared: &[&str]) -> bool {
    let name = normal(name);
    declared.iter().any(|d| normal(d) == name) || CREDENTIAL_NAMES.iter().any(|c| name.contains(c))
}

/// Replaces the values of sensitive fields, at any depth.
fn redact(value: &mut Value, declared: &[&str]) {
    match value {
        Value::Object(fields) => {
            for (name, v) in fields.iter_mut() {
                if is_sensitive(name, declared) {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v, declared);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, declared)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_and_declared_fields_are_redacted_at_any_depth() {
        let mut v = json!({
            "order_id": 7,
            "card": {"card_number": "4111", "holder": "A"},
            "items": [{"api-key": "k", "sku": "s"}],
            "refreshToken": "t",
            "Password": "p",
        });
        redact(&mut v, &["card_number"]);
        assert_eq!(
            v,
            json!({
                "order_id": 7,
                "card": {"card_number": REDACTED, "holder": "A"},
                "items": [{"api-key": REDACTED, "sku": "s"}],
                "refreshToken": REDACTED,
                "Password": REDACTED,
            })
        );
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Signup {
        email: String,
    }

    fn raw(payload: Option<&[u8]>, headers: &[(&str, &str)]) -> Raw {
        Raw {
            partition: 0,
            offset: 3,
            timestamp_ms: Some(1),
            key: Some(b"k".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
            payload: payload.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn a_record_is_decoded_by_its_type_and_undecodable_bytes_are_never_shown() {
        let model = Model::builder()
            .topic::<Signup>(|t| t.name("signups").sensitive(["email"]))
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let typed = [(crate::headers::MESSAGE_TYPE, "Signup"), ("email", "a@b")];
        let shown = view(
            &model,
            "signups",
            false,
            raw(Some(br#"{"email":"a@b"}"#), &typed),
        );
        assert_eq!(shown.value, Some(serde_json::json!({"email": REDACTED})));
        assert_eq!(shown.headers[1], ("email".to_owned(), REDACTED.to_owned()));
        assert_eq!(shown.message_type.as_deref(), Some("Signup"));
        // No ce_type: the topic's only type.
        let shown = view(
            &model,
            "signups",
            false,
            raw(Some(br#"{"email":"x"}"#), &[]),
        );
        assert_eq!(shown.message_type.as_deref(), Some("Signup"));
        // Bytes the codec refuses: why, and the size, never the bytes.
        let shown = view(
            &model,
            "signups",
            false,
            raw(Some(b"password=hunter2"), &typed),
        );
        assert_eq!(shown.value, None);
        assert!(
            shown
                .not_decoded
                .is_some_and(|why| !why.contains("hunter2"))
        );
        assert_eq!(shown.bytes, 16);
        let shown = view(&model, "signups", false, raw(None, &typed));
        assert_eq!(
            shown.not_decoded.as_deref(),
            Some("no payload (a tombstone)")
        );
        let shown = view(&model, "other", false, raw(Some(b"{}"), &[]));
        assert_eq!(
            shown.not_decoded.as_deref(),
            Some("no type of the model matches it")
        );
        // A wrong-typed sensitive value: the codec's error does not echo it.
        let wrong = raw(Some(br#"{"email": 987654321}"#), &typed);
        let shown = view(&model, "signups", false, wrong);
        let why = shown.not_decoded.unwrap_or_default();
        assert!(
            why.starts_with("the codec refused it") && !why.contains("987654321"),
            "{why}"
        );
    }

    #[test]
    fn a_dead_letter_is_viewed_as_its_original_topics_type_with_its_key_redacted() {
        let model = Model::builder()
            .topic::<Signup>(|t| t.name("signups").sensitive(["email"]).sensitive_key())
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let dead = [
            (crate::headers::MESSAGE_TYPE, "Signup"),
            (crate::headers::dlq::ORIGINAL_TOPIC, "signups"),
            (
                crate::headers::dlq::ERROR,
                r#"handler said: "a@b" is taken"#,
            ),
        ];
        let shown = view(
            &model,
            "signups.dlq",
            true,
            raw(Some(br#"{"email":"a@b"}"#), &dead),
        );
        assert_eq!(shown.value, Some(serde_json::json!({"email": REDACTED})));
        assert_eq!(shown.key.as_deref(), Some(REDACTED));
        assert_eq!(shown.headers[2].1, r#"handler said: "…" is taken"#);
        // On an ordinary topic the header is anyone's to write: ignored.
        let forged = [(crate::headers::dlq::ORIGINAL_TOPIC, "elsewhere")];
        let shown = view(
            &model,
            "signups",
            false,
            raw(Some(br#"{"email":"a@b"}"#), &forged),
        );
        assert_eq!(shown.value, Some(serde_json::json!({"email": REDACTED})));
        assert_eq!(shown.key.as_deref(), Some(REDACTED));
        // No type matches: the topic's declared names are still redacted.
        let unknown = [(crate::headers::MESSAGE_TYPE, "Other"), ("email", "a@b")];
        let shown = view(&model, "signups", false, raw(Some(b"{}"), &unknown));
        assert_eq!(shown.value, None);
        assert_eq!(shown.headers[1].1, REDACTED);
        assert_eq!(shown.key.as_deref(), Some(REDACTED));
    }

    #[test]
    fn headers_are_redacted_by_name() {
        assert!(is_sensitive("Authorization", &[]));
        assert!(is_sensitive("x-api-key", &[]));
        assert!(is_sensitive("customer-email", &["customer-email"]));
        assert!(is_sensitive("cardNumber", &["card_number"]));
        assert!(is_sensitive("privateKey", &[]));
        assert!(!is_sensitive("ce_type", &[]));
        assert!(!is_sensitive("traceparent", &[]));
    }
}
