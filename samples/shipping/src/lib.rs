//! Seed 002's two services, embedded the way a real service embeds kontext:
//!
//! - [`domain`]: shipments and the events about them; no Kafka, no database.
//! - [`application`]: the use cases and the ports they need
//!   ([`application::EventPublisher`], [`application::Shipments`]); unit
//!   tests run them on [`application::in_memory`].
//! - [`infrastructure`]: the ports implemented with kontext (outbox in the
//!   caller's transaction, inbox in the worker's unit of work), the model,
//!   the tables and the configuration file.
//! - [`api`]: the HTTP surface of `shipping-api` (axum).
//! - [`run`]: serving the API and running the worker until asked to stop.
//!
//! The binaries (`src/bin`) only wire these together: `shipping-api`,
//! `identity-worker`, `shipping` (both in one process, the embedded
//! default) and `dev-broker`.

pub mod api;
pub mod application;
pub mod domain;
pub mod infrastructure;
pub mod run;
