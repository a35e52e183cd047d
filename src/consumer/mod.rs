//! The consumer runtime: shared and dedicated poll services, typed handlers
//! and streams, bounded buffers with backpressure, at-least-once offsets,
//! retries and dead letters.
//!
//! Flow of one record: a poll service's thread polls it, routes it by topic
//! and `ce_type` header to its type's bounded buffer (pausing partitions
//! when the buffer is full), the type's async worker decodes it and runs the
//! handler (retrying, or dead-lettering), and reports the offset back to the
//! poll thread, which stores it only when every earlier offset of the
//! partition is finished too.

pub(crate) mod buffer;
mod context;
mod control;
mod dead_letter;
mod exactly_once;
#[cfg(feature = "testing")]
pub(crate) mod fault;
mod handler;
mod lent;
mod offsets;
pub(crate) mod poll;
mod pool;
mod stopwatch;
mod stream;
mod sync;
mod uow;
mod worker;

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::model::consumer::{
    Backpressure, ConsumerBuilder, ConsumerSpec, DEFAULT_MAX_BUFFERED, DedicatedBuilder,
    DedicatedSpec, Distribution, RetryPolicy, WorkerSpec,
};
pub use crate::registry::ServiceState;
pub use context::MessageContext;
pub use dead_letter::dlq_headers;
pub use exactly_once::ExactlyOnceHandler;
pub use handler::{Handler, HandlerError};
pub use stream::{MessageStream, Received};
pub use uow::{TransactionalHandler, UnitOfWork};

use crate::broker::{Broker, TopicToCreate, provision};
use crate::client::{ClientKind, ClientTracker};
use crate::config::{ConsumerSettings, KafkaSettings, OffsetReset};
use crate::error::{Error, Result};
use crate::inbox::Inbox;
use crate::model::{Message, Model};
use crate::outbox::Outbox;
use crate::registry::{Registry, TypeEntry};
use buffer::{LaneBuffer, TypeStats};
pub(crate) use control::{Controller, Standing};
use dead_letter::DeadLetters;
use poll::{Lane, PollPlan, ServiceShared};
use worker::{ActiveWorker, Dispatch, Outcome, TypeWorker, Typed, WorkerEnv};

/// The consumers a process registers: a handler or a stream per type.
/// Obtained in [`KontextBuilder::consumers`](crate::KontextBuilder::consumers).
#[derive(Default)]
pub struct Consumers {
    registrations: Vec<Registered>,
    /// Types this process's groups skip on purpose (see [`Consumers::ignore`]).
    ignored: Vec<(TypeId, &'static str)>,
    /// Faults tests plan for the handlers (`testing::HandlerFault`).
    #[cfg(feature = "testing")]
    faults: fault::Faults,
    /// Pauses standing in the fleet when this process starts
    /// (`runtime/fleet.rs`): its poll services apply them before they
    /// first poll.
    pub(crate) standing: Vec<control::Standing>,
}

/// A registration with what the runtime needs to know before building it.
struct Registered {
    type_id: TypeId,
    rust_type: &'static str,
    stream: bool,
    /// Handled in Kafka transactions ([`Consumers::exactly_once`]).
    exactly_once: bool,
    build: Box<dyn Registration>,
}

impl Registered {
    fn of<T: Message>(stream: bool, build: impl Registration + 'static) -> Self {
        Registered {
            type_id: TypeId::of::<T>(),
            rust_type: std::any::type_name::<T>(),
            stream,
            exactly_once: false,
            build: Box::new(build),
        }
    }
}

impl Consumers {
    /// Handles every message of `T` with `handler`: an
    /// `async fn(T, MessageContext) -> Result<(), HandlerError>` or a type
    /// implementing [`Handler<T>`].
    pub fn handler<T: Message>(&mut self, handler: impl Handler<T>) -> &mut Self {
        self.registrations.push(Registered::of::<T>(
            false,
            HandlerRegistration {
                handler,
                _type: PhantomData::<fn() -> T>,
            },
        ));
        self
    }

    /// Handles every message of `T` in a [`UnitOfWork`]: a database
    /// transaction that also holds the type's inbox row (if it declares an
    /// inbox) and any outbox messages the handler publishes; committed when
    /// the handler returns `Ok`, before the offset is stored. Needs
    /// [`KontextBuilder::database`](crate::KontextBuilder::database).
    pub fn transactional<T: Message>(
        &mut self,
        handler: impl TransactionalHandler<T>,
    ) -> &mut Self {
        self.registrations.push(Registered::of::<T>(
            false,
            TransactionalRegistration {
                handler,
                _type: PhantomData::<fn() -> T>,
            },
        ));
        self
    }

    /// Handles every message of `T` exactly once from Kafka to Kafka: the
    /// handler (an `async fn(T, MessageContext, Transaction) -> Result<(),
    /// HandlerError>` or an [`ExactlyOnceHandler<T>`]) produces through a
    /// Kafka [`Transaction`](crate::Transaction) that commits together with
    /// the offsets of the messages it handled, in the consumer's group
    /// generation (KIP-447). `read_committed` consumers (kontext's
    /// default) see each message's output once, whatever crashes,
    /// rebalances or retries happen; a zombie member's output is aborted.
    ///
    /// A transaction takes several messages: up to
    /// `transaction_max_records` (1000) or `transaction_interval_ms`
    /// (100 ms) of the consumer settings, and commits before the lane
    /// waits for more, before its partitions are revoked and when the
    /// service stops. Needs [`KontextBuilder::transactional_producer`](crate::KontextBuilder::transactional_producer)
    /// (each lane's producer uses `<id>.<group>.<topic>`); `T` must be the
    /// only type its poll service consumes from its topic, without a
    /// worker pool. A failed message's dead letter is sent outside the
    /// transaction (at least once).
    pub fn exactly_once<T: Message>(&mut self, handler: impl ExactlyOnceHandler<T>) -> &mut Self {
        let mut registered = Registered::of::<T>(
            false,
            ExactlyOnceRegistration {
                handler,
                _type: PhantomData::<fn() -> T>,
            },
        );
        registered.exactly_once = true;
        self.registrations.push(registered);
        self
    }

