//! Faults a test injects into a consumed type's handler (feature
//! `testing`, through `testing::HandlerFault`): the next attempts fail,
//! panic or hang, as a real handler's would, so the retry policy, dead
//! letters, time limits and health meet them in the code path they take
//! in production.
//!
//! Without the feature the handler is not wrapped: nothing here costs a
//! production build anything.

use std::any::TypeId;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::watch;

use crate::consumer::MessageContext;
use crate::consumer::handler::HandlerError;
use crate::consumer::sync::lock;
use crate::consumer::worker::{Dispatch, Outcome};

/// What an attempt that meets a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Fails with a retriable error (the retry policy decides what follows).
    Fail,
    /// Panics.
    Panic,
    /// Waits, without running the handler, until the faults of its type are
    /// released; then runs the handler. Past the type's `handler_timeout`
    /// the attempt times out instead.
    Hang,
}

/// The faults planned for one type of one `Kontext`.
#[derive(Debug)]
pub(crate) struct FaultCell {
    planned: Mutex<VecDeque<Fault>>,
    /// How many faults `planned` holds: read without the lock by every
    /// attempt, so a type with none planned costs one atomic load.
    armed: AtomicUsize,
    /// Bumped by `release`: hanging attempts go on.
    released: watch::Sender<u64>,
    /// Attempts that met a fault, for the test to wait on.
    met: Mutex<Vec<Fault>>,
}

impl Default for FaultCell {
    fn default() -> Self {
        FaultCell {
            planned: Mutex::new(VecDeque::new()),
            armed: AtomicUsize::new(0),
            released: watch::Sender::new(0),
            met: Mutex::new(Vec::new()),
        }
    }
}

impl FaultCell {
    /// The next `n` attempts meet `fault` (after those planned before).
    pub(crate) fn plan(&self, fault: Fault, n: usize) {
        let mut planned = lock(&self.planned);
        planned.extend(std::iter::repeat_n(fault, n));
        self.armed.store(planned.len(), Ordering::Release);
    }

    /// Forgets the faults not met yet and lets hanging attempts go on.
    pub(crate) fn release(&self) {
        let mut planned = lock(&self.planned);
        planned.clear();
        self.armed.store(0, Ordering::Release);
        drop(planned);
        self.released.send_modify(|n| *n += 1);
    }

    /// The faults attempts met so far, in order.
    pub(crate) fn met(&self) -> Vec<Fault> {
        lock(&self.met).clone()
    }

    /// Whether a fault is planned.
    fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire) > 0
    }

    /// The fault of the attempt starting now, if one is planned.
    fn take(&self) -> Option<Fault> {
        if self.armed.load(Ordering::Acquire) == 0 {
            return None;
        }
        let fault = {
            let mut planned = lock(&self.planned);
            let fault = planned.pop_front()?;
            self.armed.store(planned.len(), Ordering::Release);
            fault
        };
        lock(&self.met).push(fault);
        Some(fault)
    }
}

/// Each consumed type's fault cell in one `Kontext`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults(Arc<DashMap<TypeId, Arc<FaultCell>>>);

impl Faults {
    /// The cell of `type_id`, made on first use (a test may plan faults
    /// for a type before its lane is built).
    pub(crate) fn cell(&self, type_id: TypeId) -> Arc<FaultCell> {
        Arc::clone(&self.0.entry(type_id).or_default())
    }
}

/// A dispatch that meets its type's planned faults first.
pub(crate) struct Faulty<D> {
    pub(crate) inner: D,
    pub(crate) cell: Arc<FaultCell>,
}

impl<T: Send + 'static, D: Dispatch<T>> Dispatch<T> for Faulty<D> {
    fn dispatch(&self, message: T, ctx: MessageContext) -> impl Future<Output = Outcome> + Send {
        // Subscribed before the fault is taken: a release between the two
        // is not missed.
        let released = self.cell.is_armed().then(|| self.cell.released.subscribe());
        let fault = self.cell.take();
        // The handler is called (its closure runs) only when the attempt
        // is to run it: not for a failure or a panic.
        async move {
            match fault {
                None => self.inner.dispatch(message, ctx).await,
                Some(Fault::Fail) => Outcome::Failed(HandlerError::retry("injected handler fault")),
                // A panic is the fault asked for: the worker catches it as
                // it catches a handler's own.
                Some(Fault::Panic) => panic!("injected handler panic"),
                Some(Fault::Hang) => {
                    // The sender lives in the cell this future's dispatch
                    // holds: `changed` ends only on a release.
                    if let Some(mut released) = released {
                        let _ = released.changed().await;
                    }
                    self.inner.dispatch(message, ctx).await
                }
            }
        }
    }
}
