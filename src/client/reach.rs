//! Whether a client can reach any broker, as librdkafka reports it: for
//! readiness. Set down on librdkafka's all-brokers-down error, up again on
//! anything a broker answered (a record, a delivery, a join, statistics
//! with a broker up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One client's reachability; shared between its context (callbacks on
/// librdkafka's threads) and whoever reports health.
#[derive(Debug)]
pub(crate) struct Reach {
    epoch: Instant,
    /// Milliseconds since `epoch` when every broker was reported down
    /// (kept from the first report); 0 while some broker is reachable.
    down_since_ms: AtomicU64,
}

impl Default for Reach {
    fn default() -> Self {
        Reach {
            epoch: Instant::now(),
            down_since_ms: AtomicU64::new(0),
        }
    }
}

impl Reach {
    /// librdkafka reports every broker down.
    pub(crate) fn down(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let _ =
            self.down_since_ms
                .compare_exchange(0, ms.max(1), Ordering::AcqRel, Ordering::Relaxed);
    }

    /// A broker answered. A plain load first: this runs per record.
    pub(crate) fn up(&self) {
        if self.down_since_ms.load(Ordering::Relaxed) != 0 {
            self.down_since_ms.store(0, Ordering::Release);
        }
    }

    /// How long no broker has been reachable, if none is.
    pub(crate) fn down_for(&self) -> Option<Duration> {
        let since = self.down_since_ms.load(Ordering::Acquire);
        (since > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(since))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_keeps_the_first_report_and_up_clears_it() {
        let r = Reach::default();
        assert_eq!(r.down_for(), None);
        r.down();
        let first = r.down_for().expect("down");
        r.down();
        assert!(r.down_for().expect("still down") >= first);
        r.up();
        assert_eq!(r.down_for(), None);
    }
}
