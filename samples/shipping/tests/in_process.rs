//! Both services in one process, tested with kontext's test helpers: a
//! tracked session returns once a shipment's event was recorded by the
//! identity worker and its follow-up event relayed; an injected handler
//! fault sends an event to the dead-letter topic after its retries.
//!
//! On the embedded broker and SQLite by default (no set-up); on PostgreSQL
//! when `DATABASE_URL` names a server; on Apache Kafka with
//! `scripts/test-on-kafka -- cargo test -p kontext-shipping --test in_process`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kontext::config::{DatabaseSettings, ServiceConfig};
use kontext::testing::{HandlerFault, broker_from_env, fresh_database_url, track, unique_name};
use kontext::{Broker, KafkaSettings, Kontext};
use kontext_shipping::application::ShipmentService;
use kontext_shipping::domain::{NewShipment, ShipmentCreatedEvent, UserActivityRecorded};
use kontext_shipping::infrastructure::{KontextShipments, start_identity, start_shipping};
use sea_orm::{ConnectionTrait, Statement};

struct Services {
    shipping: Kontext,
    identity: Kontext,
    api: ShipmentService<KontextShipments>,
}

/// Both services on one broker, each with a database of its own, under
/// topic and group names no other test uses.
async fn services() -> Services {
    let broker: Broker = broker_from_env().unwrap();
    let kafka = KafkaSettings::new()
        .topic("shipping.shipment.created", |mut t| {
            t.name = Some(unique_name("created"));
            t.group = Some(unique_name("identity"));
            t
        })
        .topic("identity.user-activity.recorded", |mut t| {
            t.name = Some(unique_name("recorded"));
            t
        });
    let config = |url: String| ServiceConfig {
        kafka: kafka.clone(),
        database: Some(DatabaseSettings {
            url: url.into(),
            migrate: true,
        }),
    };
    let identity = start_identity(
        config(fresh_database_url().await.unwrap()),
        Some(broker.clone()),
    )
    .await
    .unwrap();
    let shipping = start_shipping(config(fresh_database_url().await.unwrap()), Some(broker))
        .await
        .unwrap();
    let api = ShipmentService::new(KontextShipments::new(&shipping).unwrap());
    Services {
        shipping,
        identity,
        api,
    }
}

fn new_shipment(user_id: i64) -> NewShipment {
    NewShipment {
        user_id,
        warehouse: "ams-1".into(),
        destination: "Rotterdam".into(),
    }
}

async fn activity_rows(identity: &Kontext) -> i64 {
    let db = identity.database().unwrap();
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM user_activity",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

#[tokio::test]
async fn a_shipment_is_recorded_and_its_follow_up_relayed() {
    let s = services().await;
    let tracked = track([&s.shipping, &s.identity])
        .timeout(Duration::from_secs(30))
        .run(|| s.api.create(new_shipment(42)))
        .await
        .unwrap();
    let shipment = tracked.value.unwrap();

    // Everything the request caused is done when the session returns.
    let created = tracked
        .activity
        .of::<ShipmentCreatedEvent>(&s.identity)
        .unwrap();
    assert_eq!((created.outbox_sent, created.handled), (1, 1));
    let follow_up = tracked
        .activity
        .of::<UserActivityRecorded>(&s.identity)
        .unwrap();
    assert_eq!(follow_up.outbox_sent, 1, "the follow-up was relayed");
    assert_eq!(activity_rows(&s.identity).await, 1);
    let topic = s
        .identity
        .model()
        .spec::<UserActivityRecorded>()
        .unwrap()
        .topic()
        .to_owned();
    let relayed =
        kontext::testing::read_topic(s.identity.broker(), &topic, 1, Duration::from_secs(10))
            .await
            .unwrap();
    let event: UserActivityRecorded =
        serde_json::from_slice(relayed[0].payload.as_deref().unwrap()).unwrap();
    assert_eq!(event.shipment_id, shipment.id);

    s.shipping.shutdown(Duration::from_secs(10)).await.unwrap();
    s.identity.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn an_event_whose_handler_keeps_failing_is_dead_lettered_and_has_no_effect() {
    let s = services().await;
    // Every attempt the retry policy allows (3) fails.
    HandlerFault::of::<ShipmentCreatedEvent>(&s.identity)
        .unwrap()
        .fail_next(3);
    let tracked = track([&s.shipping, &s.identity])
        .timeout(Duration::from_secs(30))
        .run(|| s.api.create(new_shipment(43)))
        .await
        .unwrap();
    tracked.value.unwrap();
    let created = tracked
        .activity
        .of::<ShipmentCreatedEvent>(&s.identity)
        .unwrap();
    assert_eq!((created.attempts, created.handled), (3, 0));
    assert_eq!(
        created.dead_letter_reasons.get("retries-exhausted"),
        Some(&1)
    );
    assert_eq!(activity_rows(&s.identity).await, 0);
    let follow_up = tracked
        .activity
        .of::<UserActivityRecorded>(&s.identity)
        .unwrap();
    assert_eq!(follow_up.outbox_sent, 0);

    s.shipping.shutdown(Duration::from_secs(10)).await.unwrap();
    s.identity.shutdown(Duration::from_secs(10)).await.unwrap();
}
