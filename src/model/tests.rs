use serde::{Deserialize, Serialize};

use super::*;

#[derive(Serialize, Deserialize)]
struct OrderCreated {
    order_id: u64,
}

#[derive(Serialize, Deserialize)]
struct OrderPaid {
    order_id: u64,
}

mod v2 {
    #[derive(serde::Serialize, serde::Deserialize)]
    pub(super) struct OrderCreated {
        pub(super) order_id: u64,
    }
}

fn issues(result: Result<Model, ModelError>) -> Vec<ModelIssue> {
    match result {
        Ok(_) => panic!("the model should be invalid"),
        Err(e) => e.issues().to_vec(),
    }
}

#[test]
fn defaults_come_from_the_type_name() {
    let model = ModelBuilder::new()
        .topic::<OrderCreated>(|t| t)
        .build()
        .unwrap();
    let spec = model.spec::<OrderCreated>().unwrap();
    assert_eq!(spec.topic(), "order-created");
    assert_eq!(spec.type_name(), "OrderCreated");
    assert_eq!(model.topics()[0].partitions(), 1);
    assert_eq!(model.topics()[0].replication(), None);
}

#[test]
fn duplicate_registration_names_the_type() {
    let found = issues(
        ModelBuilder::new()
            .topic::<OrderCreated>(|t| t.name("orders"))
            .topic::<OrderCreated>(|t| t.name("orders-again"))
            .build(),
    );
    assert_eq!(found.len(), 1);
    let text = found[0].to_string();
    assert!(
        text.contains("OrderCreated") && text.contains("declared more than once"),
        "{text}"
    );
    assert!(text.contains("orders-again"), "{text}");
}

#[test]
fn illegal_topic_names_are_rejected_with_the_reason() {
    for (name, reason) in [
        ("", "empty"),
        (".", "reserved"),
        ("..", "reserved"),
        ("orders/created", "`/` is not allowed"),
        ("orders created", "` ` is not allowed"),
    ] {
        let found = issues(
            ModelBuilder::new()
                .topic::<OrderCreated>(|t| t.name(name))
                .build(),
        );
        let text = found[0].to_string();
        assert!(text.contains("OrderCreated"), "{text}");
        assert!(text.contains(&format!("`{name}`")), "{text}");
        assert!(text.contains(reason), "{name:?}: {text}");
    }
    let long = "a".repeat(250);
    let found = issues(
        ModelBuilder::new()
            .topic::<OrderCreated>(|t| t.name(&long))
            .build(),
    );
    assert!(found[0].to_string().contains("at most 249"), "{}", found[0]);
}

#[test]
fn shared_topic_needs_distinct_discriminators() {
    let found = issues(
        ModelBuilder::new()
            .topic::<OrderCreated>(|t| t.name("orders"))
            .topic::<v2::OrderCreated>(|t| t.name("orders"))
            .build(),
    );
    assert_eq!(found.len(), 1);
    assert!(matches!(
        &found[0],
        ModelIssue::DuplicateDiscriminator { topic, discriminator, .. }
            if topic == "orders" && discriminator == "OrderCreated"
    ));
    assert_eq!(found[0].topic(), "orders");

    // Versioned events (seed 002): same topic, explicit discriminators.
    let model = ModelBuilder::new()
        .topic::<OrderCreated>(|t| t.name("orders").type_name("OrderCreatedV1"))
        .topic::<v2::OrderCreated>(|t| t.name("orders").type_name("OrderCreatedV2"))
        .build()
        .unwrap();
    assert_eq!(model.topics().len(), 1);
    let types: Vec<&str> = model.topics()[0]
        .types()
        .iter()
        .map(|(d, _)| d.as_str())
        .collect();
    assert_eq!(types, ["OrderCreatedV1", "OrderCreatedV2"]);
}

#[test]
fn conflicting_topic_settings_name_both_types() {
    let found = issues(
        ModelBuilder::new()
            .topic::<OrderCreated>(|t| t.name("orders").partitions(6))
            .topic::<OrderPaid>(|t| t.name("orders").partitions(3).config("retention.ms", "1"))
            .build(),
    );
    let text = found[0].to_string();
    assert!(
        text.contains("partitions") && text.contains("6 vs 3"),
        "{text}"
    );
    assert!(
        text.contains("OrderCreated") && text.contains("OrderPaid"),
        "{text}"
    );

    // Declared once, inherited by the other type.
    let model = ModelBuilder::new()
        .topic::<OrderCreated>(|t| t.name("orders").partitions(6))
        .topic::<OrderPaid>(|t| t.name("orders"))
        .build()
        .unwrap();
    assert_eq!(model.topics()[0].partitions(), 6);
}

