//! Counts of live Kafka clients, so an operator (or a test) can see exactly
//! which connections a process holds: a producer-only API must hold no
//! consumer.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Kinds of Kafka client kontext creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientKind {
    Producer,
    Consumer,
}

/// Live client counts, shared by everything one [`Kontext`](crate::Kontext) starts.
#[derive(Clone, Default)]
pub struct ClientTracker {
    inner: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    producers: AtomicUsize,
    consumers: AtomicUsize,
}

/// A snapshot of live client counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientCounts {
    /// Producer clients.
    pub producers: usize,
    /// Consumer clients (one per poll service).
    pub consumers: usize,
}

impl ClientTracker {
    /// The current counts.
    pub fn counts(&self) -> ClientCounts {
        ClientCounts {
            producers: self.inner.producers.load(Ordering::Relaxed),
            consumers: self.inner.consumers.load(Ordering::Relaxed),
        }
    }

    /// Counts a new client until the guard drops.
    pub(crate) fn track(&self, kind: ClientKind) -> ClientGuard {
        self.counter(kind).fetch_add(1, Ordering::Relaxed);
        ClientGuard {
            tracker: self.clone(),
            kind,
        }
    }

    fn counter(&self, kind: ClientKind) -> &AtomicUsize {
        match kind {
            ClientKind::Producer => &self.inner.producers,
            ClientKind::Consumer => &self.inner.consumers,
        }
    }
}

impl fmt::Debug for ClientTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.counts().fmt(f)
    }
}

/// Held by a client for its lifetime.
pub(crate) struct ClientGuard {
    tracker: ClientTracker,
    kind: ClientKind,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.tracker
            .counter(self.kind)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for ClientGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientGuard")
            .field("kind", &self.kind)
            .finish()
    }
}
