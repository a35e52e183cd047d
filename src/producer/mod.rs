//! Typed producing: encode with the topic's codec, key and headers from the
//! model, await the broker's acknowledgement.

mod transaction;

pub(crate) use transaction::Open;
pub use transaction::{Sending, Transaction, TransactionalProducer};

use std::any::TypeId;
use std::convert::Infallible;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::channel::oneshot::Canceled;
use futures::future::BoxFuture;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rustc_hash::FxHashMap;
use tokio::sync::SemaphorePermit;
use uuid::Uuid;

use crate::client::{ClientGuard, ClientKind, ClientTracker};
use crate::client::{Reach, TracingContext};
use crate::config::{KafkaSettings, redacted};
use crate::error::{Error, Result};
use crate::headers::{self, HeaderList, HeaderProfile};
use crate::model::{HeaderSource, Message, MessageKey, Model, TopicSpec};
use crate::telemetry::ProduceMetrics;

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
    /// Room in librdkafka's local queue for single `produce` calls (see
    /// [`room_for_calls`]): calls wait here, in order, when it is full,
    /// instead of each retrying on a timer.
    room: tokio::sync::Semaphore,
    /// Calls that found librdkafka's queue full take turns here, in the
    /// order they met it, each until librdkafka took its message: a queue
    /// full by bytes (which `room` does not count) keeps call order too.
    line: tokio::sync::Mutex<()>,
    /// Calls in `line` or on their way to it; while there are any, a new
    /// call queues behind them instead of trying librdkafka first.
    waiting: AtomicUsize,
    /// Counters and latency per produced type (see `telemetry`).
    metrics: FxHashMap<TypeId, ProduceMetrics>,
    /// Whether the client reaches a broker, for health.
    reach: Arc<Reach>,
    /// The bootstrap servers it was made with: the cluster, for the
    /// ledger of tracked tests (`telemetry::ledger`).
    servers: Arc<str>,
    _guard: ClientGuard,
}

