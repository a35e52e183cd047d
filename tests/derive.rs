//! A derived type round-trips through the broker with the derived topic,
//! key and headers, and the builder can override them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, Topic)]
#[topic(name = "kx-derive.shipment.created", key = shipment_id, type_name = "ShipmentCreatedV2", partitions = 3)]
struct ShipmentCreated {
    shipment_id: u64,
    #[topic(header = "x-tenant")]
    tenant: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Topic)]
struct AuditLogged {
    #[topic(key)]
    line: String,
    /// A raw identifier: the header is `type`, not `r#type`.
    #[topic(header)]
    r#type: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derived_type_round_trips_with_its_topic_key_and_headers() {
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let model = Model::builder()
        .topic::<ShipmentCreated>(|t| t)
        .topic::<AuditLogged>(|t| t.name(unique_name("audit")))
        .build()
        .unwrap();
    assert_eq!(
        model.topic_of::<ShipmentCreated>(),
        Some("kx-derive.shipment.created")
    );
    assert_eq!(model.topics()[0].partitions(), 3);
    let audit_topic = model.topic_of::<AuditLogged>().unwrap().to_owned();
    assert_ne!(
        audit_topic, "audit-logged",
        "the builder overrides the derived default"
    );

    let kontext = Kontext::builder(model)
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let p = kontext.producer().unwrap();
    let d = p
        .produce(&ShipmentCreated {
            shipment_id: 42,
            tenant: "eu".into(),
        })
        .await
        .unwrap();
    assert_eq!(&*d.topic, "kx-derive.shipment.created");
    p.produce(&AuditLogged {
        line: "hello".into(),
        r#type: "login".into(),
    })
    .await
    .unwrap();

    let records = read_topic(
        &broker,
        "kx-derive.shipment.created",
        1,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let r = &records[0];
    assert_eq!(r.key_str(), Some("42"));
    assert_eq!(r.header("x-tenant"), Some("eu"));
    assert_eq!(r.header("ce_type"), Some("ShipmentCreatedV2"));
    let back: ShipmentCreated = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
    assert_eq!(
        back,
        ShipmentCreated {
            shipment_id: 42,
            tenant: "eu".into()
        }
    );

    let audit = read_topic(&broker, &audit_topic, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(audit[0].key_str(), Some("hello"));
    assert_eq!(audit[0].header("ce_type"), Some("AuditLogged"));
    assert_eq!(
        audit[0].header("type"),
        Some("login"),
        "{:?}",
        audit[0].headers
    );
    assert_eq!(audit[0].header("r#type"), None);
}
