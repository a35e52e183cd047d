//! Consumers: retries, dead letters, per-key order across retries, hung
//! handlers and undecodable records.
//! Against the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod consumer_common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kontext::consumer::dlq_headers;
use kontext::prelude::*;

use consumer_common::*;
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_then_dead_letter_with_headers_and_the_loop_survives() {
    init_tracing();
    let broker = broker();
    let (topic, group, dlq) = (
        unique_name("jobs"),
        unique_name("g"),
        unique_name("jobs-dlq"),
    );
    let dlq2 = dlq.clone();
    let model = Model::builder()
        .topic::<Job>(move |t| {
            t.name(&topic).key(|j| j.id).consumer(move |c| {
                c.dead_letter_topic(dlq2).retry(RetryPolicy {
                    max_attempts: 3,
                    initial_backoff: Duration::from_millis(10),
                    max_backoff: Duration::from_millis(50),
                })
            })
        })
        .build()
        .unwrap();
    let topic = model.topic_of::<Job>().unwrap().to_owned();
    let producer = producer_for(&model, &broker).await;
    let p = producer.producer().unwrap();

    let attempts: Arc<Mutex<HashMap<u32, Vec<u32>>>> = Arc::default();
    let done: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (at, dn) = (attempts.clone(), done.clone());
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |job: Job, ctx: MessageContext| {
                let (at, dn) = (at.clone(), dn.clone());
                async move {
                    at.lock()
                        .unwrap()
                        .entry(job.id)
                        .or_default()
                        .push(ctx.attempt());
                    match job.mode.as_str() {
                        "panic" => panic!("job {} exploded", job.id),
                        "fatal" => return Err(HandlerError::dead_letter("not fixable")),
                        "skip" => return Err(HandlerError::skip("not for us")),
                        _ => {}
                    }
                    if ctx.attempt() <= job.fail_times {
                        return Err(
                            std::io::Error::other(format!("flaky {}", ctx.attempt())).into()
                        );
                    }
                    dn.lock().unwrap().push(job.id);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    assert_eq!(consumer.clients().producers, 0, "nothing dead-lettered yet");

    let job = |id, fail_times, mode: &str| Job {
        id,
        fail_times,
        mode: mode.into(),
    };
    p.produce(&job(1, 2, "")).await.unwrap(); // succeeds on attempt 3
    p.produce(&job(2, 5, "")).await.unwrap(); // exhausts 3 attempts -> DLQ
    p.produce(&job(3, 0, "panic")).await.unwrap(); // panics every time -> DLQ
    p.produce(&job(4, 0, "fatal")).await.unwrap(); // DLQ at once
    p.produce(&job(5, 0, "skip")).await.unwrap(); // skipped, not dead-lettered

    // Raw records the codec or the router cannot accept.
    let raw = rdkafka_producer(&broker);
    send_raw(&raw, &topic, Some(b"{not json"), Some("Job")).await;
    send_raw(&raw, &topic, Some(br#"{"id":9}"#), Some("SomethingElse")).await;
    send_raw(&raw, &topic, None, Some("Job")).await;
    p.produce(&job(6, 0, "")).await.unwrap(); // the loop is still alive

    wait_until("job 6 to be handled", async || {
        let done = done.lock().unwrap();
        ready(done.contains(&6), || format!("handled {done:?}"))
    })
    .await;
    let records = read_topic(&broker, &dlq, 6, READ_TIMEOUT).await.unwrap();
    assert_eq!(records.len(), 6, "{records:#?}");
    // Unroutable records are dead-lettered by the poll service's own worker,
    // so only the per-type order is fixed; index by reason.
    let by_reason: BTreeMap<&str, &RecordedMessage> = records
        .iter()
        .map(|r| (r.header(dlq_headers::REASON).unwrap(), r))
        .collect();
    let reasons: Vec<&str> = by_reason.keys().copied().collect();
    assert_eq!(
        reasons,
        [
            "decode",
            "handler",
            "panic",
            "retries-exhausted",
            "tombstone",
            "unknown-type"
        ]
    );
    let exhausted = by_reason["retries-exhausted"];
    assert_eq!(
        exhausted.header(dlq_headers::ORIGINAL_TOPIC),
        Some(topic.as_str())
    );
    assert_eq!(exhausted.header(dlq_headers::ATTEMPTS), Some("3"));
    assert_eq!(exhausted.header(dlq_headers::GROUP), Some(group.as_str()));
    assert!(
        exhausted
            .header(dlq_headers::ERROR)
            .unwrap()
            .contains("flaky 3")
    );
    assert!(
        exhausted
            .header(dlq_headers::ORIGINAL_OFFSET)
            .unwrap()
            .parse::<i64>()
            .is_ok()
    );
    assert!(humantime::parse_rfc3339(exhausted.header(dlq_headers::FAILED_AT).unwrap()).is_ok());
    assert_eq!(
        exhausted.header("ce_type"),
        Some("Job"),
        "original headers kept"
    );
    assert_eq!(exhausted.key_str(), Some("2"));
    assert!(
        by_reason["panic"]
            .header(dlq_headers::ERROR)
            .unwrap()
            .contains("job 3 exploded")
    );
    assert_eq!(
        by_reason["decode"].payload.as_deref(),
        Some(&b"{not json"[..])
    );
    assert!(by_reason["tombstone"].payload.is_none());
    assert!(
        by_reason["unknown-type"]
            .header(dlq_headers::ERROR)
            .unwrap()
            .contains("SomethingElse")
    );
    assert_eq!(
        by_reason["handler"].header(dlq_headers::ATTEMPTS),
        Some("1")
    );

    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts[&1], vec![1, 2, 3]);
    assert_eq!(attempts[&2], vec![1, 2, 3]);
    assert_eq!(attempts[&3], vec![1, 2, 3]);
    assert_eq!(attempts[&4], vec![1]);
    assert_eq!(attempts[&5], vec![1]);
    assert_eq!(*done.lock().unwrap(), vec![1, 6]);
    let st = consumer.registry().type_status::<Job>().unwrap();
    assert_eq!(
        st.dead_lettered, 4,
        "retries-exhausted, panic, handler, decode"
    );
    // Issue 13, defect 10: what no type could take was counted nowhere.
    assert_eq!(
        consumer.registry().services()[0].rejected,
        2,
        "tombstone, unknown type"
    );
    assert_eq!(
        consumer.clients().producers,
        1,
        "one dead-letter producer, made when first needed"
    );
    assert!(consumer.registry().is_healthy());
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_across_retries() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("orders"), unique_name("g"));
    let model = Model::builder()
        .topic::<OrderCreated>(|t| {
            t.name(&topic).partitions(3).key(|e| e.order).consumer(|c| {
                c.retry(RetryPolicy {
                    max_attempts: 5,
                    initial_backoff: Duration::from_millis(1),
                    max_backoff: Duration::from_millis(5),
                })
            })
        })
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    let events = created_batch(0..300, 7);
    producer
        .producer()
        .unwrap()
        .produce_batch(&events)
        .await
        .unwrap();

    let seen = Seen::default();
    let s = seen.clone();
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker)
        .consumers(move |c| {
            c.handler(move |e: OrderCreated, ctx: MessageContext| {
                let s = s.clone();
                async move {
                    // Every fifth message fails twice before it succeeds.
                    if e.seq % 5 == 0 && ctx.attempt() < 3 {
                        return Err(HandlerError::retry("transient"));
                    }
                    s.push("created", e.order, e.seq, &ctx);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    assert!(seen.wait_for("created", 300, READ_TIMEOUT).await);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let mut per_key: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (_, key, seq, _, _) in seen.all() {
        per_key.entry(key).or_default().push(seq);
    }
    for (key, seqs) in per_key {
        let expected: Vec<u32> = (0..300).filter(|s| s % 7 == key).collect();
        assert_eq!(seqs, expected, "key {key}");
    }
}

/// Issue 13, defect 7: a 2 MB record that does not decode went to a
/// dead-letter producer limited to 1 MB, which retried forever; the lane
/// never moved on and nothing showed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_mb_record_that_does_not_decode_is_dead_lettered_and_the_partition_moves_on() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("jobs"), unique_name("g"));
    let model = Model::builder()
        .topic::<Job>(|t| {
            t.name(&topic)
                .partitions(1)
                // The source topic takes the big record; its dead-letter
                // topic keeps the broker's default limit (1 MB on Kafka).
                .config("max.message.bytes", "4194304")
        })
        .build()
        .unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let consumer = Kontext::builder(model.clone())
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(RecordJobIds(h));
        })
        .start()
        .await
        .unwrap();
    let big: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("message.max.bytes", "4194304")
        .create()
        .unwrap();
    let payload = vec![b'x'; 2 * 1024 * 1024];
    send_raw(&big, &topic, Some(&payload), None).await;
    let good = serde_json::to_vec(&Job {
        id: 7,
        fail_times: 0,
        mode: String::new(),
    })
    .unwrap();
    send_raw(&big, &topic, Some(&good), None).await;

    wait_until("the record after the big one to be handled", async || {
        ready(!handled.lock().unwrap().is_empty(), String::new)
    })
    .await;
    assert_eq!(*handled.lock().unwrap(), vec![7]);
    let dlq = read_topic(&broker, &format!("{topic}.dlq"), 1, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header(dlq_headers::REASON), Some("decode"));
    let kept = dlq[0].payload.as_ref().map_or(0, Vec::len);
    match dlq[0].header(dlq_headers::TRUNCATED) {
        // The broker refused the full record: the payload was cut to its
        // first 16 KiB (README).
        Some(t) => {
            assert_eq!(t, format!("{kept}/{}", payload.len()));
            assert_eq!(kept, 16 * 1024);
        }
        None => {
            // Apache Kafka refuses a 2 MB record on a topic with its
            // default limit (1 MB): there the cut must have happened.
            assert!(!external(), "Apache Kafka took a 2 MB dead letter whole");
            assert_eq!(kept, payload.len(), "the whole record");
        }
    }
    let st = consumer.registry().type_status::<Job>().unwrap();
    assert_eq!(st.dead_lettered + st.handled, 2, "{st:?}");
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Issue 13, defect 6: a handler that never returned held its partition
/// forever. With a time limit, the hung attempt is cancelled and retried,
/// one that always hangs is dead-lettered, and the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_is_cancelled_at_its_time_limit_and_the_partition_moves_on() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("jobs"), unique_name("g"));
    let model = Model::builder()
        .topic::<Job>(|t| {
            t.name(&topic).partitions(1).key(|j| j.id).consumer(|c| {
                c.handler_timeout(Duration::from_millis(300))
                    .retry(RetryPolicy {
                        max_attempts: 2,
                        initial_backoff: Duration::from_millis(10),
                        max_backoff: Duration::from_millis(10),
                    })
            })
        })
        .build()
        .unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let consumer = Kontext::builder(model.clone())
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |j: Job, ctx: MessageContext| {
                let h = h.clone();
                async move {
                    // "hang" hangs on every attempt, "hang-once" on the first.
                    if j.mode == "hang" || (j.mode == "hang-once" && ctx.attempt() == 1) {
                        std::future::pending::<()>().await;
                    }
                    h.lock().unwrap().push(j.id);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    let p = producer.producer().unwrap();
    for (id, mode) in [(1, "hang-once"), (2, "hang"), (3, "")] {
        p.produce(&Job {
            id,
            fail_times: 0,
            mode: mode.into(),
        })
        .await
        .unwrap();
    }
    wait_until("two records to be handled", async || {
        let handled = handled.lock().unwrap();
        ready(handled.len() >= 2, || format!("handled {handled:?}"))
    })
    .await;
    assert_eq!(*handled.lock().unwrap(), vec![1, 3], "in partition order");
    let dlq = read_topic(&broker, &format!("{topic}.dlq"), 1, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header(dlq_headers::REASON), Some("timeout"));
    assert_eq!(dlq[0].header(dlq_headers::ATTEMPTS), Some("2"));
    let st = consumer.registry().type_status::<Job>().unwrap();
    assert_eq!(
        (st.handled, st.dead_lettered, st.retried),
        (2, 1, 2),
        "{st:?}"
    );
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Issue 13, defect 7: a dead letter the broker refuses for good (here its
/// topic does not exist and may not be created) was retried forever; the
/// lane never moved on and nothing showed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_for_good_is_given_up_on_counted_and_the_partition_moves_on() {
    init_tracing();
    let broker = broker();
    let (topic, group, dlq) = (
        unique_name("jobs"),
        unique_name("g"),
        unique_name("missing-dlq"),
    );
    let model = Model::builder()
        .topic::<Job>(|t| {
            t.name(&topic)
                .partitions(1)
                .consumer(|c| c.dead_letter_topic(&dlq))
        })
        .build()
        .unwrap();
    // Creates the source topic; the dead-letter topic is never created.
    let _producer = producer_for(&model, &broker).await;
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let consumer = Kontext::builder(model.clone())
        .settings(
            settings(&group)
                .provision_topics(false)
                .producer(|p| p.librdkafka.set("allow.auto.create.topics", "false")),
        )
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(RecordJobIds(h));
        })
        .start()
        .await
        .unwrap();
    let raw: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    send_raw(&raw, &topic, Some(b"not json"), None).await;
    let good = serde_json::to_vec(&Job {
        id: 7,
        fail_times: 0,
        mode: String::new(),
    })
    .unwrap();
    send_raw(&raw, &topic, Some(&good), None).await;

    wait_until(
        "the record after the refused dead letter to be handled",
        async || {
            ready(!handled.lock().unwrap().is_empty(), || {
                format!("{:?}", consumer.registry().type_status::<Job>())
            })
        },
    )
    .await;
    assert_eq!(*handled.lock().unwrap(), vec![7]);
    let st = consumer.registry().type_status::<Job>().unwrap();
    assert_eq!(
        (st.dead_letters_refused, st.dead_lettered),
        (1, 0),
        "{st:?}"
    );
    let service = consumer.registry().services()[0].clone();
    assert_eq!(service.dead_letters_refused, 1);
    assert!(
        !service.is_healthy(),
        "a record was given up on: {service:?}"
    );
    // Through `health()`: not ready, saying why; still live (a restart
    // does not create the dead-letter topic).
    let health = consumer.health();
    assert!(
        health.live
            && !health.ready
            && health
                .reasons
                .iter()
                .any(|r| r.contains("dead letters refused")),
        "{health:?}"
    );
    // README: tried 4 times (3 retried, the 4th given up on), then given
    // up on, logged with where it is.
    let lines = logged(&format!("dead_letter_topic=\"{dlq}\""));
    let retried = lines
        .iter()
        .filter(|l| l.contains("publish failed; retrying"))
        .count();
    assert_eq!(retried, 3, "{lines:?}");
    let given_up = lines
        .into_iter()
        .filter(|l| l.contains("refused for good"))
        .collect::<Vec<_>>();
    assert_eq!(given_up.len(), 1, "{given_up:?}");
    assert!(
        given_up[0].contains("attempts=4") && given_up[0].contains(&format!("\"{topic}\"")),
        "{given_up:?}"
    );
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Issue 13, defect 6: a handler that never returned held its lane with no
/// signal: health still said healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_shows_as_a_stall_and_makes_the_service_unhealthy() {
    let o = orders(1, |c| c).await;
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let consumer = Kontext::builder(o.model.clone())
        .settings(settings(&o.group).consumer(|c| c.stall_limit_ms = Some(500)))
        .broker(o.broker.clone())
        .consumers(move |c| {
            c.handler(move |_: OrderCreated, _: MessageContext| {
                let g = g.clone();
                async move {
                    g.acquire().await.unwrap().forget();
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let status = || consumer.registry().services()[0].clone();
    assert!(status().is_healthy());
    o.producer
        .producer()
        .unwrap()
        .produce(&OrderCreated { order: 1, seq: 1 })
        .await
        .unwrap();
    wait_until("the stalled service to be unhealthy", async || {
        ready(!status().is_healthy(), || format!("{:?}", status()))
    })
    .await;
    let stalled = consumer
        .registry()
        .type_status::<OrderCreated>()
        .unwrap()
        .stalled_for;
    assert!(
        stalled.is_some_and(|d| d > Duration::from_millis(500)),
        "{stalled:?}"
    );

    // The handler returns: the stall ends and health comes back.
    gate.add_permits(1);
    wait_until("the service to be healthy again", async || {
        ready(status().is_healthy(), || format!("{:?}", status()))
    })
    .await;
    assert_eq!(status().stalled_for, None);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A session timeout the broker refuses is a setting to fix, not a blip:
/// the poll service fails at once with an error that names the setting and
/// the broker's bounds, instead of retrying the group join forever with a
/// warning each time. Apache Kafka only: the embedded broker takes any
/// session timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_timeout_the_broker_refuses_fails_the_service_naming_the_setting() {
    if !external() {
        return;
    }
    let o = orders(1, |c| c).await;
    let seen = Seen::default();
    let s = seen.clone();
    let k = Kontext::builder(o.model.clone())
        .settings(settings(&o.group).consumer(|c| c.session_timeout_ms = Some(1_000)))
        .broker(o.broker.clone())
        .consumers(move |c| {
            c.handler(move |e: OrderCreated, ctx: MessageContext| {
                let s = s.clone();
                async move {
                    s.push("created", e.order, e.seq, &ctx);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let reason = wait_until("the poll service to fail", async || {
        let st = k.registry().services()[0].clone();
        match st.state {
            kontext::consumer::ServiceState::Failed(reason) => Ok(reason),
            _ => Err(format!("{st:?}")),
        }
    })
    .await;
    assert!(reason.contains("session.timeout.ms = 1000"), "{reason}");
    assert!(reason.contains("group.min.session.timeout.ms"), "{reason}");
    assert!(!k.health().ready, "{:?}", k.health());
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// README: a dead letter waits out a broker outage: its record stays
/// unfinished (its partition does not move on past it) while the broker is
/// away, nothing is given up (`dead_letters_refused` stays 0), and the dead
/// letter arrives, once, when the broker is back. Embedded broker: the test
/// takes it down and brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_waits_out_a_broker_outage_and_nothing_is_given_up() {
    if external() {
        return;
    }
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let (topic, group) = (unique_name("orders"), unique_name("g"));
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).partitions(1).key(|e| e.order))
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    producer
        .producer()
        .unwrap()
        .produce(&OrderCreated { order: 1, seq: 0 })
        .await
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(Semaphore::new(0));
    let (g, s) = (gate.clone(), started.clone());
    let consumer = Kontext::builder(model)
        // A session that outlasts the outage: the partition stays here.
        // Sends that fail after a second: the outage makes several fail.
        .settings(
            settings(&group)
                .consumer(|c| c.librdkafka.set("session.timeout.ms", "60000"))
                .producer(|p| p.message_timeout_ms = Some(1_000)),
        )
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |_: OrderCreated, _: MessageContext| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    s.add_permits(1);
                    g.acquire().await.unwrap().forget();
                    Err(HandlerError::dead_letter("not this one"))
                }
            });
        })
        .start()
        .await
        .unwrap();
    started.acquire().await.unwrap().forget();
    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    gate.add_permits(1);
    let status = || consumer.registry().type_status::<OrderCreated>().unwrap();
    let dlq_topic = format!("{topic}.dlq");
    let failed_sends = || {
        logged(&format!("dead_letter_topic=\"{dlq_topic}\""))
            .iter()
            .filter(|l| l.contains("dead-letter publish failed; retrying"))
            .count()
    };
    wait_until(
        "several dead-letter sends to fail on the outage",
        async || {
            let s = status();
            assert_eq!((s.dead_lettered, s.dead_letters_refused), (0, 0), "{s:?}");
            let failed = failed_sends();
            ready(failed >= 3, || format!("{failed} failed sends; {s:?}"))
        },
    )
    .await;
    embedded.set_broker_up(1, true).unwrap();
    wait_until("the dead letter to be sent", async || {
        let s = status();
        ready(s.dead_lettered == 1, || format!("{s:?}"))
    })
    .await;
    let s = status();
    assert_eq!(s.dead_letters_refused, 0, "{s:?}");
    let service = consumer.registry().service_of::<OrderCreated>().unwrap();
    assert_eq!(service.dead_letters_refused, 0, "{service:?}");
    // Sent once: a second would show within the read's two seconds.
    let dlq = read_topic(&broker, &dlq_topic, 2, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].header(dlq_headers::REASON), Some("handler"));
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}
