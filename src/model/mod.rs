//! The topic model: which message types exist, where they go, how they are
//! keyed and encoded. Declared once with [`ModelBuilder`], validated by
//! [`ModelBuilder::build`], then frozen in a [`Model`] that producers and
//! consumers share.

pub(crate) mod consumer;
mod derive;
pub(crate) mod inbox;
/// Kafka's topic naming rules (the `kontext-names` crate, shared with the
/// derive macro).
pub use kontext_names as name;
mod topic;

use std::any::{Any, TypeId};
use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::error::{ModelError, ModelIssue};
pub use consumer::{
    Backpressure, ConsumerBuilder, ConsumerSpec, DEFAULT_MAX_BUFFERED, DedicatedBuilder,
    DedicatedSpec, Distribution, RetryPolicy, WorkerSpec,
};
#[doc(hidden)]
pub use derive::DerivedTopic;
pub use derive::Topic;
pub use inbox::{InboxBuilder, InboxSpec};
pub(crate) use topic::HeaderSource;
pub use topic::{
    MessageKey, OutboxMode, ProducerBuilder, TopicBuilder, TopicProvisioning, TopicSpec,
};

use crate::config::TopicSettings;
use crate::error::{Error, Result};

/// A type kontext can carry: serde in both directions, shareable across
/// threads. Implemented for every such type.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<T> Message for T where T: Serialize + DeserializeOwned + Send + Sync + 'static {}

/// Declares the message types of a service.
///
/// ```
/// use kontext::ModelBuilder;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderCreated { order_id: u64 }
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPaid { order_id: u64 }
///
/// fn orders(m: &mut ModelBuilder) {
///     m.topic::<OrderCreated>(|t| t.name("orders").partitions(6).key(|e| e.order_id));
///     m.topic::<OrderPaid>(|t| t.name("orders").key(|e| e.order_id));
/// }
///
/// let model = ModelBuilder::new().configure(orders).build()?;
/// assert_eq!(model.topic_of::<OrderPaid>(), Some("orders"));
/// # Ok::<(), kontext::Error>(())
/// ```
#[derive(Default)]
pub struct ModelBuilder {
    specs: Vec<(TypeId, Box<dyn ErasedSpec>)>,
}

impl ModelBuilder {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares message type `T`; `f` sets its topic, key, headers and codec.
    /// Declaring the same type twice is an error reported by [`build`](Self::build).
    pub fn topic<T: Message>(
        &mut self,
        f: impl FnOnce(TopicBuilder<T>) -> TopicBuilder<T>,
    ) -> &mut Self {
        let mut builder = TopicBuilder::new();
        derive::apply_derived(&mut builder);
        let spec = f(builder).freeze();
        self.specs.push((TypeId::of::<T>(), Box::new(spec)));
        self
    }

    /// Applies a function that declares a whole bounded context, so each
    /// module of a service can own its part of the model.
    pub fn configure(&mut self, f: impl FnOnce(&mut ModelBuilder)) -> &mut Self {
        f(self);
        self
    }

    /// Validates the declarations and freezes them. Every problem is reported,
    /// each naming its type and topic. The builder is left empty.
    pub fn build(&mut self) -> Result<Model, ModelError> {
        Model::from_specs(std::mem::take(&mut self.specs))
    }
}