impl Producer {
    pub(crate) fn new(
        settings: &KafkaSettings,
        bootstrap_servers: &str,
        model: Arc<Model>,
        clients: &ClientTracker,
    ) -> Result<Producer> {
        let mut config = settings.producer_config(bootstrap_servers);
        // Statistics tell when a broker is reachable again after an outage
        // (for health) without waiting for traffic.
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", "5000");
        }
        let setting = |name: &str, default: usize| {
            config
                .get(name)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(default)
        };
        let room = room_for_calls(
            setting("queue.buffering.max.messages", DEFAULT_QUEUE_MESSAGES),
            setting("batch.num.messages", DEFAULT_BATCH_MESSAGES),
        );
        // How long a call waits for room: the message timeout the client
        // was really given (a raw `message.timeout.ms`, or its alias
        // `delivery.timeout.ms`, wins over the typed setting).
        let queue_timeout = ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .find_map(|name| config.get(name).and_then(|v| v.trim().parse::<u64>().ok()))
            // 0 is librdkafka's "no timeout": wait as the default does.
            .filter(|ms| *ms > 0)
            .map_or_else(|| settings.message_timeout(), Duration::from_millis);
        // A transactional client's records count as produced (for tracked
        // tests, `telemetry::ledger`) once their transaction commits.
        let transactional = config.get("transactional.id").is_some();
        tracing::debug!(config = ?redacted(&config), "creating producer");
        let reach = Arc::new(Reach::default());
        let context = TracingContext {
            role: "producer",
            reach: Some(Arc::clone(&reach)),
        };
        let client = config
            .create_with_context(context)
            .map_err(|source| Error::Client {
                role: "producer",
                source,
            })?;
        crate::telemetry::describe();
        let mut metrics = FxHashMap::default();
        for topic in model.topics() {
            for (id, info) in model.types_on(topic.name()) {
                let mut m = ProduceMetrics::new(bootstrap_servers, info.topic, info.discriminator);
                m.tally_on_delivery = !transactional;
                metrics.insert(id, m);
            }
        }
        Ok(Producer {
            inner: Arc::new(Inner {
                client,
                metrics,
                model,
                source: settings.effective_client_id().to_owned(),
                queue_timeout,
                room: tokio::sync::Semaphore::new(room),
                line: tokio::sync::Mutex::new(()),
                waiting: AtomicUsize::new(0),
                reach,
                servers: Arc::from(bootstrap_servers),
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
    ///
    /// Ordering: concurrent calls take room in librdkafka's local queue in
    /// the order they are first polled, waiting in line while it is full
    /// (by message count or by bytes), so messages with one key keep that
    /// order. (A `produce_batch` running at the same time is not in that
    /// line: its messages and single calls for one key may interleave.)
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
            message: MessageRef::Owned(Box::new(message)),
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

        let metrics = self.metrics_of::<T>();
        let mut pending: Vec<(DeliveryFuture, Uuid, Instant, tracing::Span)> =
            Vec::with_capacity(prepared.len());
        let mut first_unawaited = 0;
        let mut results: Vec<Delivery> = Vec::with_capacity(prepared.len());
        let capacity = headers::RESERVED.len() + spec.headers.len();
        // One task produces the whole batch: one trace context for all.
        let trace = carried_trace(&options);
        for (message, encoded) in messages.iter().zip(prepared) {
            let headers = write_headers(
                spec,
                *message,
                &options,
                &self.inner.source,
                &encoded,
                &trace,
                OwnedHeaders::new_with_capacity(capacity),
            )?;
            let started = Instant::now();
            let record = encoded.record(spec.topic(), headers);
            // When the local queue is full, waiting for the oldest message
            // in flight frees room.
            let wait_for_oldest = OldestOfBatch {
                pending: &mut pending,
                first_unawaited: &mut first_unawaited,
                results: &mut results,
                spec,
                metrics,
            };
            let future = match enqueue(
                &self.inner.client,
                record,
                Some((started, self.inner.queue_timeout)),
                wait_for_oldest,
            )
            .await
            {
                Ok(f) => f,
                Err(Enqueue::Stopped(e)) => return Err(e),
                Err(Enqueue::Failed(source)) => {
                    if let Some(m) = metrics {
                        m.errors.increment(1);
                    }
                    return Err(produce_failed(spec, source));
                }
            };
            let span = publish_span(spec, encoded.message_id);
            pending.push((future, encoded.message_id, started, span));
        }
        for (f, id, sent, span) in pending.iter_mut().skip(first_unawaited) {
            let id = *id;
            let measure = metrics.map(|m| (m, *sent));
            results.push(await_delivery(f, spec, id, measure, span).await?);
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

    /// The measures of `T`'s messages.
    fn metrics_of<T: 'static>(&self) -> Option<&ProduceMetrics> {
        self.inner.metrics.get(&TypeId::of::<T>())
    }

    /// The process-wide tally of `T`'s records (see `telemetry::ledger`),
    /// for a transaction to count them once committed.
    pub(crate) fn tally_of<T: 'static>(&self) -> Option<Arc<crate::telemetry::ledger::Tally>> {
        self.metrics_of::<T>().map(|m| Arc::clone(&m.tally))
    }

    /// The bootstrap servers it was made with.
    pub(crate) fn servers(&self) -> &str {
        &self.inner.servers
    }

    /// How long the client has reached no broker, if it reaches none.
    pub(crate) fn brokers_down_for(&self) -> Option<Duration> {
        self.inner.reach.down_for()
    }

    /// How long the client may reach no broker before it is not ready: a
    /// message's delivery timeout, at most 45 s (a producer whose messages
    /// would fail by now, or long after consumers would have left).
    pub(crate) fn reach_limit(&self) -> Duration {
        self.inner.queue_timeout.min(Duration::from_secs(45))
    }

    /// Messages queued locally or in flight, not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.inner.client.in_flight_count()
    }

    /// Waits for room in librdkafka's local queue, then enqueues. The slow
    /// path of a produce call, boxed by its caller so that the common
    /// future stays small. `place` was taken (synchronously, by the caller)
    /// when the call found no room, so calls after it queue behind it.
    async fn send_when_room<'a, T: Message>(
        &'a self,
        spec: &'a TopicSpec<T>,
        encoded: Encoded,
        headers: Option<OwnedHeaders>,
        place: Waiting<'a>,
    ) -> Result<InFlight<'a, T>> {
        // In line first, then room: the one in front holds the line while
        // it waits, so nothing behind it takes the room it waits for.
        let _line = self.inner.line.lock().await;
        // The semaphore is never closed, so `ok()` only drops an error that
        // cannot happen.
        let permit = self.inner.room.acquire().await.ok();
        let started = Instant::now();
        let record = encoded.record(spec.topic(), headers);
        // Full although we hold room: the queue is full by bytes, or a
        // batch shares it.
        let pause = Pause(QUEUE_FULL_PAUSE);
        let delivery = match enqueue(
            &self.inner.client,
            record,
            Some((started, self.inner.queue_timeout)),
            pause,
        )
        .await
        {
            Ok(f) => f,
            Err(Enqueue::Stopped(never)) => match never {},
            Err(Enqueue::Failed(source)) => {
                if let Some(m) = self.metrics_of::<T>() {
                    m.errors.increment(1);
                }
                return Err(produce_failed(spec, source));
            }
        };
        // Out of line once librdkafka has the message.
        drop(place);
        Ok(InFlight {
            delivery,
            _permit: permit,
            span: publish_span(spec, encoded.message_id),
            message_id: encoded.message_id,
            spec,
            measure: self.metrics_of::<T>().map(|m| (m, started)),
        })
    }

