//! librdkafka callbacks routed into `tracing`, so a client's own log lines
//! and errors land in the service's telemetry with the client's role.

use std::sync::Arc;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::Reach;

/// The context of every client kontext creates.
#[derive(Debug, Clone)]
pub(crate) struct TracingContext {
    pub(crate) role: &'static str,
    /// Where broker reachability is reported, for clients whose health
    /// counts (the application's producer); statistics must be enabled
    /// for it to clear without traffic.
    pub(crate) reach: Option<Arc<Reach>>,
}

impl TracingContext {
    pub(crate) fn new(role: &'static str) -> Self {
        TracingContext { role, reach: None }
    }
}

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let role = self.role;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "kontext::librdkafka", role, fac, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "kontext::librdkafka", role, fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "kontext::librdkafka", role, fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "kontext::librdkafka", role, fac, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(reach) = &self.reach
            && error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
        {
            reach.down();
        }
        // librdkafka reports transient connection trouble here and recovers
        // by itself; a warning keeps outages visible without paging anyone.
        tracing::warn!(target: "kontext::librdkafka", role = self.role, %error, reason, "client error");
    }

    /// Statistics (when enabled): a broker up means the client reaches one.
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(reach) = &self.reach
            && statistics.brokers.values().any(|b| b.state == "UP")
        {
            reach.up();
        }
    }
}
