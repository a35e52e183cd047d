//! A consumed record and what a handler may know about it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Headers, Message as _};
use uuid::Uuid;

use crate::consumer::poll::Rejection;
use crate::headers;

/// A record copied out of librdkafka on the poll thread, so it can cross to
/// the async workers.
///
/// Key, payload and headers are copied into the lane's arena, one buffer
/// per poll round, and the record holds a reference-counted slice of it:
/// one allocation per round instead of several per record (which the
/// worker's thread would then free, the costliest pattern for malloc).
#[derive(Clone)]
pub(crate) struct Record {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// Position in its lane's delivery order (set when it enters the lane).
    pub(crate) seq: u64,
    pub(crate) timestamp: Option<i64>,
    /// Which type of its lane the record is (when `rejection` is `None`).
    pub(crate) type_index: usize,
    /// Set when the record could not be routed to a type.
    pub(crate) rejection: Option<Box<Rejection>>,
    /// Key, payload and encoded headers, back to back.
    data: Bytes,
    /// Where `data` starts in the arena until the round is sealed.
    start: usize,
    key: Option<Range<u32>>,
    payload: Option<Range<u32>>,
    headers: Option<Range<u32>>,
}

impl Record {
    /// Copies `m` into `arena`; [`seal`](Self::seal) attaches the bytes.
    pub(crate) fn copy_from(
        topic: Arc<str>,
        m: &BorrowedMessage<'_>,
        headers: Option<&BorrowedHeaders>,
        arena: &mut BytesMut,
    ) -> Record {
        let start = arena.len();
        let put = |bytes: &[u8], arena: &mut BytesMut| {
            let from = arena.len() - start;
            arena.put_slice(bytes);
            // A Kafka record is far below 4 GiB.
            (from as u32)..((arena.len() - start) as u32)
        };
        let key = m.key().map(|k| put(k, arena));
        let payload = m.payload().map(|p| put(p, arena));
        let headers = headers.map(|h| {
            let from = (arena.len() - start) as u32;
            for h in h.iter() {
                encode_header(arena, h.key, h.value);
            }
            from..((arena.len() - start) as u32)
        });
        Record {
            topic,
            partition: m.partition(),
            offset: m.offset(),
            seq: 0,
            timestamp: m.timestamp().to_millis(),
            type_index: 0,
            rejection: None,
            data: Bytes::new(),
            start,
            key,
            payload,
            headers,
        }
    }

    /// A record without bytes, for unit tests of the buffer and tracker.
    #[cfg(test)]
    pub(crate) fn test(partition: i32, offset: i64, seq: u64) -> Record {
        Record {
            topic: Arc::from("t"),
            partition,
            offset,
            seq,
            timestamp: None,
            type_index: 0,
            rejection: None,
            data: Bytes::new(),
            start: 0,
            key: None,
            payload: None,
            headers: None,
        }
    }

    /// Attaches this record's bytes from its round's sealed arena.
    pub(crate) fn seal(&mut self, round: &Bytes, end: usize) {
        // Always within the round (both offsets were taken from it); clamped
        // all the same, as `slice` panics out of range.
        let end = end.min(round.len());
        self.data = round.slice(self.start.min(end)..end);
    }

    /// Where this record's bytes end in the arena.
    pub(crate) fn end(&self) -> usize {
        let len = [&self.key, &self.payload, &self.headers]
            .iter()
            .filter_map(|r| r.as_ref().map(|r| r.end as usize))
            .max()
            .unwrap_or(0);
        self.start + len
    }

    fn part(&self, range: &Option<Range<u32>>) -> Option<&[u8]> {
        let r = range.as_ref()?;
        self.data.get(r.start as usize..r.end as usize)
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.part(&self.key)
    }

    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.part(&self.payload)
    }

    /// Headers in wire order.
    pub(crate) fn headers(&self) -> HeaderIter<'_> {
        HeaderIter {
            rest: self.part(&self.headers).unwrap_or_default(),
        }
    }

    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v)
    }
}

/// Header encoding in the arena: name length (u32), name, value length
/// (i32, -1 for a null value), value; native endian, never leaves the process.
fn encode_header(arena: &mut BytesMut, name: &str, value: Option<&[u8]>) {
    arena.put_u32_ne(name.len() as u32);
    arena.put_slice(name.as_bytes());
    match value {
        Some(v) => {
            arena.put_i32_ne(v.len() as i32);
            arena.put_slice(v);
        }
        None => arena.put_i32_ne(-1),
    }
}

/// Iterates the headers a [`Record`] carries.
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

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

/// Everything about a consumed message except its decoded value.
#[derive(Clone)]
pub struct MessageContext {
    record: Record,
    attempt: u32,
}

impl MessageContext {
    pub(crate) fn new(record: Record, attempt: u32) -> Self {
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
        self.record.key()
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
        self.record.headers()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_arena_encoding() {
        let mut arena = BytesMut::new();
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
