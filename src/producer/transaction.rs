//! Kafka transactions: several messages produced all or nothing.
//!
//! librdkafka's transaction calls block (up to their timeout), so each runs
//! on tokio's blocking pool. Transactions of one producer run one at a
//! time: a Kafka producer has at most one open transaction.
//!
//! Errors are classified as librdkafka classifies them: a retriable one is
//! retried within the transaction's time; an abortable one aborts the
//! transaction and is returned; a fatal one leaves the client unusable, so
//! the next transaction creates a new client with the same
//! `transactional.id` (which aborts whatever the old one left open). A
//! commit not confirmed in time is in doubt: it may have reached the
//! coordinator, so it is not aborted (an abort would then conflict with
//! it) and the client is replaced. When the client was fenced (another
//! producer with the same id took over) no new one is made, which would
//! fence that one in turn: a fenced producer refuses every later
//! transaction and makes the process not ready, saying so. A fencing past
//! the transaction's own time is the broker's timeout, not another
//! producer, and counts as fatal.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;

use crate::client::ClientTracker;
use crate::config::KafkaSettings;
use crate::error::{Error, Result, TransactionFailure};
use crate::model::{Message, Model};

use super::{Delivery, Produce, Producer};

/// librdkafka's default `transaction.timeout.ms`.
const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// How long past its deadline a blocking transaction call is awaited.
const CALL_GRACE: Duration = Duration::from_secs(5);

/// Pause between tries of a call librdkafka says may be retried.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Produces messages in Kafka transactions: every message of a transaction
/// becomes visible to `read_committed` consumers (kontext's default) at
/// once when it commits, or never. Cheap to clone; clones share one client
/// and take turns.
///
/// Registered with [`KontextBuilder::transactional_producer`](crate::KontextBuilder::transactional_producer).
#[derive(Clone)]
pub struct TransactionalProducer {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    settings: KafkaSettings,
    bootstrap_servers: String,
    model: Arc<Model>,
    clients: ClientTracker,
    timeout: Duration,
    /// The client and what it was left doing. Held for the whole of a
    /// transaction.
    slot: Arc<tokio::sync::Mutex<Slot>>,
    /// Why the producer was fenced, once it was: it stays so.
    fenced: Mutex<Option<String>>,
    /// What the last transaction whose commit was in doubt produced, for
    /// the ledger once its outcome is known ([`TransactionalProducer::settled`]).
    in_doubt: Uncommitted,
}

#[derive(Default)]
struct Slot {
    /// `None` after a fatal error until the next transaction makes one.
    producer: Option<Producer>,
    /// A transaction was begun and neither committed nor aborted: its
    /// caller went away (the future was dropped, or the work panicked).
    /// The next transaction aborts it first.
    open: bool,
    /// A client being made (`init_transactions` runs for up to the
    /// transaction timeout): the next call awaits it rather than making a
    /// second one, whose registration the first would then fence.
    making: Option<tokio::task::JoinHandle<Result<Producer>>>,
}

impl TransactionalProducer {
    /// Creates the client and registers its transactional id with the
    /// cluster (which fences an older producer with the same id and aborts
    /// what it left open).
    pub(crate) async fn start(
        settings: &KafkaSettings,
        bootstrap_servers: &str,
        model: Arc<Model>,
        clients: &ClientTracker,
        transactional_id: String,
    ) -> Result<TransactionalProducer> {
        let producer = Self::unconnected(
            settings,
            bootstrap_servers,
            model,
            clients,
            transactional_id,
        )?;
        let first = producer.new_client().await?;
        producer.inner.slot.lock().await.producer = Some(first);
        Ok(producer)
    }

