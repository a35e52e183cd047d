//! Scenario 1, produce: typed `produce_batch` and `produce` against raw
//! `FutureProducer` sends with the same headers, and without.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use kontext::prelude::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::harness::*;

/// Raw rdkafka, one call per message: what a service awaiting each send
/// writes. `FutureProducer::send` per message (it waits for queue room
/// itself), the same headers, every future joined: the like-for-like
/// baseline for kontext's one `produce` call per message.
pub(crate) async fn raw_produce_each(
    producer: &FutureProducer,
    topic: &str,
    events: &[OrderPlaced],
) -> Result<u64, BoxError> {
    let calls = events.iter().map(|e| async move {
        let payload = serde_json::to_vec(e)?;
        let record = FutureRecord::to(topic)
            .key(e.order_id.as_str())
            .payload(payload.as_slice())
            .headers(ce_headers());
        // The delivery (partition, offset) is what a caller gets back, as
        // kontext's `produce` returns its own.
        let delivery = producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| e)?;
        Ok::<_, BoxError>(delivery)
    });
    Ok(futures::future::try_join_all(calls).await?.len() as u64)
}

pub(crate) async fn scenario_produce(b: &Bench, n: u64, rounds: usize) -> Result<(), BoxError> {
    let events = Arc::new(events(n));
    let (mut raw, mut raw_h, mut raw_each, mut batch, mut single) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut raw_lean, mut lean) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // 32 partitions keep each under the mock's 5 MiB per partition.
        let (raw_topic, raw_h_topic, raw1_topic, k_topic, k1_topic) = (
            unique_name("bench-raw"),
            unique_name("bench-rawh"),
            unique_name("bench-raw1"),
            unique_name("bench-kx"),
            unique_name("bench-kx1"),
        );
        let (raw_l_topic, kl_topic) = (unique_name("bench-rawl"), unique_name("bench-kxl"));
        for t in [
            &raw_topic,
            &raw_h_topic,
            &raw1_topic,
            &k_topic,
            &k1_topic,
            &raw_l_topic,
            &kl_topic,
        ] {
            b.create_topic(t, 32).await?;
        }
        let producer: FutureProducer = b
            .settings
            .producer_config(b.broker.bootstrap_servers())
            .create()?;
        let kontext = Kontext::builder(b.model(&k_topic, 32, None)?)
            .settings(b.settings.clone().provision_topics(false))
            .broker(b.broker.clone())
            .producer()
            .start()
            .await?;
        let k = kontext.producer()?;
        // Its own topic for the one-call-per-message run.
        let kontext1 = Kontext::builder(b.model(&k1_topic, 32, None)?)
            .settings(b.settings.clone().provision_topics(false))
            .broker(b.broker.clone())
            .producer()
            .start()
            .await?;
        let k1 = kontext1.producer()?;
        // The same type with the lean header profile, on its own topic.
        let lean_model = Model::builder()
            .topic::<OrderPlaced>(|t| {
                t.name(&kl_topic)
                    .partitions(32)
                    .key_ref(|e| &e.order_id)
                    .header_profile(kontext::HeaderProfile::Lean)
            })
            .build()?;
        let kontext_l = Kontext::builder(lean_model)
            .settings(b.settings.clone().provision_topics(false))
            .broker(b.broker.clone())
            .producer()
            .start()
            .await?;
        let kl = kontext_l.producer()?;
        let order: [u8; 7] = if round % 2 == 0 {
            [0, 1, 2, 3, 4, 5, 6]
        } else {
            [6, 5, 4, 3, 2, 1, 0]
        };
        let names = [
            "raw",
            "raw-headers",
            "batch",
            "single",
            "raw-each",
            "raw-lean",
            "lean",
        ];
        for side in order.into_iter().filter(|s| wanted(names[*s as usize])) {
            match side {
                0 => raw.push(
                    measure(|| raw_produce(&producer, &raw_topic, &events, order_key)).await?,
                ),
                1 => raw_h.push(
                    measure(|| {
                        raw_produce_with(
                            &producer,
                            &raw_h_topic,
                            &events,
                            order_key,
                            Headers::CloudEvents,
                        )
                    })
                    .await?,
                ),
                5 => raw_lean.push(
                    measure(|| {
                        raw_produce_with(&producer, &raw_l_topic, &events, order_key, Headers::Lean)
                    })
                    .await?,
                ),
                6 => lean.push(
                    measure(|| async { Ok(kl.produce_batch(events.iter()).await?.len() as u64) })
                        .await?,
                ),
                2 => batch.push(
                    measure(|| async { Ok(k.produce_batch(events.iter()).await?.len() as u64) })
                        .await?,
                ),
                4 => raw_each
                    .push(measure(|| raw_produce_each(&producer, &raw1_topic, &events)).await?),
                _ => single.push(
                    measure(|| async {
                        let calls = events.iter().map(|e| k1.produce(e).into_future());
                        Ok(futures::future::try_join_all(calls).await?.len() as u64)
                    })
                    .await?,
                ),
            }
        }
        kontext.shutdown(Duration::from_secs(10)).await?;
        kontext1.shutdown(Duration::from_secs(10)).await?;
        kontext_l.shutdown(Duration::from_secs(10)).await?;
    }
    report(
        &format!("produce {n} (batch), raw with the same 6 headers"),
        &raw_h,
        &batch,
    );
    report(
        &format!("produce {n} (batch), raw without headers"),
        &raw,
        &batch,
    );
    report(
        &format!("produce {n} (one call per message), raw: one send per message, same headers"),
        &raw_each,
        &single,
    );
    report(
        &format!("produce {n} (batch), lean headers, raw with the same 2 headers"),
        &raw_lean,
        &lean,
    );
    report(
        &format!("produce {n} (batch), lean headers, raw without headers"),
        &raw,
        &lean,
    );

    Ok(())
}
