//! Scenario 3, isolation: produce-to-handler latency of a fast type next
//! to a slow one, shared and dedicated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext::prelude::*;
use serde::{Deserialize, Serialize};

use crate::harness::*;

#[derive(Serialize, Deserialize)]
pub(crate) struct Fast {
    pub(crate) n: u64,
    /// When it was produced, microseconds since the Unix epoch.
    pub(crate) sent_us: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Slow {
    pub(crate) n: u64,
}

/// Produce-to-handler latency of a fast type: alone, next to a saturated
/// slow type on the same shared poll service, and with the slow type on a
/// dedicated poll service.
pub(crate) async fn scenario_isolation(b: &Bench, fast_count: u64) -> Result<(), BoxError> {
    let mut alone_p = (0.0, 0.0);
    for mode in ["alone", "shared", "dedicated"] {
        let (fast_topic, slow_topic) = (unique_name("bench-fast"), unique_name("bench-slow"));
        let slow_group = unique_name("bench-slow-g");
        let dedicated = mode == "dedicated";
        let model = Model::builder()
            .topic::<Fast>(|t| t.name(&fast_topic).partitions(3).key(|e| e.n))
            .topic::<Slow>(|t| {
                t.name(&slow_topic)
                    .partitions(3)
                    .key(|e| e.n)
                    .consumer(move |c| {
                        if dedicated {
                            c.dedicated(|d| d.group(slow_group).max_buffered(100))
                        } else {
                            c.max_buffered(100)
                        }
                    })
            })
            .build()?;
        b.provision(&model).await?;
        let latencies = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let l = Arc::clone(&latencies);
        let with_slow = mode != "alone";
        let kontext = Kontext::builder(model)
            .settings(
                b.settings
                    .clone()
                    .consumer(|c| c.group_id = Some(unique_name("bench-iso"))),
            )
            .broker(b.broker.clone())
            .producer()
            .consumers(move |c| {
                c.handler(move |e: Fast, _: MessageContext| {
                    let l = Arc::clone(&l);
                    async move {
                        let took = now_us().saturating_sub(e.sent_us);
                        if let Ok(mut v) = l.lock() {
                            v.push(took);
                        }
                        Ok(())
                    }
                });
                if with_slow {
                    c.handler(|_: Slow, _: MessageContext| async {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok(())
                    });
                }
            })
            .start()
            .await?;
        let p = kontext.producer()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Measure from a settled state: partitions assigned, slow type saturated.
        while kontext
            .registry()
            .service_of::<Fast>()?
            .assigned_partitions
            .is_empty()
        {
            if Instant::now() > deadline {
                return Err("the fast type's partitions were never assigned".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if with_slow {
            let slow: Vec<Slow> = (0..20_000).map(|n| Slow { n }).collect();
            p.produce_batch(&slow).await?;
            while {
                let st = kontext.registry().type_status::<Slow>()?;
                !st.paused && st.buffered < st.capacity
            } {
                if Instant::now() > deadline {
                    return Err("the slow type never filled its buffer".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for n in 0..fast_count {
            p.produce(&Fast {
                n,
                sent_us: now_us(),
            })
            .await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        while latencies.lock().map_or(0, |v| v.len() as u64) < fast_count {
            if Instant::now() > deadline {
                return Err("fast messages went missing".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        kontext.shutdown(Duration::from_secs(5)).await?;
        let mut v = latencies.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_unstable();
        let (p50, p99) = (percentile(&v, 0.50), percentile(&v, 0.99));
        if mode == "alone" {
            alone_p = (p50, p99);
        }
        let label = match mode {
            "alone" => "fast type alone",
            "shared" => "fast type, saturated slow type on the same shared poll service",
            _ => "fast type, saturated slow type on a dedicated poll service",
        };
        println!(
            "| isolation: {label} ({fast_count} messages) | p50 {p50:.2} ms, p99 {p99:.2} ms | p50 {:.2}x, p99 {:.2}x of alone |",
            p50 / alone_p.0,
            p99 / alone_p.1
        );
    }
    Ok(())
}
