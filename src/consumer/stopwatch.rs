//! Times a lane's handler attempts for the handler-duration and end-to-end
//! histograms with one clock read per attempt: attempts of a lane run one
//! after another, so one's end is the next one's start, and the wall clock
//! is the batch's reading plus the time measured since. Reading the clock
//! twice per record and the wall clock once more cost about 1% of a
//! consumed record's CPU (callgrind, BENCHMARKS.md), for histograms that
//! are no-ops unless the application installed a recorder.

use std::time::{Duration, Instant, SystemTime};

/// One lane's attempt timer.
pub(crate) struct Stopwatch {
    /// The wall clock at `anchor`, in ms since the epoch.
    anchor_ms: u64,
    /// Time from the anchor to `mark`.
    since_anchor: Duration,
    /// When the current attempt began.
    mark: Instant,
}

impl Stopwatch {
    /// Starts timing now, reading the wall clock (once per batch, so a
    /// long-running lane follows clock adjustments).
    pub(crate) fn start() -> Stopwatch {
        let mark = Instant::now();
        let anchor_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Stopwatch {
            anchor_ms,
            since_anchor: Duration::ZERO,
            mark,
        }
    }

    /// A watch for an attempt that begins now, on this watch's wall-clock
    /// reading: a worker pool's attempts overlap, so each is timed alone,
    /// but they share the pool's reading of the wall clock.
    pub(crate) fn fork(&self) -> Stopwatch {
        let mark = Instant::now();
        Stopwatch {
            anchor_ms: self.anchor_ms,
            since_anchor: self.since_anchor + mark.saturating_duration_since(self.mark),
            mark,
        }
    }

    /// The next attempt begins now: after a wait that was not a handler's
    /// (a retry's pause, a yield, a dead-letter publish).
    pub(crate) fn restart(&mut self) {
        let now = Instant::now();
        self.since_anchor += now.saturating_duration_since(self.mark);
        self.mark = now;
    }

    /// Ends the current attempt (the next one begins now): how long it
    /// took, and the wall clock now in ms since the epoch.
    pub(crate) fn lap(&mut self) -> (Duration, u64) {
        let now = Instant::now();
        let took = now.saturating_duration_since(self.mark);
        self.mark = now;
        self.since_anchor += took;
        let wall = self
            .anchor_ms
            .saturating_add(u64::try_from(self.since_anchor.as_millis()).unwrap_or(u64::MAX));
        (took, wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wall_ms() -> u64 {
        u64::try_from(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX)
    }

    #[test]
    fn laps_follow_one_another_and_the_wall_clock_advances_with_them() {
        let before = wall_ms();
        let outer = Instant::now();
        let mut watch = Stopwatch::start();
        std::thread::sleep(Duration::from_millis(20));
        let (first, wall1) = watch.lap();
        let between = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let (second, wall2) = watch.lap();
        let total = outer.elapsed();
        let after = wall_ms();
        // Each lap covers its own sleep, and the two together no more than
        // the time around them (the second does not repeat the first).
        assert!(first >= Duration::from_millis(20), "{first:?}");
        assert!(second >= Duration::from_millis(30), "{second:?}");
        assert!(first <= between.duration_since(outer), "{first:?}");
        assert!(
            first + second <= total,
            "{first:?} + {second:?} > {total:?}"
        );
        // The wall clock of a lap lies between the readings around it
        // (whole milliseconds, truncated).
        assert!(before + 20 <= wall1 && wall1 <= wall2 && wall2 <= after + 1);
        assert!(wall2 >= before + 50, "{wall2} vs {before}");
    }

    #[test]
    fn a_restart_leaves_the_wait_out_of_the_next_lap_but_not_out_of_the_wall_clock() {
        let before = wall_ms();
        let mut watch = Stopwatch::start();
        std::thread::sleep(Duration::from_millis(40));
        let outer = Instant::now();
        watch.restart();
        let (took, wall) = watch.lap();
        assert!(took <= outer.elapsed(), "{took:?}");
        assert!(wall >= before + 40, "{wall} vs {before}");
    }

    #[test]
    fn a_forked_watch_times_its_attempt_alone_on_the_pools_wall_clock() {
        let before = wall_ms();
        let pool = Stopwatch::start();
        std::thread::sleep(Duration::from_millis(30));
        let outer = Instant::now();
        let mut attempt = pool.fork();
        std::thread::sleep(Duration::from_millis(20));
        let (took, wall) = attempt.lap();
        let around = outer.elapsed();
        let after = wall_ms();
        // The attempt's time leaves out what passed before the fork; its
        // wall clock does not.
        assert!(
            took >= Duration::from_millis(20) && took <= around,
            "{took:?}"
        );
        assert!(
            before + 50 <= wall && wall <= after + 1,
            "{before} {wall} {after}"
        );
    }
}
