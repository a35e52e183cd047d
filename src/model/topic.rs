//! Declaring one message type: its topic, key, headers and codec.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::codec::{Codec, Json};
use crate::headers::HeaderProfile;
use crate::model::Message;
use crate::model::consumer::{ConsumerBuilder, ConsumerSpec};
use crate::model::name::{default_topic_name, short_type_name};

/// Something that can be written as a message key.
///
/// Implemented for strings, byte vectors, UUIDs (hyphenated text) and
/// integers (decimal text), and for `Option` of those (`None` means no key,
/// so the partitioner spreads the messages).
pub trait MessageKey {
    /// Appends the key's bytes to `out`. Returns `false` when there is no key.
    fn write_key(&self, out: &mut Vec<u8>) -> bool;
}

impl MessageKey for String {
    fn write_key(&self, out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(self.as_bytes());
        true
    }
}

impl MessageKey for str {
    fn write_key(&self, out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(self.as_bytes());
        true
    }
}

impl MessageKey for [u8] {
    fn write_key(&self, out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(self);
        true
    }
}

impl MessageKey for &'static str {
    fn write_key(&self, out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(self.as_bytes());
        true
    }
}

impl MessageKey for Vec<u8> {
    fn write_key(&self, out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(self);
        true
    }
}

impl MessageKey for uuid::Uuid {
    fn write_key(&self, out: &mut Vec<u8>) -> bool {
        let mut buf = uuid::Uuid::encode_buffer();
        out.extend_from_slice(self.hyphenated().encode_lower(&mut buf).as_bytes());
        true
    }
}

impl<K: MessageKey> MessageKey for Option<K> {
    fn write_key(&self, out: &mut Vec<u8>) -> bool {
        match self {
            Some(k) => k.write_key(out),
            None => false,
        }
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl MessageKey for $t {
            fn write_key(&self, out: &mut Vec<u8>) -> bool {
                use std::io::Write;
                // Writing to a Vec cannot fail.
                let _ = write!(out, "{self}");
                true
            }
        }
    )*};
}
int_keys!(
    u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, usize, isize
);

