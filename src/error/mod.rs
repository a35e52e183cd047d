//! The one public error type of kontext.
//!
//! Variants are named after the operation that failed and carry the topic or
//! type involved, so a log line says what broke without a debugger.

mod model;

pub use model::{ModelError, ModelIssue};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::codec::CodecError;

/// `Result` with kontext's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kontext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model failed validation in [`ModelBuilder::build`](crate::ModelBuilder::build).
    #[error(transparent)]
    Model(#[from] ModelError),

    /// Settings could not be loaded or are inconsistent.
    #[error("invalid kontext settings: {message}")]
    Config {
        /// What is wrong, naming the offending key.
        message: String,
        /// The loader's error, when loading from a file or the environment failed.
        #[source]
        source: Option<Box<figment::Error>>,
    },

    /// A message type was used that the model does not declare.
    #[error(
        "type `{type_name}` is not registered in the model; declare it with `ModelBuilder::topic::<{type_name}>()`"
    )]
    UnknownType {
        /// `std::any::type_name` of the type.
        type_name: &'static str,
    },

    /// A type was looked up in the registry that no handler or stream consumes.
    #[error(
        "type `{type_name}` is not consumed by this process; register a handler or stream for it in `KontextBuilder::consumers`"
    )]
    NotConsumed {
        /// `std::any::type_name` of the type.
        type_name: &'static str,
    },

    /// A role (producer, consumers) was used that was not registered when kontext started.
    #[error("the {role} role is not registered; call `KontextBuilder::{role}()` before `start()`")]
    RoleNotRegistered {
        /// `producer` or `consumers`.
        role: &'static str,
    },

    /// The codec could not encode a message.
    #[error("failed to encode `{type_name}` for topic `{topic}`: {source}")]
    Encode {
        /// Topic the message was meant for.
        topic: String,
        /// Type of the message.
        type_name: &'static str,
        /// The codec's error.
        #[source]
        source: CodecError,
    },

    /// The codec could not decode a record.
    #[error("failed to decode `{type_name}` from {topic}[{partition}]@{offset}: {source}")]
    Decode {
        /// Topic of the record.
        topic: String,
        /// Partition of the record.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// Type the record was decoded as.
        type_name: &'static str,
        /// The codec's error.
        #[source]
        source: CodecError,
    },

    /// The broker did not acknowledge a message.
    #[error("failed to produce to topic `{topic}`: {source}")]
    Produce {
        /// Topic the message was meant for.
        topic: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },

    /// Flushing the producer's queue failed or timed out.
    #[error("failed to flush the producer: {source}")]
    Flush {
        /// The client's error.
        #[source]
        source: KafkaError,
    },

    /// A per-call header used a name kontext reserves for its standard
    /// headers (in any case), or an empty name.
    #[error("header `{header}` on a message for topic `{topic}` is empty or reserved by kontext")]
    ReservedHeader {
        /// Topic of the message.
        topic: String,
        /// The header name.
        header: String,
    },

    /// A Kafka client could not be created from the settings.
    #[error("failed to create the Kafka {role} client: {source}")]
    Client {
        /// `producer`, `consumer` or `admin`.
        role: &'static str,
        /// The client's error (often a rejected configuration property).
        #[source]
        source: KafkaError,
    },

    /// A topic could not be created or inspected during provisioning.
    #[error("failed to provision topic `{topic}`: {reason}")]
    Provision {
        /// The topic.
        topic: String,
        /// What the broker answered.
        reason: String,
        /// The client's error, if there was one (boxed to keep `Error` small).
        #[source]
        source: Option<Box<KafkaError>>,
    },

    /// A database operation of the outbox, inbox or unit of work failed.
    #[error("database: {operation} failed: {source}")]
    Database {
        /// What was attempted.
        operation: &'static str,
        /// sea-orm's error.
        #[source]
        source: sea_orm::DbErr,
    },

    /// A unit of work's transaction was aborted by PostgreSQL before kontext
    /// could commit it: a statement failed inside the handler and the handler
    /// went on (for example it ignored a duplicate-key error). PostgreSQL
    /// would answer the `COMMIT` with a rollback and no error, so kontext
    /// checks first and treats the message as failed.
    #[error(
        "the unit of work's transaction was aborted by a statement that failed inside the handler \
         (the handler went on after its error); nothing was committed (PostgreSQL: {source})"
    )]
    TransactionAborted {
        /// PostgreSQL's answer to kontext's check.
        #[source]
        source: sea_orm::DbErr,
    },

    /// A thread kontext needs could not be started (the system refused it).
    #[error("could not start {what}: {source}")]
    Spawn {
        /// What the thread was for.
        what: &'static str,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },

    /// The development broker could not listen on its address (in use,
    /// or not a local address).
    #[error("dev broker: could not listen on {address}: {source}")]
    Listen {
        /// The address asked for.
        address: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },

    /// The embedded (in-process mock) broker could not be started or used.
    #[error("embedded broker: {operation} failed: {source}")]
    EmbeddedBroker {
        /// What was attempted.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: KafkaError,
    },

    /// `Outbox::reshard` could not change the outbox's shard count.
    #[error("could not reshard the outbox: {0}")]
    Reshard(String),

    /// `Kontext::shutdown` ran out of time before everything it stops had
    /// stopped; `what` says what was cut short and what that means.
    #[error("shutdown incomplete: {what}")]
    ShutdownIncomplete {
        /// What was cut short, and its consequences.
        what: String,
    },

    /// A Kafka transaction was not committed; `failure` says what that
    /// leaves: nothing of an aborted one is visible to `read_committed`
    /// consumers.
    #[error("Kafka transaction of `{transactional_id}`: {operation} failed, {failure}: {cause}")]
    KafkaTransaction {
        /// The producer's transactional id.
        transactional_id: String,
        /// The call that failed: `init`, `begin`, `work` (it overran the
        /// transaction's time) or `commit`.
        operation: &'static str,
        /// What the failure means for this transaction and the producer.
        failure: TransactionFailure,
        /// librdkafka's error.
        cause: String,
    },

    /// A dead-letter replay stopped before reading its topic to the end;
    /// `replayed` records had been sent back (and delivered) by then. The
    /// dead letters stay where they are: replaying again sends those
    /// `replayed` records a second time.
    #[error(
        "replaying the dead letters of `{topic}` stopped after {replayed} records were sent back: {cause}"
    )]
    Replay {
        /// The dead-letter topic.
        topic: String,
        /// Records sent back and delivered before it stopped.
        replayed: u64,
        /// Why it stopped.
        cause: String,
    },

    /// A wait of kontext's test helpers (`testing`) ended at its deadline
    /// before what it waited for was done; `pending` says what was not.
    #[error("{what} not done within {timeout:?}: {pending}")]
    Pending {
        /// What was waited for.
        what: &'static str,
        /// How long.
        timeout: std::time::Duration,
        /// What was still pending at the deadline.
        pending: String,
    },

    /// Something kontext relies on internally did not hold (a bug in
    /// kontext), or a helper task it ran panicked.
    #[error("kontext internal error: {0}")]
    Internal(String),
}

