//! Shipments and the events about them. Plain serde types: which Kafka
//! topic carries an event is declared in the infrastructure's model.

use serde::{Deserialize, Serialize};

/// A shipment as stored and returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// `shp-` and a UUIDv7.
    pub id: String,
    /// The customer.
    pub user_id: i64,
    /// Where it leaves from.
    pub warehouse: String,
    /// Where it goes.
    pub destination: String,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// A request to create a shipment, as the API receives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewShipment {
    /// The customer; positive.
    pub user_id: i64,
    /// 1 to 64 characters.
    pub warehouse: String,
    /// 1 to 200 characters.
    pub destination: String,
}

/// Why a [`NewShipment`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {problem}")]
pub struct Invalid {
    /// The field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl NewShipment {
    /// The shipment this request creates, or the first rule it breaks.
    pub fn into_shipment(self, id: String, now_ms: i64) -> Result<Shipment, Invalid> {
        if self.user_id <= 0 {
            return Err(Invalid {
                field: "user_id",
                problem: "must be positive",
            });
        }
        let bounded = |field, value: &str, max| {
            let value = value.trim();
            if value.is_empty() {
                Err(Invalid {
                    field,
                    problem: "must not be empty",
                })
            } else if value.chars().any(char::is_control) {
                // NUL and other control characters: PostgreSQL refuses NUL
                // in text, and none belongs in a warehouse or an address.
                Err(Invalid {
                    field,
                    problem: "must not contain control characters",
                })
            } else if value.chars().count() > max {
                Err(Invalid {
                    field,
                    problem: "is too long",
                })
            } else {
                Ok(value.to_owned())
            }
        };
        Ok(Shipment {
            id,
            user_id: self.user_id,
            warehouse: bounded("warehouse", &self.warehouse, 64)?,
            destination: bounded("destination", &self.destination, 200)?,
            created_at_ms: now_ms,
        })
    }
}

/// Published by the shipping service when a shipment was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCreatedEvent {
    /// The shipment.
    pub shipment_id: String,
    /// The customer.
    pub user_id: i64,
    /// Where it leaves from.
    pub warehouse: String,
}

impl From<&Shipment> for ShipmentCreatedEvent {
    fn from(s: &Shipment) -> Self {
        ShipmentCreatedEvent {
            shipment_id: s.id.clone(),
            user_id: s.user_id,
            warehouse: s.warehouse.clone(),
        }
    }
}

/// Published by the identity service when it recorded a user's activity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserActivityRecorded {
    /// The customer.
    pub user_id: i64,
    /// The shipment the activity is about.
    pub shipment_id: String,
    /// What happened, for people.
    pub activity: String,
}

impl UserActivityRecorded {
    /// The activity a created shipment means for its customer.
    pub fn for_shipment(e: &ShipmentCreatedEvent) -> Self {
        UserActivityRecorded {
            user_id: e.user_id,
            shipment_id: e.shipment_id.clone(),
            activity: format!("shipment {} created at {}", e.shipment_id, e.warehouse),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request(user_id: i64, warehouse: &str, destination: &str) -> NewShipment {
        NewShipment {
            user_id,
            warehouse: warehouse.into(),
            destination: destination.into(),
        }
    }

    #[test]
    fn a_valid_request_becomes_a_trimmed_shipment() {
        let s = request(7, " ams-1 ", "Utrecht")
            .into_shipment("shp-1".into(), 42)
            .unwrap();
        assert_eq!(s.warehouse, "ams-1");
        assert_eq!(s.created_at_ms, 42);
    }

    #[test]
    fn each_rule_names_its_field() {
        let refused = |r: NewShipment| r.into_shipment("x".into(), 0).unwrap_err().field;
        assert_eq!(refused(request(0, "a", "b")), "user_id");
        assert_eq!(refused(request(1, "  ", "b")), "warehouse");
        assert_eq!(refused(request(1, "a", &"x".repeat(201))), "destination");
    }
}