    /// Consumes `T` as a [`MessageStream`], taken after start with
    /// [`Kontext::stream`](crate::Kontext::stream).
    pub fn stream<T: Message>(&mut self) -> &mut Self {
        self.registrations.push(Registered::of::<T>(
            true,
            StreamRegistration {
                _type: PhantomData::<fn() -> T>,
            },
        ));
        self
    }

    /// Skips `T`'s records on its topic: they are committed unhandled by the
    /// poll services of this process that read the topic. For a type that
    /// shares a topic with consumed types but is someone else's business
    /// (another service reads it with its own group, or nobody needs it
    /// here). Without this, or a consumer group the model gives `T`, a
    /// record of `T` is dead-lettered (`dlq-reason: not-consumed`) rather
    /// than committed unhandled: within one group, skipping would lose it
    /// for the member that does consume it.
    pub fn ignore<T: Message>(&mut self) -> &mut Self {
        self.ignored
            .push((TypeId::of::<T>(), std::any::type_name::<T>()));
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.registrations.is_empty()
    }
}

impl fmt::Debug for Consumers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.registrations.iter().map(|r| r.rust_type))
            .finish()
    }
}

/// What a registration needs to build its type's worker.
struct WorkerArgs<'a> {
    model: &'a Model,
    retry: RetryPolicy,
    handler_timeout: Option<Duration>,
    dead_letter_topic: String,
    stats: Arc<TypeStats>,
    timings: crate::telemetry::TypeTimings,
    outbox: Option<&'a Outbox>,
    inbox: Option<Inbox>,
    /// The lane's transactions, when its type is consumed exactly once.
    exactly_once: Option<ExactlyOnceLane>,
    /// The faults tests plan for this type's handler.
    #[cfg(feature = "testing")]
    fault: Arc<fault::FaultCell>,
}

/// A handler's dispatch as its lane runs it: met by planned faults first
/// when built for tests (feature `testing`).
#[cfg(feature = "testing")]
pub(crate) type Wrapped<D> = fault::Faulty<D>;
/// A handler's dispatch as its lane runs it.
#[cfg(not(feature = "testing"))]
pub(crate) type Wrapped<D> = D;

/// The handler's own dispatch inside its [`Wrapped`] one.
#[cfg(feature = "testing")]
pub(crate) fn unwrapped<D>(wrapped: &Wrapped<D>) -> &D {
    &wrapped.inner
}

/// The handler's own dispatch inside its [`Wrapped`] one.
#[cfg(not(feature = "testing"))]
pub(crate) fn unwrapped<D>(wrapped: &Wrapped<D>) -> &D {
    wrapped
}

/// What a lane in Kafka transactions is built with.
struct ExactlyOnceLane {
    producer: crate::producer::TransactionalProducer,
    bounds: exactly_once::Bounds,
    group_config: ClientConfig,
}

impl WorkerArgs<'_> {
    /// The worker of `T` around `dispatch`.
    fn typed<T: Message, D: Dispatch<T>>(self, dispatch: D) -> Result<Typed<T, Wrapped<D>>> {
        #[cfg(feature = "testing")]
        let dispatch = fault::Faulty {
            inner: dispatch,
            cell: self.fault,
        };
        Ok(Typed {
            spec: self.model.spec::<T>()?.clone(),
            retry: self.retry,
            handler_timeout: self.handler_timeout,
            dead_letter_topic: self.dead_letter_topic,
            dispatch,
            stats: self.stats,
            timings: self.timings,
        })
    }

    /// An inbox needs the transaction of a transactional handler.
    fn refuse_inbox(&self, rust_type: &'static str) -> Result<()> {
        match &self.inbox {
            Some(_) => Err(Error::config(format!(
                "`{rust_type}` declares an inbox but is consumed without a unit of work; register it with `consumers(|c| c.transactional(...))`"
            ))),
            None => Ok(()),
        }
    }
}

/// A type's worker, and its stream for stream registrations.
type Built = (Box<dyn TypeWorker>, Option<Box<dyn Any + Send>>);

trait Registration: Send {
    fn build(self: Box<Self>, args: WorkerArgs<'_>) -> Result<Built>;
}

struct HandlerRegistration<T, H> {
    handler: H,
    _type: PhantomData<fn() -> T>,
}

struct HandlerDispatch<H>(H);

impl<T: Message, H: Handler<T>> Dispatch<T> for HandlerDispatch<H> {
    // Not an async fn: a plain map moves the handler's future one time fewer.
    fn dispatch(&self, message: T, ctx: MessageContext) -> impl Future<Output = Outcome> + Send {
        futures::FutureExt::map(self.0.handle(message, ctx), |result| match result {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e),
        })
    }
}

impl<T: Message, H: Handler<T>> Registration for HandlerRegistration<T, H> {
    fn build(self: Box<Self>, a: WorkerArgs<'_>) -> Result<Built> {
        a.refuse_inbox(std::any::type_name::<T>())?;
        Ok((Box::new(a.typed(HandlerDispatch(self.handler))?), None))
    }
}

struct TransactionalRegistration<T, H> {
    handler: H,
    _type: PhantomData<fn() -> T>,
}

impl<T: Message, H: TransactionalHandler<T>> Registration for TransactionalRegistration<T, H> {
    fn build(self: Box<Self>, mut a: WorkerArgs<'_>) -> Result<Built> {
        let rust_type = std::any::type_name::<T>();
        let outbox = a.outbox.cloned().ok_or_else(|| {
            Error::config(format!(
                "`{rust_type}` has a transactional handler but kontext has no database; call `KontextBuilder::database`"
            ))
        })?;
        let inbox = a.inbox.take();
        if let Some(inbox) = &inbox {
            inbox.check_type(TypeId::of::<T>(), rust_type)?;
        }
        let dispatch = uow::TransactionalDispatch {
            handler: self.handler,
            outbox,
            inbox,
        };
        Ok((Box::new(a.typed(dispatch)?), None))
    }
}

