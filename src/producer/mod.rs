//! Typed producing: encode with the topic's codec, key and headers from the
//! model, await the broker's acknowledgement.

use std::fmt;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use uuid::Uuid;

use crate::config::{KafkaSettings, redacted};
use crate::error::{Error, Result};
use crate::headers;
use crate::model::{HeaderSource, Message, MessageKey, Model, TopicSpec};
use crate::runtime::client_context::TracingContext;
use crate::runtime::clients::{ClientGuard, ClientKind, ClientTracker};

/// Where the broker stored a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Topic written to.
    pub topic: Arc<str>,
    /// Partition written to.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// The message id (`ce_id` header).
    pub message_id: Uuid,
}

/// Produces the model's message types. Cheap to clone; all clones share one
/// Kafka producer client.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    client: FutureProducer<TracingContext>,
    model: Arc<Model>,
    source: String,
    /// How long a call waits for room in librdkafka's full local queue.
    queue_timeout: Duration,
    /// One permit per message librdkafka's local queue holds: single
    /// `produce` calls queue here, in order, when it is full, instead of
    /// each retrying on a timer.
    room: tokio::sync::Semaphore,
    _guard: ClientGuard,
}

impl Producer {
    pub(crate) fn new(
        settings: &KafkaSettings,
        bootstrap_servers: &str,
        model: Arc<Model>,
        clients: &ClientTracker,
    ) -> Result<Producer> {
        let config = settings.producer_config(bootstrap_servers);
        let queue_capacity = config
            .get("queue.buffering.max.messages")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(DEFAULT_QUEUE_MESSAGES);
        tracing::debug!(config = ?redacted(&config), "creating producer");
        let client = config
            .create_with_context(TracingContext { role: "producer" })
            .map_err(|source| Error::Client {
                role: "producer",
                source,
            })?;
        Ok(Producer {
            inner: Arc::new(Inner {
                client,
                model,
                source: settings.effective_client_id().to_owned(),
                queue_timeout: settings.message_timeout(),
                room: tokio::sync::Semaphore::new(
                    queue_capacity.min(tokio::sync::Semaphore::MAX_PERMITS),
                ),
                _guard: clients.track(ClientKind::Producer),
            }),
        })
    }

    /// Produces `message` to its topic and waits until the broker has it.
    ///
    /// The returned request can be refined before it is awaited:
    /// `producer.produce(&event).correlation_id("req-42").header("tenant", "eu").await?`.
    ///
    /// Cancellation: dropping the future after the message was queued does
    /// not recall it; it is still delivered.
    pub fn produce<'a, T: Message>(&'a self, message: &'a T) -> Produce<'a, T> {
        Produce {
            producer: self,
            message: MessageRef::Borrowed(message),
            options: CallOptions::default(),
        }
    }