    fn prepare<T: Message>(
        &self,
        spec: &TopicSpec<T>,
        message: &T,
        options: &CallOptions,
    ) -> Result<(Encoded, OwnedHeaders)> {
        let capacity = headers::RESERVED.len() + spec.headers.len() + options.headers.len();
        prepare(
            spec,
            message,
            options,
            &self.inner.source,
            OwnedHeaders::new_with_capacity(capacity),
        )
    }

    /// The client, for the outbox relay and the transaction calls.
    pub(crate) fn client(&self) -> &FutureProducer<TracingContext> {
        &self.inner.client
    }
}

/// Encodes a message and builds its key and headers (into `h`).
pub(crate) fn prepare<T: Message, H: HeaderList>(
    spec: &TopicSpec<T>,
    message: &T,
    options: &CallOptions,
    source: &str,
    h: H,
) -> Result<(Encoded, H)> {
    let encoded = encode(spec, message, options)?;
    let trace = carried_trace(options);
    let h = write_headers(spec, message, options, source, &encoded, &trace, h)?;
    Ok((encoded, h))
}

/// Encodes a message's payload and key and gives it an id and a timestamp.
pub(crate) fn encode<T: Message>(
    spec: &TopicSpec<T>,
    message: &T,
    options: &CallOptions,
) -> Result<Encoded> {
    // Payload and key share one allocation: one malloc per message fewer.
    let mut data = Vec::with_capacity(256);
    spec.codec()
        .encode(message, &mut data)
        .map_err(|source| Error::Encode {
            topic: spec.topic().to_owned(),
            type_name: spec.rust_type(),
            source,
        })?;
    let payload_len = data.len();
    let has_key = match &options.key {
        Some(k) => {
            data.extend_from_slice(k);
            true
        }
        None => spec.write_key(message, &mut data),
    };
    if !has_key {
        // A key writer that declined may have written part of one.
        data.truncate(payload_len);
    }

    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Ok(Encoded {
        data,
        payload_len,
        has_key,
        timestamp,
        message_id: Uuid::now_v7(),
    })
}

/// The trace context a message produced now carries on (see
/// `telemetry::trace`): the handled message's or the current span's,
/// unless the call sets its own. The same for every message of one call.
pub(crate) fn carried_trace(options: &CallOptions) -> Vec<(String, String)> {
    let own_trace = options
        .headers
        .iter()
        .any(|(n, _)| n == crate::telemetry::trace::TRACEPARENT);
    if own_trace {
        Vec::new()
    } else {
        crate::telemetry::trace::outgoing()
    }
}