struct ExactlyOnceRegistration<T, H> {
    handler: H,
    _type: PhantomData<fn() -> T>,
}

impl<T: Message, H: ExactlyOnceHandler<T>> Registration for ExactlyOnceRegistration<T, H> {
    fn build(self: Box<Self>, mut a: WorkerArgs<'_>) -> Result<Built> {
        let rust_type = std::any::type_name::<T>();
        a.refuse_inbox(rust_type)?;
        let lane = a.exactly_once.take().ok_or_else(|| {
            Error::Internal(format!(
                "`{rust_type}` is consumed exactly once but its lane has no transactions"
            ))
        })?;
        let worker = exactly_once::ExactlyOnce {
            typed: a.typed(exactly_once::TransactionDispatch::new(self.handler))?,
            producer: lane.producer,
            bounds: lane.bounds,
            group_config: lane.group_config,
            state: tokio::sync::Mutex::default(),
        };
        Ok((Box::new(worker), None))
    }
}

struct StreamRegistration<T> {
    _type: PhantomData<fn() -> T>,
}

impl<T: Message> Registration for StreamRegistration<T> {
    fn build(self: Box<Self>, a: WorkerArgs<'_>) -> Result<Built> {
        a.refuse_inbox(std::any::type_name::<T>())?;
        let (sink, stream) = stream::channel::<T>();
        Ok((Box::new(a.typed(sink)?), Some(Box::new(stream))))
    }
}

/// A running poll service: its shared state and its thread.
struct RunningService {
    shared: Arc<ServiceShared>,
    thread: Option<JoinHandle<()>>,
}

/// Everything the consumer role started; stopped by [`shutdown`](Self::shutdown).
pub(crate) struct ConsumerRuntime {
    services: Vec<RunningService>,
    streams: std::sync::Mutex<HashMap<TypeId, Box<dyn Any + Send>>>,
    tasks: TaskTracker,
    /// The lanes' workers, aborted when a shutdown reaches its deadline:
    /// dropping a worker's future drops the handler's it is awaiting.
    workers: Vec<tokio::task::AbortHandle>,
    cancel: CancellationToken,
    #[cfg(feature = "testing")]
    faults: fault::Faults,
}

/// One type's place in a planned poll service.
struct PlannedType {
    registration: Registered,
    topic: Arc<str>,
    discriminator: String,
    spec: ConsumerSpec,
    dead_letter_topic: String,
}

struct PlannedService {
    name: String,
    group: String,
    dedicated: Option<ConsumerSettings>,
    start_immediately: bool,
    offset_reset: Option<(OffsetReset, &'static str)>,
    types: Vec<PlannedType>,
}

impl ConsumerRuntime {
    /// Plans every poll service, checks every client setting, provisions
    /// the dead-letter topics and builds every lane and worker; only then
    /// spawns. A failure at any step before spawning leaves nothing
    /// running; one while spawning drops the runtime, which stops what
    /// already runs.
    // One call site (the runtime), each argument a different piece of it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start(
        model: &Arc<Model>,
        settings: &KafkaSettings,
        broker: &Broker,
        mut consumers: Consumers,
        clients: &ClientTracker,
        registry: &Registry,
        outbox: Option<&Outbox>,
        mock_cluster: bool,
        transactional_id: Option<&str>,
    ) -> Result<ConsumerRuntime> {
        crate::telemetry::describe();
        #[cfg(feature = "testing")]
        let faults = consumers.faults.clone();
        let ignored = ignored_types(model, &consumers)?;
        let standing = std::mem::take(&mut consumers.standing);
        let services = plan(model, settings, consumers)?;
        warn_on_builtin_group(settings, &services);
        check_client_settings(settings, broker, mock_cluster, &services)?;
        if settings.provisioning_enabled() {
            provision_dead_letters(model, settings, broker, &services).await?;
        }
        let mut build = Build {
            model,
            settings,
            broker,
            mock_cluster,
            clients,
            registry,
            outbox,
            transactional_id,
            ignored: &ignored,
            dead_letters: Arc::new(DeadLetters::new(
                settings,
                broker.bootstrap_servers(),
                clients,
            )?),
            cancel: CancellationToken::new(),
            streams: HashMap::new(),
            cleanup_every: None,
            lane_workers: Vec::new(),
            poll_plans: Vec::new(),
            transactional_lanes: Vec::new(),
            #[cfg(feature = "testing")]
            faults,
        };
        for planned in services {
            build.service(planned)?;
        }
        // Each exactly-once lane registers its transactional id before its
        // consumer reads a committed offset: that aborts what a previous
        // instance left open, whose pending offsets would otherwise hold
        // the read up until `transaction.timeout.ms`.
        for producer in &build.transactional_lanes {
            producer.ensure_client().await?;
        }
        for (_, shared, _) in &build.poll_plans {
            control::queue_standing(shared, &standing);
        }
        build.spawn()
    }

    /// The faults tests plan for the handlers.
    #[cfg(feature = "testing")]
    pub(crate) fn faults(&self) -> &fault::Faults {
        &self.faults
    }

    pub(crate) fn take_stream<T: Message>(&self) -> Result<MessageStream<T>> {
        let mut streams = sync::lock(&self.streams);
        let boxed = streams.remove(&TypeId::of::<T>()).ok_or_else(|| {
            Error::config(format!(
                "no stream of `{}` to take: register it with `consumers(|c| c.stream::<{}>())`, and take it once",
                std::any::type_name::<T>(),
                crate::model::name::short_type_name(std::any::type_name::<T>()),
            ))
        })?;
        boxed
            .downcast::<MessageStream<T>>()
            .map(|b| *b)
            .map_err(|_| {
                Error::Internal(format!(
                    "the stream kept for `{}` has another type",
                    std::any::type_name::<T>()
                ))
            })
    }

