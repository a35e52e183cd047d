use kontext::Topic;

#[derive(serde::Serialize, serde::Deserialize, Topic)]
enum Event {
    Created,
}

#[derive(serde::Serialize, serde::Deserialize, Topic)]
struct Envelope<T> {
    inner: T,
}

fn main() {}
