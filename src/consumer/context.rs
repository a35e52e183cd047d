//! A consumed record and what a handler may know about it.
//!
//! A record is not copied out of librdkafka: the message the poll thread got
//! goes to the worker as it is, is decoded in place, and goes back to the
//! poll thread to be destroyed once its handler is done. Its headers are
//! read (which makes librdkafka parse them, its costliest step per record)
//! only when something asks: the router on a topic that carries several
//! types, a handler through its [`MessageContext`], a dead letter.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use std::ops::Range;

use rdkafka::message::{BorrowedMessage, Message as _};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::raw_headers::{self, RawHeaders};
use crate::consumer::lent::Polled;
use crate::consumer::sync::lock;
use crate::headers;

/// Why a record could not be routed to a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejection {
    Tombstone,
    MissingType,
    UnknownType(String),
    /// A type of the model on this topic that this group neither consumes,
    /// ignores, nor leaves to another group.
    NotConsumed(String),
    /// A header whose name is not UTF-8 (shown lossily, with its bytes).
    BadHeader(String),
}

impl Rejection {
    pub(crate) fn reason(&self) -> String {
        match self {
            Rejection::Tombstone => "tombstone (record without payload)".into(),
            Rejection::MissingType => "no ce_type header, and several types share the topic".into(),
            Rejection::UnknownType(t) => format!("unknown type `{t}` for this topic"),
            Rejection::NotConsumed(t) => format!(
                "type `{t}` is declared on this topic but this consumer group does not consume it; \
                 consume it, `ignore` it, or give it its own group in the model"
            ),
            Rejection::BadHeader(name) => {
                format!("header name `{name}` is not UTF-8 (Kafka header names are strings)")
            }
        }
    }
}

/// A polled record on its way from the poll thread to its lane's worker.
pub(crate) struct Record {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// Position in its lane's delivery order (set when it enters the lane).
    pub(crate) seq: u64,
    pub(crate) timestamp: Option<i64>,
    /// Which type of its lane the record is (when `rejection` is `None`).
    pub(crate) type_index: usize,
    /// Set when the record could not be routed to a type.
    pub(crate) rejection: Option<Box<Rejection>>,
    /// The message itself; `None` only in unit tests, and while a handler's
    /// context holds it.
    polled: Option<Polled>,
}

impl Record {
    pub(crate) fn new(polled: Polled) -> Record {
        let m = polled.message();
        Record {
            partition: m.partition(),
            offset: m.offset(),
            seq: 0,
            timestamp: m.timestamp().to_millis(),
            type_index: 0,
            rejection: None,
            polled: Some(polled),
        }
    }

    /// A record without a message, for unit tests of the buffer and tracker.
    #[cfg(test)]
    pub(crate) fn test(partition: i32, offset: i64, seq: u64) -> Record {
        Record {
            partition,
            offset,
            seq,
            timestamp: None,
            type_index: 0,
            rejection: None,
            polled: None,
        }
    }

    fn message(&self) -> Option<&BorrowedMessage<'static>> {
        self.polled.as_ref().map(Polled::message)
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.message()?.key()
    }

    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.message()?.payload()
    }

    /// Headers in wire order, names as bytes (librdkafka parses them on
    /// the first call).
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.message().map(RawHeaders::of).into_iter().flatten()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(k, _)| *k == name.as_bytes())
            .and_then(|(_, v)| v)
    }

    /// The first header name that is not UTF-8, shown lossily.
    pub(crate) fn bad_header(&self) -> Option<String> {
        raw_headers::bad_name(self.headers())
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]@{}", self.partition, self.offset)
    }
}

/// What a handler's context shares with its clones: the message while the
/// handler runs, and a copy of its key and headers made on first use.
#[derive(Default)]
pub(crate) struct Shared {
    polled: Mutex<Option<Polled>>,
    copied: OnceLock<Copied>,
    /// Cancelled when the service begins to stop (see
    /// [`MessageContext::cancelled`]); set when the cell is made, which is
    /// rarely: cells are reused.
    stopping: CancellationToken,
}

/// Key and headers copied out of a message.
#[derive(Default)]
struct Copied {
    /// Key, then the encoded headers, back to back.
    data: Vec<u8>,
    key: Option<Range<u32>>,
    headers: Range<u32>,
}

