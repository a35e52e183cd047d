//! Operator controls on a running `Kontext`: dead letters replayed to
//! their original topics ([`Kontext::replay_dead_letters`](crate::Kontext::replay_dead_letters)).

mod replay;

pub use crate::headers::REPLAYED_FROM;
pub(crate) use replay::replay_blocking;
pub use replay::{ReplayFilter, Replayed};
