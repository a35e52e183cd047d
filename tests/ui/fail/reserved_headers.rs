use kontext::Topic;

// A derived header may not take a standard header's name (a record would
// carry two `ce_type`s), nor be empty; a raw identifier names the header
// without its `r#`.
#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(name = "orders", header(ce_id))]
struct OrderCreated {
    #[topic(key)]
    order_id: u64,
    ce_id: String,
    #[topic(header = "ce_type")]
    kind: String,
    #[topic(header = "CONTENT-TYPE")]
    media: String,
    #[topic(header = "")]
    blank: String,
    #[topic(header)]
    r#type: String,
}

fn main() {}
