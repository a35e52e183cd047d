//! Model validation errors (here, below the model, so the one `Error` can
//! hold them without importing the model). Every variant names the type and the topic so the
//! message points at the registration to fix.

use std::fmt;

/// One problem found while building a `Model`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelIssue {
    /// The same Rust type was declared twice.
    #[error(
        "type `{type_name}` is declared more than once (topics `{first_topic}` and `{second_topic}`)"
    )]
    DuplicateType {
        /// The type.
        type_name: &'static str,
        /// Topic of the first declaration.
        first_topic: String,
        /// Topic of the second declaration.
        second_topic: String,
    },

    /// The topic name breaks Kafka's naming rules.
    #[error("type `{type_name}` has an illegal topic name `{topic}`: {reason}")]
    InvalidTopicName {
        /// The type.
        type_name: &'static str,
        /// The name as given.
        topic: String,
        /// Which rule it breaks.
        reason: String,
    },

    /// Two types on one topic would be told apart by the same discriminator.
    #[error(
        "types `{first_type}` and `{second_type}` share topic `{topic}` with the same type discriminator `{discriminator}`; give one of them `.type_name(\"...\")`"
    )]
    DuplicateDiscriminator {
        /// The shared topic.
        topic: String,
        /// The discriminator both use.
        discriminator: String,
        /// The type declared first.
        first_type: &'static str,
        /// The type declared second.
        second_type: &'static str,
    },

    /// Two types on one topic disagree about a topic-level setting.
    #[error(
        "types `{first_type}` and `{second_type}` share topic `{topic}` but disagree on {setting}: {first} vs {second}"
    )]
    ConflictingTopicSetting {
        /// The shared topic.
        topic: String,
        /// `partitions`, `replication` or a topic config key.
        setting: String,
        /// The type declared first.
        first_type: &'static str,
        /// Its value.
        first: String,
        /// The type declared second.
        second_type: &'static str,
        /// Its value.
        second: String,
    },

    /// A setting has a value that can never work.
    #[error("type `{type_name}` on topic `{topic}`: {message}")]
    InvalidSetting {
        /// The type.
        type_name: &'static str,
        /// Its topic.
        topic: String,
        /// What is wrong.
        message: String,
    },
}

impl ModelIssue {
    /// The topic this problem concerns.
    pub fn topic(&self) -> &str {
        match self {
            ModelIssue::DuplicateType { second_topic, .. } => second_topic,
            ModelIssue::InvalidTopicName { topic, .. }
            | ModelIssue::DuplicateDiscriminator { topic, .. }
            | ModelIssue::ConflictingTopicSetting { topic, .. }
            | ModelIssue::InvalidSetting { topic, .. } => topic,
        }
    }
}

/// Every problem found in a model, reported together so one build shows all
/// of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    issues: Vec<ModelIssue>,
}

impl ModelError {
    pub(crate) fn new(issues: Vec<ModelIssue>) -> Self {
        debug_assert!(!issues.is_empty());
        ModelError { issues }
    }

    /// The problems, in declaration order.
    pub fn issues(&self) -> &[ModelIssue] {
        &self.issues
    }

    /// The topic of the first problem.
    pub fn topic(&self) -> Option<&str> {
        self.issues.first().map(ModelIssue::topic)
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.issues.as_slice() {
            [one] => write!(f, "invalid model: {one}"),
            many => {
                write!(f, "invalid model ({} problems):", many.len())?;
                for issue in many {
                    write!(f, "\n  - {issue}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ModelError {}
