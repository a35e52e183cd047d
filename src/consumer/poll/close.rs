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
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{Holder, LoopState, ServiceShared};
use crate::consumer::sync::lock;

/// Failed commits, from librdkafka's commit callback (automatic and
/// explicit commits alike): the final commit fails early on one.
#[derive(Default)]
pub(crate) struct Commits {
    /// Callbacks so far.
    seq: u64,
    /// The last failed commit: its callback's number and the error.
    failed: Option<(u64, String)>,
}

impl Commits {
    /// Notes one commit callback.
    pub(super) fn record(this: &Mutex<Commits>, result: &KafkaResult<()>) {
        let mut c = lock(this);
        c.seq += 1;
        if let Err(e) = result {
            if e.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset) {
                c.failed = Some((c.seq, e.to_string()));
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
/// Polls in a row that must find nothing assigned and no rebalance served
/// before the consumer counts as out of its group.
const SETTLED_POLLS: u32 = 3;

impl LoopState {
    /// Remembers the offsets handed to librdkafka, so that the final
    /// commit can tell which of them it did not commit.
    pub(super) fn note_stored(&mut self, topic: &str, partition: i32, offset: i64) {
        self.stored.insert((topic.to_owned(), partition), offset);
    }
}

/// The final commit of a stopping service: sent, then read back from the
/// group coordinator until it shows every offset stored, or until
/// `deadline` (both calls are bounded, whatever the broker does). Returns
/// why it did not happen, naming the partitions and offsets left
/// uncommitted (their records come again to the next member), or `None`
/// when everything stored is committed.
///
/// Read back rather than awaited: librdkafka delivers an explicit commit's
/// result only with a later event, and a synchronous commit waits for a
/// coordinator as long as `session.timeout.ms`.
pub(super) fn final_commit(
    consumer: &Holder,
    state: &Mutex<LoopState>,
    shared: &ServiceShared,
    deadline: Instant,
) -> Option<String> {
    let stored: HashMap<(String, i32), i64> = lock(state).stored.clone();
    if stored.is_empty() {
        return None;
    }
    let mut tpl = TopicPartitionList::with_capacity(stored.len());
    for ((t, p), o) in &stored {
        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
    }
    let send = |why: &mut String| -> u64 {
        let sent_at = lock(&shared.commits).seq;
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            *why = format!("it could not be sent ({e})");
        }
        sent_at
    };
    let mut why = "the group coordinator did not confirm it in time".to_owned();
    let mut sent_at = send(&mut why);
    let mut left: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        // Serves callbacks; records polled now are dropped unhandled
        // (never stored: they come again).
        drop(consumer.poll(Duration::from_millis(5)));
        shared.mark_polled();
        let failed = lock(&shared.commits)
            .failed
            .clone()
            .filter(|(seq, _)| *seq > sent_at);
        if let Some((_, error)) = failed {
            // A rebalance in progress, a coordinator moving: sent again
            // while there is time.
            why = format!("it failed ({error})");
            sent_at = send(&mut why);
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(READ_BACK_WAIT);
        match consumer.committed_offsets(tpl.clone(), wait) {
            Ok(committed) => {
                left = stored
                    .iter()
                    .filter(|((t, p), o)| {
                        committed
                            .find_partition(t, *p)
                            .is_none_or(|e| !matches!(e.offset(), Offset::Offset(c) if c >= **o))
                    })
                    .map(|((t, p), o)| format!("{t}[{p}] at {o}"))
                    .collect();
                if left.is_empty() {
                    return None;
                }
            }
            Err(e) => why = format!("the group coordinator could not be asked ({e})"),
        }
    }
    if left.is_empty() {
        left = stored
            .iter()
            .map(|((t, p), o)| format!("{t}[{p}] at {o}"))
            .collect();
    }
    left.sort();
    Some(format!(
        "the final commit did not happen: {why}; uncommitted: {}",
        left.join(", ")
    ))
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
    consumer.unsubscribe();
    let mut settled = 0;
    while settled < SETTLED_POLLS && Instant::now() < deadline {
        let before = lock(state).rebalances;
        drop(consumer.poll(Duration::from_millis(10)));
        shared.mark_polled();
        let assigned = consumer.assignment().map_or(0, |a| a.count());
        let quiet = lock(state).rebalances == before;
        settled = if assigned == 0 && quiet {
            settled + 1
        } else {
            0
        };
    }
    if settled < SETTLED_POLLS {
        tracing::warn!(service = %shared.name, "the consumer had not left its group by the shutdown deadline; closing anyway");
    }
}
