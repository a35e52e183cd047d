//! The shipping API's HTTP surface. Every error is JSON
//! (`{"error": "..."}`); nothing is written for a refused request.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kontext::registry::Health;
use serde_json::json;

use crate::application::{AppError, ShipmentService, Shipments};
use crate::domain::NewShipment;

/// What the handlers share.
pub struct AppState<S> {
    /// The use cases.
    pub service: ShipmentService<S>,
    /// kontext's health; `None` once kontext is stopping.
    pub health: Box<dyn Fn() -> Option<Health> + Send + Sync>,
}

impl<S> std::fmt::Debug for AppState<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The routes: `POST /api/shipments`, `GET /api/shipments/{id}`,
/// `GET /health`, `/health/live`, `/health/ready`.
pub fn router<S: Shipments>(state: AppState<S>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/api/shipments", post(create::<S>))
        .route("/api/shipments/{id}", get(find::<S>))
        .route("/health", get(health::<S>))
        .route("/health/live", get(live::<S>))
        .route("/health/ready", get(ready::<S>))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(Arc::new(state))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn create<S: Shipments>(
    State(state): State<Arc<AppState<S>>>,
    body: Result<Json<NewShipment>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => {
            // Over the limit: 413; wrong content type: 415; anything else
            // about the body (syntax, a missing or unknown field): 400.
            let status = match rejection.status() {
                s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
                _ => StatusCode::BAD_REQUEST,
            };
            return error(status, rejection.body_text());
        }
    };
    match state.service.create(request).await {
        Ok(shipment) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/shipments/{}", shipment.id))],
            Json(shipment),
        )
            .into_response(),
        Err(AppError::Invalid(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ AppError::Port(_)) => {
            tracing::error!(error = %e, "creating a shipment failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the shipment could not be saved; nothing was written, try again",
            )
        }
    }
}

async fn find<S: Shipments>(
    State(state): State<Arc<AppState<S>>>,
    Path(id): Path<String>,
) -> Response {
    match state.service.get(&id).await {
        Ok(Some(shipment)) => Json(shipment).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no shipment `{id}`")),
        Err(e) => {
            tracing::error!(error = %e, "reading a shipment failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the shipment could not be read",
            )
        }
    }
}

/// Which check an endpoint answers.
#[derive(Clone, Copy)]
enum Check {
    Both,
    Live,
    Ready,
}

fn health_response<S>(state: &AppState<S>, check: Check) -> Response {
    let Some(h) = (state.health)() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "live": false, "ready": false, "reasons": ["shutting down"] })),
        )
            .into_response();
    };
    let ok = match check {
        Check::Both => h.is_healthy(),
        Check::Live => h.live,
        Check::Ready => h.ready,
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Summaries only: this endpoint answers anyone. The error text behind
    // a failed check (`h.details`) is logged (at debug: probes come every
    // few seconds; kontext warns of the failures themselves), not served.
    if !ok {
        tracing::debug!(details = ?h.details, "health check failed");
    }
    (
        status,
        Json(json!({ "live": h.live, "ready": h.ready, "reasons": h.reasons, "notes": h.notes })),
    )
        .into_response()
}

async fn health<S: Shipments>(State(state): State<Arc<AppState<S>>>) -> Response {
    health_response(&state, Check::Both)
}

async fn live<S: Shipments>(State(state): State<Arc<AppState<S>>>) -> Response {
    health_response(&state, Check::Live)
}

async fn ready<S: Shipments>(State(state): State<Arc<AppState<S>>>) -> Response {
    health_response(&state, Check::Ready)
}
