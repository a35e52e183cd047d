//! Run with `cargo run -p kontext-samples --bin shipping-identity`
//!
//! Seed 002's flow, effectively once end to end:
//! - the **shipping** service creates a shipment row and a
//!   `ShipmentCreatedEvent` in one database transaction (transactional
//!   outbox); its relay publishes the event after the commit;
//! - the **identity** service consumes it with an inbox, writes a
//!   user-activity row and publishes a `UserActivityRecorded` follow-up
//!   through its own outbox, all in one unit of work committed before the
//!   offset is stored. One event is delivered twice to show the inbox.
//!
//! The first shipment is created inside a `shipping.create_shipment` span;
//! with kontext's `opentelemetry` feature its trace context is stored with
//! the outbox row, and identity's process span (and the follow-up event it
//! writes) continue that trace. The sample collects spans in memory and
//! prints that one trace as a tree at the end: one trace across two
//! services and two outboxes.
//!
//! SQLite files in the temp directory by default (one per service); set
//! `DATABASE_URL=postgres://...` to run both on PostgreSQL. The broker is
//! the embedded one unless `KONTEXT_BOOTSTRAP_SERVERS` is set.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kontext::prelude::*;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Serialize, Deserialize, Topic)]
#[topic(name = "shipping.shipment.created", key = shipment_id, partitions = 3)]
struct ShipmentCreatedEvent {
    shipment_id: String,
    user_id: i64,
    #[topic(header = "x-warehouse")]
    warehouse: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Topic)]
#[topic(name = "identity.user-activity.recorded", key = user_id, partitions = 3)]
struct UserActivityRecorded {
    user_id: i64,
    activity: String,
}

/// Both services share the event types; each registers only its role.
fn model() -> kontext::Result<Model> {
    let mut m = ModelBuilder::new();
    m.topic::<ShipmentCreatedEvent>(|t| {
        t.consumer(|c| {
            c.group("identity-api-shipmentcreated-consumer")
                // De-duplicate by shipment: a shipment announced twice (a
                // retried publish has a new message id) takes effect once.
                .inbox(|i| {
                    i.consumer_name("identity-api")
                        .key_by(|e: &ShipmentCreatedEvent| e.shipment_id.clone())
                })
        })
    });
    m.topic::<UserActivityRecorded>(|t| t);
    Ok(m.build()?)
}

const SHIPMENTS: i64 = 200;

async fn database(service: &str) -> kontext::Result<DatabaseConnection> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let path = std::env::temp_dir().join(format!(
                "kontext-{service}-{}.db",
                uuid::Uuid::now_v7().simple()
            ));
            format!("sqlite://{}?mode=rwc", path.display())
        }
    };
    kontext::db::connect(&url).await
}