impl fmt::Debug for ModelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelBuilder")
            .field(
                "types",
                &self
                    .specs
                    .iter()
                    .map(|(_, s)| s.rust_type())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One topic of the model with the types that share it and its merged
/// provisioning settings.
#[derive(Debug, Clone)]
pub struct TopicDef {
    name: String,
    provisioning: TopicProvisioning,
    types: Vec<(String, &'static str)>,
}

impl TopicDef {
    /// The topic name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Partitions to create it with (1 unless declared).
    pub fn partitions(&self) -> i32 {
        self.provisioning.partitions.unwrap_or(1)
    }

    /// Replication factor to create it with; `None` means the broker's default.
    pub fn replication(&self) -> Option<i32> {
        self.provisioning.replication
    }

    /// Topic configs to create it with.
    pub fn configs(&self) -> &BTreeMap<String, String> {
        &self.provisioning.configs
    }

    /// `(discriminator, Rust type)` of each type on the topic, in declaration order.
    pub fn types(&self) -> &[(String, &'static str)] {
        &self.types
    }
}

/// A validated, frozen model. Cheap to share behind an `Arc`.
pub struct Model {
    /// Looked up on every produce: a TypeId is already a hash, Fx is enough.
    by_type: FxHashMap<TypeId, Arc<dyn ErasedSpec>>,
    /// Declaration order of the types, so everything derived is deterministic.
    order: Vec<TypeId>,
    topics: Vec<TopicDef>,
}

impl Model {
    /// Starts declaring a model.
    pub fn builder() -> ModelBuilder {
        ModelBuilder::new()
    }

    /// The topics, in declaration order.
    pub fn topics(&self) -> &[TopicDef] {
        &self.topics
    }

    /// The topic of type `T`, if `T` is declared.
    pub fn topic_of<T: 'static>(&self) -> Option<&str> {
        self.by_type.get(&TypeId::of::<T>()).map(|s| s.topic())
    }

    /// The declaration of type `T`, or [`Error::UnknownType`].
    pub fn spec<T: 'static>(&self) -> Result<&TopicSpec<T>> {
        self.by_type
            .get(&TypeId::of::<T>())
            .and_then(|s| s.as_any().downcast_ref::<TopicSpec<T>>())
            .ok_or(Error::UnknownType {
                type_name: std::any::type_name::<T>(),
            })
    }

    /// What the runtime needs to know of a type, by id.
    pub(crate) fn type_info(&self, id: TypeId) -> Option<TypeInfo<'_>> {
        let spec = self.by_type.get(&id)?;
        Some(TypeInfo {
            rust_type: spec.rust_type(),
            topic: spec.topic(),
            discriminator: spec.type_name(),
            consumer: spec.consumer(),
        })
    }

    /// A record of `topic` decoded for an operator's eyes. Its type is the
    /// one its `ce_type` names among the types of its home topic (the
    /// original topic a dead letter names, else `topic`), or that topic's
    /// only type when it names none. What is redacted is what any type of
    /// the home topic declares (of the whole model when none is declared
    /// there): a record of the wrong type, or of none, shows nothing a
    /// type sharing its topic hides.
    pub(crate) fn decode_for_view(
        &self,
        topic: &str,
        original_topic: Option<&str>,
        message_type: Option<&str>,
        bytes: Option<&[u8]>,
    ) -> Viewed<'_> {
        let home = original_topic.unwrap_or(topic);
        let specs = || self.order.iter().filter_map(|id| self.by_type.get(id));
        let on_home: Vec<&Arc<dyn ErasedSpec>> = specs().filter(|s| s.topic() == home).collect();
        let candidates: Vec<&Arc<dyn ErasedSpec>> = if on_home.is_empty() {
            specs().collect()
        } else {
            on_home.clone()
        };
        let spec = match message_type {
            Some(name) => candidates.iter().find(|s| s.type_name() == name).copied(),
            None if on_home.len() == 1 => Some(on_home[0]),
            None => None,
        };
        // What the type the record names hides is hidden too, wherever
        // that type lives.
        let named = specs().filter(|s| message_type.is_some_and(|n| s.type_name() == n));
        let redacting: Vec<&Arc<dyn ErasedSpec>> =
            candidates.iter().copied().chain(named).collect();
        Viewed {
            message_type: spec.map(|s| s.type_name()),
            value: spec.zip(bytes).map(|(s, b)| s.decode_json(b)),
            sensitive: redacting
                .iter()
                .flat_map(|s| s.sensitive().iter().map(String::as_str))
                .collect(),
            sensitive_key: redacting.iter().any(|s| s.sensitive_key()),
        }
    }

    /// Every declared type, in declaration order.
    pub(crate) fn type_infos(&self) -> impl Iterator<Item = TypeInfo<'_>> + '_ {
        self.order.iter().filter_map(|id| self.type_info(*id))
    }

    /// The types declared on `topic`, in declaration order.
    pub(crate) fn types_on<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = (TypeId, TypeInfo<'a>)> + 'a {
        self.order.iter().filter_map(move |id| {
            let info = self.type_info(*id)?;
            (info.topic == topic).then_some((*id, info))
        })
    }

    /// Number of declared types.
    pub fn len(&self) -> usize {
        self.by_type.len()
    }

    /// Whether no type is declared.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Applies per-deployment topic settings (keyed by the model's topic
    /// name): physical name, partitions, replication, configs. Settings win
    /// over the model; the result is validated again. A settings entry for a
    /// topic the model does not declare is an error, so a typo cannot go
    /// unnoticed.
    pub fn with_topic_settings(&self, settings: &BTreeMap<String, TopicSettings>) -> Result<Model> {
        if let Some(unknown) = settings
            .keys()
            .find(|k| !self.topics.iter().any(|t| &t.name == *k))
        {
            return Err(Error::config(format!(
                "`topics.{unknown}` does not match any topic of the model (declared: {})",
                self.topics
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if settings.is_empty() {
            return Ok(self.clone());
        }
        // A group setting a dedicated connection cannot take (its group is
        // declared in code, `d.group(..)`) is refused, not dropped.
        for spec in self.order.iter().filter_map(|id| self.by_type.get(id)) {
            let group = settings.get(spec.topic()).and_then(|s| s.group.as_deref());
            let dedicated = spec
                .consumer()
                .and_then(|c| c.dedicated.as_ref())
                .and_then(|d| d.settings.group_id.as_deref());
            if let (Some(group), Some(own)) = (group, dedicated) {
                return Err(Error::config(format!(
                    "`topics.{}.group = \"{group}\"` cannot apply to `{}`: it has a dedicated connection, whose group \
                     (`{own}`) is declared in code with `d.group(..)`; remove the setting, or change the group in code",
                    spec.topic(),
                    spec.rust_type()
                )));
            }
        }
        let specs = self
            .order
            .iter()
            .filter_map(|id| self.by_type.get(id).map(|spec| (*id, spec)))
            .map(|(id, spec)| {
                let mut provisioning = spec.provisioning().clone();
                let mut topic = spec.topic().to_owned();
                let topic_settings = settings.get(spec.topic());
                if let Some(s) = topic_settings {
                    if let Some(name) = &s.name {
                        topic = name.clone();
                    }
                    provisioning.partitions = s.partitions.or(provisioning.partitions);
                    provisioning.replication = s.replication.or(provisioning.replication);
                    provisioning
                        .configs
                        .extend(s.configs.iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
                }
                let group = topic_settings.and_then(|s| s.group.as_deref());
                (id, spec.rebuilt(topic, provisioning, group))
            })
            .collect();
        Ok(Model::from_specs(specs)?)
    }

    fn from_specs(specs: Vec<(TypeId, Box<dyn ErasedSpec>)>) -> Result<Model, ModelError> {
        let mut issues = Vec::new();
        let mut by_type: FxHashMap<TypeId, Arc<dyn ErasedSpec>> = FxHashMap::default();
        let mut topics: Vec<TopicDef> = Vec::new();
        let mut order = Vec::new();

        for (id, spec) in specs {
            let rust_type = spec.rust_type();
            let topic = spec.topic().to_owned();
            if let Some(first) = by_type.get(&id) {
                issues.push(ModelIssue::DuplicateType {
                    type_name: rust_type,
                    first_topic: first.topic().to_owned(),
                    second_topic: topic,
                });
                continue;
            }
            if let Err(reason) = name::validate_topic_name(&topic) {
                issues.push(ModelIssue::InvalidTopicName {
                    type_name: rust_type,
                    topic: topic.clone(),
                    reason,
                });
            }
            let prov = spec.provisioning();
            let invalid = |message: String| ModelIssue::InvalidSetting {
                type_name: rust_type,
                topic: topic.clone(),
                message,
            };
            if spec.type_name().trim().is_empty() {
                issues.push(invalid("the type discriminator is empty".into()));
            }
            for name in spec.header_names() {
                if let Err(reason) = kontext_names::validate_header_name(name) {
                    issues.push(invalid(reason));
                }
            }
            if let Some(c) = spec.consumer() {
                for problem in c.problems() {
                    issues.push(invalid(format!("consumer: {problem}")));
                }
            }
            if let Some(p) = prov.partitions.filter(|p| *p < 1) {
                issues.push(invalid(format!("partitions must be at least 1, got {p}")));
            }
            if let Some(r) = prov.replication.filter(|r| *r < 1) {
                issues.push(invalid(format!("replication must be at least 1, got {r}")));
            }

            match topics.iter_mut().find(|t| t.name == topic) {
                None => topics.push(TopicDef {
                    name: topic.clone(),
                    provisioning: prov.clone(),
                    types: vec![(spec.type_name().to_owned(), rust_type)],
                }),
                Some(def) => {
                    if let Some((_, first_type)) =
                        def.types.iter().find(|(d, _)| d == spec.type_name())
                    {
                        issues.push(ModelIssue::DuplicateDiscriminator {
                            topic: topic.clone(),
                            discriminator: spec.type_name().to_owned(),
                            first_type,
                            second_type: rust_type,
                        });
                    }
                    merge_provisioning(def, prov, rust_type, &mut issues);
                    def.types.push((spec.type_name().to_owned(), rust_type));
                }
            }
            order.push(id);
            by_type.insert(id, Arc::from(spec));
        }

        if issues.is_empty() {
            Ok(Model {
                by_type,
                order,
                topics,
            })
        } else {
            Err(ModelError::new(issues))
        }
    }
}

/// Folds one type's topic-level settings into the topic's; a value set by two
/// types must be equal.
fn merge_provisioning(
    def: &mut TopicDef,
    prov: &TopicProvisioning,
    rust_type: &'static str,
    issues: &mut Vec<ModelIssue>,
) {
    let first_type = def.types.first().map(|(_, t)| *t).unwrap_or(rust_type);
    let mut conflict = |setting: &str, first: String, second: String| {
        issues.push(ModelIssue::ConflictingTopicSetting {
            topic: def.name.clone(),
            setting: setting.to_owned(),
            first_type,
            first,
            second_type: rust_type,
            second,
        })
    };
    match (def.provisioning.partitions, prov.partitions) {
        (Some(a), Some(b)) if a != b => conflict("partitions", a.to_string(), b.to_string()),
        (None, b) => def.provisioning.partitions = b,
        _ => {}
    }
    match (def.provisioning.replication, prov.replication) {
        (Some(a), Some(b)) if a != b => conflict("replication", a.to_string(), b.to_string()),
        (None, b) => def.provisioning.replication = b,
        _ => {}
    }
    for (k, v) in &prov.configs {
        match def.provisioning.configs.get(k) {
            Some(existing) if existing != v => {
                conflict(&format!("config `{k}`"), existing.clone(), v.clone())
            }
            Some(_) => {}
            None => {
                def.provisioning.configs.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Clone for Model {
    fn clone(&self) -> Self {
        Model {
            by_type: self.by_type.clone(),
            order: self.order.clone(),
            topics: self.topics.clone(),
        }
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("topics", &self.topics)
            .finish()
    }
}

/// A declared type's topic, discriminator and consumer declaration.
pub(crate) struct TypeInfo<'a> {
    pub(crate) rust_type: &'static str,
    pub(crate) topic: &'a str,
    pub(crate) discriminator: &'a str,
    pub(crate) consumer: Option<&'a ConsumerSpec>,
}

impl TypeInfo<'_> {
    /// Where this type's consumers send dead letters: the consumer
    /// declaration's topic, else its dedicated connection's, else
    /// `fallback` (the settings' `consumer.dead_letter_topic`), else
    /// `<topic>.dlq`.
    pub(crate) fn dead_letter_topic(&self, fallback: Option<&str>) -> String {
        let declared = self.consumer.and_then(|c| {
            c.dead_letter_topic.clone().or_else(|| {
                c.dedicated
                    .as_ref()
                    .and_then(|d| d.settings.dead_letter_topic.clone())
            })
        });
        declared
            .or_else(|| fallback.map(str::to_owned))
            .unwrap_or_else(|| format!("{}.dlq", self.topic))
    }
}

/// A record decoded by [`Model::decode_for_view`].
pub(crate) struct Viewed<'a> {
    /// The type it decoded as, when one matched.
    pub(crate) message_type: Option<&'a str>,
    /// The payload as JSON, or why it could not be decoded (its values
    /// elided); `None` when no type matched or it has no payload.
    pub(crate) value: Option<std::result::Result<serde_json::Value, String>>,
    /// Fields and headers to redact.
    pub(crate) sensitive: Vec<&'a str>,
    /// Whether to redact the key.
    pub(crate) sensitive_key: bool,
}

/// A [`TopicSpec`] with its type erased, so the model can hold many types.
trait ErasedSpec: Send + Sync + 'static {
    fn topic(&self) -> &str;
    fn type_name(&self) -> &str;
    fn rust_type(&self) -> &'static str;
    fn provisioning(&self) -> &TopicProvisioning;
    fn header_names(&self) -> Vec<&str>;
    fn consumer(&self) -> Option<&ConsumerSpec>;
    fn sensitive(&self) -> &[String];
    fn sensitive_key(&self) -> bool;
    /// A payload decoded with the type's codec, as JSON (for operators).
    fn decode_json(&self, bytes: &[u8]) -> std::result::Result<serde_json::Value, String>;
    fn as_any(&self) -> &dyn Any;
    fn rebuilt(
        &self,
        topic: String,
        provisioning: TopicProvisioning,
        group: Option<&str>,
    ) -> Box<dyn ErasedSpec>;
}

impl<T: Message> ErasedSpec for TopicSpec<T> {
    fn topic(&self) -> &str {
        &self.topic
    }
    fn type_name(&self) -> &str {
        &self.type_name
    }
    fn rust_type(&self) -> &'static str {
        self.rust_type
    }
    fn provisioning(&self) -> &TopicProvisioning {
        &self.provisioning
    }
    fn consumer(&self) -> Option<&ConsumerSpec> {
        self.consumer.as_ref()
    }
    fn sensitive(&self) -> &[String] {
        &self.sensitive
    }
    fn sensitive_key(&self) -> bool {
        self.sensitive_key
    }
    fn decode_json(&self, bytes: &[u8]) -> std::result::Result<serde_json::Value, String> {
        let value = self
            .codec
            .decode(bytes)
            .map_err(|e| crate::codec::describe(&e))?;
        serde_json::to_value(&value).map_err(|e| crate::codec::elide_values(&e.to_string()))
    }
    fn header_names(&self) -> Vec<&str> {
        // Derived header fields are named by the derive, which checks them.
        self.headers
            .iter()
            .filter(|(_, source)| !matches!(source, HeaderSource::Derived(_)))
            .map(|(name, _)| name.as_str())
            .collect()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn rebuilt(
        &self,
        topic: String,
        provisioning: TopicProvisioning,
        group: Option<&str>,
    ) -> Box<dyn ErasedSpec> {
        let mut spec = self.clone();
        spec.topic = topic.into();
        spec.provisioning = provisioning;
        // Deployment settings win over the code, as for topic names, also
        // for a type that declares no consumer settings at all; a
        // dedicated connection keeps the group it declares.
        if let Some(g) = group {
            let c = spec.consumer.get_or_insert_with(ConsumerSpec::default);
            if c.dedicated.is_none() {
                c.group = Some(g.to_owned());
            }
        }
        Box::new(spec)
    }
}

#[cfg(test)]
mod tests;
