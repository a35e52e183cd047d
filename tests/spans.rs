//! The spans kontext creates, with OpenTelemetry's messaging attributes,
//! read back through a recording subscriber installed for this binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// One span: its name and the fields it got, as text.
#[derive(Debug, Clone, Default)]
struct Recorded {
    name: &'static str,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<BTreeMap<u64, Recorded>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut r = Recorded {
            name: attrs.metadata().name(),
            ..Recorded::default()
        };
        attrs.record(&mut Fields(&mut r.fields));
        self.0.lock().unwrap().insert(id.into_u64(), r);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(r) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut r.fields));
        }
    }
}

impl Spans {
    fn named(&self, name: &str, topic: &str) -> Vec<Recorded> {
        self.0
            .lock()
            .unwrap()
            .values()
            .filter(|r| {
                r.name == name
                    && r.fields
                        .get("messaging.destination.name")
                        .map(String::as_str)
                        == Some(topic)
            })
            .cloned()
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipped {
    n: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_process_commit_and_relay_spans_carry_messaging_attributes() {
    let spans = Spans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();
    let broker = broker();
    let db = kontext::testing::database().await.unwrap();
    let (orders, shipped, group) = (
        unique_name("orders"),
        unique_name("shipped"),
        unique_name("g"),
    );
    let model = Model::builder()
        .topic::<Order>(|t| t.name(&orders).partitions(1).key(|e| e.n).consumer(|c| c))
        .topic::<Shipped>(|t| t.name(&shipped).partitions(1).key(|e| e.n))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .database(db)
        .producer()
        .consumers(|c| {
            c.transactional(|e: Order, _: MessageContext, uow: UnitOfWork| async move {
                uow.publish(&Shipped { n: e.n })
                    .await
                    .map_err(HandlerError::retry)?;
                Ok(())
            });
        })
        .start()
        .await
        .unwrap();
    let p = kontext.producer().unwrap();
    p.produce(&Order { n: 0 }).await.unwrap();
    p.produce_batch(&[Order { n: 1 }, Order { n: 2 }])
        .await
        .unwrap();
    read_topic(&broker, &shipped, 3, READ_TIMEOUT)
        .await
        .unwrap();
    let deadline = Instant::now() + READ_TIMEOUT;
    while spans.named("kontext.uow.commit", &orders).len() < 3 {
        assert!(Instant::now() < deadline, "no commit spans");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();

    let published = spans.named("kontext.publish", &orders);
    assert_eq!(published.len(), 3, "{published:?}");
    let mut offsets: Vec<String> = published
        .iter()
        .map(|s| {
            assert_eq!(s.fields["messaging.system"], "kafka");
            assert_eq!(s.fields["messaging.operation.type"], "publish");
            assert_eq!(s.fields["messaging.destination.partition.id"], "0");
            assert_eq!(s.fields["messaging.message.id"].len(), 36);
            s.fields["messaging.kafka.offset"].clone()
        })
        .collect();
    offsets.sort();
    assert_eq!(offsets, ["0", "1", "2"], "recorded at delivery");

    let processed = spans.named("kontext.process", &orders);
    assert_eq!(processed.len(), 3, "{processed:?}");
    for s in &processed {
        assert_eq!(s.fields["messaging.operation.type"], "process");
        assert_eq!(s.fields["kontext.attempt"], "1");
        assert_eq!(s.fields["kontext.type"], "Order");
    }
    let sends: Vec<Recorded> = spans
        .0
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.name == "kontext.relay.send")
        .cloned()
        .collect();
    let sent: u32 = sends
        .iter()
        .filter_map(|s| s.fields.get("kontext.sent")?.parse::<u32>().ok())
        .sum();
    assert_eq!(sent, 3, "the relay sent the three rows: {sends:?}");
}
