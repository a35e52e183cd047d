use kontext::Topic;

#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(name = "orders", key = order_idd, header(regoin))]
struct OrderCreated {
    order_id: u64,
    region: String,
}

fn main() {}
