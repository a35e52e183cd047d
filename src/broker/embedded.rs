//! The embedded broker: librdkafka's in-process mock cluster.
//!
//! It speaks the real Kafka protocol (consumer groups, offset commits,
//! idempotent producers) on loopback ports, starts in about a millisecond and
//! dies with the process. Limits worth knowing: it keeps at most 5 MiB per
//! partition and drops older records silently, it does not implement the
//! CreateTopics admin request (topics are created through the mock API
//! instead), and its transactions are accepted but not enforced.

// The mock's group-rebalance delay is reachable only through librdkafka's C
// API; this module is the one place kontext calls it.
#![allow(unsafe_code)]

use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{Error, Result};

/// A running mock cluster. Clients connect through [`bootstrap_servers`](Self::bootstrap_servers).
pub struct EmbeddedBroker {
    // The mock cluster lives inside this client's handle and is destroyed with it.
    owner: BaseProducer,
    bootstrap_servers: String,
    brokers: i32,
    /// Started because the settings named no broker (not asked for).
    implicit: bool,
    /// Started so with `embedded_broker = true`: meant, even beside
    /// PostgreSQL.
    meant: bool,
}

impl EmbeddedBroker {
    /// Starts a mock cluster with `brokers` brokers.
    pub fn start(brokers: i32) -> Result<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("client.id", "kontext-embedded-broker")
            // The owning client never sends anything; keep it quiet.
            .set("log_level", "3")
            .create()
            .map_err(|source| Error::EmbeddedBroker {
                operation: "start",
                source,
            })?;
        let cluster = owner.client().mock_cluster().ok_or(Error::EmbeddedBroker {
            operation: "start",
            source: rdkafka::error::KafkaError::MockCluster(RDKafkaErrorCode::Fail),
        })?;
        let bootstrap_servers = cluster.bootstrap_servers();
        drop(cluster);

        // A new group waits 3 s by default before its first rebalance
        // (Kafka's group.initial.rebalance.delay.ms); tests and demos would
        // spend most of their time there.
        let handle = owner.client().native_ptr();
        // SAFETY: `handle` is the live handle of `owner`, which owns the mock
        // cluster; the cluster pointer is checked for null and used only while
        // `owner` is alive (this function borrows it).
        unsafe {
            let mock = rdkafka::bindings::rd_kafka_handle_mock_cluster(handle);
            if !mock.is_null() {
                rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(mock, 0);
            }
        }
        tracing::debug!(%bootstrap_servers, brokers, "embedded broker started");
        Ok(EmbeddedBroker {
            owner,
            bootstrap_servers,
            brokers,
            implicit: false,
            meant: false,
        })
    }

    /// Marks it started because the settings named no broker; `meant`:
    /// they said `embedded_broker = true`.
    pub(crate) fn implicit(mut self, meant: bool) -> Self {
        self.implicit = true;
        self.meant = meant;
        self
    }

    /// Whether an implicit broker was meant (`embedded_broker = true`).
    pub(crate) fn is_meant(&self) -> bool {
        self.meant
    }

    /// Whether it was started because the settings named no broker, rather
    /// than asked for (`Broker::embedded()`).
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// `bootstrap.servers` for clients of this cluster.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Number of brokers in the cluster.
    pub fn brokers(&self) -> i32 {
        self.brokers
    }

    /// Creates a topic. Returns `Ok(false)` if it already existed.
    /// The replication factor is capped at the number of brokers.
    pub fn create_topic(&self, name: &str, partitions: i32, replication: i32) -> Result<bool> {
        let cluster = self.cluster("create topic")?;
        match cluster.create_topic(name, partitions, replication.clamp(1, self.brokers)) {
            Ok(()) => Ok(true),
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAlreadyExists) => {
                Ok(false)
            }
            Err(source) => Err(Error::Provision {
                topic: name.to_owned(),
                reason: "the embedded broker refused to create it".into(),
                source: Some(Box::new(source)),
            }),
        }
    }

    /// Answers the next `count` group heartbeats (of any member) with
    /// `UNKNOWN_MEMBER_ID`, as a coordinator does for a member it dropped
    /// (its session expired, or it exceeded `max.poll.interval.ms`): to
    /// test how a service behaves when its group goes on without it.
    pub fn drop_group_members(&self, count: usize) -> Result<()> {
        let cluster = self.cluster("fail heartbeats")?;
        let errors =
            vec![rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID; count];
        cluster.request_errors(rdkafka::types::RDKafkaApiKey::Heartbeat, &errors);
        Ok(())
    }

    /// Takes one broker down (connections refused) or brings it back, to
    /// test how a service behaves during an outage.
    pub fn set_broker_up(&self, broker_id: i32, up: bool) -> Result<()> {
        let cluster = self.cluster("set broker state")?;
        let result = if up {
            cluster.broker_up(broker_id)
        } else {
            cluster.broker_down(broker_id)
        };
        result.map_err(|source| Error::EmbeddedBroker {
            operation: "set broker state",
            source,
        })
    }

    /// Answers the next requests of kind `api` (of any client) with
    /// `errors`, one each, in order: to test how a service handles a
    /// broker's refusals (an abortable or fatal transaction error, a
    /// coordinator that moved, an authorization failure).
    pub fn fail_requests(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: &[rdkafka::types::RDKafkaRespErr],
    ) -> Result<()> {
        let cluster = self.cluster("fail requests")?;
        cluster.request_errors(api, errors);
        Ok(())
    }

    /// Delays every response of broker `broker_id` by `delay` (zero takes
    /// the delay away). The broker still acts on each request at once: a
    /// produce request is written to the log and only its answer is late,
    /// so a client whose timeout is shorter sees a failure for a record the
    /// topic holds, the case behind an outbox's duplicate window.
    pub fn set_round_trip_time(&self, broker_id: i32, delay: Duration) -> Result<()> {
        let cluster = self.cluster("set round-trip time")?;
        cluster
            .broker_round_trip_time(broker_id, delay)
            .map_err(|source| Error::EmbeddedBroker {
                operation: "set round-trip time",
                source,
            })
    }
}

