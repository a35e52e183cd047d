//! How a poll service ends: its final commit, bounded and reported, then
//! it leaves its group and serves the revocation before its consumer
//! closes.
//!
//! librdkafka aborts the process when a consumer's close finishes while an
//! assignment is still in progress (`rd_kafka_cgrp_terminated: assert:
//! !rd_kafka_assignment_in_progress`, librdkafka issue #4027): a close that
//! lands in the middle of a rebalance. So the consumer first unsubscribes
//! and is polled until the group has taken its partitions back and none
//! is left assigned, and only then closes, with nothing in progress.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use super::{Holder, LoopState, ServiceShared};
use crate::consumer::sync::lock;

/// What librdkafka's commit callback reported: the offsets its automatic
/// commits confirmed. (An explicit asynchronous commit's own result never
/// reaches the callback: rust-rdkafka sets no reply queue for it; the
/// final commit reads its result back instead.)
#[derive(Default)]
pub(crate) struct Commits {
    /// The highest offset confirmed committed per partition.
    committed: HashMap<(String, i32), i64>,
}

impl Commits {
    /// Forgets a partition's confirmations: it left this member, and what
    /// was committed before says nothing of its next assignment here.
    pub(super) fn forget(this: &Mutex<Commits>, topic: &str, partition: i32) {
        lock(this).committed.remove(&(topic.to_owned(), partition));
    }

    /// Notes one commit callback.
    pub(super) fn record(
        this: &Mutex<Commits>,
        result: &KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if result.is_err() {
            return;
        }
        let mut c = lock(this);
        for e in offsets.elements() {
            if let (Offset::Offset(o), Ok(())) = (e.offset(), e.error()) {
                let at = c
                    .committed
                    .entry((e.topic().to_owned(), e.partition()))
                    .or_insert(o);
                *at = (*at).max(o);
            }
        }
    }
}

/// Longest the leave may take when no shutdown set a deadline (the service
/// failed, or its `Kontext` was dropped).
const LEAVE_WITHOUT_DEADLINE: Duration = Duration::from_secs(2);
/// Of the time left, what the leave keeps for itself after the commit.
const LEAVE_RESERVE: Duration = Duration::from_millis(300);
/// Longest one read-back of the committed offsets waits.
const READ_BACK_WAIT: Duration = Duration::from_millis(500);
/// Shortest: the one read-back made past the deadline.
const MIN_READ_BACK_WAIT: Duration = Duration::from_millis(100);
/// Between read-backs (which answer fast when the group refuses commits).
const READ_BACK_PAUSE: Duration = Duration::from_millis(25);
/// How often an unconfirmed final commit is sent again.
const RESEND: Duration = Duration::from_millis(250);
/// Polls in a row (10 ms each) that must find nothing assigned and no
/// rebalance served before the consumer counts as out of its group, once
/// it served a rebalance after its unsubscribe.
const SETTLED_POLLS: u32 = 3;
/// The same for a member that served none (it had nothing assigned).
const SETTLED_POLLS_UNSEEN: u32 = 20;

impl LoopState {
    /// Remembers the offsets handed to librdkafka, so that the final
    /// commit can tell which of them it did not commit.
    pub(super) fn note_stored(&mut self, topic: &str, partition: i32, offset: i64) {
        self.stored.insert((topic.to_owned(), partition), offset);
    }
}

