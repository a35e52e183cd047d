//! Use cases and the ports they need (seed 001's application layer): the
//! domain and these depend on neither Kafka nor a database; the
//! infrastructure implements the ports with kontext.

use std::future::Future;

use serde::Serialize;

use crate::domain::{Invalid, NewShipment, Shipment, ShipmentCreatedEvent};

/// An event the application publishes: any serde type the infrastructure's
/// model declares a topic for.
pub trait Event: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static {}

impl<T> Event for T where T: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static {}

/// A port's failure (the database or the broker behind it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PortError(#[from] pub Box<dyn std::error::Error + Send + Sync>);

/// Publishes events as part of the work it belongs to: nothing is published
/// unless that work commits.
pub trait EventPublisher: Send {
    /// Adds `event` to the work.
    fn publish<E: Event>(
        &mut self,
        event: &E,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// One atomic piece of work on shipments: rows and events commit together.
pub trait ShipmentWork: EventPublisher {
    /// Stores a new shipment.
    fn insert(&mut self, shipment: &Shipment)
    -> impl Future<Output = Result<(), PortError>> + Send;
    /// Makes the rows and the events durable, all or nothing.
    fn commit(self) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// Where shipments live.
pub trait Shipments: Send + Sync + 'static {
    /// The work this store begins.
    type Work: ShipmentWork;
    /// Begins a piece of work.
    fn begin(&self) -> impl Future<Output = Result<Self::Work, PortError>> + Send;
    /// The shipment `id`, if it exists.
    fn find(&self, id: &str) -> impl Future<Output = Result<Option<Shipment>, PortError>> + Send;
}

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request breaks a rule: nothing was written.
    #[error("invalid shipment: {0}")]
    Invalid(#[from] Invalid),
    /// The store or the publisher failed: nothing was written.
    #[error("could not save the shipment: {0}")]
    Port(#[from] PortError),
}

/// The shipping service's use cases.
#[derive(Debug, Clone)]
pub struct ShipmentService<S> {
    store: S,
}

impl<S: Shipments> ShipmentService<S> {
    /// A service over `store`.
    pub fn new(store: S) -> Self {
        ShipmentService { store }
    }

    /// Creates a shipment and announces it, atomically: the row and
    /// [`ShipmentCreatedEvent`] are committed together or not at all.
    pub async fn create(&self, request: NewShipment) -> Result<Shipment, AppError> {
        let id = format!("shp-{}", uuid::Uuid::now_v7().simple());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let shipment = request.into_shipment(id, now_ms)?;
        let mut work = self.store.begin().await?;
        work.insert(&shipment).await?;
        work.publish(&ShipmentCreatedEvent::from(&shipment)).await?;
        work.commit().await?;
        Ok(shipment)
    }

    /// The shipment `id`, if it exists.
    pub async fn get(&self, id: &str) -> Result<Option<Shipment>, AppError> {
        Ok(self.store.find(id).await?)
    }
}

/// The ports in memory, for the application's unit tests and for trying
/// the API without a database: committed rows and events are visible;
/// work dropped without commit leaves nothing.
pub mod in_memory {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;

    #[derive(Debug, Default)]
    struct State {
        shipments: BTreeMap<String, Shipment>,
        events: Vec<serde_json::Value>,
    }

    /// Shipments and published events in memory.
    #[derive(Debug, Clone, Default)]
    pub struct InMemoryShipments {
        state: Arc<Mutex<State>>,
        /// Fail every commit (to test that nothing is half-written).
        pub fail_commits: bool,
    }

    impl InMemoryShipments {
        /// The events committed so far, as JSON.
        pub fn published(&self) -> Vec<serde_json::Value> {
            self.lock().events.clone()
        }

        /// The number of committed shipments.
        pub fn len(&self) -> usize {
            self.lock().shipments.len()
        }

        /// Whether no shipment was committed.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// Work on [`InMemoryShipments`], applied at commit.
    #[derive(Debug)]
    pub struct InMemoryWork {
        store: InMemoryShipments,
        shipments: Vec<Shipment>,
        events: Vec<serde_json::Value>,
    }

    impl EventPublisher for InMemoryWork {
        async fn publish<E: Event>(&mut self, event: &E) -> Result<(), PortError> {
            let json = serde_json::to_value(event).map_err(|e| PortError(Box::new(e)))?;
            self.events.push(json);
            Ok(())
        }
    }

    impl ShipmentWork for InMemoryWork {
        async fn insert(&mut self, shipment: &Shipment) -> Result<(), PortError> {
            self.shipments.push(shipment.clone());
            Ok(())
        }

        async fn commit(self) -> Result<(), PortError> {
            if self.store.fail_commits {
                return Err(PortError("the commit failed".into()));
            }
            let mut state = self.store.lock();
            for s in self.shipments {
                state.shipments.insert(s.id.clone(), s);
            }
            state.events.extend(self.events);
            Ok(())
        }
    }

    impl Shipments for InMemoryShipments {
        type Work = InMemoryWork;

        async fn begin(&self) -> Result<InMemoryWork, PortError> {
            Ok(InMemoryWork {
                store: self.clone(),
                shipments: Vec::new(),
                events: Vec::new(),
            })
        }

        async fn find(&self, id: &str) -> Result<Option<Shipment>, PortError> {
            Ok(self.lock().shipments.get(id).cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::in_memory::InMemoryShipments;
    use super::*;

    fn request() -> NewShipment {
        NewShipment {
            user_id: 3,
            warehouse: "ams-1".into(),
            destination: "Utrecht".into(),
        }
    }

    #[tokio::test]
    async fn creating_a_shipment_stores_it_and_publishes_its_event() {
        let store = InMemoryShipments::default();
        let service = ShipmentService::new(store.clone());
        let shipment = service.create(request()).await.unwrap();
        assert_eq!(
            service.get(&shipment.id).await.unwrap(),
            Some(shipment.clone())
        );
        assert_eq!(
            store.published(),
            vec![serde_json::to_value(ShipmentCreatedEvent::from(&shipment)).unwrap()]
        );
    }

    #[tokio::test]
    async fn an_invalid_request_writes_nothing() {
        let store = InMemoryShipments::default();
        let service = ShipmentService::new(store.clone());
        let mut bad = request();
        bad.destination = String::new();
        let err = service.create(bad).await.unwrap_err();
        assert!(matches!(
            err,
            AppError::Invalid(Invalid {
                field: "destination",
                ..
            })
        ));
        assert!(store.is_empty());
        assert!(store.published().is_empty());
    }

    #[tokio::test]
    async fn a_failed_commit_publishes_nothing() {
        let mut store = InMemoryShipments::default();
        store.fail_commits = true;
        let service = ShipmentService::new(store.clone());
        assert!(matches!(
            service.create(request()).await,
            Err(AppError::Port(_))
        ));
        assert!(store.is_empty());
        assert!(store.published().is_empty());
    }
}