/// What a failed Kafka transaction call means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransactionFailure {
    /// The transaction was aborted: none of its messages will be visible;
    /// the producer goes on (run the transaction again).
    Aborted,
    /// Another producer registered the same transactional id: this one is
    /// a zombie and refuses every transaction from now on.
    Fenced,
    /// The client hit a fatal error; the transaction was not committed and
    /// the next one runs on a new client with the same transactional id.
    Fatal,
    /// The commit was sent but not confirmed in time: its messages may or
    /// may not be visible. Nothing was aborted; the next transaction runs
    /// on a new client. Running the work again may duplicate it.
    InDoubt,
}

impl TransactionFailure {
    /// A short name: `aborted`, `fenced`, `fatal`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionFailure::Aborted => "aborted",
            TransactionFailure::Fenced => "fenced",
            TransactionFailure::Fatal => "fatal",
            TransactionFailure::InDoubt => "in_doubt",
        }
    }

    /// The `outcome` label of `kontext_transactions_total`.
    pub(crate) fn outcome(self) -> &'static str {
        match self {
            TransactionFailure::Aborted => "aborted",
            TransactionFailure::Fenced => "fenced",
            TransactionFailure::Fatal => "failed",
            TransactionFailure::InDoubt => "in_doubt",
        }
    }
}

