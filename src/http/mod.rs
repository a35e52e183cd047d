//! (Feature `http`.) An axum [`Router`] the application mounts in its own
//! server (kontext never opens a port): health probes, a status document,
//! operator commands and a page over them.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /health/live`, `GET /health/ready` | 200 or 503, with the reasons |
//! | `GET /status` | services, partitions, lanes, counters, outbox (JSON) |
//! | `GET /` | the status page, with pause, resume, seek and replay |
//! | `POST /admin/pause`, `/admin/resume`, `/admin/seek`, `/admin/replay` | operator commands |
//! | `GET /admin/outbox/failed`, `POST /admin/outbox/retry`, `/admin/outbox/discard` | failed outbox rows |
//! | `GET /admin/messages?topic=..&partition=..&limit=..` | a topic's newest records, decoded, redacted |
//!
//! Admin endpoints answer 404 unless [`HttpSettings::admin_token`] is set;
//! then they need `Authorization: Bearer <token>` (compared in constant
//! time, never logged) and answer 401 without it. Every command is logged
//! with its issuer (`X-Kontext-Operator`, else `http`) and counted in
//! `kontext_admin_commands_total`.

mod page;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest as _;
use subtle::ConstantTimeEq;

use crate::Kontext;
use crate::admin::{Look, ReplayFilter, SeekTo, Target};
use crate::config::Secret;
use crate::registry::{ServiceState, ServiceStatus, TypeStatus};

/// What the router allows.
#[derive(Clone, Default)]
pub struct HttpSettings {
    admin_token: Option<Secret>,
    stopping: tokio_util::sync::CancellationToken,
}

impl HttpSettings {
    /// Read-only: health, status and the page; no admin endpoint.
    pub fn read_only() -> Self {
        HttpSettings::default()
    }

    /// Turns the admin endpoints on, behind this bearer token. An empty
    /// token leaves them off.
    pub fn admin_token(mut self, token: impl Into<Secret>) -> Self {
        let token = token.into();
        self.admin_token = (!token.expose().is_empty()).then_some(token);
        self
    }
}

impl HttpSettings {
    /// Ends the long requests (a replay, a look at recent messages) once
    /// `stopping` is cancelled, answering 503: cancel it when the server
    /// begins its graceful shutdown, which would otherwise wait for them.
    /// A replay stopped so still flushes what it handed over (up to 30 s,
    /// which kontext's shutdown waits for); the answer says the server is
    /// stopping, not how far it got (its log line does).
    pub fn stop_on(mut self, stopping: tokio_util::sync::CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("admin", &self.admin_token.is_some())
            .finish()
    }
}

/// An answer refusing a request: its status and why.
struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

struct App {
    /// Weak: the application keeps the last strong reference, so it can
    /// shut kontext down by value once its server stopped.
    kontext: Weak<Kontext>,
    settings: HttpSettings,
    rates: Mutex<Rates>,
    /// Looks at recent messages running at once: each holds a consumer
    /// of its own for up to 10 s.
    looks: tokio::sync::Semaphore,
    /// One replay at a time: a second click while one runs would send the
    /// same dead letters twice.
    replays: tokio::sync::Semaphore,
}

/// Looks at recent messages the router runs at once.
const LOOKS_AT_ONCE: usize = 2;

/// Each lane's received and handled counters as `/status` read them over
/// the last [`Rates::WINDOW`]: rates without a timer of their own, and
/// nothing added to the record path.
#[derive(Default)]
struct Rates {
    samples: VecDeque<(Instant, Counts)>,
}

/// (received, handled) of each lane, by (topic, type).
type Counts = HashMap<(String, String), (u64, u64)>;

impl Rates {
    const WINDOW: Duration = Duration::from_secs(10);

