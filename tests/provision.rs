//! Topic provisioning against the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use kontext::broker::provision_topics;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct ShipmentCreated {
    id: u64,
}

#[derive(Serialize, Deserialize)]
struct ShipmentDelivered {
    id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_twice_creates_once_and_changes_nothing() {
    init_tracing();
    let created_topic = unique_name("shipping.shipment.created");
    let delivered_topic = unique_name("shipping.shipment.delivered");
    let model = Model::builder()
        .topic::<ShipmentCreated>(|t| t.name(&created_topic).partitions(4).key(|e| e.id))
        .topic::<ShipmentDelivered>(|t| t.name(&delivered_topic).partitions(2))
        .build()
        .unwrap();
    let broker = broker();
    let settings = KafkaSettings::new();

    let first = provision_topics(&broker, &settings, &model).await.unwrap();
    assert_eq!(
        first.created,
        vec![created_topic.clone(), delivered_topic.clone()]
    );
    assert!(first.existing.is_empty());

    let second = provision_topics(&broker, &settings, &model).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(
        second.existing,
        vec![created_topic.clone(), delivered_topic.clone()]
    );
    assert!(second.partition_mismatches.is_empty(), "{second:?}");

    // The topics have the declared partitions: a record to partition 3 of the
    // 4-partition topic lands there.
    let kontext = Kontext::builder(model)
        .broker(broker)
        .producer()
        .start()
        .await
        .unwrap();
    assert_eq!(
        kontext.provisioned().unwrap().existing.len(),
        2,
        "start-up provisioning is idempotent too"
    );
    let mut partitions = std::collections::BTreeSet::new();
    for id in 0..64 {
        let d = kontext
            .producer()
            .unwrap()
            .produce(&ShipmentCreated { id })
            .await
            .unwrap();
        partitions.insert(d.partition);
    }
    assert_eq!(partitions.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_can_be_turned_off() {
    init_tracing();
    let topic = unique_name("off");
    let model = Model::builder()
        .topic::<ShipmentCreated>(|t| t.name(&topic))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .settings(KafkaSettings::new().provision_topics(false))
        .broker(broker())
        .start()
        .await
        .unwrap();
    assert!(kontext.provisioned().is_none());
}
