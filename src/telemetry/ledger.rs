//! What this process's kontext clients put on each topic, per type: the
//! records a producer had acknowledged (a transaction's once it
//! committed) and the outbox rows a relay sent. Tracked test sessions
//! (`testing::track`) compare it with what consumers finished to know
//! when every consequence of a test's action is done.
//!
//! Process-wide, like the `metrics` facade, because records produced by
//! one `Kontext` are consumed by another. Each client looks its tallies up
//! once, when it is built (or once per relay batch); a record costs one
//! relaxed atomic add.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use dashmap::DashMap;

/// The counts of one (topic, type).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Records acknowledged by the broker and visible to consumers (a
    /// transaction's only once it committed), outbox sends included.
    pub(crate) produced: AtomicU64,
    /// Of those, outbox rows a relay (or an immediate send) delivered.
    pub(crate) outbox_sent: AtomicU64,
}

type Key = (Box<str>, Box<str>);

static LEDGER: LazyLock<DashMap<Key, Arc<Tally>>> = LazyLock::new(DashMap::new);

/// The tally of `message_type` on `topic`, made on first use.
pub(crate) fn tally(topic: &str, message_type: &str) -> Arc<Tally> {
    if let Some(t) = LEDGER.get(&(Box::from(topic), Box::from(message_type))) {
        return Arc::clone(&t);
    }
    Arc::clone(
        &LEDGER
            .entry((Box::from(topic), Box::from(message_type)))
            .or_default(),
    )
}

/// Counts `n` records of `message_type` put on `topic` by a client that
/// is not a `Producer` (a dead-letter replay).
pub(crate) fn produced(topic: &str, message_type: &str, n: u64) {
    tally(topic, message_type)
        .produced
        .fetch_add(n, Ordering::Relaxed);
}

/// Counts `n` outbox rows of `message_type` sent to `topic`.
pub(crate) fn outbox_sent(topic: &str, message_type: &str, n: u64) {
    let t = tally(topic, message_type);
    t.produced.fetch_add(n, Ordering::Relaxed);
    t.outbox_sent.fetch_add(n, Ordering::Relaxed);
}

/// Produced and outbox-sent counts of one (topic, type).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Records acknowledged (a transaction's once committed), outbox sends
    /// included.
    pub(crate) produced: u64,
    /// Outbox rows sent.
    pub(crate) outbox_sent: u64,
}

/// Every (topic, type) this process produced to, with its counts.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn snapshot() -> Vec<(String, String, Counts)> {
    LEDGER
        .iter()
        .map(|e| {
            let (topic, message_type) = e.key();
            (
                topic.to_string(),
                message_type.to_string(),
                Counts {
                    produced: e.value().produced.load(Ordering::Relaxed),
                    outbox_sent: e.value().outbox_sent.load(Ordering::Relaxed),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_are_shared_per_topic_and_type() {
        let a = tally("ledger-test-topic", "a");
        a.produced.fetch_add(2, Ordering::Relaxed);
        outbox_sent("ledger-test-topic", "a", 3);
        outbox_sent("ledger-test-topic", "b", 1);
        let counts = |t: &str| {
            snapshot()
                .into_iter()
                .find(|(topic, ty, _)| topic == "ledger-test-topic" && ty == t)
                .map(|(_, _, c)| c)
        };
        assert_eq!(
            counts("a"),
            Some(Counts {
                produced: 5,
                outbox_sent: 3
            })
        );
        assert_eq!(
            counts("b"),
            Some(Counts {
                produced: 1,
                outbox_sent: 1
            })
        );
    }
}