    /// A producer whose client is made, and its id registered, by its
    /// first transaction.
    pub(crate) fn unconnected(
        settings: &KafkaSettings,
        bootstrap_servers: &str,
        model: Arc<Model>,
        clients: &ClientTracker,
        transactional_id: String,
    ) -> Result<TransactionalProducer> {
        if transactional_id.trim().is_empty() {
            return Err(Error::config(
                "a transactional producer needs a non-empty transactional id",
            ));
        }
        let mut settings = settings.clone();
        settings
            .producer
            .librdkafka
            .set("transactional.id", transactional_id.as_str());
        // A transaction begun right after a commit finds the coordinator
        // still writing that commit's markers, and librdkafka retries its
        // AddOffsetsToTxn (CONCURRENT_TRANSACTIONS) after `retry.backoff.ms`:
        // 100 ms by default, which would cap a busy producer at a few
        // transactions a second. Java's client retries that one after
        // 20 ms; unless set, 10 ms here.
        if settings
            .producer_config(bootstrap_servers)
            .get("retry.backoff.ms")
            .is_none()
        {
            settings.producer.librdkafka.set("retry.backoff.ms", "10");
        }
        // As the client will have it: the shared raw section counts too.
        let timeout = settings
            .producer_config(bootstrap_servers)
            .get("transaction.timeout.ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_TRANSACTION_TIMEOUT, Duration::from_millis);
        let producer = TransactionalProducer {
            inner: Arc::new(Inner {
                id: transactional_id,
                settings,
                bootstrap_servers: bootstrap_servers.to_owned(),
                model,
                clients: clients.clone(),
                timeout,
                slot: Arc::new(tokio::sync::Mutex::new(Slot::default())),
                fenced: Mutex::new(None),
                in_doubt: Uncommitted::default(),
            }),
        };
        Ok(producer)
    }

    /// The outcome of the last transaction whose commit was in doubt, once
    /// known: what it produced counts in the ledger if it committed.
    pub(crate) fn settled(&self, committed: bool) {
        let produced = std::mem::take(
            &mut *self
                .inner
                .in_doubt
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if committed {
            count(produced);
        }
    }

    /// The transactional id this producer registered.
    pub fn transactional_id(&self) -> &str {
        &self.inner.id
    }

    /// Why this producer was fenced, if it was: it then refuses every
    /// transaction, and the process is not ready.
    pub fn fenced(&self) -> Option<String> {
        self.inner
            .fenced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `work` in a transaction: begins it, lets `work` produce through
    /// the [`Transaction`], and commits when `work` returns `Ok`. It aborts
    /// when `work` returns `Err` (that error is returned: a produce that
    /// failed for an abortable transaction error returns its
    /// [`Error::Produce`]), when `work` overruns the transaction's time,
    /// or when the commit fails with an abortable error.
    ///
    /// ```no_run
    /// # use kontext::prelude::*;
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Debited { account: u64, cents: i64 }
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Credited { account: u64, cents: i64 }
    /// # async fn run(kontext: &Kontext) -> kontext::Result<()> {
    /// let tx = kontext.transactional_producer()?;
    /// tx.transaction(async |t| {
    ///     t.produce(&Debited { account: 1, cents: 500 }).await?;
    ///     t.produce(&Credited { account: 2, cents: 500 }).await?;
    ///     Ok::<_, kontext::Error>(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Transactions of one producer run one after another; calling
    /// `transaction` inside `work` on the same producer waits forever. The
    /// whole of one must fit in `transaction.timeout.ms` (librdkafka's
    /// default, 60 s): `work` gets that time less a tenth (at most 5 s) for
    /// the commit, and past it the transaction is aborted. Dropping the
    /// returned future, or a panic in `work`, leaves the transaction open
    /// on the client; the next call aborts it first.
    pub async fn transaction<R, E, F>(&self, work: F) -> std::result::Result<R, E>
    where
        F: AsyncFnOnce(&Transaction) -> std::result::Result<R, E>,
        E: From<Error>,
    {
        let open = self.open().await?;
        let tx = open.transaction();
        let limit = open.work_deadline();
        let worked = tokio::time::timeout_at(limit.into(), work(&tx)).await;
        drop(tx);
        match worked {
            Ok(Ok(value)) => {
                open.commit(None).await?;
                Ok(value)
            }
            Ok(Err(e)) => {
                open.abort().await;
                Err(e)
            }
            Err(_) => {
                let timeout = self.inner.timeout;
                let given = limit.saturating_duration_since(open.begun);
                open.abort().await;
                Err(self
                    .error(
                        "work",
                        TransactionFailure::Aborted,
                        format!(
                            "the work did not finish within the transaction's time ({given:?} of `transaction.timeout.ms` {timeout:?})"
                        ),
                    )
                    .into())
            }
        }
    }

    /// Makes the client if there is none (after a fatal error or a commit
    /// in doubt): registering the id again makes the coordinator complete
    /// or abort what the old client left.
    pub(crate) async fn ensure_client(&self) -> Result<()> {
        let mut slot = self.inner.slot.lock().await;
        let producer = self.ready(&mut slot).await?;
        drop(producer);
        Ok(())
    }

    /// Begins a transaction and holds the producer for it until it is
    /// committed or aborted (the producer's other transactions wait).
    pub(crate) async fn open(&self) -> Result<Open> {
        let mut slot = Arc::clone(&self.inner.slot).lock_owned().await;
        let producer = self.ready(&mut slot).await?;
        let begun = Instant::now();
        let deadline = begun + self.inner.timeout;
        if let Err(e) = self
            .call(&producer, "begin", deadline, |c| c.begin_transaction())
            .await
        {
            // Nothing is open: a client that cannot begin is replaced.
            let failure = self.classify(&e, deadline);
            self.forget(&mut slot, failure, &e);
            counted(failure.outcome());
            retire_unless_kept(&slot, producer);
            return Err(self.error("begin", failure, e.to_string()));
        }
        slot.open = true;
        Ok(Open {
            owner: self.clone(),
            produced: Uncommitted::default(),
            slot,
            producer,
            begun,
            deadline,
        })
    }

    /// The client to run a transaction on: aborts what a caller left open,
    /// makes a new client when there is none (or awaits the one being
    /// made), refuses when fenced.
    async fn ready(&self, slot: &mut Slot) -> Result<Producer> {
        if slot.open {
            if let Some(p) = slot.producer.clone() {
                let deadline = Instant::now() + self.inner.timeout;
                tracing::warn!(transactional_id = %self.inner.id, "aborting a transaction its caller left open");
                self.abort_open(slot, &p, deadline).await;
                retire_unless_kept(slot, p);
            }
            slot.open = false;
        }
        if let Some(p) = &slot.producer {
            return Ok(p.clone());
        }
        if let Some(why) = self.fenced() {
            return Err(self.error("begin", TransactionFailure::Fenced, why));
        }
        let making = slot.making.get_or_insert_with(|| {
            let this = self.clone();
            tokio::spawn(async move { this.new_client().await })
        });
        let made = making.await;
        slot.making = None;
        let producer = made
            .map_err(|e| Error::Internal(format!("making a transactional client failed: {e}")))??;
        slot.producer = Some(producer.clone());
        Ok(producer)
    }

    /// Makes a client and registers the transactional id.
    async fn new_client(&self) -> Result<Producer> {
        let inner = &self.inner;
        let producer = Producer::new(
            &inner.settings,
            &inner.bootstrap_servers,
            Arc::clone(&inner.model),
            &inner.clients,
        )?;
        let deadline = Instant::now() + inner.timeout;
        let registered = self
            .call(&producer, "init", deadline, move |c| {
                c.init_transactions(deadline.saturating_duration_since(Instant::now()))
            })
            .await;
        if let Err(e) = registered {
            let failure = self.classify(&e, deadline);
            if failure == TransactionFailure::Fenced {
                self.fence(&e);
            }
            tokio::task::spawn_blocking(move || drop(producer));
            return Err(self.error("init", failure, e.to_string()));
        }
        tracing::debug!(transactional_id = %inner.id, "transactional producer ready");
        Ok(producer)
    }

    /// Commits the open transaction. A retriable error is retried while
    /// time is left; past it the outcome is unknown (the commit may have
    /// reached the coordinator), so nothing is aborted: the client is
    /// replaced and the caller told. An abortable error aborts.
    async fn commit(&self, slot: &mut Slot, producer: &Producer, deadline: Instant) -> Result<()> {
        // rust-rdkafka flushes and then commits, each with this timeout:
        // half the time left for each keeps both within the deadline.
        let committed = self
            .call(producer, "commit", deadline, move |c| {
                c.commit_transaction(deadline.saturating_duration_since(Instant::now()) / 2)
            })
            .await;
        match committed {
            Ok(()) => {
                slot.open = false;
                counted("committed");
                Ok(())
            }
            Err(e) => Err(self.failed(slot, producer, deadline, "commit", e).await),
        }
    }

    /// A call within the open transaction failed: aborts it when that is
    /// what librdkafka asks; otherwise the client is replaced (or refused
    /// for good when fenced), and a commit past its time is in doubt.
    async fn failed(
        &self,
        slot: &mut Slot,
        producer: &Producer,
        deadline: Instant,
        operation: &'static str,
        e: KafkaError,
    ) -> Error {
        let requires_abort = match &e {
            KafkaError::Transaction(t) => t.txn_requires_abort(),
            // Messages not delivered before the commit: it was not sent.
            KafkaError::Flush(_) => true,
            _ => false,
        };
        let failure = if requires_abort {
            self.abort_open(slot, producer, deadline).await;
            TransactionFailure::Aborted
        } else {
            let failure = match self.classify(&e, deadline) {
                // Retriable past the deadline, or not a transaction error:
                // a commit may have reached the coordinator.
                TransactionFailure::Aborted if operation == "commit" => TransactionFailure::InDoubt,
                TransactionFailure::Aborted => {
                    self.abort_open(slot, producer, deadline).await;
                    return self.error(operation, TransactionFailure::Aborted, e.to_string());
                }
                other => other,
            };
            slot.open = false;
            self.forget(slot, failure, &e);
            counted(failure.outcome());
            failure
        };
        tracing::warn!(transactional_id = %self.inner.id, operation, error = %e, outcome = failure.as_str(), "Kafka transaction not committed");
        self.error(operation, failure, e.to_string())
    }

    /// Aborts the open transaction, counting the outcome; a client that
    /// cannot abort is replaced (fenced: refused for good).
    async fn abort_open(&self, slot: &mut Slot, producer: &Producer, deadline: Instant) {
        // At least a few seconds: an abort past the transaction's own time
        // is still worth making (it frees the partitions at once).
        let until = deadline.max(Instant::now() + Duration::from_secs(5));
        let aborted = self
            .call(producer, "abort", until, move |c| {
                c.abort_transaction(until.saturating_duration_since(Instant::now()))
            })
            .await;
        slot.open = false;
        match aborted {
            Ok(()) => counted("aborted"),
            Err(e) => {
                let failure = match self.classify(&e, deadline) {
                    TransactionFailure::Aborted | TransactionFailure::InDoubt => {
                        TransactionFailure::Fatal
                    }
                    other => other,
                };
                tracing::warn!(transactional_id = %self.inner.id, error = %e, outcome = failure.as_str(), "could not abort a transaction; its client is replaced");
                self.forget(slot, failure, &e);
                counted(failure.outcome());
            }
        }
    }

    /// Runs a blocking transaction call on tokio's blocking pool, trying it
    /// again while librdkafka says it may be retried and time is left.
    async fn call(
        &self,
        producer: &Producer,
        operation: &'static str,
        deadline: Instant,
        f: impl Fn(
            &rdkafka::producer::FutureProducer<crate::client::TracingContext>,
        ) -> rdkafka::error::KafkaResult<()>
        + Send
        + Sync
        + Clone
        + 'static,
    ) -> std::result::Result<(), KafkaError> {
        loop {
            let client = producer.client().clone();
            let call = f.clone();
            // Bounded here too: a call may block past its own timeout
            // (`send_offsets_to_transaction`, librdkafka #5456). Past it the
            // call is left to finish on its thread and counts as failed.
            let blocking = tokio::task::spawn_blocking(move || call(&client));
            let result = match tokio::time::timeout_at((deadline + CALL_GRACE).into(), blocking)
                .await
            {
                Ok(joined) => joined.unwrap_or(Err(KafkaError::Canceled)),
                Err(_) => {
                    tracing::warn!(transactional_id = %self.inner.id, operation, "a transaction call overran its time; its client is given up");
                    Err(KafkaError::Canceled)
                }
            };
            match result {
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tracing::debug!(transactional_id = %self.inner.id, operation, error = %e, "retrying a transaction call");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// Forgets a client a failure left unusable (fenced: for good).
    fn forget(&self, slot: &mut Slot, failure: TransactionFailure, e: &KafkaError) {
        match failure {
            TransactionFailure::Fenced => {
                self.fence(e);
                slot.producer = None;
            }
            TransactionFailure::Fatal | TransactionFailure::InDoubt => slot.producer = None,
            TransactionFailure::Aborted => {}
        }
    }

    /// What a failed call means, by librdkafka's flags. A fencing after
    /// the transaction's time is the broker's own timeout (it bumps the
    /// epoch when it aborts), not another producer: a new client serves.
    fn classify(&self, e: &KafkaError, deadline: Instant) -> TransactionFailure {
        match classify(e) {
            TransactionFailure::Fenced if Instant::now() >= deadline => TransactionFailure::Fatal,
            other => other,
        }
    }

    fn fence(&self, e: &KafkaError) {
        let mut fenced = self
            .inner
            .fenced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if fenced.is_none() {
            tracing::error!(transactional_id = %self.inner.id, error = %e, "transactional producer fenced: another producer registered the same transactional id; this one refuses every transaction from now on");
            *fenced = Some(format!(
                "another producer registered transactional id `{}` ({e})",
                self.inner.id
            ));
        }
    }

    fn error(&self, operation: &'static str, failure: TransactionFailure, cause: String) -> Error {
        Error::KafkaTransaction {
            transactional_id: self.inner.id.clone(),
            operation,
            failure,
            cause,
        }
    }
}

/// Drops `producer` on the blocking pool when the slot no longer keeps it:
/// the last clone of a client destroys it, which waits for librdkafka (up
/// to half a second), not on an async worker.
fn retire_unless_kept(slot: &Slot, producer: Producer) {
    if slot.producer.is_none() {
        tokio::task::spawn_blocking(move || drop(producer));
    }
}

/// A transaction begun by [`TransactionalProducer::open`]. It holds the
/// producer until [`Open::commit`] or [`Open::abort`]; dropped without
/// either, it stays open on the client and the producer's next
/// transaction aborts it first.
pub(crate) struct Open {
    owner: TransactionalProducer,
    /// What its `Transaction`s produced, per type: counted in the ledger
    /// (`telemetry::ledger`) once the transaction commits.
    produced: Uncommitted,
    slot: tokio::sync::OwnedMutexGuard<Slot>,
    producer: Producer,
    begun: Instant,
    deadline: Instant,
}

impl Open {
    /// What produces in this transaction.
    pub(crate) fn transaction(&self) -> Transaction {
        Transaction {
            producer: self.producer.clone(),
            produced: Arc::clone(&self.produced),
        }
    }

    /// When this transaction began.
    pub(crate) fn begun(&self) -> Instant {
        self.begun
    }

    /// Until when work may be added: the transaction's time less a tenth
    /// (at most 5 s), left for the commit.
    pub(crate) fn work_deadline(&self) -> Instant {
        let timeout = self.deadline - self.begun;
        self.deadline - (timeout / 10).min(Duration::from_secs(5))
    }

    /// Commits what was produced; with `offsets`, the consumed records'
    /// next offsets commit in the same transaction, in the group whose
    /// metadata is given (KIP-447: a member no longer in that generation
    /// cannot commit them, so its output is aborted).
    pub(crate) async fn commit(
        mut self,
        offsets: Option<(TopicPartitionList, Arc<ConsumerGroupMetadata>)>,
    ) -> Result<()> {
        let owner = self.owner.clone();
        let deadline = self.deadline;
        let producer = self.producer.clone();
        if let Some((offsets, group)) = offsets {
            let offsets = Arc::new(offsets);
            let sent = owner
                .call(&producer, "send_offsets", deadline, move |c| {
                    c.send_offsets_to_transaction(
                        &offsets,
                        &group,
                        deadline.saturating_duration_since(Instant::now()),
                    )
                })
                .await;
            if let Err(e) = sent {
                return Err(owner
                    .failed(&mut self.slot, &producer, deadline, "send_offsets", e)
                    .await);
            }
        }
        // rust-rdkafka's commit first flushes by polling the client in
        // 100 ms steps, while the client's own thread serves the delivery
        // reports: it would wait 100 ms whenever a message was in flight.
        // Waiting here in 1 ms steps leaves it nothing to flush.
        while producer.client().in_flight_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let committed = owner.commit(&mut self.slot, &producer, deadline).await;
        let produced =
            std::mem::take(&mut *self.produced.lock().unwrap_or_else(PoisonError::into_inner));
        match &committed {
            Ok(()) => count(produced),
            // Counted if the commit turns out to have happened.
            Err(Error::KafkaTransaction {
                failure: TransactionFailure::InDoubt,
                ..
            }) => {
                *owner
                    .inner
                    .in_doubt
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = produced;
            }
            Err(_) => {}
        }
        committed
    }

    /// Aborts: nothing produced in it becomes visible.
    pub(crate) async fn abort(mut self) {
        let owner = self.owner.clone();
        let producer = self.producer.clone();
        owner
            .abort_open(&mut self.slot, &producer, self.deadline)
            .await;
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            retire_unless_kept(&self.slot, self.producer.clone());
        }
    }
}

impl std::fmt::Debug for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Open")
            .field("transactional_id", &self.owner.inner.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TransactionalProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalProducer")
            .field("transactional_id", &self.inner.id)
            .field("fenced", &self.fenced())
            .finish()
    }
}

/// An open transaction: what is produced through it commits or aborts with
/// it. Clones produce into the same transaction; keep none past it.
#[derive(Clone)]
pub struct Transaction {
    producer: Producer,
    produced: Uncommitted,
}

/// Counts a committed transaction's records in the ledger.
fn count(produced: Vec<(Arc<crate::telemetry::ledger::Tally>, u64)>) {
    for (tally, n) in produced {
        tally.produced(n);
    }
}

/// Records produced in an open transaction, per type's tally.
type Uncommitted = Arc<Mutex<Vec<(Arc<crate::telemetry::ledger::Tally>, u64)>>>;

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction").finish_non_exhaustive()
    }
}

impl Transaction {
    /// Sends `message` in this transaction: returns once librdkafka has it
    /// (waiting only for room in its queue), not for the broker; the
    /// commit waits for every message sent and fails, aborting the
    /// transaction, if one could not be delivered. The fast way to produce
    /// in a transaction. Refine it as [`Producer::produce`]'s request:
    /// `.key(..)`, `.header(..)`, `.correlation_id(..)`.
    pub fn send<'a, T: Message>(&'a self, message: &'a T) -> Sending<'a, T> {
        self.count::<T>(1);
        Sending(self.producer.produce(message))
    }

    /// Produces `message` in this transaction and waits until the broker
    /// has it, for its [`Delivery`] (partition and offset); it becomes
    /// visible to `read_committed` consumers only when the transaction
    /// commits. Each call waits a round trip (and the producer's
    /// `linger_ms`): prefer [`Transaction::send`] unless the delivery is
    /// needed.
    pub fn produce<'a, T: Message>(&'a self, message: &'a T) -> Produce<'a, T> {
        self.count::<T>(1);
        self.producer.produce(message)
    }

    /// Produces `messages` in this transaction, as
    /// [`Producer::produce_batch`].
    pub async fn produce_batch<'a, T, I>(&self, messages: I) -> Result<Vec<Delivery>>
    where
        T: Message + 'a,
        I: IntoIterator<Item = &'a T>,
    {
        let messages: Vec<&T> = messages.into_iter().collect();
        self.count::<T>(messages.len() as u64);
        self.producer.produce_batch(messages).await
    }

    /// Notes `n` records of `T` for the ledger, counted if the transaction
    /// commits (a record that fails to send fails the commit).
    fn count<T: 'static>(&self, n: u64) {
        if let Some(tally) = self.producer.tally_of::<T>() {
            self.produced
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((tally, n));
        }
    }
}

/// A message being sent in a transaction ([`Transaction::send`]); `.await`
/// it to hand it over.
#[must_use = "a send does nothing until it is awaited"]
pub struct Sending<'a, T>(Produce<'a, T>);