    /// Like [`produce`](Self::produce), taking the message by value.
    pub fn produce_owned<T: Message>(&self, message: T) -> Produce<'_, T> {
        Produce {
            producer: self,
            message: MessageRef::Owned(message),
            options: CallOptions::default(),
        }
    }

    /// Produces every message, keeping as many in flight as librdkafka's
    /// queue allows, and waits for all acknowledgements. Deliveries are
    /// returned in input order.
    ///
    /// Every message is encoded before the first is sent, so an encoding
    /// error sends nothing. A broker error returns the first failure; the
    /// other messages may have been delivered (produce again to be sure: the
    /// batch is at-least-once).
    pub async fn produce_batch<'a, T, I>(&self, messages: I) -> Result<Vec<Delivery>>
    where
        T: Message,
        I: IntoIterator<Item = &'a T>,
    {
        let spec = self.inner.model.spec::<T>()?;
        let options = CallOptions::default();
        let messages: Vec<&T> = messages.into_iter().collect();
        // Payloads first, so an encoding error sends nothing; headers are
        // built as each message is sent rather than held for the whole batch.
        let prepared: Vec<Encoded> = messages
            .iter()
            .map(|m| encode(spec, *m, &options))
            .collect::<Result<_>>()?;

        let mut pending: Vec<(DeliveryFuture, Uuid)> = Vec::with_capacity(prepared.len());
        let mut first_unawaited = 0;
        let mut results: Vec<Delivery> = Vec::with_capacity(prepared.len());
        let capacity = 7 + spec.headers.len();
        for (message, encoded) in messages.iter().zip(prepared) {
            let headers = write_headers(
                spec,
                *message,
                &options,
                &self.inner.source,
                &encoded,
                OwnedHeaders::new_with_capacity(capacity),
            )?;
            let started = Instant::now();
            let mut record = encoded.record(spec.topic(), headers);
            let future = loop {
                match self.inner.client.send_result(record) {
                    Ok(f) => break f,
                    Err((e, r)) if self.may_wait(&e, started) => {
                        record = r;
                        // The local queue is full: wait for the oldest
                        // message in flight, which frees room.
                        match pending.get_mut(first_unawaited) {
                            Some((f, id)) => {
                                let id = *id;
                                results.push(await_delivery(f, spec, id).await?);
                                first_unawaited += 1;
                            }
                            None => tokio::time::sleep(QUEUE_FULL_PAUSE).await,
                        }
                    }
                    Err((source, _)) => {
                        return Err(Error::Produce {
                            topic: spec.topic().to_owned(),
                            source,
                        });
                    }
                }
            };
            pending.push((future, encoded.message_id));
        }
        for (f, id) in pending.iter_mut().skip(first_unawaited) {
            let id = *id;
            results.push(await_delivery(f, spec, id).await?);
        }
        Ok(results)
    }

    /// Waits until every queued message is delivered or `timeout` passes.
    /// Runs the blocking flush off the async worker threads.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.client.flush(timeout))
            .await
            .map_err(|_| Error::Flush {
                source: KafkaError::Canceled,
            })?
            .map_err(|source| Error::Flush { source })
    }

    /// Messages queued locally or in flight, not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.inner.client.in_flight_count()
    }

    async fn send_one<T: Message>(&self, message: &T, options: &CallOptions) -> Result<Delivery> {
        let spec = self.inner.model.spec::<T>()?;
        let (encoded, headers) = self.prepare(spec, message, options)?;
        // Held until the delivery is known. The semaphore is never closed.
        let _permit = self.inner.room.acquire().await.ok();
        let started = Instant::now();
        let mut record = encoded.record(spec.topic(), headers);
        let mut future = loop {
            match self.inner.client.send_result(record) {
                Ok(f) => break f,
                Err((e, r)) if self.may_wait(&e, started) => {
                    record = r;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((source, _)) => {
                    return Err(Error::Produce {
                        topic: spec.topic().to_owned(),
                        source,
                    });
                }
            }
        };
        await_delivery(&mut future, spec, encoded.message_id).await
    }

    fn prepare<T: Message>(
        &self,
        spec: &TopicSpec<T>,
        message: &T,
        options: &CallOptions,
    ) -> Result<(Encoded, OwnedHeaders)> {
        let capacity = 7 + spec.headers.len() + options.headers.len();
        prepare(
            spec,
            message,
            options,
            &self.inner.source,
            OwnedHeaders::new_with_capacity(capacity),
        )
    }

    /// The client, for the outbox relay.
    pub(crate) fn client(&self) -> &FutureProducer<TracingContext> {
        &self.inner.client
    }

    /// The `ce_source` of every message.
    pub(crate) fn source(&self) -> &str {
        &self.inner.source
    }

    /// Whether a failed enqueue should be retried: librdkafka's local queue
    /// is full and the call has not waited longer than a delivery may take.
    fn may_wait(&self, e: &KafkaError, started: Instant) -> bool {
        e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
            && started.elapsed() < self.inner.queue_timeout
    }
}

/// Where the standard and declared headers of a message are written: the
/// client's header list when producing, a plain list for the outbox.
pub(crate) trait HeaderSink: Sized {
    fn with(self, key: &str, value: &str) -> Self;
}

impl HeaderSink for OwnedHeaders {
    fn with(self, key: &str, value: &str) -> Self {
        self.insert(header(key, value))
    }
}

