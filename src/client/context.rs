//! librdkafka callbacks routed into `tracing`, so a client's own log lines
//! and errors land in the service's telemetry with the client's role.

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// The context of every client kontext creates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TracingContext {
    pub(crate) role: &'static str,
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
        // librdkafka reports transient connection trouble here and recovers
        // by itself; a warning keeps outages visible without paging anyone.
        tracing::warn!(target: "kontext::librdkafka", role = self.role, %error, reason, "client error");
    }
}