impl<T: Message> std::fmt::Debug for Sending<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sending").finish_non_exhaustive()
    }
}

impl<'a, T: Message> Sending<'a, T> {
    /// Uses this key instead of the one the model derives.
    pub fn key(self, key: impl crate::model::MessageKey) -> Self {
        Sending(self.0.key(key))
    }

    /// Sets the correlation id (`ce_correlationid` header).
    pub fn correlation_id(self, id: impl Into<String>) -> Self {
        Sending(self.0.correlation_id(id))
    }

    /// Adds a header to this message only.
    pub fn header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        Sending(self.0.header(name, value))
    }
}

impl<'a, T: Message> std::future::IntoFuture for Sending<'a, T> {
    type Output = Result<()>;
    type IntoFuture = futures::future::BoxFuture<'a, Result<()>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.0.queue())
    }
}

/// What a failed transaction call means, by librdkafka's flags.
fn classify(e: &KafkaError) -> TransactionFailure {
    match e {
        KafkaError::Transaction(e) => {
            let fenced = matches!(
                e.code(),
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            );
            if fenced {
                TransactionFailure::Fenced
            } else if e.is_fatal() {
                TransactionFailure::Fatal
            } else {
                // Abortable, or retriable past the transaction's time, or
                // neither: aborting is what leaves the client usable.
                TransactionFailure::Aborted
            }
        }
        // Not a transaction error (a produce, a canceled call): abort.
        _ => TransactionFailure::Aborted,
    }
}

fn counted(outcome: &'static str) {
    metrics::counter!(crate::telemetry::TRANSACTIONS, "outcome" => outcome).increment(1);
}