    /// Stops fetching, lets workers drain their buffers for up to `timeout`,
    /// commits and closes every consumer. Returns within `timeout` plus
    /// [`SHUTDOWN_GRACE`]: at `timeout`, workers still busy are aborted
    /// (a running handler's future is dropped; its message was not
    /// committed and is delivered again) and the poll threads get the grace
    /// to commit what finished and close.
    ///
    /// Returns what the stop left undone, one line per poll service: a
    /// final commit that failed or found no coordinator in time (naming
    /// the partitions and offsets left uncommitted), a poll thread still
    /// closing its consumer.
    pub(crate) async fn shutdown(mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        for s in &self.services {
            // The poll thread's final commit and leave end within the grace.
            s.shared
                .close_by_at(deadline + SHUTDOWN_GRACE - CLOSE_MARGIN);
            s.shared.drain();
        }
        while Instant::now() < deadline && !self.all_threads_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grace = Instant::now() + SHUTDOWN_GRACE;
        if !self.all_threads_finished() {
            tracing::warn!(
                ?timeout,
                "consumers did not drain in time; cancelling handlers"
            );
            self.cancel.cancel();
            for s in &self.services {
                s.shared.stop_now();
            }
            for w in &self.workers {
                w.abort();
            }
            while Instant::now() < grace && !self.all_threads_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.cancel.cancel();
        let _ = tokio::time::timeout_at(grace.into(), self.tasks.wait()).await;
        let mut undone = Vec::new();
        for s in &mut self.services {
            let name = &s.shared.name;
            if let Some(t) = s.thread.take() {
                if t.is_finished() {
                    let _ = t.join();
                } else {
                    tracing::error!(service = %name, "poll thread did not stop; leaving it detached");
                    undone.push(format!(
                        "poll service {name}: its consumer was still closing at the deadline \
                         (librdkafka waits for its group coordinator, up to session.timeout.ms, or a \
                         handler that ignores cancellation still holds a record); it is left to finish"
                    ));
                }
            }
            if let Some(what) = s.shared.take_report() {
                undone.push(format!("poll service {name}: {what}"));
            }
        }
        undone
    }

    fn all_threads_finished(&self) -> bool {
        self.services
            .iter()
            .all(|s| s.thread.as_ref().is_none_or(|t| t.is_finished()))
    }
}

impl Drop for ConsumerRuntime {
    /// Dropped without `shutdown`: stop at once, like a crash would, except
    /// that offsets already stored are still committed by librdkafka's close.
    fn drop(&mut self) {
        // Stopping first: a lane that ends on the cancellation must find
        // its service stopping (`worker::supervised`).
        for s in &self.services {
            s.shared.stop_now();
        }
        self.cancel.cancel();
        for w in &self.workers {
            w.abort();
        }
    }
}

impl fmt::Debug for ConsumerRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerRuntime")
            .field(
                "services",
                &self
                    .services
                    .iter()
                    .map(|s| &s.shared.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Checks every poll service's client settings before anything is
/// provisioned or spawned: librdkafka rejects a bad property only when a
/// client is created, and that happens on the poll thread, after `start()`
/// would have returned `Ok`.
fn check_client_settings(
    settings: &KafkaSettings,
    broker: &Broker,
    mock_cluster: bool,
    services: &[PlannedService],
) -> Result<()> {
    for planned in services {
        consumer_config(
            settings,
            broker,
            mock_cluster,
            &planned.group,
            planned.dedicated.as_ref(),
            planned.offset_reset.map(|(r, _)| r),
        )
        .create_native_config()
        .map_err(|source| Error::Client {
            role: "consumer",
            source,
        })?;
    }
    Ok(())
}

/// Creates the dead-letter topics the planned types send to, each with as
/// many partitions as the largest topic sending to it.
async fn provision_dead_letters(
    model: &Model,
    settings: &KafkaSettings,
    broker: &Broker,
    services: &[PlannedService],
) -> Result<()> {
    let mut dlqs: BTreeMap<String, i32> = BTreeMap::new();
    for s in services {
        for t in &s.types {
            let partitions = model
                .topics()
                .iter()
                .find(|d| d.name() == &*t.topic)
                .map(|d| d.partitions())
                .unwrap_or(1);
            let entry = dlqs.entry(t.dead_letter_topic.clone()).or_insert(1);
            *entry = (*entry).max(partitions);
        }
    }
    let topics: Vec<TopicToCreate> = dlqs
        .into_iter()
        .map(|(name, partitions)| TopicToCreate::new(name, partitions))
        .collect();
    provision(broker, settings, &topics).await.map(drop)
}

/// Everything the consumer role builds before anything runs: what the
/// services share, and what each built service and lane adds.
struct Build<'a> {
    model: &'a Arc<Model>,
    settings: &'a KafkaSettings,
    broker: &'a Broker,
    /// The cluster is librdkafka's mock (see `Broker::MOCK_CONSUMER_DEFAULTS`).
    mock_cluster: bool,
    clients: &'a ClientTracker,
    registry: &'a Registry,
    outbox: Option<&'a Outbox>,
    /// `KontextBuilder::transactional_producer`'s id: the prefix of the
    /// transactional ids of exactly-once lanes.
    transactional_id: Option<&'a str>,
    ignored: &'a [TypeId],
    dead_letters: Arc<DeadLetters>,
    cancel: CancellationToken,
    streams: HashMap<TypeId, Box<dyn Any + Send>>,
    /// The shortest cleanup interval of the inboxes, if any type has one.
    cleanup_every: Option<Duration>,
    lane_workers: Vec<futures::future::BoxFuture<'static, ()>>,
    poll_plans: Vec<(String, Arc<ServiceShared>, PollPlan)>,
    /// The transactional producers of exactly-once lanes.
    transactional_lanes: Vec<crate::producer::TransactionalProducer>,
    #[cfg(feature = "testing")]
    faults: fault::Faults,
}

impl Build<'_> {
    /// Builds one poll service: its shared state, its client configuration
    /// and a lane per topic.
    fn service(&mut self, planned: PlannedService) -> Result<()> {
        let shared = ServiceShared::new(
            planned.name.clone(),
            planned.group.clone(),
            planned.dedicated.is_some(),
            planned.start_immediately,
        );
        self.registry
            .add_service(Arc::clone(&shared) as Arc<dyn crate::registry::ServiceProbe>);
        let env = WorkerEnv {
            shared: Arc::clone(&shared),
            dead_letters: Arc::clone(&self.dead_letters),
            cancel: self.cancel.clone(),
        };
        let config = consumer_config(
            self.settings,
            self.broker,
            self.mock_cluster,
            &planned.group,
            planned.dedicated.as_ref(),
            planned.offset_reset.map(|(r, _)| r),
        );
        let effective = crate::config::redacted(&config);
        tracing::debug!(service = %planned.name, config = ?effective, "creating poll service");
        let _ = shared.settings.set(effective);
        let revoke_timeout = service_millis(
            &planned,
            self.settings,
            |s| s.revoke_timeout_ms,
            DEFAULT_REVOKE_TIMEOUT_MS,
        );
        let _ = shared.stall_limit.set(service_millis(
            &planned,
            self.settings,
            |s| s.stall_limit_ms,
            DEFAULT_STALL_LIMIT_MS,
        ));
        let bounds = exactly_once::Bounds {
            max_records: planned
                .dedicated
                .as_ref()
                .and_then(|d| d.transaction_max_records)
                .or(self.settings.consumer.transaction_max_records)
                .unwrap_or(DEFAULT_TRANSACTION_MAX_RECORDS)
                .max(1),
            interval: service_millis(
                &planned,
                self.settings,
                |s| s.transaction_interval_ms,
                DEFAULT_TRANSACTION_INTERVAL_MS,
            ),
        };
        let PlannedService {
            name, group, types, ..
        } = planned;
        let mut lanes = Vec::new();
        for lane_types in by_topic(types) {
            lanes.push(self.lane(&name, &group, &env, lane_types, (bounds, &config))?);
        }
        let _ = shared
            .topics
            .set(lanes.iter().map(|l| l.topic.to_string()).collect());
        let poll_plan = PollPlan {
            shared: Arc::clone(&shared),
            config,
            lanes,
            guard: self.clients.track(ClientKind::Consumer),
            revoke_timeout,
        };
        self.poll_plans
            .push((thread_name(&name), shared, poll_plan));
        Ok(())
    }

    /// Builds one topic's lane of service `service`: its buffer, a worker
    /// for each type (registered, with its inbox and stream) and the lane's
    /// task (one worker, or a pool).
    fn lane(
        &mut self,
        service: &str,
        group: &str,
        env: &WorkerEnv,
        lane_types: Vec<PlannedType>,
        (bounds, config): (exactly_once::Bounds, &ClientConfig),
    ) -> Result<Lane> {
        let shared = &env.shared;
        let topic = Arc::clone(&lane_types[0].topic);
        let (capacity, mode) = lane_settings(&lane_types)?;
        let pool = lane_workers_spec(&lane_types)?;
        let rust_types: Vec<&'static str> = lane_types
            .iter()
            .map(|t| t.registration.rust_type)
            .collect();
        let flags: Vec<bool> = lane_types
            .iter()
            .map(|t| t.registration.exactly_once)
            .collect();
        let transactional =
            exactly_once::check_lane(&rust_types, &flags, pool.is_some(), self.transactional_id)?;
        let mut exactly_once = if transactional {
            let id = format!(
                "{}.{group}.{topic}",
                self.transactional_id.unwrap_or_default()
            );
            let producer = crate::producer::TransactionalProducer::unconnected(
                self.settings,
                self.broker.bootstrap_servers(),
                Arc::clone(self.model),
                self.clients,
                id,
            )?;
            self.transactional_lanes.push(producer.clone());
            Some(ExactlyOnceLane {
                producer,
                bounds,
                group_config: config.clone(),
            })
        } else {
            None
        };
        let buffer = LaneBuffer::new(
            Arc::clone(&topic),
            capacity,
            mode,
            Arc::clone(&shared.room),
            pool.is_some(),
        );
        if let Some(spec) = pool {
            // Visible in the registry from the start.
            buffer.workers.store(spec.initial(), Ordering::Relaxed);
        }
        let lane_dead_letters = lane_types[0].dead_letter_topic.clone();
        let consumed: Vec<String> = lane_types.iter().map(|t| t.discriminator.clone()).collect();
        let (others, unclaimed) =
            not_consumed_here(self.model, &topic, group, &consumed, self.ignored);
        let mut workers: Vec<Box<dyn TypeWorker>> = Vec::new();
        let mut types = Vec::new();
        let mut counters = Vec::new();
        for t in lane_types {
            let labels = crate::telemetry::type_labels(&t.topic, &t.discriminator, group, service);
            let stats = Arc::new(TypeStats::default());
            let type_id = t.registration.type_id;
            self.registry.add_type(
                type_id,
                TypeEntry {
                    rust_type: t.registration.rust_type,
                    topic: t.topic.to_string(),
                    discriminator: t.discriminator.clone(),
                    service: service.to_owned(),
                    stream: t.registration.stream,
                    backpressure: mode,
                    dead_letter_topic: t.dead_letter_topic.clone(),
                    probe: Arc::new(buffer::LaneProbe {
                        buffer: Arc::clone(&buffer),
                        stats: Arc::clone(&stats),
                    }),
                },
            );
            let inbox = t.spec.inbox.clone().map(|spec| {
                let name = spec
                    .consumer_name
                    .clone()
                    .unwrap_or_else(|| format!("{group}/{}", t.discriminator));
                Inbox::new(name, spec)
            });
            if let Some(i) = &inbox {
                self.cleanup_every = Some(
                    self.cleanup_every
                        .map_or(i.cleanup_interval(), |c| c.min(i.cleanup_interval())),
                );
            }
            let (worker, stream) = t.registration.build.build(WorkerArgs {
                model: self.model,
                retry: t.spec.retry(),
                handler_timeout: t.spec.handler_timeout(),
                dead_letter_topic: t.dead_letter_topic,
                stats: Arc::clone(&stats),
                timings: crate::telemetry::TypeTimings::new(&labels),
                outbox: self.outbox,
                inbox,
                exactly_once: exactly_once.take(),
                #[cfg(feature = "testing")]
                fault: self.faults.cell(type_id),
            })?;
            counters.push(crate::telemetry::TypeCounters::new(&labels));
            if let Some(s) = stream {
                self.streams.insert(type_id, s);
            }
            workers.push(worker);
            types.push((t.discriminator, stats));
        }
        let active = ActiveWorker::new(Arc::clone(shared));
        let run: futures::future::BoxFuture<'static, ()> = match pool {
            Some(spec) => Box::pin(pool::run_pool(
                active,
                env.clone(),
                Arc::clone(&buffer),
                workers,
                lane_dead_letters,
                spec,
            )),
            None => Box::pin(worker::run_lane(
                active,
                env.clone(),
                Arc::clone(&buffer),
                workers,
                lane_dead_letters,
            )),
        };
        let names: Vec<&str> = types.iter().map(|(d, _)| d.as_str()).collect();
        self.lane_workers.push(Box::pin(worker::supervised(
            run,
            Arc::clone(shared),
            format!("topic `{topic}` (types {})", names.join(", ")),
        )));
        Ok(Lane {
            buffered: crate::telemetry::buffered(&topic, service),
            topic,
            buffer,
            types,
            others,
            unclaimed,
            counters,
            // librdkafka's mock stores no offsets sent with a transaction:
            // there the poll thread commits them as any lane's.
            transactional: transactional && !self.mock_cluster,
        })
    }

