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

/// What the derive expands to, checked where it compiles: every attribute
/// (the `tests/ui` snapshots check what it refuses).
mod expansion {
    use kontext::{ModelBuilder, Topic};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Topic)]
    #[topic(
        name = "orders.order.created",
        key = order_id,
        header(region),
        type_name = "OrderCreatedV2",
        partitions = 6,
        replication = 3
    )]
    struct OrderCreated {
        order_id: u64,
        region: String,
        #[topic(header = "x-tenant")]
        tenant: String,
    }

    #[derive(Serialize, Deserialize, Topic)]
    struct ShipmentDelivered {
        #[topic(key)]
        id: uuid::Uuid,
    }

    #[test]
    fn every_attribute_of_the_derive_expands_to_its_constants_key_and_headers() {
        assert_eq!(OrderCreated::NAME, "orders.order.created");
        assert_eq!(OrderCreated::TYPE_NAME, "OrderCreatedV2");
        assert_eq!(OrderCreated::PARTITIONS, Some(6));
        assert_eq!(ShipmentDelivered::NAME, "shipment-delivered");
        assert_eq!(ShipmentDelivered::TYPE_NAME, "ShipmentDelivered");
        let e = OrderCreated {
            order_id: 7,
            region: "eu".into(),
            tenant: "t1".into(),
        };
        let mut key = Vec::new();
        assert!(e.write_key(&mut key));
        assert_eq!(key, b"7");
        let mut headers = Vec::new();
        e.headers(&mut headers);
        assert_eq!(
            headers,
            vec![("region", "eu".to_owned()), ("x-tenant", "t1".to_owned())]
        );
        let model = ModelBuilder::new()
            .topic::<OrderCreated>(|t| t)
            .topic::<ShipmentDelivered>(|t| t)
            .build()
            .unwrap();
        assert_eq!(
            model.topic_of::<ShipmentDelivered>(),
            Some("shipment-delivered")
        );
    }
}

/// A service that re-exports kontext under another path.
mod reexported {
    mod infra {
        pub(super) use kontext as messaging;
    }

    use infra::messaging::Topic;

    #[derive(serde::Serialize, serde::Deserialize, Topic)]
    #[topic(crate = "infra::messaging", name = "audit.log")]
    struct AuditLogged {
        line: String,
    }

    #[test]
    fn a_crate_that_reexports_kontext_names_it_with_crate() {
        assert_eq!(<AuditLogged as infra::messaging::Topic>::NAME, "audit.log");
    }
}