    /// Records this read and answers each lane's (received, handled) per
    /// second since the oldest read of the window (none before a second
    /// has passed).
    fn observe(&mut self, now: Instant, counts: Counts) -> HashMap<(String, String), (f64, f64)> {
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > Self::WINDOW)
        {
            self.samples.pop_front();
        }
        let mut rates = HashMap::new();
        if let Some((at, then)) = self.samples.front() {
            let secs = now.duration_since(*at).as_secs_f64();
            if secs >= 1.0 {
                for (lane, (received, handled)) in &counts {
                    if let Some((r0, h0)) = then.get(lane) {
                        let per_s =
                            |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
                        rates.insert(lane.clone(), (per_s(*received, *r0), per_s(*handled, *h0)));
                    }
                }
            }
        }
        // Many readers polling fast keep one sample per 200 ms.
        if self
            .samples
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= Duration::from_millis(200))
        {
            self.samples.push_back((now, counts));
        }
        rates
    }
}

impl App {
    /// Kontext, or the answer once it is gone (503).
    fn kontext(&self) -> Result<Arc<Kontext>, Refusal> {
        self.kontext.upgrade().ok_or(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "kontext has shut down",
        ))
    }
}

/// The router over `kontext`; mount it where the application wants it
/// (`Router::nest("/kontext", kontext::http::router(&kontext, ..))`). It
/// holds `kontext` weakly: once the application dropped it, every endpoint
/// answers 503.
pub fn router(kontext: &Arc<Kontext>, settings: HttpSettings) -> Router {
    let app = Arc::new(App {
        kontext: Arc::downgrade(kontext),
        settings,
        rates: Mutex::default(),
        looks: tokio::sync::Semaphore::new(LOOKS_AT_ONCE),
        replays: tokio::sync::Semaphore::new(1),
    });
    Router::new()
        .route("/", get(page))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/status", get(status))
        .route("/admin/pause", post(pause))
        .route("/admin/resume", post(resume))
        .route("/admin/seek", post(seek))
        .route("/admin/replay", post(replay))
        .route("/admin/outbox/failed", get(outbox_failed))
        .route("/admin/outbox/retry", post(outbox_retry))
        .route("/admin/outbox/discard", post(outbox_discard))
        .route("/admin/messages", get(messages))
        .with_state(app)
}

async fn page() -> Html<&'static str> {
    Html(page::HTML)
}

fn health_json(kontext: &Kontext) -> (bool, bool, Value) {
    let h = kontext.health();
    let body = json!({
        "live": h.live,
        "ready": h.ready,
        "reasons": h.reasons,
        "details": h.details,
        "notes": h.notes,
    });
    (h.live, h.ready, body)
}

fn code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn live(State(app): State<Arc<App>>) -> Response {
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let (live, _, body) = health_json(&k);
    (code(live), Json(body)).into_response()
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let (_, ready, body) = health_json(&k);
    (code(ready), Json(body)).into_response()
}

fn ms(d: Option<std::time::Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_millis() as u64))
}

fn state_name(state: &ServiceState) -> (String, Option<String>) {
    match state {
        ServiceState::Waiting => ("waiting".into(), None),
        ServiceState::Running => ("running".into(), None),
        ServiceState::Draining => ("draining".into(), None),
        ServiceState::Stopped => ("stopped".into(), None),
        ServiceState::Failed(why) => ("failed".into(), Some(why.clone())),
        #[allow(unreachable_patterns)]
        _ => ("unknown".into(), None),
    }
}

fn partitions(list: &[(String, i32)]) -> Value {
    json!(
        list.iter()
            .map(|(t, p)| json!({"topic": t, "partition": p}))
            .collect::<Vec<_>>()
    )
}

fn service_json(s: &ServiceStatus) -> Value {
    let (state, failure) = state_name(&s.state);
    json!({
        "name": s.name,
        "group": s.group_id,
        "dedicated": s.dedicated,
        "state": state,
        "failure": failure,
        "joined": s.joined,
        "types": s.types,
        "assigned": partitions(&s.assigned_partitions),
        "paused": partitions(&s.paused_partitions),
        "held": partitions(&s.held_partitions),
        "partitions": s.partitions.iter().map(|p| json!({
            "topic": p.topic,
            "partition": p.partition,
            "committed": p.committed,
            "end": p.end,
            "lag": p.lag,
            "paused": s.paused_partitions.contains(&(p.topic.clone(), p.partition)),
            "held": s.held_partitions.contains(&(p.topic.clone(), p.partition)),
        })).collect::<Vec<_>>(),
        "since_last_poll_ms": ms(s.since_last_poll),
        "brokers_down_for_ms": ms(s.brokers_down_for),
        "stalled_for_ms": ms(s.stalled_for),
        "rejected": s.rejected,
        "skipped": s.skipped,
        "assignments_lost": s.assignments_lost,
        "settings": s.settings.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
    })
}