impl Copied {
    fn of(m: Option<&BorrowedMessage<'static>>) -> Copied {
        let mut c = Copied::default();
        let Some(m) = m else {
            return c;
        };
        if let Some(k) = m.key() {
            c.data.extend_from_slice(k);
            c.key = Some(0..k.len() as u32);
        }
        let from = c.data.len() as u32;
        for (name, value) in RawHeaders::of(m) {
            // A name that is not UTF-8 reaches the handler lossily rather
            // than not at all (see `raw_headers`).
            match std::str::from_utf8(name) {
                Ok(name) => encode_header(&mut c.data, name, value),
                Err(_) => encode_header(&mut c.data, &raw_headers::lossy(name), value),
            }
        }
        c.headers = from..c.data.len() as u32;
        c
    }

    fn key(&self) -> Option<&[u8]> {
        let r = self.key.as_ref()?;
        self.data.get(r.start as usize..r.end as usize)
    }

    fn headers(&self) -> HeaderIter<'_> {
        let r = &self.headers;
        HeaderIter {
            rest: self
                .data
                .get(r.start as usize..r.end as usize)
                .unwrap_or_default(),
        }
    }
}

/// A lane worker's keeper of messages: lends a record's message to a
/// handler's context and takes it back into the record.
///
/// One [`Shared`] is reused from record to record while no handler keeps its
/// context; a context kept past its handler gets a copy of the key and
/// headers, and the message comes back all the same.
#[derive(Default)]
pub(crate) struct Lender {
    spare: Option<Arc<Shared>>,
    stopping: CancellationToken,
}

impl Lender {
    /// A lender whose contexts report `stopping` as their cancellation.
    pub(crate) fn new(stopping: CancellationToken) -> Lender {
        Lender {
            spare: None,
            stopping,
        }
    }

    /// Moves `record`'s message into a shared cell for a context.
    pub(crate) fn lend(&mut self, record: &mut Record) -> Lent {
        let fresh = |polled| {
            Arc::new(Shared {
                polled: Mutex::new(polled),
                copied: OnceLock::new(),
                stopping: self.stopping.clone(),
            })
        };
        let shared = match self.spare.take() {
            Some(mut shared) => match Arc::get_mut(&mut shared) {
                Some(s) => {
                    *s.polled.get_mut().unwrap_or_else(|e| e.into_inner()) = record.polled.take();
                    s.copied = OnceLock::new();
                    shared
                }
                // Not spare after all (cannot happen: spares are unshared).
                None => fresh(record.polled.take()),
            },
            None => fresh(record.polled.take()),
        };
        Lent(Some(shared))
    }

    /// Gives the message back to `record` once the handler is done.
    pub(crate) fn take_back(&mut self, mut lent: Lent, record: &mut Record) {
        let Some(mut shared) = lent.0.take() else {
            return;
        };
        match Arc::get_mut(&mut shared) {
            // The usual case: nobody kept the context.
            Some(s) => {
                record.polled = s.polled.get_mut().unwrap_or_else(|e| e.into_inner()).take();
                self.spare = Some(shared);
            }
            // A context outlives its handler: it keeps a copy, not the message.
            None => record.polled = shared.reclaim(),
        }
    }
}

/// A record's message lent to a handler's context.
///
/// Normally given back with [`Lender::take_back`]. If the handler's future
/// is dropped before it finishes (its task aborted, its runtime shut down),
/// the message is reclaimed and destroyed here all the same: a context the
/// handler kept elsewhere must never hold a message that could outlive its
/// consumer.
pub(crate) struct Lent(Option<Arc<Shared>>);

impl Lent {
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.0.clone().unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            drop(shared.reclaim());
        }
    }
}

impl crate::telemetry::trace::Incoming for Shared {
    fn with_header(&self, name: &str, f: &mut dyn FnMut(&str)) {
        let value = self
            .copied()
            .headers()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v)
            .and_then(|v| std::str::from_utf8(v).ok());
        if let Some(v) = value {
            f(v);
        }
    }
}

impl Shared {
    /// Takes the message back, leaving contexts that share it a copy of
    /// its key and headers.
    fn reclaim(&self) -> Option<Polled> {
        self.copied();
        lock(&self.polled).take()
    }

    fn copied(&self) -> &Copied {
        // Once the message is taken back the copy exists, so the closure
        // only ever runs while the message is here.
        self.copied
            .get_or_init(|| Copied::of(lock(&self.polled).as_ref().map(Polled::message)))
    }
}