/// The final commit of a stopping service: sent (again every
/// [`RESEND`] while unconfirmed: a refused commit says nothing back), then
/// read back from the group coordinator until every offset stored is
/// confirmed, or until `deadline` (every call is bounded, whatever the
/// broker does; one read-back happens even past it). Returns what stayed
/// unconfirmed and why, naming the partitions and offsets (their records
/// may come again to the next member), or `None`.
///
/// Not a synchronous commit: that waits for a coordinator as long as
/// `session.timeout.ms`.
pub(super) fn final_commit(
    consumer: &Holder,
    state: &Mutex<LoopState>,
    shared: &ServiceShared,
    deadline: Instant,
) -> Option<String> {
    // A revocation served meanwhile commits nothing itself: a synchronous
    // commit would wait for a coordinator past the deadline (librdkafka
    // commits the partition's stored offset as it unassigns it).
    shared.closing.store(true, Ordering::Release);
    let mut confirmed: HashMap<(String, i32), i64> = HashMap::new();
    let mut why = "the group coordinator did not confirm it in time".to_owned();
    let mut sent: Option<Instant> = None;
    let mut unsent: Option<String> = None;
    let mut first = true;
    loop {
        // Re-read: a partition revoked meanwhile is not this member's.
        let stored = lock(state).stored.clone();
        for (k, o) in &lock(&shared.commits).committed {
            let at = confirmed.entry(k.clone()).or_insert(*o);
            *at = (*at).max(*o);
        }
        let mut left: Vec<((String, i32), i64)> = stored
            .into_iter()
            .filter(|(k, o)| confirmed.get(k).is_none_or(|c| c < o))
            .collect();
        if left.is_empty() {
            return None;
        }
        if !first && Instant::now() >= deadline {
            left.sort();
            let named: Vec<String> = left
                .iter()
                .map(|((t, p), o)| format!("{t}[{p}] at {o}"))
                .collect();
            return Some(format!(
                "the final commit was not confirmed: {why}{}; not confirmed committed (their records may come again to the next member): {}",
                unsent.as_deref().unwrap_or_default(),
                named.join(", ")
            ));
        }
        first = false;
        let mut tpl = TopicPartitionList::with_capacity(left.len());
        for ((t, p), o) in &left {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if sent.is_none_or(|at| at.elapsed() >= RESEND) {
            unsent = consumer
                .commit(&tpl, CommitMode::Async)
                .err()
                .map(|e| format!("; it could not be sent ({e})"));
            sent = Some(Instant::now());
        }
        // Serves callbacks; records polled now are dropped unhandled
        // (never stored: they come again).
        drop(consumer.poll(READ_BACK_PAUSE));
        shared.mark_polled();
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .clamp(MIN_READ_BACK_WAIT, READ_BACK_WAIT);
        match consumer.committed_offsets(tpl, wait) {
            Ok(committed) => {
                why = "the group coordinator did not confirm it in time".to_owned();
                for e in committed.elements() {
                    if let Offset::Offset(c) = e.offset() {
                        let at = confirmed
                            .entry((e.topic().to_owned(), e.partition()))
                            .or_insert(c);
                        *at = (*at).max(c);
                    }
                }
            }
            Err(e) => why = format!("the group coordinator could not be asked ({e})"),
        }
    }
}

/// When the poll thread must be done with its final commit and its leave.
pub(super) fn deadlines(shared: &ServiceShared) -> (Instant, Instant) {
    let now = Instant::now();
    let end = shared
        .close_by()
        .unwrap_or(now + LEAVE_WITHOUT_DEADLINE)
        .max(now + LEAVE_RESERVE);
    (end - LEAVE_RESERVE, end)
}

/// Leaves the group and serves the revocation of every partition, until
/// nothing is assigned and no rebalance comes for a few polls, or until
/// `deadline`: the consumer's close then has no assignment in progress.
pub(super) fn leave(
    consumer: &Holder,
    state: &Mutex<LoopState>,
    shared: &ServiceShared,
    deadline: Instant,
) {
    shared.closing.store(true, Ordering::Release);
    let before = lock(state).rebalances;
    consumer.unsubscribe();
    // librdkafka postpones the unsubscribe while a join is in flight and
    // then revokes what that join assigned; a member that had partitions
    // sees its revocation served. One that saw no rebalance since waits
    // longer for a join it may not know about.
    let mut quiet = 0;
    loop {
        let needed = if lock(state).rebalances > before {
            SETTLED_POLLS
        } else {
            SETTLED_POLLS_UNSEEN
        };
        if quiet >= needed {
            return;
        }
        if Instant::now() >= deadline {
            if consumer.assignment().is_ok_and(|a| a.count() > 0) {
                tracing::warn!(service = %shared.name, "the consumer still had partitions at the shutdown deadline; closing anyway");
            }
            return;
        }
        let seen = lock(state).rebalances;
        drop(consumer.poll(Duration::from_millis(10)));
        shared.mark_polled();
        let assigned = consumer.assignment().map_or(0, |a| a.count());
        quiet = if assigned == 0 && lock(state).rebalances == seen {
            quiet + 1
        } else {
            0
        };
    }
}
