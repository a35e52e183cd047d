// A service that re-exports kontext under another path.
mod infra {
    pub use kontext as messaging;
}

use infra::messaging::Topic;

#[derive(serde::Serialize, serde::Deserialize, Topic)]
#[topic(crate = "infra::messaging", name = "audit.log")]
struct AuditLogged {
    line: String,
}

fn main() {
    assert_eq!(<AuditLogged as infra::messaging::Topic>::NAME, "audit.log");
}