/// Writes the standard, declared and per-call headers of an encoded message
/// (`trace`: from [`carried_trace`]).
pub(crate) fn write_headers<T: Message, H: HeaderList>(
    spec: &TopicSpec<T>,
    message: &T,
    options: &CallOptions,
    source: &str,
    encoded: &Encoded,
    trace: &[(String, String)],
    mut h: H,
) -> Result<H> {
    let mut id_buf = Uuid::encode_buffer();
    let id_text = encoded.message_id.hyphenated().encode_lower(&mut id_buf);
    match spec.header_profile() {
        HeaderProfile::CloudEvents => {
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
        }
        HeaderProfile::Lean => {
            h = h
                .with(headers::MESSAGE_ID, id_text)
                .with(headers::MESSAGE_TYPE, spec.type_name());
        }
    }
    if let Some(c) = &options.correlation_id {
        h = h.with(headers::CORRELATION_ID, c);
    }
    for (name, value) in trace {
        h = h.with(name, value);
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
        // The model's rule: reserved names (any case) and empty ones.
        if kontext_names::validate_header_name(name).is_err() {
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

fn produce_failed<T>(spec: &TopicSpec<T>, source: KafkaError) -> Error {
    Error::Produce {
        topic: spec.topic().to_owned(),
        source,
    }
}

/// librdkafka's local queue has no room.
fn queue_full(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
}

/// Why [`enqueue`] gave up.
pub(crate) enum Enqueue<E> {
    /// librdkafka refused the message (or its queue stayed full past the
    /// deadline).
    Failed(KafkaError),
    /// Making room failed.
    Stopped(E),
}

/// How a caller frees room in librdkafka's full local queue.
pub(crate) trait MakeRoom {
    type Error;
    fn make_room(&mut self) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;
}

/// Makes room by waiting a moment (when the caller has nothing in flight
/// of its own to wait for).
pub(crate) struct Pause(pub(crate) Duration);

impl MakeRoom for Pause {
    type Error = Infallible;

    async fn make_room(&mut self) -> std::result::Result<(), Infallible> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
}

/// A batch makes room by awaiting its oldest message in flight, whose
/// outcome it keeps.
struct OldestOfBatch<'b, T> {
    pending: &'b mut Vec<(DeliveryFuture, Uuid, Instant, tracing::Span)>,
    first_unawaited: &'b mut usize,
    results: &'b mut Vec<Delivery>,
    spec: &'b TopicSpec<T>,
    metrics: Option<&'b ProduceMetrics>,
}

impl<T: Sync> MakeRoom for OldestOfBatch<'_, T> {
    type Error = Error;

    async fn make_room(&mut self) -> Result<()> {
        match self.pending.get_mut(*self.first_unawaited) {
            Some((f, id, sent, span)) => {
                let measure = self.metrics.map(|m| (m, *sent));
                let delivery = await_delivery(f, self.spec, *id, measure, span).await?;
                self.results.push(delivery);
                *self.first_unawaited += 1;
            }
            None => tokio::time::sleep(QUEUE_FULL_PAUSE).await,
        }
        Ok(())
    }
}

/// Hands `record` to librdkafka. While its local queue is full, has `room`
/// make room and tries again, until `deadline` if there is one (a start
/// and a limit: the sum is taken only when the queue is full). The one
/// place that waits for room: single produce calls, batches and the outbox
/// relay all enqueue here.
pub(crate) async fn enqueue<R: MakeRoom>(
    client: &FutureProducer<TracingContext>,
    mut record: FutureRecord<'_, [u8], [u8]>,
    deadline: Option<(Instant, Duration)>,
    mut room: R,
) -> std::result::Result<DeliveryFuture, Enqueue<R::Error>> {
    loop {
        match client.send_result(record) {
            Ok(f) => return Ok(f),
            Err((e, back))
                if queue_full(&e)
                    && deadline.is_none_or(|(from, limit)| from.elapsed() < limit) =>
            {
                record = back;
                room.make_room().await.map_err(Enqueue::Stopped)?;
            }
            Err((e, _)) => return Err(Enqueue::Failed(e)),
        }
    }
}

/// librdkafka's default `queue.buffering.max.messages`.
const DEFAULT_QUEUE_MESSAGES: usize = 100_000;

/// librdkafka's default `batch.num.messages`.
const DEFAULT_BATCH_MESSAGES: usize = 10_000;

/// How many single `produce` calls may hold room in librdkafka's queue.
///
/// Less than the queue holds: librdkafka reports a batch's deliveries
/// before it frees their room, so a call that starts as soon as an earlier
/// one is acknowledged could meet a full queue, retry, and be overtaken.
/// Holding back one batch (at most half the queue) keeps calls in order.
fn room_for_calls(queue: usize, batch: usize) -> usize {
    // 0 is librdkafka's "no limit": the calls' room is not limited either.
    if queue == 0 {
        return tokio::sync::Semaphore::MAX_PERMITS;
    }
    let held_back = batch.min(queue / 2);
    (queue - held_back).clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
}

/// Pause before retrying an enqueue into a full local queue.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);

async fn await_delivery<T>(
    future: &mut DeliveryFuture,
    spec: &TopicSpec<T>,
    message_id: Uuid,
    measure: Option<(&ProduceMetrics, Instant)>,
    span: &tracing::Span,
) -> Result<Delivery> {
    delivered(future.await, spec, message_id, measure, span)
}

/// The publish span of one message, with OpenTelemetry's messaging
/// attributes; it ends when the message's delivery is known.
fn publish_span<T>(spec: &TopicSpec<T>, message_id: Uuid) -> tracing::Span {
    tracing::debug_span!(
        "kontext.publish",
        "messaging.system" = "kafka",
        "messaging.operation.type" = "publish",
        "messaging.destination.name" = spec.topic(),
        "messaging.message.id" = %message_id,
        "kontext.type" = spec.type_name(),
        "messaging.destination.partition.id" = tracing::field::Empty,
        "messaging.kafka.offset" = tracing::field::Empty
    )
}

/// What a delivery report means for the caller; counted, with the time
/// since the message was handed to librdkafka, when `measure` is given.
fn delivered<T>(
    report: std::result::Result<OwnedDeliveryResult, Canceled>,
    spec: &TopicSpec<T>,
    message_id: Uuid,
    measure: Option<(&ProduceMetrics, Instant)>,
    span: &tracing::Span,
) -> Result<Delivery> {
    if let (Ok(Ok(d)), false) = (&report, span.is_disabled()) {
        span.record("messaging.destination.partition.id", d.partition);
        span.record("messaging.kafka.offset", d.offset);
    }
    if let Some((m, sent)) = measure {
        match &report {
            Ok(Ok(_)) => {
                m.produced.increment(1);
                if m.tally_on_delivery {
                    m.tally.produced(1);
                }
                m.latency.record(sent.elapsed());
            }
            _ => m.errors.increment(1),
        }
    }
    match report {
        Ok(Ok(d)) => Ok(Delivery {
            topic: spec.topic_arc(),
            partition: d.partition,
            offset: d.offset,
            message_id,
        }),
        Ok(Err((source, _))) => Err(produce_failed(spec, source)),
        // The client went away before reporting: the message's fate is unknown.
        Err(_) => Err(produce_failed(spec, KafkaError::Canceled)),
    }
}

/// An encoded message ready to hand to librdkafka (which copies it).
pub(crate) struct Encoded {
    /// The payload, then the key when there is one.
    data: Vec<u8>,
    payload_len: usize,
    has_key: bool,
    pub(crate) timestamp: i64,
    pub(crate) message_id: Uuid,
}

impl Encoded {
    pub(crate) fn payload(&self) -> &[u8] {
        self.data.get(..self.payload_len).unwrap_or_default()
    }

    pub(crate) fn key(&self) -> Option<&[u8]> {
        self.has_key
            .then(|| self.data.get(self.payload_len..))
            .flatten()
    }

    /// Payload and key as separate buffers (for the outbox row).
    pub(crate) fn into_parts(mut self) -> (Vec<u8>, Option<Vec<u8>>) {
        let key = self.data.split_off(self.payload_len.min(self.data.len()));
        (self.data, self.has_key.then_some(key))
    }

    fn record<'a>(
        &'a self,
        topic: &'a str,
        headers: impl Into<Option<OwnedHeaders>>,
    ) -> FutureRecord<'a, [u8], [u8]> {
        let mut record = FutureRecord::to(topic)
            .payload(self.payload())
            .timestamp(self.timestamp);
        record.headers = headers.into();
        match self.key() {
            Some(k) => record.key(k),
            None => record,
        }
    }
}