#[test]
fn impossible_settings_and_reserved_headers_are_rejected() {
    let found = issues(
        ModelBuilder::new()
            .topic::<OrderCreated>(|t| t.partitions(0).replication(0).header("ce_id", "x"))
            .build(),
    );
    let all: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(
        all.iter()
            .any(|m| m.contains("partitions must be at least 1"))
    );
    assert!(
        all.iter()
            .any(|m| m.contains("replication must be at least 1"))
    );
    assert!(all.iter().any(|m| m.contains("`ce_id` is reserved")));
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = ModelBuilder::new()
        .topic::<OrderCreated>(|t| t.name("bad name"))
        .topic::<OrderPaid>(|t| t.name("also/bad"))
        .build()
        .unwrap_err();
    assert_eq!(err.issues().len(), 2);
    let text = err.to_string();
    assert!(
        text.contains("2 problems") && text.contains("bad name") && text.contains("also/bad"),
        "{text}"
    );
}

#[test]
fn configure_applies_a_bounded_context() {
    fn orders(m: &mut ModelBuilder) {
        m.topic::<OrderCreated>(|t| t.name("orders").key(|e| e.order_id));
        m.topic::<OrderPaid>(|t| t.name("orders").key(|e| e.order_id));
    }
    let model = ModelBuilder::new().configure(orders).build().unwrap();
    assert_eq!(model.len(), 2);
    let spec = model.spec::<OrderPaid>().unwrap();
    let mut key = Vec::new();
    assert!(spec.write_key(&OrderPaid { order_id: 42 }, &mut key));
    assert_eq!(key, b"42");
}

#[test]
fn unknown_type_is_an_error() {
    let model = ModelBuilder::new()
        .topic::<OrderCreated>(|t| t)
        .build()
        .unwrap();
    let err = model.spec::<OrderPaid>().unwrap_err();
    assert!(matches!(err, Error::UnknownType { type_name } if type_name.ends_with("OrderPaid")));
}

#[test]
fn deployment_settings_rename_topics_and_are_checked() {
    let model = ModelBuilder::new()
        .topic::<OrderCreated>(|t| t.name("orders").partitions(3))
        .topic::<OrderPaid>(|t| t.name("orders"))
        .build()
        .unwrap();
    let mut settings = BTreeMap::new();
    settings.insert(
        "orders".to_owned(),
        TopicSettings::default().name("orders-eu").partitions(12),
    );
    let resolved = model.with_topic_settings(&settings).unwrap();
    assert_eq!(resolved.topic_of::<OrderPaid>(), Some("orders-eu"));
    assert_eq!(resolved.topics().len(), 1);
    assert_eq!(resolved.topics()[0].partitions(), 12);

    let mut typo = BTreeMap::new();
    typo.insert("oders".to_owned(), TopicSettings::default());
    let err = model.with_topic_settings(&typo).unwrap_err();
    assert!(err.to_string().contains("`topics.oders`"), "{err}");

    // Renaming onto an illegal name is caught by validation again.
    let mut bad = BTreeMap::new();
    bad.insert(
        "orders".to_owned(),
        TopicSettings::default().name("orders eu"),
    );
    assert!(model.with_topic_settings(&bad).is_err());
}

/// A topic's `group` setting cannot move a type with a dedicated connection
/// (its group is declared in code): refused, naming both, not dropped.
#[test]
fn a_group_setting_for_a_dedicated_type_is_refused() {
    let model = ModelBuilder::new()
        .topic::<OrderCreated>(|t| {
            t.name("orders")
                .consumer(|c| c.dedicated(|d| d.group("orders-dedicated")))
        })
        .build()
        .unwrap();
    let mut settings = BTreeMap::new();
    settings.insert(
        "orders".to_owned(),
        TopicSettings::default().group("billing"),
    );
    let err = model
        .with_topic_settings(&settings)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`topics.orders.group = \"billing\"`") && err.contains("`orders-dedicated`"),
        "{err}"
    );
}