pub(crate) type KeyFn<T> = Arc<dyn Fn(&T, &mut Vec<u8>) -> bool + Send + Sync>;
pub(crate) type HeaderFn<T> = Arc<dyn Fn(&T) -> Option<String> + Send + Sync>;
pub(crate) type HeadersFn<T> = Arc<dyn Fn(&T, &mut Vec<(&'static str, String)>) + Send + Sync>;

/// A header declared on a topic: fixed, or computed from each message.
pub(crate) enum HeaderSource<T> {
    Static(String),
    Computed(HeaderFn<T>),
    /// The header fields of a derived type (its entry has an empty name).
    Derived(HeadersFn<T>),
}

impl<T> Clone for HeaderSource<T> {
    fn clone(&self) -> Self {
        match self {
            HeaderSource::Static(v) => HeaderSource::Static(v.clone()),
            HeaderSource::Computed(f) => HeaderSource::Computed(Arc::clone(f)),
            HeaderSource::Derived(f) => HeaderSource::Derived(Arc::clone(f)),
        }
    }
}

/// Topic-level settings used when kontext creates the topic. Several types
/// may declare them for a shared topic; they must agree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicProvisioning {
    /// Number of partitions; `None` leaves it to the other declarations or to
    /// the default of 1.
    pub partitions: Option<i32>,
    /// Replication factor; `None` means the broker's default.
    pub replication: Option<i32>,
    /// Topic configs such as `retention.ms` or `cleanup.policy`.
    pub configs: BTreeMap<String, String>,
}

/// Declares how a message type maps to Kafka. Obtained in
/// [`ModelBuilder::topic`](super::ModelBuilder::topic).
pub struct TopicBuilder<T> {
    pub(crate) name: Option<String>,
    pub(crate) type_name: Option<String>,
    pub(crate) provisioning: TopicProvisioning,
    pub(crate) key: Option<KeyFn<T>>,
    pub(crate) headers: Vec<(String, HeaderSource<T>)>,
    pub(crate) header_profile: HeaderProfile,
    pub(crate) codec: Arc<dyn Codec<T>>,
    pub(crate) consumer: Option<ConsumerSpec>,
    pub(crate) outbox_mode: OutboxMode,
    pub(crate) sensitive: Vec<String>,
    pub(crate) sensitive_key: bool,
}

/// Producer-side settings of a type; obtained in [`TopicBuilder::producer`].
#[derive(Debug, Clone, Default)]
pub struct ProducerBuilder {
    outbox_mode: OutboxMode,
}

impl ProducerBuilder {
    /// How messages written to the outbox leave it. Defaults to
    /// [`OutboxMode::Background`].
    pub fn outbox(mut self, mode: OutboxMode) -> Self {
        self.outbox_mode = mode;
        self
    }
}

impl<T: Message> TopicBuilder<T> {
    pub(crate) fn new() -> Self {
        TopicBuilder {
            name: None,
            type_name: None,
            provisioning: TopicProvisioning::default(),
            key: None,
            headers: Vec::new(),
            header_profile: HeaderProfile::default(),
            codec: Arc::new(Json),
            consumer: None,
            outbox_mode: OutboxMode::Background,
            sensitive: Vec::new(),
            sensitive_key: false,
        }
    }

    /// Producer-side settings: `t.producer(|p| p.outbox(OutboxMode::ImmediateWithFallback))`.
    pub fn producer(mut self, f: impl FnOnce(ProducerBuilder) -> ProducerBuilder) -> Self {
        self.outbox_mode = f(ProducerBuilder::default()).outbox_mode;
        self
    }

    /// The topic name, e.g. `shipping.shipment.created`. Defaults to the
    /// type's name in kebab case (`OrderCreated` gives `order-created`).
    ///
    /// This is the name in the model; settings may map it to another physical
    /// name per deployment (`topics.<name>.name`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The type discriminator written to the `ce_type` header so several
    /// types can share a topic (`OrderCreatedV1` and `OrderCreatedV2`, say).
    /// Defaults to the type's name without its module path.
    pub fn type_name(mut self, discriminator: impl Into<String>) -> Self {
        self.type_name = Some(discriminator.into());
        self
    }

    /// Partitions to create the topic with. Defaults to 1.
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.provisioning.partitions = Some(partitions);
        self
    }

    /// Replication factor to create the topic with. Defaults to the broker's
    /// default (`default.replication.factor`).
    pub fn replication(mut self, replication: i32) -> Self {
        self.provisioning.replication = Some(replication);
        self
    }

    /// A topic config applied when the topic is created, such as
    /// `retention.ms` or `cleanup.policy`.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.provisioning.configs.insert(key.into(), value.into());
        self
    }

    /// How to derive the message key, which decides the partition: messages
    /// with one key stay in order. Without a key, messages are spread over
    /// the partitions.
    pub fn key<K, F>(mut self, f: F) -> Self
    where
        K: MessageKey,
        F: Fn(&T) -> K + Send + Sync + 'static,
    {
        self.key = Some(Arc::new(move |value, out| f(value).write_key(out)));
        self
    }

    /// Like [`key`](Self::key), for a key the message holds:
    /// `.key_ref(|e| &e.order_id)` reads it in place instead of cloning it
    /// for every message produced.
    pub fn key_ref<K, F>(mut self, f: F) -> Self
    where
        K: MessageKey + ?Sized,
        F: Fn(&T) -> &K + Send + Sync + 'static,
    {
        self.key = Some(Arc::new(move |value, out| f(value).write_key(out)));
        self
    }

    /// A header with the same value on every message of this type.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers
            .push((key.into(), HeaderSource::Static(value.into())));
        self
    }

    /// A header computed from each message; `None` leaves it out.
    pub fn header_with<F, V>(mut self, key: impl Into<String>, f: F) -> Self
    where
        F: Fn(&T) -> V + Send + Sync + 'static,
        V: Into<Option<String>>,
    {
        self.headers.push((
            key.into(),
            HeaderSource::Computed(Arc::new(move |value| f(value).into())),
        ));
        self
    }

    /// Which standard headers this type's messages carry: the CloudEvents
    /// set (the default) or [`HeaderProfile::Lean`] (id and type only), for
    /// high-volume topics of small events where the headers cost more than
    /// the payload. Consumers read both.
    pub fn header_profile(mut self, profile: HeaderProfile) -> Self {
        self.header_profile = profile;
        self
    }

    /// Payload fields (at any depth, by their serialized names) and
    /// headers whose values operators never see: the status page's view of
    /// recent messages shows `<redacted>` for them. Names compare ignoring
    /// case, `_` and `-` (`card_number` also covers `cardNumber`). Names
    /// that look like credentials (`password`, `secret`, `token`,
    /// `authorization`, `api_key`, `cookie`, `credential`, `private_key`)
    /// are redacted without being declared.
    pub fn sensitive<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sensitive.extend(names.into_iter().map(Into::into));
        self
    }

    /// The message key is personal data (a customer id, an email): the
    /// status page's view of recent messages shows `<redacted>` for it.
    pub fn sensitive_key(mut self) -> Self {
        self.sensitive_key = true;
        self
    }

    /// The codec for this type. Defaults to [`Json`].
    pub fn codec(mut self, codec: impl Codec<T>) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    /// Declares that this type is consumed, and how: group, buffer,
    /// backpressure, retries, dead letters, dedicated poll service. The
    /// handler itself is registered when kontext starts
    /// ([`KontextBuilder::consumers`](crate::KontextBuilder::consumers)), so a
    /// producer-only process shares the model without consuming.
    pub fn consumer(mut self, f: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder) -> Self {
        self.consumer = Some(f(ConsumerBuilder::default()).spec);
        self
    }

    pub(crate) fn freeze(self) -> TopicSpec<T> {
        let rust_type = std::any::type_name::<T>();
        TopicSpec {
            topic: self
                .name
                .unwrap_or_else(|| default_topic_name(rust_type))
                .into(),
            type_name: self
                .type_name
                .unwrap_or_else(|| short_type_name(rust_type).to_owned()),
            rust_type,
            provisioning: self.provisioning,
            key: self.key,
            headers: self.headers,
            header_profile: self.header_profile,
            codec: self.codec,
            consumer: self.consumer,
            outbox_mode: self.outbox_mode,
            sensitive: self.sensitive,
            sensitive_key: self.sensitive_key,
        }
    }
}

