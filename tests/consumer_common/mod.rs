//! What the consumer tests share: the order model and its types, a
//! recording of what handlers saw, producers and consumers set up the same
//! way.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use kontext::prelude::*;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OrderCreated {
    pub(crate) order: u32,
    pub(crate) seq: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OrderPaid {
    pub(crate) order: u32,
    pub(crate) seq: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Alert {
    pub(crate) n: u32,
}

/// One handled message: `(type, key, seq, partition, offset)`.
pub(crate) type Handled = (&'static str, u32, u32, i32, i64);

/// What handlers saw, in handling order.
#[derive(Clone, Default)]
pub(crate) struct Seen {
    pub(crate) inner: Arc<Mutex<Vec<Handled>>>,
}

impl Seen {
    pub(crate) fn push(&self, kind: &'static str, key: u32, seq: u32, ctx: &MessageContext) {
        self.inner
            .lock()
            .unwrap()
            .push((kind, key, seq, ctx.partition(), ctx.offset()));
    }
    pub(crate) fn count(&self, kind: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.0 == kind)
            .count()
    }
    pub(crate) fn all(&self) -> Vec<Handled> {
        self.inner.lock().unwrap().clone()
    }
    /// A handler that records `kind` with the `(key, seq)` that `parts`
    /// reads; with a gate, it first waits for one of its permits.
    pub(crate) fn handler<T: Message>(
        &self,
        kind: &'static str,
        parts: fn(&T) -> (u32, u32),
        gate: Option<Arc<Semaphore>>,
    ) -> impl Handler<T> {
        let seen = self.clone();
        move |e: T, ctx: MessageContext| {
            let (seen, gate) = (seen.clone(), gate.clone());
            async move {
                if let Some(g) = gate {
                    g.acquire().await.unwrap().forget();
                }
                let (key, seq) = parts(&e);
                seen.push(kind, key, seq, &ctx);
                Ok(())
            }
        }
    }

    pub(crate) async fn wait_for(&self, kind: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count(kind) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

/// `OrderCreated` for each seq of `seqs`, over `keys` orders.
pub(crate) fn created_batch(seqs: std::ops::Range<u32>, keys: u32) -> Vec<OrderCreated> {
    seqs.map(|seq| OrderCreated {
        order: seq % keys,
        seq,
    })
    .collect()
}

pub(crate) fn orders_model(
    topic: &str,
    alerts: &str,
    partitions: i32,
    f: impl Fn(kontext::consumer::ConsumerBuilder) -> kontext::consumer::ConsumerBuilder + Clone,
) -> Model {
    let (f1, f2, f3) = (f.clone(), f.clone(), f);
    Model::builder()
        .topic::<OrderCreated>(|t| {
            t.name(topic)
                .partitions(partitions)
                .key(|e| e.order)
                .consumer(f1)
        })
        .topic::<OrderPaid>(|t| t.name(topic).key(|e| e.order).consumer(f2))
        .topic::<Alert>(|t| t.name(alerts).partitions(2).key(|e| e.n).consumer(f3))
        .build()
        .unwrap()
}

/// Fresh names for `orders_model`'s two topics and a consumer group.
pub(crate) fn order_names() -> (String, String, String) {
    (
        unique_name("orders"),
        unique_name("alerts"),
        unique_name("g"),
    )
}

pub(crate) async fn producer_for(model: &Model, broker: &Broker) -> Kontext {
    Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap()
}

/// Where the `orders_model` tests start: fresh names, the model over them
/// with `consumer` applied to every type, and a producer-only instance.
pub(crate) struct Orders {
    pub(crate) broker: Broker,
    pub(crate) topic: String,
    pub(crate) alerts: String,
    pub(crate) group: String,
    pub(crate) model: Model,
    pub(crate) producer: Kontext,
}

pub(crate) async fn orders(
    partitions: i32,
    consumer: impl Fn(kontext::consumer::ConsumerBuilder) -> kontext::consumer::ConsumerBuilder + Clone,
) -> Orders {
    init_tracing();
    let broker = broker();
    let (topic, alerts, group) = order_names();
    let model = orders_model(&topic, &alerts, partitions, consumer);
    let producer = producer_for(&model, &broker).await;
    Orders {
        broker,
        topic,
        alerts,
        group,
        model,
        producer,
    }
}

pub(crate) fn settings(group: &str) -> KafkaSettings {
    KafkaSettings::new().consumer(|c| c.group_id = Some(group.to_owned()))
}

/// A consumer of `OrderCreated` whose handler waits for a permit of the
/// returned semaphore before recording each message.
pub(crate) async fn gated_consumer(
    model: Model,
    broker: Broker,
    group: &str,
) -> (Kontext, Seen, Arc<Semaphore>) {
    gated_consumer_with(model, broker, settings(group)).await
}

/// [`gated_consumer`] with its own settings.
pub(crate) async fn gated_consumer_with(
    model: Model,
    broker: Broker,
    settings: KafkaSettings,
) -> (Kontext, Seen, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let seen = Seen::default();
    let (s1, g1) = (seen.clone(), gate.clone());
    let consumer = Kontext::builder(model)
        .settings(settings)
        .broker(broker)
        .consumers(move |c| {
            c.handler(s1.handler::<OrderCreated>("created", |e| (e.order, e.seq), Some(g1)));
        })
        .start()
        .await
        .unwrap();
    (consumer, seen, gate)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Job {
    pub(crate) id: u32,
    pub(crate) fail_times: u32,
    pub(crate) mode: String,
}

/// A handler of [`Job`] that records each job's id, in handling order.
pub(crate) struct RecordJobIds(pub(crate) Arc<Mutex<Vec<u32>>>);

impl Handler<Job> for RecordJobIds {
    async fn handle(&self, job: Job, _: MessageContext) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(job.id);
        Ok(())
    }
}

pub(crate) fn rdkafka_producer(broker: &Broker) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap()
}

pub(crate) async fn send_raw(
    p: &rdkafka::producer::FutureProducer,
    topic: &str,
    payload: Option<&[u8]>,
    kind: Option<&str>,
) {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut headers = OwnedHeaders::new();
    if let Some(k) = kind {
        headers = headers.insert(Header {
            key: "ce_type",
            value: Some(k),
        });
    }
    let mut record: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
        rdkafka::producer::FutureRecord::to(topic)
            .headers(headers)
            .key(&b"raw"[..]);
    if let Some(p) = payload {
        record = record.payload(p);
    }
    p.send(record, Duration::from_secs(10)).await.unwrap();
}

/// A member of `group` whose `OrderCreated` handler takes `delay` and
/// records each message in `seen` under `member`.
pub(crate) async fn member(
    o: &Orders,
    (property, value): (&str, &str),
    seen: &Seen,
    member: &'static str,
    delay: Duration,
) -> Kontext {
    let s = seen.clone();
    Kontext::builder(o.model.clone())
        .settings(settings(&o.group).consumer(|c| c.librdkafka.set(property, value)))
        .broker(o.broker.clone())
        .consumers(move |c| {
            c.handler(move |e: OrderCreated, ctx: MessageContext| {
                let s = s.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    s.push(member, e.order, e.seq, &ctx);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap()
}

/// Sets its flag when dropped: shows that a handler's future was dropped.
pub(crate) struct DropFlag(pub(crate) Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Starts a consumer of `OrderCreated` in `group` that records what it sees.
pub(crate) async fn recording_consumer(
    model: &Model,
    broker: &Broker,
    group: &str,
    seen: &Seen,
    delay: Duration,
) -> Kontext {
    let s = seen.clone();
    Kontext::builder(model.clone())
        .settings(settings(group).consumer(|c| c.librdkafka.set("auto.commit.interval.ms", "100")))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |e: OrderCreated, ctx: MessageContext| {
                let s = s.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    s.push("created", e.order, e.seq, &ctx);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap()
}
