use kontext::Topic;

#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(name = "orders/created")]
struct Slash {}

#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(name = "")]
struct Empty {}

#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(name = "..")]
struct Dots {}

#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(name = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")]
struct TooLong {}

fn main() {}
