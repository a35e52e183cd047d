//! The trait behind `#[derive(Topic)]`, and how derived settings reach the
//! model: each derive registers its type in a link-time list, and
//! [`ModelBuilder::topic`](super::ModelBuilder::topic) applies the derived
//! settings before the builder closure runs, so the closure can override any
//! of them.

use std::any::{Any, TypeId};
use std::sync::Arc;

use crate::model::{HeaderSource, Message, TopicBuilder};

/// A type mapped to its topic at compile time. Derive it:
///
/// ```
/// use kontext::{ModelBuilder, Topic};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Topic)]
/// #[topic(name = "shipping.shipment.created", key = shipment_id, partitions = 6)]
/// struct ShipmentCreated {
///     shipment_id: String,
///     #[topic(header = "x-tenant")]
///     tenant: String,
/// }
///
/// assert_eq!(ShipmentCreated::NAME, "shipping.shipment.created");
/// let model = ModelBuilder::new().topic::<ShipmentCreated>(|t| t).build()?;
/// assert_eq!(model.topic_of::<ShipmentCreated>(), Some("shipping.shipment.created"));
/// # Ok::<(), kontext::model::ModelError>(())
/// ```
///
/// Container attributes, in `#[topic(...)]`:
/// - `name = "..."`: the topic; checked against Kafka's rules at compile
///   time. Defaults to the type name in kebab case (`OrderCreated` gives
///   `order-created`), like the builder.
/// - `key = field`: the field whose value is the message key (any
///   [`MessageKey`](crate::model::MessageKey): strings, UUIDs, integers...).
/// - `header(field, ...)`: fields copied into headers named like the field.
/// - `type_name = "..."`: the `ce_type` discriminator (defaults to the type name).
/// - `partitions = N`, `replication = N`: for provisioning.
/// - `crate = "path"`: where kontext is, if re-exported under another path.
///
/// Field attributes: `#[topic(key)]`, `#[topic(header)]`, `#[topic(header = "name")]`.
pub trait Topic: Message {
    /// The topic name.
    const NAME: &'static str;
    /// The type discriminator.
    const TYPE_NAME: &'static str;
    /// Partitions for provisioning, if declared.
    const PARTITIONS: Option<i32>;
    /// Replication for provisioning, if declared.
    const REPLICATION: Option<i32>;
    /// Whether a key field is declared.
    const HAS_KEY: bool;

    /// Appends the key; `false` if there is none.
    fn write_key(&self, out: &mut Vec<u8>) -> bool;

    /// Appends `(header name, value)` for every header field.
    fn headers(&self, out: &mut Vec<(&'static str, String)>);
}

/// A derived type's registration. Created by the derive; not for direct use.
#[doc(hidden)]
#[derive(Debug)]
pub struct DerivedTopic {
    type_id: fn() -> TypeId,
    apply: fn(&mut dyn Any),
}

impl DerivedTopic {
    #[doc(hidden)]
    pub const fn of<T: Topic>() -> Self {
        DerivedTopic {
            type_id: TypeId::of::<T>,
            apply: apply::<T>,
        }
    }
}

inventory::collect!(DerivedTopic);

fn apply<T: Topic>(builder: &mut dyn Any) {
    let Some(b) = builder.downcast_mut::<TopicBuilder<T>>() else {
        return;
    };
    b.name = Some(T::NAME.to_owned());
    b.type_name = Some(T::TYPE_NAME.to_owned());
    b.provisioning.partitions = T::PARTITIONS;
    b.provisioning.replication = T::REPLICATION;
    if T::HAS_KEY {
        b.key = Some(Arc::new(|value: &T, out: &mut Vec<u8>| {
            value.write_key(out)
        }));
    }
    b.headers
        .push((String::new(), HeaderSource::Derived(Arc::new(T::headers))));
}

/// Applies the derived settings of `T`, if `T` derives `Topic`.
pub(crate) fn apply_derived<T: Message>(builder: &mut TopicBuilder<T>) {
    let id = TypeId::of::<T>();
    if let Some(d) = inventory::iter::<DerivedTopic>
        .into_iter()
        .find(|d| (d.type_id)() == id)
    {
        (d.apply)(builder);
    }
}
