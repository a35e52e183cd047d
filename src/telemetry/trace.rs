//! W3C trace context carried through a kontext hop: a message produced
//! (directly or through the outbox) while a handler handles a message that
//! carried `traceparent`/`tracestate` carries the same headers, so a trace
//! is not broken where a service consumes and publishes.
//!
//! The handler's task knows the message it handles through a task-local
//! set around each handler invocation; its headers are copied only when
//! something is produced. Tasks the handler spawns do not inherit it.

use std::future::Future;
use std::sync::Arc;

use tokio::task::futures::TaskLocalFuture;

/// W3C trace context: the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace context: vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// The headers of the message being handled.
pub(crate) trait Incoming: Send + Sync {
    /// Calls `f` with the value of the first header named `name`, if it is
    /// there and UTF-8.
    fn with_header(&self, name: &str, f: &mut dyn FnMut(&str));
}

tokio::task_local! {
    static INCOMING: Arc<dyn Incoming>;
}

/// Runs `future` (a handler invocation) with `incoming` as the message it
/// handles.
pub(crate) fn handling<F: Future>(
    incoming: Arc<dyn Incoming>,
    future: F,
) -> TaskLocalFuture<Arc<dyn Incoming>, F> {
    INCOMING.scope(incoming, future)
}

/// The trace context of the message this task is handling, if any:
/// `(header, value)` pairs to write on what it produces.
pub(crate) fn carried() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let _ = INCOMING.try_with(|incoming| {
        for name in [TRACEPARENT, TRACESTATE] {
            incoming.with_header(name, &mut |v| out.push((name, v.to_owned())));
        }
    });
    out
}