enum MessageRef<'a, T> {
    Borrowed(&'a T),
    /// Boxed so that the size of a produce future does not depend on `T`.
    Owned(Box<T>),
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
    type IntoFuture = ProduceFuture<'a, T>;

    fn into_future(self) -> Self::IntoFuture {
        ProduceFuture {
            state: State::Start(self),
        }
    }
}

impl<'a, T: Message> Produce<'a, T> {
    /// Hands the message to librdkafka, waiting only for room in its
    /// queue, not for the broker: for a transaction, whose commit waits
    /// for every message it sent and fails if one failed.
    async fn queue(self) -> Result<()> {
        match self.start()? {
            State::Waiting(wait) => wait.await.map(drop),
            State::Start(_) | State::InFlight(_) | State::Finished => Ok(()),
        }
    }

    /// Encodes the message and hands it to librdkafka when its queue has
    /// room; otherwise returns the boxed wait for room.
    fn start(self) -> Result<State<'a, T>> {
        let producer = self.producer;
        let message: &T = match &self.message {
            MessageRef::Borrowed(m) => m,
            MessageRef::Owned(m) => m,
        };
        let spec = producer.inner.model.spec::<T>()?;
        let (encoded, headers) = producer.prepare(spec, message, &self.options)?;
        // While no call waits and there is room the message goes out now,
        // without a future for the semaphore.
        let permit = match producer.inner.waiting.load(Ordering::Acquire) {
            0 => producer.inner.room.try_acquire().ok(),
            _ => None,
        };
        let Some(permit) = permit else {
            let place = Waiting::take(&producer.inner.waiting);
            let wait = producer.send_when_room(spec, encoded, Some(headers), place);
            return Ok(State::Waiting(Box::pin(wait)));
        };
        let record = encoded.record(spec.topic(), headers);
        let measure = producer.metrics_of::<T>().map(|m| (m, Instant::now()));
        match producer.inner.client.send_result(record) {
            Ok(delivery) => Ok(State::InFlight(InFlight {
                delivery,
                _permit: Some(permit),
                span: publish_span(spec, encoded.message_id),
                message_id: encoded.message_id,
                spec,
                measure,
            })),
            Err((e, record)) if queue_full(&e) => {
                // Full by bytes (or by a batch): give the room back and
                // queue up like any call that found no room.
                drop(permit);
                let place = Waiting::take(&producer.inner.waiting);
                let headers = record.headers;
                let wait = producer.send_when_room(spec, encoded, headers, place);
                Ok(State::Waiting(Box::pin(wait)))
            }
            Err((source, _)) => {
                if let Some((m, _)) = measure {
                    m.errors.increment(1);
                }
                Err(produce_failed(spec, source))
            }
        }
    }
}

