//! The one backoff rule: pauses that double from a first pause up to a
//! longest one. Handler retries, outbox rows, dead-letter publishing, relay
//! passes and the outbox listener all wait by it.

use std::time::Duration;

/// Doubling pauses, `initial` after the first failure, never over `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    pub(crate) const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// The pause after failure `attempt` (1-based; 0 counts as 1).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        // 2^20 times any sensible first pause is past any sensible cap.
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_first_pause_and_stops_at_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let pauses: Vec<u128> = (0..7).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(pauses, [100, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_huge_first_pause_saturates_instead_of_overflowing() {
        let b = Backoff::new(Duration::MAX, Duration::from_secs(5));
        assert_eq!(b.delay(30), Duration::from_secs(5));
    }
}
