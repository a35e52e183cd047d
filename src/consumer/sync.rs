//! Locks that survive a panic elsewhere.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering from poisoning: the state is plain data and a
/// panicking handler never holds these locks.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