    /// Spawns what was built: the lanes' tasks, the poll threads, the
    /// inbox cleanup. From here on a failure drops the runtime, whose
    /// `Drop` stops whatever was spawned so far.
    fn spawn(self) -> Result<ConsumerRuntime> {
        let mut runtime = ConsumerRuntime {
            services: Vec::new(),
            streams: std::sync::Mutex::new(self.streams),
            tasks: TaskTracker::new(),
            workers: Vec::new(),
            cancel: self.cancel,
            #[cfg(feature = "testing")]
            faults: self.faults,
        };
        for w in self.lane_workers {
            let handle = runtime.tasks.spawn(w);
            runtime.workers.push(handle.abort_handle());
        }
        for (name, shared, poll_plan) in self.poll_plans {
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || poll::run(poll_plan))
                .map_err(|source| Error::Spawn {
                    what: "a poll thread",
                    source,
                })?;
            runtime.services.push(RunningService {
                shared,
                thread: Some(thread),
            });
        }
        if let (Some(every), Some(o)) = (self.cleanup_every, self.outbox) {
            runtime.tasks.spawn(crate::inbox::cleanup(
                o.database().clone(),
                every,
                runtime.cancel.clone(),
            ));
        }
        runtime.tasks.close();
        Ok(runtime)
    }
}