impl std::fmt::Display for TransactionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransactionFailure::Aborted => "the transaction was aborted (none of its messages is visible)",
            TransactionFailure::Fenced => {
                "this producer was fenced: another one registered the same transactional id, and this one refuses every transaction from now on"
            }
            TransactionFailure::Fatal => {
                "the client failed fatally and the transaction was not committed (the next one runs on a new client)"
            }
            TransactionFailure::InDoubt => {
                "the commit was not confirmed in time: its messages may or may not be visible (the next transaction runs on a new client)"
            }
        })
    }
}

impl Error {
    /// Whether trying the same operation again later may succeed: broker
    /// unavailability, timeouts and full queues are retriable; a bad model, bad
    /// settings or a message the codec rejects are not.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Produce { source, .. } | Error::Flush { source } => {
                kafka_error_is_retriable(source)
            }
            Error::Provision {
                source: Some(source),
                ..
            } => kafka_error_is_retriable(source),
            // Run again, an aborted transaction may commit. An in-doubt
            // commit run again may duplicate; a fenced producer never
            // commits; a client refused at init stays refused.
            Error::KafkaTransaction {
                failure, operation, ..
            } => match failure {
                TransactionFailure::Aborted => true,
                TransactionFailure::Fatal => *operation != "init",
                TransactionFailure::Fenced | TransactionFailure::InDoubt => false,
            },
            // Connection trouble and lock conflicts pass; constraint and
            // syntax errors do not.
            Error::Database { source, .. } => {
                matches!(
                    source,
                    sea_orm::DbErr::Conn(_)
                        | sea_orm::DbErr::ConnectionAcquire(_)
                        | sea_orm::DbErr::Exec(_)
                ) && source.sql_err().is_none()
            }
            _ => false,
        }
    }

    /// The topic the failed operation concerned, if any.
    pub fn topic(&self) -> Option<&str> {
        match self {
            Error::Encode { topic, .. }
            | Error::Decode { topic, .. }
            | Error::Produce { topic, .. }
            | Error::ReservedHeader { topic, .. }
            | Error::Provision { topic, .. } => Some(topic),
            Error::Model(e) => e.topic(),
            _ => None,
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
            source: None,
        }
    }
}

/// Classifies librdkafka error codes: transient conditions a later attempt can
/// get past, as opposed to errors that will fail the same way every time.
pub(crate) fn kafka_error_is_retriable(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            C::QueueFull
                | C::MessageTimedOut
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::NetworkException
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
                | C::UnknownTopicOrPartition
                | C::BrokerNotAvailable
                | C::ReplicaNotAvailable
                | C::ThrottlingQuotaExceeded
                | C::Resolve
        ),
        // Canceled deliveries (client dropped) and the like: another client may succeed.
        None => matches!(err, KafkaError::Canceled),
    }
}

/// Names the database operation a sea-orm result belongs to:
/// `statement.await.db("delete sent outbox rows")?`.
pub(crate) trait DbContext<T> {
    fn db(self, operation: &'static str) -> Result<T>;
}

impl<T> DbContext<T> for std::result::Result<T, sea_orm::DbErr> {
    fn db(self, operation: &'static str) -> Result<T> {
        self.map_err(|source| Error::Database { operation, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_outage_is_retriable_and_bad_input_is_not() {
        let outage = Error::Produce {
            topic: "orders".into(),
            source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        assert!(outage.is_retriable());
        assert_eq!(outage.topic(), Some("orders"));

        let too_large = Error::Produce {
            topic: "orders".into(),
            source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
        };
        assert!(!too_large.is_retriable());

        let unknown = Error::UnknownType { type_name: "x::Y" };
        assert!(!unknown.is_retriable());
        assert!(unknown.to_string().contains("x::Y"));
    }

    #[test]
    fn messages_name_their_cause() {
        // `eprintln!("{e}")` is how most errors get read: the cause must be
        // in the message, not only in `source()`.
        let outage = Error::Produce {
            topic: "orders".into(),
            source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        let text = outage.to_string();
        assert!(
            text.contains("orders") && text.contains("timed out"),
            "{text}"
        );
        let spawn = Error::Spawn {
            what: "a poll thread",
            source: std::io::Error::other("no more threads"),
        };
        assert_eq!(
            spawn.to_string(),
            "could not start a poll thread: no more threads"
        );
    }
}
