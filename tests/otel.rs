//! The `opentelemetry` feature: the current span's context goes into what
//! kontext produces, and the consumer's process span continues that trace,
//! directly and through the outbox.
#![cfg(feature = "opentelemetry")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kontext::prelude::*;
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Keeps every finished span.
#[derive(Clone, Debug, Default)]
struct Exported(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Exported {
    async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().append(&mut batch);
        Ok(())
    }
}

impl Exported {
    /// Trace ids of the finished process spans of `topic`.
    fn processed(&self, topic: &str) -> Vec<TraceId> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                s.name == "kontext.process"
                    && s.attributes.iter().any(|kv| {
                        kv.key.as_str() == "messaging.destination.name"
                            && kv.value.as_str() == topic
                    })
            })
            .map(|s| s.span_context.trace_id())
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Invoice {
    n: u32,
}

async fn wait_for(exported: &Exported, topic: &str) -> TraceId {
    wait_until(&format!("a process span for {topic}"), async || {
        exported
            .processed(topic)
            .first()
            .copied()
            .ok_or_else(String::new)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_span_continues_the_trace_of_the_span_that_produced_or_wrote_the_row() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exported = Exported::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    let tracer = provider.tracer("kontext-test");
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer)),
    )
    .unwrap();

    let broker = broker();
    let db = kontext::testing::database().await.unwrap();
    let (orders, invoices, group) = (
        unique_name("orders"),
        unique_name("invoices"),
        unique_name("g"),
    );
    let model = Model::builder()
        .topic::<Order>(|t| t.name(&orders).partitions(1).key(|e| e.n).consumer(|c| c))
        .topic::<Invoice>(|t| t.name(&invoices).partitions(1).key(|e| e.n).consumer(|c| c))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .database(db)
        .producer()
        .consumers(|c| {
            c.handler(|_: Order, _: MessageContext| async { Ok(()) })
                .handler(|_: Invoice, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap();

    // Produced inside a request's span.
    let request = tracing::info_span!("request");
    let request_trace = request.context().span().span_context().trace_id();
    let p = kontext.producer().unwrap();
    p.produce(&Order { n: 1 })
        .into_future()
        .instrument(request)
        .await
        .unwrap();

    // Written to the outbox inside a business span; sent by the relay.
    let business = tracing::info_span!("business");
    let business_trace = business.context().span().span_context().trace_id();
    let outbox = kontext.outbox().unwrap();
    async {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&Invoice { n: 1 }).await.unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(business)
    .await;

    assert_eq!(wait_for(&exported, &orders).await, request_trace);
    assert_eq!(wait_for(&exported, &invoices).await, business_trace);
    assert_ne!(request_trace, business_trace);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
    let _ = provider.shutdown();
}