/// The future of a [`Produce`] request: resolves when the broker has the
/// message (or could not take it).
///
/// Not boxed, and small whatever the message type: the message is encoded
/// and queued on the first poll, after which the future holds only what it
/// needs to wait for the acknowledgement.
#[must_use = "futures do nothing unless polled"]
pub struct ProduceFuture<'a, T> {
    state: State<'a, T>,
}

enum State<'a, T> {
    /// Not polled yet.
    Start(Produce<'a, T>),
    /// librdkafka's queue was full: waiting for room.
    Waiting(BoxFuture<'a, Result<InFlight<'a, T>>>),
    /// Queued; waiting for the broker's acknowledgement.
    InFlight(InFlight<'a, T>),
    Finished,
}

/// A call's place among those waiting for room (see `Inner::waiting`),
/// given up when the call has its message queued, fails or is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn take(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A message librdkafka has, and the room it takes in its queue.
struct InFlight<'a, T> {
    delivery: DeliveryFuture,
    /// Released when the delivery is known.
    _permit: Option<SemaphorePermit<'a>>,
    message_id: Uuid,
    spec: &'a TopicSpec<T>,
    /// Where to count the outcome, and when the message was handed over.
    measure: Option<(&'a ProduceMetrics, Instant)>,
    span: tracing::Span,
}

impl<T: Message> Future for ProduceFuture<'_, T> {
    type Output = Result<Delivery>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is `Unpin` (the message is behind a reference or a box).
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.state, State::Finished) {
                State::Start(request) => match request.start() {
                    Ok(next) => this.state = next,
                    Err(e) => return Poll::Ready(Err(e)),
                },
                State::Waiting(mut wait) => match wait.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.state = State::Waiting(wait);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(in_flight)) => this.state = State::InFlight(in_flight),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                },
                State::InFlight(mut in_flight) => {
                    return match Pin::new(&mut in_flight.delivery).poll(cx) {
                        Poll::Pending => {
                            this.state = State::InFlight(in_flight);
                            Poll::Pending
                        }
                        Poll::Ready(result) => Poll::Ready(delivered(
                            result,
                            in_flight.spec,
                            in_flight.message_id,
                            in_flight.measure,
                            &in_flight.span,
                        )),
                    };
                }
                State::Finished => panic!("a produce future was polled after it completed"),
            }
        }
    }
}