fn type_json(t: &TypeStatus, rates: Option<&(f64, f64)>) -> Value {
    let rate = |r: Option<f64>| r.map_or(Value::Null, |r| json!((r * 10.0).round() / 10.0));
    json!({
        "type": t.discriminator,
        "rust_type": t.rust_type,
        "topic": t.topic,
        "service": t.service,
        "dead_letter_topic": t.dead_letter_topic,
        "buffered": t.buffered,
        "capacity": t.capacity,
        "paused": t.paused,
        "held": t.held,
        "workers": t.workers,
        "busy_workers": t.busy_workers,
        "received": t.received,
        "handled": t.handled,
        "received_per_s": rate(rates.map(|r| r.0)),
        "handled_per_s": rate(rates.map(|r| r.1)),
        "failed": t.failed,
        "retried": t.retried,
        "dead_lettered": t.dead_lettered,
        "dead_letter_reasons": t.dead_letter_reasons.iter().map(|(r, n)| json!([r, n])).collect::<Vec<_>>(),
        "dropped": t.dropped,
        "duplicates": t.duplicates,
        "stalled_for_ms": ms(t.stalled_for),
    })
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let k = &k;
    let registry = k.registry();
    let (live, ready, health) = health_json(k);
    let types = registry.types();
    let rates = app
        .rates
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .observe(
            Instant::now(),
            types
                .iter()
                .map(|t| {
                    let lane = (t.topic.clone(), t.discriminator.clone());
                    (lane, (t.received, t.handled))
                })
                .collect(),
        );
    let outbox = match k.outbox() {
        Ok(o) => {
            let pending = o.pending().await.map_err(|e| e.to_string());
            let failed = o.failed_count().await.map_err(|e| e.to_string());
            json!({
                "pending": pending.as_ref().ok(),
                "failed": failed.as_ref().ok(),
                "error": pending.err().or(failed.err()),
            })
        }
        Err(_) => Value::Null,
    };
    let topics: Vec<Value> = k
        .model()
        .topics()
        .iter()
        .map(|t| json!({"name": t.name(), "partitions": t.partitions()}))
        .collect();
    Json(json!({
        "live": live,
        "ready": ready,
        "health": health,
        "admin": app.settings.admin_token.is_some(),
        "topics": topics,
        "services": registry.services().iter().map(service_json).collect::<Vec<_>>(),
        "types": types
            .iter()
            .map(|t| type_json(t, rates.get(&(t.topic.clone(), t.discriminator.clone()))))
            .collect::<Vec<_>>(),
        "outbox": outbox,
    }))
    .into_response()
}

/// Who is allowed, and who they say they are: `Err` is the answer to
/// give (404 with admin off, 401 without the token).
fn authorize(app: &App, headers: &HeaderMap) -> Result<String, Refusal> {
    let Some(token) = &app.settings.admin_token else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "admin endpoints are off (no admin token configured)",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Digests first: equal lengths, so the comparison says nothing of the
    // token's length either.
    let digest = |s: &str| sha2::Sha256::digest(s.as_bytes());
    let ok: bool = digest(given)
        .as_slice()
        .ct_eq(digest(token.expose()).as_slice())
        .into();
    if !ok {
        tracing::warn!("admin request refused: missing or wrong bearer token");
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required",
        ));
    }
    let issuer = headers
        .get("x-kontext-operator")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .unwrap_or("http")
        .to_owned();
    Ok(issuer)
}

/// A lane addressed over HTTP: a consumed type (its `ce_type`) or a topic.
#[derive(Debug, Deserialize)]
struct Aimed {
    #[serde(rename = "type")]
    type_name: Option<String>,
    topic: Option<String>,
    group: Option<String>,
    partitions: Option<Vec<i32>>,
    to: Option<SeekTo>,
}