fn sql(backend: DbBackend, sqlite: &str) -> String {
    // Positional parameters are `$n` on PostgreSQL and `?` on SQLite.
    if backend == DbBackend::Postgres {
        let mut n = 0;
        sqlite
            .chars()
            .map(|c| {
                if c == '?' {
                    n += 1;
                    format!("${n}")
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        sqlite.to_owned()
    }
}

async fn count(db: &DatabaseConnection, table: &str) -> Result<i64, Box<dyn std::error::Error>> {
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await?
        .ok_or("no count")?;
    Ok(row.try_get::<i64>("", "n")?)
}

/// Keeps finished spans in memory (an application would export them to a
/// collector with `opentelemetry-otlp` instead).
#[derive(Clone, Debug, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .append(&mut batch);
        Ok(())
    }
}

impl Collected {
    /// The spans of `trace` as an indented tree, each with its service
    /// (the `ce_source`-like client of the span, when kontext knows it).
    fn tree(&self, trace: TraceId) -> Vec<String> {
        let spans: Vec<SpanData> = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .cloned()
            .collect();
        let mut lines = Vec::new();
        fn walk(spans: &[SpanData], parent: SpanId, depth: usize, lines: &mut Vec<String>) {
            let mut children: Vec<&SpanData> = spans
                .iter()
                .filter(|s| s.parent_span_id == parent)
                .collect();
            children.sort_by_key(|s| s.start_time);
            for s in children {
                let topic = s
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "messaging.destination.name")
                    .map(|kv| format!(" ({})", kv.value.as_str()))
                    .unwrap_or_default();
                lines.push(format!("{}{}{topic}", "  ".repeat(depth), s.name));
                walk(spans, s.span_context.span_id(), depth + 1, lines);
            }
        }
        walk(&spans, SpanId::INVALID, 1, &mut lines);
        lines
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Logs as before; spans also go to OpenTelemetry (kontext's own spans
    // are at DEBUG), with W3C trace context in message headers.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collected.clone())
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("shipping-identity"))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("kontext", tracing::Level::DEBUG)
                .with_target("shipping_identity", tracing::Level::INFO),
        );
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        ))
        .with(otel)
        .init();
    let mut settings = KafkaSettings::from_env()?;
    // A demo: both services in this process may share the embedded broker,
    // PostgreSQL or not (a service would leave this to its settings).
    settings.embedded_broker.get_or_insert(true);
    let broker = Broker::from_settings(&settings)?;
    let shipping_db = database("shipping").await?;
    let identity_db = database("identity").await?;
    // The demo's own tables, emptied so a rerun on the same PostgreSQL
    // database starts clean; shipment ids carry a per-run prefix so the
    // identity inbox of an earlier run does not take them for duplicates.
    for (db, ddl, clear) in [
        (
            &shipping_db,
            "CREATE TABLE IF NOT EXISTS demo_shipment (id TEXT PRIMARY KEY, user_id BIGINT NOT NULL)",
            "DELETE FROM demo_shipment",
        ),
        (
            &identity_db,
            "CREATE TABLE IF NOT EXISTS demo_user_activity (user_id BIGINT NOT NULL, activity TEXT NOT NULL)",
            "DELETE FROM demo_user_activity",
        ),
    ] {
        db.execute_unprepared(ddl).await?;
        db.execute_unprepared(clear).await?;
    }
    let run = uuid::Uuid::now_v7().simple().to_string()[24..].to_owned();

    // The identity service: consumes with inbox + unit of work.
    let identity = Kontext::builder(model()?)
        .settings(settings.clone().client_id("identity-api"))
        .broker(broker.clone())
        .database(identity_db.clone())
        .consumers(|c| {
            c.transactional(
                |e: ShipmentCreatedEvent, _ctx: MessageContext, uow: UnitOfWork| async move {
                    let activity = format!("shipment {} created", e.shipment_id);
                    uow.execute(Statement::from_sql_and_values(
                        uow.get_database_backend(),
                        sql(
                            uow.get_database_backend(),
                            "INSERT INTO demo_user_activity (user_id, activity) VALUES (?, ?)",
                        ),
                        [e.user_id.into(), activity.clone().into()],
                    ))
                    .await?;
                    uow.publish(&UserActivityRecorded {
                        user_id: e.user_id,
                        activity,
                    })
                    .await
                    .map_err(HandlerError::retry)?;
                    Ok(())
                },
            );
        })
        .start()
        .await?;

    // The shipping service: business row and event in one transaction.
    let shipping = Kontext::builder(model()?)
        .settings(settings.clone().client_id("shipping-api"))
        .broker(broker.clone())
        .database(shipping_db.clone())
        .start()
        .await?;
    let started = Instant::now();
    let outbox = shipping.outbox()?;
    let backend = shipping_db.get_database_backend();
    let mut traced = None;
    for i in 0..SHIPMENTS {
        let shipment_id = format!("shp-{run}-{i:05}");
        // The first request is traced, as an HTTP layer would trace each.
        let span = if i == 0 {
            let span = tracing::info_span!("shipping.create_shipment", shipment_id);
            traced = Some(span.context().span().span_context().trace_id());
            span
        } else {
            tracing::Span::none()
        };
        async {
            let mut tx = outbox.begin().await?;
            tx.execute(Statement::from_sql_and_values(
                backend,
                sql(
                    backend,
                    "INSERT INTO demo_shipment (id, user_id) VALUES (?, ?)",
                ),
                [shipment_id.clone().into(), (i % 20).into()],
            ))
            .await?;
            tx.publish(&ShipmentCreatedEvent {
                shipment_id,
                user_id: i % 20,
                warehouse: "ams-1".into(),
            })
            .await?;
            tx.commit().await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        }
        .instrument(span)
        .await?;
    }
    // A shipment whose transaction rolls back: neither row nor event exists.
    let mut tx = outbox.begin().await?;
    tx.publish(&ShipmentCreatedEvent {
        shipment_id: format!("shp-{run}-rolled-back"),
        user_id: 0,
        warehouse: "ams-1".into(),
    })
    .await?;
    tx.rollback().await?;

    // The shipping service announces the first shipment again (a retried
    // publish): identity's inbox recognises it.
    let mut tx = outbox.begin().await?;
    tx.publish(&ShipmentCreatedEvent {
        shipment_id: format!("shp-{run}-00000"),
        user_id: 0,
        warehouse: "ams-1".into(),
    })
    .await?;
    tx.commit().await?;

    let deadline = Instant::now() + Duration::from_secs(60);
    let done = || {
        identity
            .registry()
            .type_status::<ShipmentCreatedEvent>()
            .map(|s| s.handled + s.duplicates)
            .unwrap_or(0)
    };
    while done() < SHIPMENTS as u64 + 1 {
        if Instant::now() > deadline {
            return Err(format!("only {} of {} events handled", done(), SHIPMENTS + 1).into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let status = identity.registry().type_status::<ShipmentCreatedEvent>()?;
    identity.shutdown(Duration::from_secs(10)).await?;
    shipping.shutdown(Duration::from_secs(10)).await?;

    println!(
        "shipping stored: {} shipments, {} outbox rows still pending",
        count(&shipping_db, "demo_shipment").await?,
        count(&shipping_db, "kontext_outbox").await?
    );
    println!(
        "identity stored: {} user-activity rows, {} inbox rows, {} follow-up events still in its outbox",
        count(&identity_db, "demo_user_activity").await?,
        count(
            &identity_db,
            &format!("kontext_inbox WHERE dedup_key LIKE 'shp-{run}-%'")
        )
        .await?,
        count(&identity_db, "kontext_outbox").await?
    );
    println!(
        "identity handled {} events ({} duplicates acknowledged) in {elapsed:.2?} from first commit to last handling",
        status.handled, status.duplicates
    );
    provider.force_flush()?;
    if let Some(trace) = traced {
        let tree = collected.tree(trace);
        println!("trace {trace} of the first shipment, across both services:");
        for line in &tree {
            println!("{line}");
        }
        if !tree.iter().any(|l| l.contains("kontext.process")) {
            return Err("the identity service's handling is not in the shipment's trace".into());
        }
    }
    provider.shutdown()?;
    Ok(())
}