impl HeaderSink for Vec<(String, String)> {
    fn with(mut self, key: &str, value: &str) -> Self {
        self.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// Encodes a message and builds its key and headers (into `h`).
pub(crate) fn prepare<T: Message, H: HeaderSink>(
    spec: &TopicSpec<T>,
    message: &T,
    options: &CallOptions,
    source: &str,
    h: H,
) -> Result<(Encoded, H)> {
    let encoded = encode(spec, message, options)?;
    let h = write_headers(spec, message, options, source, &encoded, h)?;
    Ok((encoded, h))
}

/// Encodes a message's payload and key and gives it an id and a timestamp.
pub(crate) fn encode<T: Message>(
    spec: &TopicSpec<T>,
    message: &T,
    options: &CallOptions,
) -> Result<Encoded> {
    let mut payload = Vec::with_capacity(256);
    spec.codec()
        .encode(message, &mut payload)
        .map_err(|source| Error::Encode {
            topic: spec.topic().to_owned(),
            type_name: spec.rust_type(),
            source,
        })?;

    let key = match &options.key {
        Some(k) => Some(k.clone()),
        None => {
            let mut k = Vec::new();
            spec.write_key(message, &mut k).then_some(k)
        }
    };

    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Ok(Encoded {
        payload,
        key,
        timestamp,
        message_id: Uuid::now_v7(),
    })
}

/// Writes the standard, declared and per-call headers of an encoded message.
pub(crate) fn write_headers<T: Message, H: HeaderSink>(
    spec: &TopicSpec<T>,
    message: &T,
    options: &CallOptions,
    source: &str,
    encoded: &Encoded,
    mut h: H,
) -> Result<H> {
    let mut id_buf = Uuid::encode_buffer();
    let id_text = encoded.message_id.hyphenated().encode_lower(&mut id_buf);
    h = h
        .with(headers::SPEC_VERSION, headers::SPEC_VERSION_VALUE)
        .with(headers::MESSAGE_ID, id_text)
        .with(headers::MESSAGE_TYPE, spec.type_name())
        .with(headers::SOURCE, source);
    h = TIME_TEXT.with_borrow_mut(|cache| {
        // Many messages share a millisecond: format its RFC 3339 text once.
        if cache.0 != encoded.timestamp || cache.1.is_empty() {
            let at = SystemTime::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(encoded.timestamp).unwrap_or(0));
            cache.0 = encoded.timestamp;
            cache.1 = humantime::format_rfc3339_millis(at).to_string();
        }
        h.with(headers::TIME, &cache.1)
    });
    h = h.with(headers::CONTENT_TYPE, spec.codec().content_type());
    if let Some(c) = &options.correlation_id {
        h = h.with(headers::CORRELATION_ID, c);
    }
    for (name, source) in &spec.headers {
        match source {
            HeaderSource::Static(v) => h = h.with(name, v),
            HeaderSource::Computed(f) => {
                if let Some(v) = f(message) {
                    h = h.with(name, &v);
                }
            }
            HeaderSource::Derived(f) => {
                let mut fields = Vec::new();
                f(message, &mut fields);
                for (name, v) in &fields {
                    h = h.with(name, v);
                }
            }
        }
    }
    for (name, v) in &options.headers {
        if headers::RESERVED.contains(&name.as_str()) {
            return Err(Error::ReservedHeader {
                topic: spec.topic().to_owned(),
                header: name.clone(),
            });
        }
        h = h.with(name, v);
    }
    Ok(h)
}

thread_local! {
    /// The last `ce_time` text formatted on this thread, by millisecond.
    static TIME_TEXT: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// librdkafka's default `queue.buffering.max.messages`.
const DEFAULT_QUEUE_MESSAGES: usize = 100_000;

/// Pause before retrying an enqueue into a full local queue.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);

async fn await_delivery<T>(
    future: &mut DeliveryFuture,
    spec: &TopicSpec<T>,
    message_id: Uuid,
) -> Result<Delivery> {
    match future.await {
        Ok(Ok(d)) => Ok(Delivery {
            topic: spec.topic_arc(),
            partition: d.partition,
            offset: d.offset,
            message_id,
        }),
        Ok(Err((source, _))) => Err(Error::Produce {
            topic: spec.topic().to_owned(),
            source,
        }),
        // The client went away before reporting: the message's fate is unknown.
        Err(_) => Err(Error::Produce {
            topic: spec.topic().to_owned(),
            source: KafkaError::Canceled,
        }),
    }
}

/// An encoded message ready to hand to librdkafka (which copies it).
pub(crate) struct Encoded {
    pub(crate) payload: Vec<u8>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) timestamp: i64,
    pub(crate) message_id: Uuid,
}

impl Encoded {
    fn record<'a>(&'a self, topic: &'a str, headers: OwnedHeaders) -> FutureRecord<'a, [u8], [u8]> {
        let record = FutureRecord::to(topic)
            .payload(self.payload.as_slice())
            .headers(headers)
            .timestamp(self.timestamp);
        match &self.key {
            Some(k) => record.key(k.as_slice()),
            None => record,
        }
    }
}

enum MessageRef<'a, T> {
    Borrowed(&'a T),
    Owned(T),
}

#[derive(Default)]
pub(crate) struct CallOptions {
    key: Option<Vec<u8>>,
    correlation_id: Option<String>,
    headers: Vec<(String, String)>,
}

/// A produce call being prepared; `.await` it to send.
#[must_use = "a produce request does nothing until it is awaited"]
pub struct Produce<'a, T> {
    producer: &'a Producer,
    message: MessageRef<'a, T>,
    options: CallOptions,
}

impl<T: Message> Produce<'_, T> {
    /// Uses this key instead of the one the model derives.
    pub fn key(mut self, key: impl MessageKey) -> Self {
        let mut k = Vec::new();
        self.options.key = key.write_key(&mut k).then_some(k);
        self
    }

    /// Sets the correlation id (`ce_correlationid` header).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.options.correlation_id = Some(id.into());
        self
    }

    /// Adds a header to this message only. Names of kontext's standard
    /// headers are rejected when the request is awaited.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.headers.push((name.into(), value.into()));
        self
    }
}

impl<'a, T: Message> IntoFuture for Produce<'a, T> {
    type Output = Result<Delivery>;
    type IntoFuture = BoxFuture<'a, Result<Delivery>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let message = match &self.message {
                MessageRef::Borrowed(m) => *m,
                MessageRef::Owned(m) => m,
            };
            self.producer.send_one(message, &self.options).await
        })
    }
}

impl<T> fmt::Debug for Produce<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Produce")
            .field("type", &std::any::type_name::<T>())
            .field("correlation_id", &self.options.correlation_id)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("source", &self.inner.source)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