/// Groups a service's types by topic, in declaration order: one lane each.
fn by_topic(types: Vec<PlannedType>) -> Vec<Vec<PlannedType>> {
    let mut lanes: Vec<Vec<PlannedType>> = Vec::new();
    for t in types {
        match lanes.iter_mut().find(|l| l[0].topic == t.topic) {
            Some(lane) => lane.push(t),
            None => lanes.push(vec![t]),
        }
    }
    lanes
}

/// Types sharing a topic share its buffer (so a partition stays in order):
/// the largest `max_buffered` applies, and their backpressure modes must agree.
fn lane_settings(types: &[PlannedType]) -> Result<(usize, Backpressure)> {
    let capacity = types
        .iter()
        .map(|t| t.spec.max_buffered())
        .max()
        .unwrap_or(DEFAULT_MAX_BUFFERED);
    let first = &types[0];
    if let Some(other) = types
        .iter()
        .find(|t| t.spec.backpressure() != first.spec.backpressure())
    {
        return Err(Error::config(format!(
            "`{}` and `{}` share topic `{}` and so its buffer, but declare different backpressure modes ({:?} vs {:?})",
            first.registration.rust_type,
            other.registration.rust_type,
            first.topic,
            first.spec.backpressure(),
            other.spec.backpressure()
        )));
    }
    Ok((capacity, first.spec.backpressure()))
}

/// The worker pool of a lane: types sharing a topic share its records' order
/// and so its pool; they must not declare different ones. A stream has one
/// reader, which takes its messages in order: no pool.
fn lane_workers_spec(types: &[PlannedType]) -> Result<Option<WorkerSpec>> {
    let mut found: Option<(&PlannedType, WorkerSpec)> = None;
    for t in types {
        let Some(spec) = t.spec.workers() else {
            continue;
        };
        if t.registration.stream {
            return Err(Error::config(format!(
                "`{}` is consumed as a stream, which has one reader taking messages in order; `workers` applies to handlers",
                t.registration.rust_type
            )));
        }
        match found {
            Some((first, other)) if other != spec => {
                return Err(Error::config(format!(
                    "`{}` and `{}` share topic `{}` and so its workers, but declare different worker pools ({other:?} vs {spec:?})",
                    first.registration.rust_type, t.registration.rust_type, t.topic
                )));
            }
            _ => found = Some((t, spec)),
        }
    }
    if let Some((_, _)) = found {
        if let Some(s) = types.iter().find(|t| t.registration.stream) {
            return Err(Error::config(format!(
                "`{}` is consumed as a stream on topic `{}`, which has a worker pool; a stream has one reader taking messages in order",
                s.registration.rust_type, s.topic
            )));
        }
    }
    Ok(found.map(|(_, spec)| spec))
}

