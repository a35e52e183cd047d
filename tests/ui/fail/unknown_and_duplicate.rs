use kontext::Topic;

#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(name = "orders", nmae = "x", name = "again", partitions = 0)]
struct OrderCreated {
    #[topic(key)]
    order_id: u64,
    #[topic(key, primary)]
    other: u64,
}

fn main() {}