impl<T> fmt::Debug for TopicBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicBuilder")
            .field("type", &std::any::type_name::<T>())
            .field("name", &self.name)
            .field("type_name", &self.type_name)
            .field("provisioning", &self.provisioning)
            .finish_non_exhaustive()
    }
}

/// The frozen declaration of one message type.
pub struct TopicSpec<T> {
    pub(crate) topic: Arc<str>,
    pub(crate) type_name: String,
    pub(crate) rust_type: &'static str,
    pub(crate) provisioning: TopicProvisioning,
    pub(crate) key: Option<KeyFn<T>>,
    pub(crate) headers: Vec<(String, HeaderSource<T>)>,
    pub(crate) header_profile: HeaderProfile,
    pub(crate) codec: Arc<dyn Codec<T>>,
    pub(crate) consumer: Option<ConsumerSpec>,
    pub(crate) outbox_mode: OutboxMode,
    pub(crate) sensitive: Vec<String>,
    pub(crate) sensitive_key: bool,
}

impl<T> Clone for TopicSpec<T> {
    fn clone(&self) -> Self {
        TopicSpec {
            topic: Arc::clone(&self.topic),
            type_name: self.type_name.clone(),
            rust_type: self.rust_type,
            provisioning: self.provisioning.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            header_profile: self.header_profile,
            codec: Arc::clone(&self.codec),
            consumer: self.consumer.clone(),
            outbox_mode: self.outbox_mode,
            sensitive: self.sensitive.clone(),
            sensitive_key: self.sensitive_key,
        }
    }
}

impl<T> TopicSpec<T> {
    /// The topic messages of this type go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) fn topic_arc(&self) -> Arc<str> {
        Arc::clone(&self.topic)
    }

    /// The type discriminator written to every message.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// `std::any::type_name` of the Rust type.
    pub fn rust_type(&self) -> &'static str {
        self.rust_type
    }

    /// Whether a key is derived from each message.
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// Writes the key of `value` into `out`; `false` when the type has no key
    /// or the key function returned none.
    pub(crate) fn write_key(&self, value: &T, out: &mut Vec<u8>) -> bool {
        match &self.key {
            Some(f) => f(value, out),
            None => false,
        }
    }

    /// Which standard headers messages of this type carry.
    pub fn header_profile(&self) -> HeaderProfile {
        self.header_profile
    }

    /// How outbox messages of this type are sent.
    pub fn outbox_mode(&self) -> OutboxMode {
        self.outbox_mode
    }

    /// The consumer declaration, if the type is consumed.
    pub fn consumer(&self) -> Option<&ConsumerSpec> {
        self.consumer.as_ref()
    }

    pub(crate) fn codec(&self) -> &dyn Codec<T> {
        &*self.codec
    }
}

impl<T> fmt::Debug for TopicSpec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicSpec")
            .field("topic", &self.topic)
            .field("type_name", &self.type_name)
            .field("rust_type", &self.rust_type)
            .field("provisioning", &self.provisioning)
            .field("has_key", &self.key.is_some())
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// How a type's messages leave the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutboxMode {
    /// Only the relay sends (the default).
    #[default]
    Background,
    /// [`OutboxTransaction::commit`](crate::outbox::OutboxTransaction::commit) sends right after the commit and
    /// deletes the row on acknowledgement; anything it cannot send is left
    /// to the relay. The immediate send takes the row's shard lease, like a
    /// relay, so no relay sends the row too; if a relay holds the lease, or
    /// an earlier row of the same key is still waiting, the row is left to
    /// the relay (which was woken), so order and single sending hold.
    ImmediateWithFallback,
}
