//! Members of one group stopped while the group is still assigning: one
//! joins while another stops, both stop at once, one stops right after
//! another left. librdkafka aborts the process when a consumer closes
//! while an assignment is in progress (`rd_kafka_cgrp_terminated: assert:
//! !rd_kafka_assignment_in_progress`, librdkafka issue #4027); kontext
//! leaves its group and serves the revocation before it closes. A round
//! that aborts takes this test binary with it.
//! Against the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod consumer_common;

use std::time::Duration;

use common::*;
use consumer_common::*;
use kontext::prelude::*;

/// Rounds per run; `KONTEXT_CLOSE_ROUNDS` raises it for a longer stress.
fn rounds() -> usize {
    std::env::var("KONTEXT_CLOSE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6)
}

async fn member(model: &Model, broker: &Broker, group: &str, seen: &Seen) -> Kontext {
    let s = seen.clone();
    Kontext::builder(model.clone())
        .settings(settings(group).consumer(|c| c.librdkafka.set("auto.commit.interval.ms", "50")))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s.handler::<OrderCreated>("created", |e| (e.order, e.seq), None));
        })
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_stopped_while_their_group_rebalances_close_cleanly() {
    init_tracing();
    let broker = broker();
    let topic = unique_name("orders");
    let model = Model::builder()
        .topic::<OrderCreated>(|t| {
            t.name(&topic)
                .partitions(6)
                .key(|e| e.order)
                .consumer(|c| c.workers(4))
        })
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    producer
        .producer()
        .unwrap()
        .produce_batch(&created_batch(0..600, 60))
        .await
        .unwrap();
    let rounds = rounds();
    for round in 0..rounds {
        let group = unique_name("g");
        let seen = Seen::default();
        let a = member(&model, &broker, &group, &seen).await;
        // Odd rounds: A has its partitions and is handling when the others
        // join; even rounds: all three join together.
        if round % 2 == 1 {
            wait_until("A to be assigned", async || {
                let s = a.registry().service_of::<OrderCreated>().unwrap();
                ready(!s.assigned_partitions.is_empty(), || format!("{s:?}"))
            })
            .await;
        }
        let (b, c) = tokio::join!(
            member(&model, &broker, &group, &seen),
            member(&model, &broker, &group, &seen)
        );
        // Each stops after its own pause, so that over the rounds closes
        // land at every step of the group's rebalances: before a join
        // completes, while partitions are being assigned, while they are
        // handed over, after another member left.
        let pause = |i: usize| Duration::from_millis([0, 5, 20, 60, 150, 400][(round + i * 2) % 6]);
        let stop = async |k: Kontext, i: usize| {
            tokio::time::sleep(pause(i)).await;
            let started = std::time::Instant::now();
            let stopped = k.shutdown(Duration::from_secs(5)).await;
            // Within its timeout plus 2 s, with slack for a loaded machine.
            assert!(
                started.elapsed() < Duration::from_secs(12),
                "{:?}",
                started.elapsed()
            );
            stopped
        };
        let (x, y, z) = tokio::join!(stop(a, 0), stop(b, 1), stop(c, 2));
        // Every stop returns, within its bound; a final commit the group
        // refused while it rebalanced is reported, not an error here.
        for stopped in [x, y, z] {
            match stopped {
                Ok(()) => {}
                Err(kontext::Error::ShutdownIncomplete { what }) => {
                    assert!(what.contains("final commit"), "{what}");
                }
                Err(e) => panic!("{e}"),
            }
        }
        eprintln!("round {round}: {} handled", seen.all().len());
    }
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}