/// Header encoding in a [`Copied`]: name length (u32), name, value length
/// (i32, -1 for a null value), value; native endian, never leaves the process.
fn encode_header(out: &mut Vec<u8>, name: &str, value: Option<&[u8]>) {
    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    out.extend_from_slice(name.as_bytes());
    match value {
        Some(v) => {
            out.extend_from_slice(&(v.len() as i32).to_ne_bytes());
            out.extend_from_slice(v);
        }
        None => out.extend_from_slice(&(-1i32).to_ne_bytes()),
    }
}

/// Iterates the headers of a [`Copied`].
pub(crate) struct HeaderIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let (len, rest) = self.rest.split_first_chunk::<4>()?;
        let (name, rest) = rest.split_at_checked(u32::from_ne_bytes(*len) as usize)?;
        let (vlen, rest) = rest.split_first_chunk::<4>()?;
        let (value, rest) = match usize::try_from(i32::from_ne_bytes(*vlen)) {
            Ok(n) => {
                let (v, rest) = rest.split_at_checked(n)?;
                (Some(v), rest)
            }
            Err(_) => (None, rest),
        };
        self.rest = rest;
        // Kafka header names are strings; librdkafka hands them over as such.
        Some((std::str::from_utf8(name).unwrap_or_default(), value))
    }
}

/// Everything about a consumed message except its decoded value.
///
/// Cheap to clone. Key and headers are copied out of the record the first
/// time one is read; a context that never reads them costs no copy.
#[derive(Clone)]
pub struct MessageContext {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    attempt: u32,
    shared: Arc<Shared>,
}

impl MessageContext {
    pub(crate) fn new(topic: Arc<str>, record: &Record, shared: Arc<Shared>, attempt: u32) -> Self {
        MessageContext {
            topic,
            partition: record.partition,
            offset: record.offset,
            timestamp: record.timestamp,
            attempt,
            shared,
        }
    }

    /// Completes when kontext begins to shut down (`shutdown`, `run_until`'s
    /// signal, or the instance dropped). A handler that may run long can
    /// await it next to its work and give up early (returning an error
    /// retries the message later, with its next owner); a handler still
    /// running at the shutdown deadline is dropped at its next `.await` and
    /// its message is delivered again.
    pub async fn cancelled(&self) {
        self.shared.stopping.cancelled().await;
    }

    /// Whether kontext has begun to shut down (see [`cancelled`](Self::cancelled)).
    pub fn is_cancelled(&self) -> bool {
        self.shared.stopping.is_cancelled()
    }

    /// Topic the message came from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition the message came from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Offset of the message in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The key bytes.
    pub fn key(&self) -> Option<&[u8]> {
        self.shared.copied().key()
    }

    /// The key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v)
    }

    /// The first header named `name` as UTF-8, if it is.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All headers in wire order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.shared.copied().headers()
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

    /// The producing service (`ce_source`); `None` for messages produced
    /// with the [lean](crate::headers::HeaderProfile::Lean) header profile.
    pub fn source(&self) -> Option<&str> {
        self.header_str(headers::SOURCE)
    }

    /// The correlation id (`ce_correlationid`).
    pub fn correlation_id(&self) -> Option<&str> {
        self.header_str(headers::CORRELATION_ID)
    }

    /// The record timestamp in milliseconds since the epoch, as Kafka has it.
    pub(crate) fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp
    }

    /// The record timestamp.
    pub fn timestamp(&self) -> Option<SystemTime> {
        let ms = u64::try_from(self.timestamp?).ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_copy_encoding() {
        let mut arena = Vec::new();
        encode_header(&mut arena, "ce_type", Some(b"order.created"));
        encode_header(&mut arena, "empty", Some(b""));
        encode_header(&mut arena, "null", None);
        encode_header(&mut arena, "ce_type", Some(b"second"));
        let it = HeaderIter { rest: &arena };
        let all: Vec<_> = it.collect();
        assert_eq!(
            all,
            vec![
                ("ce_type", Some(&b"order.created"[..])),
                ("empty", Some(&b""[..])),
                ("null", None),
                ("ce_type", Some(&b"second"[..])),
            ]
        );
        // Truncated input ends the iteration instead of reading past it.
        let cut = HeaderIter {
            rest: &arena[..arena.len() - 3],
        };
        assert_eq!(cut.count(), 3);
    }
}
