//! What this process's kontext clients put on each topic, per cluster
//! and type: the records a producer had acknowledged (a transaction's once
//! it committed), the outbox rows a relay sent, the dead letters a replay
//! sent back. Tracked test sessions (`testing::track`) compare it with
//! what consumers finished to know when every consequence of a test's
//! action is done.
//!
//! Process-wide, like the `metrics` facade, because records produced by
//! one `Kontext` are consumed by another; keyed by cluster too, so tests
//! on embedded brokers of their own never mix. Kept only when built with
//! the `testing` feature: otherwise a [`Tally`] is empty and every count
//! compiles to nothing.

use std::sync::Arc;
#[cfg(feature = "testing")]
use std::sync::LazyLock;
#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "testing")]
use dashmap::DashMap;

/// The counts of one (cluster, topic, type).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Records acknowledged by the broker and visible to consumers (a
    /// transaction's only once it committed), outbox sends included.
    #[cfg(feature = "testing")]
    produced: AtomicU64,
    /// Of those, outbox rows a relay (or an immediate send) delivered.
    #[cfg(feature = "testing")]
    outbox_sent: AtomicU64,
}

impl Tally {
    /// Counts `n` records put on the topic.
    #[inline]
    pub(crate) fn produced(&self, n: u64) {
        #[cfg(feature = "testing")]
        self.produced.fetch_add(n, Ordering::Relaxed);
        #[cfg(not(feature = "testing"))]
        let _ = n;
    }
}

#[cfg(feature = "testing")]
type Key = (Box<str>, Box<str>, Box<str>);

#[cfg(feature = "testing")]
static LEDGER: LazyLock<DashMap<Key, Arc<Tally>>> = LazyLock::new(DashMap::new);

/// The tally of `message_type` on `topic` of the cluster `servers`
/// (bootstrap servers), made on first use. Called once per client and
/// type, not per record.
pub(crate) fn tally(servers: &str, topic: &str, message_type: &str) -> Arc<Tally> {
    #[cfg(feature = "testing")]
    {
        Arc::clone(
            &LEDGER
                .entry((
                    Box::from(servers),
                    Box::from(topic),
                    Box::from(message_type),
                ))
                .or_default(),
        )
    }
    #[cfg(not(feature = "testing"))]
    {
        let _ = (servers, topic, message_type);
        Arc::new(Tally::default())
    }
}

/// Counts `n` records of `message_type` put on `topic` by a client that
/// is not a `Producer` (a dead-letter replay).
pub(crate) fn produced(servers: &str, topic: &str, message_type: &str, n: u64) {
    #[cfg(feature = "testing")]
    tally(servers, topic, message_type).produced(n);
    #[cfg(not(feature = "testing"))]
    let _ = (servers, topic, message_type, n);
}

/// Counts `n` outbox rows of `message_type` sent to `topic`.
pub(crate) fn outbox_sent(servers: &str, topic: &str, message_type: &str, n: u64) {
    #[cfg(feature = "testing")]
    {
        let t = tally(servers, topic, message_type);
        t.produced.fetch_add(n, Ordering::Relaxed);
        t.outbox_sent.fetch_add(n, Ordering::Relaxed);
    }
    #[cfg(not(feature = "testing"))]
    let _ = (servers, topic, message_type, n);
}

/// Produced and outbox-sent counts of one (topic, type).
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Records acknowledged (a transaction's once committed), outbox sends
    /// included.
    pub(crate) produced: u64,
    /// Outbox rows sent.
    pub(crate) outbox_sent: u64,
}

/// Every (cluster, topic, type) this process produced to, with its counts.
#[cfg(feature = "testing")]
pub(crate) fn snapshot() -> Vec<((String, String, String), Counts)> {
    LEDGER
        .iter()
        .map(|e| {
            let (servers, topic, message_type) = e.key();
            (
                (
                    servers.to_string(),
                    topic.to_string(),
                    message_type.to_string(),
                ),
                Counts {
                    produced: e.value().produced.load(Ordering::Relaxed),
                    outbox_sent: e.value().outbox_sent.load(Ordering::Relaxed),
                },
            )
        })
        .collect()
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;

    #[test]
    fn tallies_are_kept_per_cluster_topic_and_type() {
        let a = tally("c1", "ledger-test-topic", "a");
        a.produced(2);
        outbox_sent("c1", "ledger-test-topic", "a", 3);
        outbox_sent("c1", "ledger-test-topic", "b", 1);
        produced("c2", "ledger-test-topic", "a", 7);
        let counts = |c: &str, t: &str| {
            snapshot()
                .into_iter()
                .find(|((cluster, topic, ty), _)| {
                    cluster == c && topic == "ledger-test-topic" && ty == t
                })
                .map(|(_, c)| c)
        };
        assert_eq!(
            counts("c1", "a"),
            Some(Counts {
                produced: 5,
                outbox_sent: 3
            })
        );
        assert_eq!(
            counts("c1", "b"),
            Some(Counts {
                produced: 1,
                outbox_sent: 1
            })
        );
        assert_eq!(
            counts("c2", "a"),
            Some(Counts {
                produced: 7,
                outbox_sent: 0
            })
        );
    }
}
