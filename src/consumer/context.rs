//! A consumed record and what a handler may know about it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::message::{BorrowedMessage, Headers, Message as _, OwnedHeaders};
use uuid::Uuid;

use crate::consumer::poll::Rejection;
use crate::headers;

/// A record copied out of librdkafka on the poll thread, so it can cross to
/// the async workers.
pub(crate) struct Record {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// Position in its lane's delivery order (set when it enters the lane).
    pub(crate) seq: u64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Option<OwnedHeaders>,
    pub(crate) timestamp: Option<i64>,
    /// Which type of its lane the record is (when `rejection` is `None`).
    pub(crate) type_index: usize,
    /// Set when the record could not be routed to a type.
    pub(crate) rejection: Option<Rejection>,
}

impl Record {
    pub(crate) fn copy_from(topic: Arc<str>, m: &BorrowedMessage<'_>) -> Record {
        Record {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            seq: 0,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: m.headers().map(|h| h.detach()),
            timestamp: m.timestamp().to_millis(),
            type_index: 0,
            rejection: None,
        }
    }

    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        let h = self.headers.as_ref()?;
        h.iter().find(|h| h.key == name).and_then(|h| h.value)
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

/// Everything about a consumed message except its decoded value.
#[derive(Clone)]
pub struct MessageContext {
    record: Arc<Record>,
    attempt: u32,
}

impl MessageContext {
    pub(crate) fn new(record: Arc<Record>, attempt: u32) -> Self {
        MessageContext { record, attempt }
    }

    /// Topic the message came from.
    pub fn topic(&self) -> &str {
        &self.record.topic
    }

    /// Partition the message came from.
    pub fn partition(&self) -> i32 {
        self.record.partition
    }

    /// Offset of the message in its partition.
    pub fn offset(&self) -> i64 {
        self.record.offset
    }

    /// The key bytes.
    pub fn key(&self) -> Option<&[u8]> {
        self.record.key.as_deref()
    }

    /// The key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.record.header(name)
    }

    /// The first header named `name` as UTF-8, if it is.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All headers in wire order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.record
            .headers
            .iter()
            .flat_map(|h| h.iter().map(|h| (h.key, h.value)))
    }

    /// The message id (`ce_id`), if the producer set a valid one.
    pub fn message_id(&self) -> Option<Uuid> {
        self.header_str(headers::MESSAGE_ID)
            .and_then(|s| Uuid::parse_str(s).ok())
    }

    /// The type discriminator (`ce_type`).
    pub fn message_type(&self) -> Option<&str> {
        self.header_str(headers::MESSAGE_TYPE)
    }

    /// The correlation id (`ce_correlationid`).
    pub fn correlation_id(&self) -> Option<&str> {
        self.header_str(headers::CORRELATION_ID)
    }

    /// The record timestamp.
    pub fn timestamp(&self) -> Option<SystemTime> {
        let ms = u64::try_from(self.record.timestamp?).ok()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }

    /// Which attempt this is: 1 the first time, 2 on the first retry...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl fmt::Debug for MessageContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageContext")
            .field("topic", &self.topic())
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .field("key", &self.key_str())
            .field("message_id", &self.message_id())
            .field("attempt", &self.attempt)
            .finish()
    }
}