/// The answer to a long request the server's shutdown ended.
fn stopping() -> Response {
    Refusal(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping").into_response()
}

fn bad_request(why: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": why.into()}))).into_response()
}

fn target_of(k: &Kontext, aimed: &Aimed, issuer: String) -> Result<Target, Refusal> {
    let (topic, group) = match (&aimed.type_name, &aimed.topic) {
        (Some(name), _) => {
            let t = k
                .registry()
                .types()
                .into_iter()
                .find(|t| &t.discriminator == name)
                .ok_or(Refusal(
                    StatusCode::BAD_REQUEST,
                    "no consumed type of that name",
                ))?;
            let group = k.registry().service(&t.service).map(|s| s.group_id);
            (t.topic, group)
        }
        (None, Some(topic)) => (topic.clone(), aimed.group.clone()),
        (None, None) => {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                "name a `type` or a `topic`",
            ));
        }
    };
    let mut target = Target::topic(topic).by(issuer);
    if let Some(g) = group {
        target = target.group(g);
    }
    if let Some(p) = &aimed.partitions {
        target = target.partitions(p.iter().copied());
    }
    Ok(target)
}

fn answer<T: serde::Serialize>(result: crate::Result<T>) -> Response {
    match result {
        Ok(v) => Json(json!({"results": v})).into_response(),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn command(
    app: &App,
    headers: &HeaderMap,
    body: Result<Json<Aimed>, axum::extract::rejection::JsonRejection>,
    which: &str,
) -> Response {
    let issuer = match authorize(app, headers) {
        Ok(i) => i,
        Err(r) => return r.into_response(),
    };
    let Json(aimed) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(e.body_text()),
    };
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let target = match target_of(&k, &aimed, issuer) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    match which {
        "pause" => answer(k.pause(target).await),
        "resume" => answer(k.resume(target).await),
        _ => match aimed.to {
            Some(to) => answer(k.seek(target, to).await),
            None => bad_request(
                "a seek needs `to`: \"beginning\", \"end\", {\"offset\": n} or {\"timestamp\": ms}",
            ),
        },
    }
}

type Body = Result<Json<Aimed>, axum::extract::rejection::JsonRejection>;

async fn pause(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    command(&app, &headers, body, "pause").await
}

async fn resume(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    command(&app, &headers, body, "resume").await
}

async fn seek(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    command(&app, &headers, body, "seek").await
}

#[derive(Debug, Deserialize)]
struct ReplayBody {
    dead_letter_topic: String,
    reason: Option<String>,
    #[serde(rename = "type")]
    type_name: Option<String>,
    /// Only records with this key (as UTF-8).
    key: Option<String>,
    /// Only dead letters written at or after this time (ms since the epoch).
    from_ms: Option<u64>,
    /// Only dead letters written before this time (ms since the epoch).
    until_ms: Option<u64>,
    #[serde(default)]
    dry_run: bool,
    per_second: Option<u32>,
}

async fn replay(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<ReplayBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let issuer = match authorize(&app, &headers) {
        Ok(i) => i,
        Err(r) => return r.into_response(),
    };
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(e.body_text()),
    };
    let mut filter = ReplayFilter::all().by(issuer);
    let at = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
    filter.key = b.key.map(String::into_bytes);
    filter.from = b.from_ms.map(at);
    filter.until = b.until_ms.map(at);
    if let Some(r) = b.reason {
        filter = filter.reason(r);
    }
    if let Some(t) = b.type_name {
        filter = filter.message_type(t);
    }
    if let Some(n) = b.per_second {
        filter = filter.per_second(n);
    }
    if b.dry_run {
        filter = filter.dry_run();
    }
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let Ok(_running) = app.replays.try_acquire() else {
        return Refusal(
            StatusCode::CONFLICT,
            "a replay is running; wait for its answer",
        )
        .into_response();
    };
    let replayed = tokio::select! {
        replayed = k.replay_dead_letters(&b.dead_letter_topic, filter) => replayed,
        () = app.settings.stopping.cancelled() => return stopping(),
    };
    match replayed {
        Ok(r) => Json(json!({
            "scanned": r.scanned,
            "matched": r.matched,
            "replayed": r.replayed,
        }))
        .into_response(),
        Err(e) => answer::<()>(Err(e)),
    }
}