/// Linux keeps 15 bytes of a thread name; keep the distinctive end.
fn thread_name(service: &str) -> String {
    let name = format!("kx-{service}");
    if name.len() <= 15 {
        name
    } else {
        let tail: String = service
            .chars()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("kx-{tail}")
    }
}

/// A poll service's duration setting in milliseconds: its dedicated
/// settings, else the shared consumer section, else `default`.
/// Records one exactly-once transaction takes at most, by default.
const DEFAULT_TRANSACTION_MAX_RECORDS: usize = 1000;
/// How long one exactly-once transaction takes records, by default.
const DEFAULT_TRANSACTION_INTERVAL_MS: u64 = 100;

fn service_millis(
    planned: &PlannedService,
    settings: &KafkaSettings,
    pick: fn(&ConsumerSettings) -> Option<u64>,
    default: u64,
) -> Duration {
    let ms = planned
        .dedicated
        .as_ref()
        .and_then(pick)
        .or_else(|| pick(&settings.consumer))
        .unwrap_or(default);
    Duration::from_millis(ms)
}

/// The types `consumers` ignores, checked against the model and against
/// what it consumes.
fn ignored_types(model: &Model, consumers: &Consumers) -> Result<Vec<TypeId>> {
    let mut ignored = Vec::new();
    for &(id, rust_type) in &consumers.ignored {
        if model.type_info(id).is_none() {
            return Err(Error::UnknownType {
                type_name: rust_type,
            });
        }
        if consumers.registrations.iter().any(|r| r.type_id == id) {
            return Err(Error::config(format!(
                "`{rust_type}` is both consumed and ignored; drop one of the two"
            )));
        }
        ignored.push(id);
    }
    Ok(ignored)
}

/// The model's types on `topic` that a poll service of `group` does not
/// consume, split in two: those it may skip and commit (ignored by this
/// process, or given another consumer group by the model, whose members
/// read them), and the unclaimed rest, which it dead-letters instead: a
/// member of this group elsewhere may be the one that consumes them, and
/// skipping would commit past its records.
fn not_consumed_here(
    model: &Model,
    topic: &str,
    group: &str,
    consumed: &[String],
    ignored: &[TypeId],
) -> (Vec<String>, Vec<String>) {
    let mut skip = Vec::new();
    let mut unclaimed = Vec::new();
    for (id, info) in model.types_on(topic) {
        if consumed.iter().any(|c| c == info.discriminator) {
            continue;
        }
        let elsewhere = info
            .consumer
            .and_then(ConsumerSpec::declared_group)
            .is_some_and(|g| g != group);
        if elsewhere || ignored.contains(&id) {
            skip.push(info.discriminator.to_owned());
        } else {
            unclaimed.push(info.discriminator.to_owned());
        }
    }
    (skip, unclaimed)
}

/// Every service that runs on the built-in client id and no group of its
/// own joins group `kontext`, which any other such service on the same
/// topics shares: they would split partitions and miss each other's
/// records. Said once at start.
fn warn_on_builtin_group(settings: &KafkaSettings, services: &[PlannedService]) {
    if settings.client_id.is_some() || settings.consumer.group_id.is_some() {
        return;
    }
    let builtin = settings.effective_client_id();
    if services.iter().any(|s| s.group == builtin) {
        tracing::warn!(
            group = builtin,
            "consumers run in the built-in default group `{builtin}` (no client_id or consumer.group_id set): \
             any other service doing the same shares the group and its partitions; set `client_id` (the default group) per service"
        );
    }
}

/// Groups the registrations into poll services: one per dedicated type, and
/// one shared service per consumer group for the rest.
fn plan(
    model: &Model,
    settings: &KafkaSettings,
    consumers: Consumers,
) -> Result<Vec<PlannedService>> {
    let default_group = settings
        .consumer
        .group_id
        .clone()
        .unwrap_or_else(|| settings.effective_client_id().to_owned());
    let mut seen: HashMap<TypeId, &'static str> = HashMap::new();
    let mut services: Vec<PlannedService> = Vec::new();
    for registration in consumers.registrations {
        let id = registration.type_id;
        if seen.insert(id, registration.rust_type).is_some() {
            return Err(Error::config(format!(
                "`{}` has two consumers registered; register one handler or stream per type",
                registration.rust_type
            )));
        }
        let info = model.type_info(id).ok_or(Error::UnknownType {
            type_name: registration.rust_type,
        })?;
        let dead_letter_topic =
            info.dead_letter_topic(settings.consumer.dead_letter_topic.as_deref());
        let spec = info.consumer.cloned().unwrap_or_default();
        let topic: Arc<str> = Arc::from(info.topic);
        let planned = PlannedType {
            registration,
            topic,
            discriminator: info.discriminator.to_owned(),
            spec,
            dead_letter_topic,
        };
        let reset = planned.spec.auto_offset_reset.map(|r| (r, info.rust_type));
        match &planned.spec.dedicated {
            Some(d) => {
                let group = d.settings.group_id.clone().unwrap_or_default();
                services.push(PlannedService {
                    name: format!(
                        "dedicated-{}",
                        crate::model::name::short_type_name(info.rust_type)
                    ),
                    group,
                    // Applied over the shared section: what it leaves unset
                    // is inherited (DEDICATED_CONNECTIONS.md).
                    dedicated: Some(d.settings.clone()),
                    start_immediately: d.start_immediately,
                    offset_reset: reset,
                    types: vec![planned],
                });
            }
            None => {
                let group = planned
                    .spec
                    .group
                    .clone()
                    .unwrap_or_else(|| default_group.clone());
                let name = format!("shared-{group}");
                match services
                    .iter_mut()
                    .find(|s| s.dedicated.is_none() && s.group == group)
                {
                    Some(s) => {
                        if let (Some((a, at)), Some((b, bt))) = (s.offset_reset, reset) {
                            if a != b {
                                return Err(Error::config(format!(
                                    "`{at}` and `{bt}` share the poll service of group `{group}` but declare different auto_offset_reset ({a:?} vs {b:?}); make them agree or give one a dedicated connection"
                                )));
                            }
                        }
                        s.offset_reset = s.offset_reset.or(reset);
                        s.types.push(planned);
                    }
                    None => services.push(PlannedService {
                        name,
                        group,
                        dedicated: None,
                        start_immediately: true,
                        offset_reset: reset,
                        types: vec![planned],
                    }),
                }
            }
        }
    }
    check_groups(&services)?;
    Ok(services)
}

