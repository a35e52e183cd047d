//! Operator controls on a running `Kontext`: dead letters replayed to
//! their original topics ([`Kontext::replay_dead_letters`](crate::Kontext::replay_dead_letters)).

mod replay;

pub(crate) use replay::replay_blocking;
pub use replay::{REPLAYED_FROM, ReplayFilter, Replayed};
