//! The dev broker: the embedded cluster on a loopback address, reached by
//! clients as an external broker (as a second process would reach it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use kontext::broker::DevBroker;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct ParcelScanned {
    parcel: u32,
    seq: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct ParcelLost {
    parcel: u32,
}

fn model(scanned: &str, lost: &str) -> Model {
    Model::builder()
        .topic::<ParcelScanned>(|t| t.name(scanned).partitions(3).key(|e| e.parcel))
        .topic::<ParcelLost>(|t| t.name(lost))
        .build()
        .unwrap()
}

/// Provisioning against a mock cluster fails at once and says why (the
/// mock has no CreateTopics), naming the missing topics; once the dev
/// broker created them, clients of the listening address produce and
/// consume through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_the_dev_broker_by_its_address_and_provisioning_explains_the_mock() {
    init_tracing();
    let dev = DevBroker::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address = dev.address().to_string();
    let (scanned, lost) = (unique_name("parcel.scanned"), unique_name("parcel.lost"));
    let settings = KafkaSettings::new().bootstrap_servers(&address);

    let refused = Kontext::builder(model(&scanned, &lost))
        .settings(settings.clone())
        .producer()
        .start()
        .await
        .expect_err("the mock cannot create topics");
    let message = refused.to_string();
    assert!(
        message.contains("does not support CreateTopics"),
        "{message}"
    );
    assert!(
        message.contains(&scanned) && message.contains(&lost),
        "{message}"
    );
    assert!(message.contains(&address), "{message}");

    let report = dev
        .create_topics(&model(&scanned, &lost), &KafkaSettings::new())
        .await
        .unwrap();
    assert_eq!(
        report.created,
        vec![
            scanned.clone(),
            lost.clone(),
            format!("{scanned}.dlq"),
            format!("{lost}.dlq")
        ]
    );

    let producer = Kontext::builder(model(&scanned, &lost))
        .settings(settings.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let provisioned = producer.provisioned().unwrap();
    assert_eq!(provisioned.existing, vec![scanned.clone(), lost.clone()]);
    assert!(provisioned.created.is_empty());
    assert!(
        provisioned.partition_mismatches.is_empty(),
        "{provisioned:?}"
    );

    let group = unique_name("parcel-scanner");
    let consumer = Kontext::builder(model(&scanned, &lost))
        .settings(
            settings
                .clone()
                .consumer(|c| c.group_id = Some(group.clone())),
        )
        .consumers(|c| {
            c.stream::<ParcelScanned>();
        })
        .start()
        .await
        .unwrap();
    let mut stream = consumer.stream::<ParcelScanned>().unwrap();
    // Recognised as a mock: its consumers get the embedded broker's short
    // fetch wait (the mock answers a waiting fetch only when it expires).
    assert!(consumer.provisioned().unwrap().mock_cluster);
    let service = &consumer.registry().services()[0];
    assert!(
        service
            .settings
            .contains(&("fetch.wait.max.ms".to_owned(), "10".to_owned())),
        "{:?}",
        service.settings
    );

    let events: Vec<ParcelScanned> = (0..60)
        .map(|i| ParcelScanned {
            parcel: i % 6,
            seq: i / 6,
        })
        .collect();
    let deliveries = producer
        .producer()
        .unwrap()
        .produce_batch(&events)
        .await
        .unwrap();
    assert!(deliveries.iter().all(|d| (0..3).contains(&d.partition)));

    // Every event arrives once, each parcel's in the order produced.
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); 6];
    let mut received = 0;
    while received < events.len() {
        let item = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("events arrive through the dev broker")
            .expect("the stream stays open");
        seen[item.message.parcel as usize].push(item.message.seq);
        received += 1;
        item.ack();
    }
    for (parcel, seqs) in seen.iter().enumerate() {
        assert_eq!(seqs, &(0..10).collect::<Vec<_>>(), "parcel {parcel}");
    }

    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
    dev.stop().await;
}

/// The address is the dev broker's: a second one on it is refused clearly.
#[tokio::test]
async fn a_taken_address_is_a_clear_error() {
    let first = DevBroker::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let second = DevBroker::start(first.address()).await.unwrap_err();
    let message = second.to_string();
    assert!(
        message.contains(&first.address().to_string()) && message.contains("could not listen"),
        "{message}"
    );
    first.stop().await;
}