impl<T> fmt::Debug for ProduceFuture<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Start(_) => "not started",
            State::Waiting(_) => "waiting for queue room",
            State::InFlight(_) => "awaiting acknowledgement",
            State::Finished => "finished",
        };
        f.debug_struct("ProduceFuture")
            .field("type", &std::any::type_name::<T>())
            .field("state", &state)
            .finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw `message.timeout.ms` (or `delivery.timeout.ms`) is the one the
    /// client has, so it bounds a call's wait for room (and health's limit),
    /// not the typed setting's default of 300 s.
    #[test]
    fn a_raw_message_timeout_bounds_the_wait_for_room() {
        let model = Arc::new(crate::model::Model::builder().build().unwrap());
        for name in ["message.timeout.ms", "delivery.timeout.ms"] {
            let mut settings = KafkaSettings::new();
            settings.producer.librdkafka.set(name, "1234");
            let p = Producer::new(
                &settings,
                "127.0.0.1:1",
                Arc::clone(&model),
                &ClientTracker::default(),
            )
            .unwrap();
            assert_eq!(p.inner.queue_timeout, Duration::from_millis(1234), "{name}");
        }
        // 0 is "no timeout", not "give up at once".
        let mut settings = KafkaSettings::new();
        settings.producer.librdkafka.set("message.timeout.ms", "0");
        let p = Producer::new(&settings, "127.0.0.1:1", model, &ClientTracker::default()).unwrap();
        assert_eq!(p.inner.queue_timeout, settings.message_timeout());
    }

    #[test]
    fn single_calls_leave_a_batch_of_room_in_the_queue() {
        assert_eq!(room_for_calls(100_000, 10_000), 90_000);
        assert_eq!(room_for_calls(16, 10_000), 8);
        assert_eq!(room_for_calls(1, 10_000), 1);
        // librdkafka's "no limit" is not a queue of one.
        assert_eq!(
            room_for_calls(0, 10_000),
            tokio::sync::Semaphore::MAX_PERMITS
        );
    }
}
