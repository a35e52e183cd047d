//! The inbox declaration: which consumer name and which key a consumed
//! type's inbox records (`ConsumerBuilder::inbox`). Recording and cleaning
//! up rows is the `inbox` module's work.

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub(crate) type KeyFn = Arc<dyn Fn(&(dyn Any + Sync)) -> Option<String> + Send + Sync>;

/// Declares de-duplication for a consumer; obtained in
/// [`ConsumerBuilder::inbox`](crate::model::ConsumerBuilder::inbox).
#[derive(Clone, Default)]
pub struct InboxBuilder {
    spec: InboxSpec,
}

/// The frozen inbox declaration.
#[derive(Clone)]
pub struct InboxSpec {
    pub(crate) consumer_name: Option<String>,
    pub(crate) retention: Duration,
    pub(crate) cleanup_interval: Duration,
    pub(crate) key: Option<(TypeId, &'static str, KeyFn)>,
}

impl Default for InboxSpec {
    fn default() -> Self {
        InboxSpec {
            consumer_name: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
            key: None,
        }
    }
}

impl InboxBuilder {
    /// The name the inbox rows are recorded under. Defaults to
    /// `<group>/<type discriminator>`.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.spec.consumer_name = Some(name.into());
        self
    }

    /// De-duplicate by fields of the message instead of its message id
    /// (`ce_id`); for example a business key, when the same fact can be
    /// published twice with different ids.
    pub fn key_by<T: Send + Sync + 'static>(
        mut self,
        f: impl Fn(&T) -> String + Send + Sync + 'static,
    ) -> Self {
        let erased: KeyFn =
            Arc::new(move |any: &(dyn Any + Sync)| (any as &dyn Any).downcast_ref::<T>().map(&f));
        self.spec.key = Some((TypeId::of::<T>(), std::any::type_name::<T>(), erased));
        self
    }

    /// How long a processed message is remembered. Defaults to 7 days; it
    /// should exceed how late a redelivery can come (topic retention, or how
    /// far back offsets may be reset).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.spec.retention = retention;
        self
    }

    /// How often expired rows are deleted. Defaults to 1 hour.
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.spec.cleanup_interval = interval;
        self
    }

    pub(crate) fn build(self) -> InboxSpec {
        self.spec
    }
}

impl fmt::Debug for InboxBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spec.fmt(f)
    }
}

impl fmt::Debug for InboxSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxSpec")
            .field("consumer_name", &self.consumer_name)
            .field("retention", &self.retention)
            .field("key_by", &self.key.as_ref().map(|(_, t, _)| t))
            .finish()
    }
}
