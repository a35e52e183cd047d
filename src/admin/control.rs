//! What an operator asks of the consumers of a running `Kontext` (pause,
//! resume, seek) and what each poll service answers. The poll thread
//! applies a command between two polls (`consumer/poll/control.rs`), so a
//! command and a rebalance never interleave.

use std::any::TypeId;

use serde::Serialize;

/// Which consumed records a command is about: one consumed type's lane,
/// or every lane reading a topic (in every group of this process, or in
/// one), optionally narrowed to some partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub(crate) what: Aim,
    pub(crate) group: Option<String>,
    pub(crate) partitions: Option<Vec<i32>>,
    pub(crate) issuer: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Aim {
    Type(TypeId, &'static str),
    Topic(String),
}

impl Target {
    /// The lane consuming `T`. Its topic's other types consumed by the same
    /// poll service share the lane, so they pause with it; the report names
    /// them.
    pub fn of<T: 'static>() -> Self {
        Target {
            what: Aim::Type(TypeId::of::<T>(), std::any::type_name::<T>()),
            group: None,
            partitions: None,
            issuer: "api".into(),
        }
    }

    /// Every lane of this process reading `topic`.
    pub fn topic(topic: impl Into<String>) -> Self {
        Target {
            what: Aim::Topic(topic.into()),
            group: None,
            partitions: None,
            issuer: "api".into(),
        }
    }

    /// Only the lanes of consumer group `group`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Who issues the command, for the log line and the
    /// `kontext_admin_commands_total` metric (`api` unless said).
    pub fn by(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    /// Only these partitions (a pause holds them also while another member
    /// owns them, until they come here).
    pub fn partitions(mut self, partitions: impl IntoIterator<Item = i32>) -> Self {
        let mut p: Vec<i32> = partitions.into_iter().collect();
        p.sort_unstable();
        p.dedup();
        self.partitions = Some(p);
        self
    }
}

/// Where a seek moves a group's position on a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeekTo {
    /// The first record the partition still holds.
    Beginning,
    /// After the last record: only records produced from now on.
    End,
    /// This offset, clamped to what the partition holds (between its
    /// first offset and its end).
    Offset(i64),
    /// The first record whose timestamp is at or after this many
    /// milliseconds since the Unix epoch (the end if there is none).
    Timestamp(i64),
}

/// One poll service's answer to a command, for one of its lanes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct ControlReport {
    /// The poll service (`shared-<group>` or `dedicated-<Type>`).
    pub service: String,
    /// Its consumer group.
    pub group: String,
    /// The lane's topic.
    pub topic: String,
    /// The consumed types sharing the lane (`ce_type` discriminators).
    pub types: Vec<String>,
    /// What happened.
    pub outcome: Outcome,
}

/// What a poll service did with a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Done. `partitions` are the lane's partitions this member owns that
    /// the command changed; `positions` the offsets a seek moved them to
    /// (committed, unless `uncommitted` says why not). A pause also holds partitions owned elsewhere once they
    /// come here; `held` says whether the lane holds anything after it.
    Applied {
        /// Partitions owned here that it changed.
        partitions: Vec<i32>,
        /// New positions, for a seek.
        positions: Vec<(i32, i64)>,
        /// Partitions named that it did not change: not owned by this
        /// member now (a pause still holds them should they come here), or
        /// a seek that failed (logged; the partition is fetched again from
        /// its last stored position).
        not_applied: Vec<i32>,
        /// Whether any partition of the lane is held paused afterwards.
        held: bool,
        /// For a seek whose commit the group did not take (a rebalance
        /// under way): why. The member reads on from the new positions
        /// while it keeps the partitions, and they stay stored, so the next
        /// commit (periodic, or on their revoke) sends them; should that
        /// fail too, a member they move to starts from the last commit.
        /// Seek again once the group has settled to be sure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uncommitted: Option<String>,
    },
    /// None of the partitions it names is owned by this member now (a seek
    /// is the owner's to apply: send it there, or again after a rebalance).
    NotOwned {
        /// The partitions asked for.
        partitions: Vec<i32>,
    },
    /// Not applied, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// The poll thread did not take the command in time (it is waiting to
    /// be started, or busy in a rebalance); it is applied when it does.
    Queued,
}

/// A command a poll service applies to one of its lanes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Pause,
    Resume,
    Seek(SeekTo),
}

impl Command {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Seek(_) => "seek",
        }
    }
}
