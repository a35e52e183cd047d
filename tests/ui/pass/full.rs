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

fn main() {
    assert_eq!(OrderCreated::NAME, "orders.order.created");
    assert_eq!(OrderCreated::TYPE_NAME, "OrderCreatedV2");
    assert_eq!(OrderCreated::PARTITIONS, Some(6));
    assert_eq!(ShipmentDelivered::NAME, "shipment-delivered");
    assert_eq!(ShipmentDelivered::TYPE_NAME, "ShipmentDelivered");
    let e = OrderCreated { order_id: 7, region: "eu".into(), tenant: "t1".into() };
    let mut key = Vec::new();
    assert!(e.write_key(&mut key));
    assert_eq!(key, b"7");
    let mut headers = Vec::new();
    e.headers(&mut headers);
    assert_eq!(headers, vec![("region", "eu".to_owned()), ("x-tenant", "t1".to_owned())]);
    let model = ModelBuilder::new()
        .topic::<OrderCreated>(|t| t)
        .topic::<ShipmentDelivered>(|t| t)
        .build()
        .unwrap();
    assert_eq!(model.topic_of::<ShipmentDelivered>(), Some("shipment-delivered"));
}
