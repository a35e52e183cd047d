//! The bounded buffer of one lane (one topic of a poll service, with every
//! type on it) between the poll thread and the lane's async worker: a
//! crossbeam channel for the records (the poll thread never blocks on it)
//! and a tokio `Notify` to wake the worker. One lane per topic keeps the
//! records of a partition in order even when several types share it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use tokio::sync::Notify;

use crate::consumer::Backpressure;
use crate::consumer::context::Record;

/// Counters of one type, readable from the registry.
#[derive(Debug, Default)]
pub(crate) struct TypeStats {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) duplicates: AtomicU64,
}

/// Result of offering a record to a full or non-full buffer.
pub(crate) enum Offer {
    /// Buffered.
    Accepted,
    /// Full under [`Backpressure::Apply`]: the record is handed back to keep
    /// until there is room.
    Full(Record),
    /// A record was discarded to make room (or the incoming one was): its
    /// offset counts as finished. The second record is only ever set if the
    /// buffer refilled between making room and sending, which the single
    /// poll thread rules out; it is reported rather than lost all the same.
    Dropped(Record, Option<Record>),
}

pub(crate) struct TypeBuffer {
    tx: Sender<Record>,
    rx: Receiver<Record>,
    notify: Notify,
    mode: Backpressure,
    capacity: usize,
    /// Whether the lane's partitions are paused because it is full.
    pub(crate) paused: AtomicBool,
    dropped: AtomicU64,
}

impl TypeBuffer {
    pub(crate) fn new(capacity: usize, mode: Backpressure) -> Arc<TypeBuffer> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        Arc::new(TypeBuffer {
            tx,
            rx,
            notify: Notify::new(),
            mode,
            capacity: capacity.max(1),
            paused: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        })
    }

    /// Called by the poll thread; never blocks.
    pub(crate) fn offer(&self, record: Record) -> Offer {
        let outcome = match self.tx.try_send(record) {
            Ok(()) => Offer::Accepted,
            Err(TrySendError::Full(record)) | Err(TrySendError::Disconnected(record)) => {
                match self.mode {
                    Backpressure::Apply => return Offer::Full(record),
                    Backpressure::DropNewest => Offer::Dropped(record, None),
                    Backpressure::DropOldest => match self.rx.try_recv() {
                        Ok(oldest) => match self.tx.try_send(record) {
                            Ok(()) => Offer::Dropped(oldest, None),
                            Err(e) => {
                                self.count_drop();
                                Offer::Dropped(oldest, Some(e.into_inner()))
                            }
                        },
                        // The worker emptied it meanwhile.
                        Err(_) => match self.tx.try_send(record) {
                            Ok(()) => Offer::Accepted,
                            Err(e) => Offer::Dropped(e.into_inner(), None),
                        },
                    },
                }
            }
        };
        match &outcome {
            // The worker waits only after finding the buffer empty, so only
            // the record that makes it non-empty needs to wake it: a busy
            // worker is not woken (and rescheduled) once per record.
            Offer::Accepted => {
                if self.rx.len() <= 1 {
                    self.notify.notify_one();
                }
            }
            Offer::Dropped(..) => {
                self.count_drop();
                self.notify.notify_one();
            }
            Offer::Full(_) => {}
        }
        outcome
    }

    fn count_drop(&self) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // First drop and then every thousandth, so a flood cannot flood the log.
        if n == 1 || n % 1000 == 0 {
            tracing::warn!(dropped = n, mode = ?self.mode, "buffer full: message dropped");
        }
    }

    /// Next record for the worker, without waiting.
    pub(crate) fn try_take(&self) -> Option<Record> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
        }
    }

    /// Waits until something may have been buffered.
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Wakes the worker without a record (shutdown).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    pub(crate) fn len(&self) -> usize {
        self.rx.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Fill level below which paused partitions resume.
    pub(crate) fn low_mark(&self) -> usize {
        self.capacity / 2
    }
}