/// Two poll services of one consumer group that read the same topic would
/// split its partitions between them, and each would commit past the
/// records of the types only the other handles: those would be lost.
fn check_groups(services: &[PlannedService]) -> Result<()> {
    let reads = |s: &PlannedService, topic: &str| -> Vec<&'static str> {
        s.types
            .iter()
            .filter(|t| &*t.topic == topic)
            .map(|t| t.registration.rust_type)
            .collect()
    };
    for (i, a) in services.iter().enumerate() {
        for b in services.iter().skip(i + 1).filter(|b| b.group == a.group) {
            for t in &a.types {
                let theirs = reads(b, &t.topic);
                if theirs.is_empty() {
                    continue;
                }
                return Err(Error::config(format!(
                    "poll services `{}` ({:?}) and `{}` ({:?}) are both in consumer group `{}` and both read topic `{}`: \
                     Kafka would split the topic's partitions between them and each would commit past the other's records; \
                     give the dedicated type a group of its own (`d.group(..)`) or consume these types in one poll service",
                    a.name,
                    reads(a, &t.topic),
                    b.name,
                    theirs,
                    a.group,
                    t.topic
                )));
            }
        }
    }
    Ok(())
}

/// The client configuration of a poll service: common settings, the broker's
/// needs, the shared consumer section, the dedicated overrides, then the
/// properties kontext's offset handling depends on.
/// How often librdkafka reports statistics (consumer lag), by default.
const STATISTICS_INTERVAL_MS: &str = "5000";

fn consumer_config(
    settings: &KafkaSettings,
    broker: &Broker,
    mock_cluster: bool,
    group: &str,
    dedicated: Option<&ConsumerSettings>,
    offset_reset: Option<OffsetReset>,
) -> ClientConfig {
    let mut config = settings.client_config(broker.bootstrap_servers());
    // The embedded broker's quick defaults yield to `[kafka.librdkafka]`
    // (raw pass-through wins, as documented), which `client_config` set.
    if mock_cluster {
        for (k, v) in Broker::MOCK_CONSUMER_DEFAULTS {
            if config.get(k).is_none() {
                config.set(*k, *v);
            }
        }
    }
    // Stored offsets go to the broker every second instead of librdkafka's
    // five: a crash redelivers what was handled since the last commit, so
    // this interval is the crash window. Settings may still override it.
    if config.get("auto.commit.interval.ms").is_none() {
        config.set("auto.commit.interval.ms", AUTO_COMMIT_INTERVAL_MS);
    }
    apply_consumer_settings(&mut config, &settings.consumer);
    if let Some(d) = dedicated {
        apply_consumer_settings(&mut config, d);
    }
    if let Some(r) = offset_reset {
        config.set("auto.offset.reset", r.as_property());
    }
    // kontext's default, not librdkafka's (latest): a new group reads what
    // is already there.
    if config.get("auto.offset.reset").is_none() {
        config.set("auto.offset.reset", OffsetReset::default().as_property());
    }
    // Incremental rebalancing: a rebalance revokes only the partitions that
    // move, so the others keep flowing, and the revoke happens while the
    // group is stable, when the handed-over offsets can still be committed
    // (a broker may refuse commits once an eager rebalance began). Not with
    // the KIP-848 protocol, where the broker assigns.
    let broker_assigns = config.get("group.protocol") == Some("consumer");
    if config.get("partition.assignment.strategy").is_none() && !broker_assigns {
        config.set("partition.assignment.strategy", DEFAULT_ASSIGNMENT_STRATEGY);
    }
    // The consumer-lag gauge comes from librdkafka's statistics: every 5 s
    // unless the settings say otherwise (0 turns them, and the gauge, off).
    if config.get("statistics.interval.ms").is_none() {
        config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    }
    config
        .set("group.id", group)
        // Offsets are stored by kontext once messages are finished; librdkafka
        // commits what is stored in the background.
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("enable.partition.eof", "false");
    config
}

/// How long past its timeout a consumer shutdown may take: aborted workers
/// let go of their records and poll threads commit and close.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Of the grace, what the poll thread leaves for closing its consumer once
/// its final commit and leave are over.
const CLOSE_MARGIN: Duration = Duration::from_millis(150);

/// `partition.assignment.strategy` unless the settings name one.
pub(crate) const DEFAULT_ASSIGNMENT_STRATEGY: &str = "cooperative-sticky";

/// How long a lane may hold records without finishing one before its
/// service reports unhealthy.
const DEFAULT_STALL_LIMIT_MS: u64 = 120_000;

/// How long a revocation waits for running handlers of its partitions.
const DEFAULT_REVOKE_TIMEOUT_MS: u64 = 10_000;

/// How often stored offsets are committed (`auto.commit.interval.ms`).
pub(crate) const AUTO_COMMIT_INTERVAL_MS: &str = "1000";

fn apply_consumer_settings(config: &mut ClientConfig, s: &ConsumerSettings) {
    if let Some(r) = s.auto_offset_reset {
        config.set("auto.offset.reset", r.as_property());
    }
    if let Some(i) = s.isolation_level {
        config.set("isolation.level", i.as_property());
    }
    let optional = [
        ("session.timeout.ms", s.session_timeout_ms),
        ("heartbeat.interval.ms", s.heartbeat_interval_ms),
        ("max.poll.interval.ms", s.max_poll_interval_ms),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            config.set(k, v.to_string());
        }
    }
    for (k, v) in s.librdkafka.iter() {
        config.set(k, v);
    }
}
