//! The zero-copy record's ownership: the one module of the consumer with
//! `unsafe` code, and the one that keeps every invariant it rests on.
//!
//! A record is not copied out of librdkafka. The poll thread's message goes
//! to a worker as it is and is destroyed when the worker is done with it,
//! possibly long after the `poll` call that returned it. librdkafka frees a
//! message's memory with its consumer, so a message must never outlive its
//! consumer; `BorrowedMessage` says so with a lifetime, which a message
//! crossing threads and queues cannot carry.
//!
//! [`LentConsumer`] therefore hands out each message as a [`Polled`] that
//! holds a loan on the consumer, and lets the consumer go only when no loan
//! is out. If records are still out when it is dropped (a handler that
//! ignores cancellation still holds one), it leaves the consumer open
//! rather than free memory under them: a leak, never a use after free.
//! Nothing outside this module can break that, whatever it does with the
//! records: drop them on any thread, in any order, or never.

#![allow(unsafe_code)]

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;

use crate::client::ClientGuard;

/// A message polled from a [`LentConsumer`], usable on any thread for as
/// long as it lives.
pub(crate) struct Polled {
    // Declared before the loan: fields drop in order, so the message is
    // destroyed before its loan is given back.
    message: BorrowedMessage<'static>,
    _loan: Arc<()>,
}

impl Polled {
    pub(crate) fn message(&self) -> &BorrowedMessage<'static> {
        &self.message
    }
}

/// What became of a [`LentConsumer`] when it was let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// No record was out: the consumer is closed and freed.
    Closed,
    /// `out` records were still out: the consumer is left open (leaked).
    LeftOpen { out: usize },
}

/// A consumer whose messages may outlive the `poll` call that returned them.
pub(crate) struct LentConsumer<C: ConsumerContext + 'static> {
    consumer: ManuallyDrop<BaseConsumer<C>>,
    /// Counts the client as live; let go after the consumer.
    guard: ManuallyDrop<ClientGuard>,
    /// Cloned into every [`Polled`]: the consumer's own reference plus one
    /// per record out.
    loans: Arc<()>,
    released: bool,
}

impl<C: ConsumerContext + 'static> LentConsumer<C> {
    pub(crate) fn new(consumer: BaseConsumer<C>, guard: ClientGuard) -> Self {
        LentConsumer {
            consumer: ManuallyDrop::new(consumer),
            guard: ManuallyDrop::new(guard),
            loans: Arc::new(()),
            released: false,
        }
    }

    /// Polls one message (or error), waiting up to `timeout`.
    pub(crate) fn poll(&self, timeout: Duration) -> Option<KafkaResult<Polled>> {
        let polled = self.consumer.poll(timeout)?;
        Some(polled.map(|m| Polled {
            // SAFETY: only the lifetime changes. The loan taken with it keeps
            // the consumer from being freed while the message lives (see
            // `release`), which is all the borrow stood for.
            message: unsafe {
                std::mem::transmute::<BorrowedMessage<'_>, BorrowedMessage<'static>>(m)
            },
            _loan: Arc::clone(&self.loans),
        }))
    }

    /// Records polled from this consumer and not dropped yet.
    pub(crate) fn out(&self) -> usize {
        Arc::strong_count(&self.loans) - 1
    }

    /// Waits until every record is back (dropped), at most `wait`; `true`
    /// if they all are.
    pub(crate) fn wait_returned(&self, wait: Duration) -> bool {
        let since = Instant::now();
        while self.out() > 0 {
            if since.elapsed() >= wait {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Lets the consumer go now and says how; dropping does the same.
    #[cfg(test)]
    pub(crate) fn close(mut self) -> Closed {
        self.release()
    }

    fn release(&mut self) -> Closed {
        if self.released {
            return Closed::Closed;
        }
        self.released = true;
        // `get_mut` succeeds only if no other reference exists, and it
        // synchronises with the release of every record's loan, so each
        // message was destroyed before the consumer is.
        if Arc::get_mut(&mut self.loans).is_none() {
            let out = self.out();
            tracing::error!(
                records = out,
                "records still held when the consumer was let go; it is left open so they stay valid"
            );
            return Closed::LeftOpen { out };
        }
        // SAFETY: released once (the flag), and never used again: every
        // other method needs the value, which is being closed or dropped.
        unsafe {
            ManuallyDrop::drop(&mut self.consumer);
            ManuallyDrop::drop(&mut self.guard);
        }
        Closed::Closed
    }
}

impl<C: ConsumerContext + 'static> std::ops::Deref for LentConsumer<C> {
    type Target = BaseConsumer<C>;

    fn deref(&self) -> &BaseConsumer<C> {
        &self.consumer
    }
}

impl<C: ConsumerContext + 'static> Drop for LentConsumer<C> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::Consumer as _;
    use rdkafka::consumer::DefaultConsumerContext;
    use rdkafka::message::Message as _;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

    use super::*;
    use crate::broker::EmbeddedBroker;
    use crate::client::{ClientKind, ClientTracker};

    const TOPIC: &str = "lent-records";

    fn broker_with_records(n: usize) -> EmbeddedBroker {
        let broker = EmbeddedBroker::start(1).expect("embedded broker");
        broker.create_topic(TOPIC, 1, 1).expect("topic");
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .create()
            .expect("producer");
        for i in 0..n {
            let payload = format!("record-{i}");
            producer
                .send(BaseRecord::<(), _>::to(TOPIC).payload(&payload))
                .expect("enqueue");
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
        broker
    }

    fn consumer(
        broker: &EmbeddedBroker,
        clients: &ClientTracker,
    ) -> LentConsumer<DefaultConsumerContext> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .set("group.id", "lent-test")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[TOPIC]).expect("subscribe");
        LentConsumer::new(consumer, clients.track(ClientKind::Consumer))
    }

    fn next(consumer: &LentConsumer<DefaultConsumerContext>) -> Polled {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(p)) = consumer.poll(Duration::from_millis(100)) {
                return p;
            }
        }
        panic!("no record within 30 s");
    }

    #[test]
    fn a_record_held_past_its_consumer_keeps_the_consumer_open() {
        let broker = broker_with_records(2);
        let clients = ClientTracker::default();
        let consumer = consumer(&broker, &clients);
        let first = next(&consumer);
        let second = next(&consumer);
        assert_eq!(consumer.out(), 2);
        drop(second);
        assert_eq!(consumer.out(), 1);
        assert!(!consumer.wait_returned(Duration::from_millis(20)));

        // Let go while `first` is held: the consumer stays open, so the
        // message is still valid memory, and its client is still counted.
        assert_eq!(consumer.close(), Closed::LeftOpen { out: 1 });
        assert_eq!(first.message().payload(), Some(&b"record-0"[..]));
        assert_eq!(clients.counts().consumers, 1);
    }

    #[test]
    fn a_consumer_whose_records_are_back_closes() {
        let broker = broker_with_records(1);
        let clients = ClientTracker::default();
        let consumer = consumer(&broker, &clients);
        let record = next(&consumer);
        assert_eq!(record.message().payload(), Some(&b"record-0"[..]));
        // Dropped on another thread, as workers do.
        std::thread::spawn(move || drop(record))
            .join()
            .expect("thread");
        assert!(consumer.wait_returned(Duration::from_secs(1)));
        assert_eq!(consumer.close(), Closed::Closed);
        assert_eq!(clients.counts().consumers, 0);
    }
}
