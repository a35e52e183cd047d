//! Client plumbing every role shares: the librdkafka client context that
//! routes its logs and errors to `tracing`, the tracker that counts live
//! clients, and headers read as bytes (`raw_headers`). The ground floor: producer, consumer, outbox and runtime use it;
//! it uses none of them.

mod context;
pub(crate) mod raw_headers;
mod reach;
mod tracker;

pub(crate) use context::TracingContext;
pub(crate) use reach::Reach;
pub use tracker::{ClientCounts, ClientTracker};
pub(crate) use tracker::{ClientGuard, ClientKind};