async fn outbox_failed(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r.into_response();
    }
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let rows = match k.outbox() {
        Ok(o) => o.failed().await,
        Err(e) => Err(e),
    };
    match rows {
        Ok(rows) => Json(json!({
            "failed": rows.iter().map(|r| json!({
                "message_id": r.message_id,
                "topic": r.topic,
                "attempts": r.attempts,
                "last_error": r.last_error,
            })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => answer::<()>(Err(e)),
    }
}

#[derive(Debug, Deserialize)]
struct Ids {
    message_ids: Vec<String>,
}

async fn outbox_rows(
    app: &App,
    headers: &HeaderMap,
    body: Result<Json<Ids>, axum::extract::rejection::JsonRejection>,
    retry: bool,
) -> Response {
    let issuer = match authorize(app, headers) {
        Ok(i) => i,
        Err(r) => return r.into_response(),
    };
    let Json(ids) = match body {
        Ok(b) => b,
        Err(e) => return bad_request(e.body_text()),
    };
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let outbox = match k.outbox() {
        Ok(o) => o,
        Err(e) => return answer::<()>(Err(e)),
    };
    let ids: Vec<&str> = ids.message_ids.iter().map(String::as_str).collect();
    let what = if retry {
        "outbox-retry"
    } else {
        "outbox-discard"
    };
    crate::telemetry::admin_command(what, &issuer);
    tracing::info!(%issuer, command = what, rows = ids.len(), "operator command");
    let done = if retry {
        outbox.retry(&ids).await
    } else {
        outbox.discard(&ids).await
    };
    match done {
        Ok(n) => Json(json!({"rows": n})).into_response(),
        Err(e) => answer::<()>(Err(e)),
    }
}

async fn outbox_retry(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<Ids>, axum::extract::rejection::JsonRejection>,
) -> Response {
    outbox_rows(&app, &headers, body, true).await
}

async fn outbox_discard(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<Ids>, axum::extract::rejection::JsonRejection>,
) -> Response {
    outbox_rows(&app, &headers, body, false).await
}

#[derive(Debug, Deserialize)]
struct LookQuery {
    topic: String,
    partition: Option<i32>,
    limit: Option<usize>,
}

/// Behind the token: payloads are the business's data, not status.
async fn messages(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    look: Result<Query<LookQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let issuer = match authorize(&app, &headers) {
        Ok(i) => i,
        Err(r) => return r.into_response(),
    };
    let Query(look) = match look {
        Ok(q) => q,
        Err(e) => return bad_request(e.body_text()),
    };
    let k = match app.kontext() {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let Ok(_running) = app.looks.try_acquire() else {
        return Refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "other looks at recent messages are running; try again",
        )
        .into_response();
    };
    let mut query = Look::topic(&look.topic).by(issuer);
    if let Some(p) = look.partition {
        query = query.partition(p);
    }
    if let Some(n) = look.limit {
        query = query.limit(n);
    }
    let looked = tokio::select! {
        looked = k.recent_messages(query) => looked,
        () = app.settings.stopping.cancelled() => return stopping(),
    };
    match looked {
        Ok(records) => Json(json!({"topic": look.topic, "records": records})).into_response(),
        Err(e) => answer::<()>(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(received: u64, handled: u64) -> Counts {
        let key = ("orders".to_owned(), "OrderPlaced".to_owned());
        HashMap::from([(key, (received, handled))])
    }

    #[test]
    fn rates_come_from_reads_at_least_a_second_apart_within_the_window() {
        let mut rates = Rates::default();
        let t0 = Instant::now();
        let key = ("orders".to_owned(), "OrderPlaced".to_owned());
        assert!(rates.observe(t0, lane(0, 0)).is_empty());
        assert!(
            rates
                .observe(t0 + Duration::from_millis(500), lane(5, 5))
                .is_empty()
        );
        let r = rates.observe(t0 + Duration::from_secs(2), lane(40, 20));
        assert_eq!(r.get(&key), Some(&(20.0, 10.0)));
        // Reads older than the window no longer count.
        let r = rates.observe(t0 + Duration::from_secs(13), lane(40, 20));
        assert!(
            r.is_empty(),
            "every earlier read is older than the window: {r:?}"
        );
    }
}
