//! W3C trace context carried through a kontext hop: a message produced
//! (directly or through the outbox) while a handler handles a message that
//! carried `traceparent`/`tracestate` carries the same headers, so a trace
//! is not broken where a service consumes and publishes.
//!
//! The handler's task knows the message it handles through a task-local
//! set around each handler invocation; its headers are copied only when
//! something is produced. Tasks the handler spawns do not inherit it.
//!
//! With the `opentelemetry` feature the current span's context, when it
//! has one, is injected instead (through the global propagator), and a
//! process span takes the context of the message it handles as its parent.

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
    static INCOMING: Scope;
}

/// What a task's scope says about the message being handled.
#[derive(Clone)]
pub(crate) enum Scope {
    /// One handler invocation (a worker pool's attempt).
    Message(Arc<dyn Incoming>),
    /// A lane worker that handles one message at a time and says which in
    /// `Handling`: one scope for the worker's whole task instead of one per
    /// record (a scope costs about 1% of a consumed record's CPU).
    Lane(Arc<Handling>),
}

/// The message a lane worker is handling, if any.
#[derive(Default)]
pub(crate) struct Handling(std::sync::Mutex<Option<Arc<dyn Incoming>>>);

impl Handling {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<dyn Incoming>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The worker's handler is about to handle `incoming`.
    pub(crate) fn set(&self, incoming: Arc<dyn Incoming>) {
        *self.slot() = Some(incoming);
    }

    /// The handler is done with it: the message is the worker's alone again.
    pub(crate) fn clear(&self) {
        self.slot().take();
    }
}

/// Runs `future` (a handler invocation) with `incoming` as the message it
/// handles.
pub(crate) fn handling<F: Future>(
    incoming: Arc<dyn Incoming>,
    future: F,
) -> TaskLocalFuture<Scope, F> {
    INCOMING.scope(Scope::Message(incoming), future)
}

/// Runs `future` (a lane worker) with `handling` saying which message its
/// handler handles.
pub(crate) fn lane<F: Future>(handling: Arc<Handling>, future: F) -> TaskLocalFuture<Scope, F> {
    INCOMING.scope(Scope::Lane(handling), future)
}

/// The trace context to write on a message produced now: the current
/// span's (with the `opentelemetry` feature, when it has one), else that
/// of the message this task is handling, if any; `(header, value)` pairs.
pub(crate) fn outgoing() -> Vec<(String, String)> {
    #[cfg(feature = "opentelemetry")]
    {
        let current = otel::current();
        if !current.is_empty() {
            return current;
        }
    }
    let mut out = Vec::new();
    let copy = |incoming: &dyn Incoming, out: &mut Vec<(String, String)>| {
        for name in [TRACEPARENT, TRACESTATE] {
            incoming.with_header(name, &mut |v| out.push((name.to_owned(), v.to_owned())));
        }
    };
    let _ = INCOMING.try_with(|scope| match scope {
        Scope::Message(incoming) => copy(&**incoming, &mut out),
        Scope::Lane(handling) => {
            if let Some(incoming) = &*handling.slot() {
                copy(&**incoming, &mut out);
            }
        }
    });
    out
}

/// Makes `span` (a process span) a child of the context carried by the
/// headers of the message it handles. Without the `opentelemetry` feature,
/// or when the span is disabled, nothing is read.
#[allow(unused_variables)]
pub(crate) fn adopt(span: &tracing::Span, message: &dyn Incoming) {
    #[cfg(feature = "opentelemetry")]
    if !span.is_disabled() {
        otel::adopt(span, message);
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TRACEPARENT, TRACESTATE};

    struct Pairs<'a>(&'a mut Vec<(String, String)>);

    impl Injector for Pairs<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }

    /// The trace headers of a consumed message.
    struct Headers {
        parent: Option<String>,
        state: Option<String>,
    }

    impl Extractor for Headers {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                TRACEPARENT => self.parent.as_deref(),
                TRACESTATE => self.state.as_deref(),
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT, TRACESTATE]
        }
    }

    /// The current span's context, injected by the global propagator;
    /// empty when the current span belongs to no trace.
    pub(super) fn current() -> Vec<(String, String)> {
        let cx = tracing::Span::current().context();
        if !cx.span().span_context().is_valid() {
            return Vec::new();
        }
        let mut out = Vec::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut Pairs(&mut out))
        });
        out
    }

    pub(super) fn adopt(span: &tracing::Span, message: &dyn super::Incoming) {
        let mut headers = Headers {
            parent: None,
            state: None,
        };
        message.with_header(TRACEPARENT, &mut |v| headers.parent = Some(v.to_owned()));
        message.with_header(TRACESTATE, &mut |v| headers.state = Some(v.to_owned()));
        if headers.parent.is_none() {
            return;
        }
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&headers));
        if cx.span().span_context().is_valid() {
            // Fails only for a span already started or not an OpenTelemetry
            // one: it then stays a root, which loses the link and nothing else.
            let _ = span.set_parent(cx);
        }
    }
}