impl EmbeddedBroker {
    /// Makes the cluster's metadata name `host:port` as broker
    /// `broker_id`'s address, so clients reach it through a forwarder
    /// listening there (the mock itself binds an ephemeral port).
    pub(crate) fn advertise(&self, broker_id: i32, host: &str, port: u16) -> Result<()> {
        let host = std::ffi::CString::new(host).map_err(|_| Error::EmbeddedBroker {
            operation: "advertise an address",
            source: rdkafka::error::KafkaError::MockCluster(RDKafkaErrorCode::InvalidArgument),
        })?;
        let handle = self.owner.client().native_ptr();
        // SAFETY: as in `start`: `handle` belongs to `owner`, alive for this
        // call; the cluster pointer is checked for null; librdkafka copies
        // the host string under the cluster's lock before returning.
        unsafe {
            let mock = rdkafka::bindings::rd_kafka_handle_mock_cluster(handle);
            if mock.is_null() {
                return Err(Error::EmbeddedBroker {
                    operation: "advertise an address",
                    source: rdkafka::error::KafkaError::MockCluster(RDKafkaErrorCode::Fail),
                });
            }
            rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
                mock,
                broker_id,
                host.as_ptr(),
                i32::from(port),
            );
        }
        Ok(())
    }

    /// Delays the answer to each of broker `broker_id`'s next `count`
    /// requests of kind `api` by `delay`; the broker acts on each at once
    /// (a produce request is written to the log, only its answer is late).
    /// Other requests are answered as usual: a consumer still reads what a
    /// delayed produce request wrote.
    pub fn delay_requests(
        &self,
        broker_id: i32,
        api: rdkafka::types::RDKafkaApiKey,
        count: usize,
        delay: Duration,
    ) -> Result<()> {
        let failed = |code| Error::EmbeddedBroker {
            operation: "delay requests",
            source: rdkafka::error::KafkaError::MockCluster(code),
        };
        let rtt_ms = std::ffi::c_int::try_from(delay.as_millis())
            .map_err(|_| failed(RDKafkaErrorCode::InvalidArgument))?;
        let handle = self.owner.client().native_ptr();
        for _ in 0..count {
            // SAFETY: as in `start`: `handle` belongs to `owner`, alive for
            // this call; the cluster pointer is checked for null. The
            // variadic arguments are one (error, rtt) pair, as `cnt` = 1
            // says, of the C types librdkafka reads (an enum and an int).
            let err = unsafe {
                let mock = rdkafka::bindings::rd_kafka_handle_mock_cluster(handle);
                if mock.is_null() {
                    return Err(failed(RDKafkaErrorCode::Fail));
                }
                rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(
                    mock,
                    broker_id,
                    api as i16,
                    1,
                    rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
                    rtt_ms,
                )
            };
            if err != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(failed(err.into()));
            }
        }
        Ok(())
    }

    /// The mock cluster's handle, for `operation`.
    fn cluster(
        &self,
        operation: &'static str,
    ) -> Result<rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext>> {
        self.owner
            .client()
            .mock_cluster()
            .ok_or(Error::EmbeddedBroker {
                operation,
                source: rdkafka::error::KafkaError::MockCluster(RDKafkaErrorCode::Fail),
            })
    }
}

impl fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("brokers", &self.brokers)
            .field("implicit", &self.implicit)
            .finish()
    }
}
