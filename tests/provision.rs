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
    assert_eq!(first.mock_cluster, !external(), "a real broker is no mock");

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

/// An existing topic is left as it is, and every declared difference is
/// reported: partitions, replication and configs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_topic_that_differs_is_reported_and_left_unchanged() {
    init_tracing();
    if !external() {
        eprintln!("skipped: the embedded cluster cannot describe topic configs");
        return;
    }
    let topic = unique_name("shipping.shipment.created");
    let broker = broker();
    let settings = KafkaSettings::new();
    let original = Model::builder()
        .topic::<ShipmentCreated>(|t| {
            t.name(&topic)
                .partitions(2)
                .replication(1)
                .config("retention.ms", "3600000")
                .config("cleanup.policy", "delete")
        })
        .build()
        .unwrap();
    let first = provision_topics(&broker, &settings, &original)
        .await
        .unwrap();
    assert_eq!(first.created, vec![topic.clone()]);

    let same = provision_topics(&broker, &settings, &original)
        .await
        .unwrap();
    assert!(same.config_mismatches.is_empty(), "{same:?}");
    assert!(same.partition_mismatches.is_empty(), "{same:?}");

    let changed = Model::builder()
        .topic::<ShipmentCreated>(|t| {
            t.name(&topic)
                .partitions(3)
                .replication(1)
                .config("retention.ms", "7200000")
                .config("cleanup.policy", "delete")
        })
        .build()
        .unwrap();
    let report = provision_topics(&broker, &settings, &changed)
        .await
        .unwrap();
    assert_eq!(report.existing, vec![topic.clone()]);
    assert_eq!(report.partition_mismatches, vec![(topic.clone(), 3, 2)]);
    assert_eq!(
        report.config_mismatches,
        vec![kontext::broker::ConfigMismatch {
            topic: topic.clone(),
            setting: "retention.ms".into(),
            declared: "7200000".into(),
            actual: Some("3600000".into()),
        }]
    );
    // Left unchanged: asking with the original model again finds no difference.
    let again = provision_topics(&broker, &settings, &original)
        .await
        .unwrap();
    assert!(again.config_mismatches.is_empty(), "{again:?}");
    assert!(again.partition_mismatches.is_empty(), "{again:?}");
}
