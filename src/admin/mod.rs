//! Operator controls on a running `Kontext`: pause, resume and seek of
//! consumed lanes ([`Kontext::pause`](crate::Kontext::pause),
//! [`Kontext::resume`](crate::Kontext::resume),
//! [`Kontext::seek`](crate::Kontext::seek)), and dead letters replayed to
//! their original topics ([`Kontext::replay_dead_letters`](crate::Kontext::replay_dead_letters)),
//! and a topic's recent records, decoded and redacted
//! ([`Kontext::recent_messages`](crate::Kontext::recent_messages)).

mod browse;
mod control;
mod fleet;
mod replay;

pub use crate::headers::REPLAYED_FROM;
pub use browse::{Look, MAX_RECENT, REDACTED, RecentRecord};
pub(crate) use browse::{recent_blocking, view};
pub(crate) use control::{Aim, Command};
pub use control::{ControlReport, Outcome, SeekTo, Target};
pub(crate) use fleet::{Envelope, FleetCommand, Op};
pub use fleet::{FleetReport, FleetSettings};
pub(crate) use replay::replay_blocking;
pub use replay::{ReplayFilter, Replayed};
