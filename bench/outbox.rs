//! Scenario 4, outbox: business transactions with an outbox row against
//! the same transactions producing directly, on SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext::outbox::OutboxSettings;
use kontext::prelude::*;
use sea_orm::ConnectionTrait;

use crate::harness::*;

pub(crate) async fn scenario_outbox(
    b: &Bench,
    label: &str,
    url: Option<&str>,
    n: u64,
    writers: u64,
) -> Result<(), BoxError> {
    let db = match url {
        Some(u) => kontext::db::connect(u).await?,
        // Not `testing::database()`: that follows DATABASE_URL.
        None => {
            let path = std::env::temp_dir().join(format!("{}.db", unique_name("kontext-bench")));
            kontext::db::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?
        }
    };
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS bench_order (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL)",
    )
    .await?;
    db.execute_unprepared("DELETE FROM bench_order").await?;
    let topic = unique_name("bench-outbox");
    b.create_topic(&topic, 32).await?;
    let kontext = Kontext::builder(b.model(&topic, 32, None)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            poll_interval: Duration::from_millis(50),
            ..OutboxSettings::default()
        })
        .start()
        .await?;
    // The same business transactions without their message, then with it:
    // the outbox's cost is the ratio of the commit rates. First with no
    // relay running (the write path alone), then with the relay sending
    // while the writers commit (the deployment).
    let plain = measure(|| {
        business_transactions(
            kontext.outbox(),
            Arc::new(events_from(10 * n, n)),
            writers,
            false,
        )
    })
    .await?;
    let writer_only = Kontext::builder(b.model(&topic, 32, None)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .outbox_writer(db.clone())
        .start()
        .await?;
    let write_path = measure(|| {
        business_transactions(
            writer_only.outbox(),
            Arc::new(events_from(20 * n, n)),
            writers,
            true,
        )
    })
    .await?;
    writer_only.shutdown(Duration::from_secs(10)).await?;
    {
        let outbox = kontext.outbox()?;
        outbox.wake();
        while outbox.pending().await? > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let events = Arc::new(events(n));
    let with_outbox =
        measure(|| business_transactions(kontext.outbox(), events, writers, true)).await?;
    let to_delivery = measure(|| async {
        let outbox = kontext.outbox()?;
        while outbox.pending().await? > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(n)
    })
    .await?;
    kontext.shutdown(Duration::from_secs(10)).await?;
    println!(
        "| business transactions on {label}: {n} (1 row each), {writers} writers, no outbox | {:.0} tx/s | {:.1} µs CPU/tx |",
        plain.rate(),
        plain.cpu_us()
    );
    println!(
        "| the same with 1 outbox message each, no relay running (commit rate; ratio to no outbox {:.2}) | {:.0} tx/s | {:.1} µs CPU/tx |",
        write_path.rate() / plain.rate(),
        write_path.rate(),
        write_path.cpu_us()
    );
    println!(
        "| the same with 1 outbox message each, the relay sending meanwhile (commit rate; ratio to no outbox {:.2}) | {:.0} tx/s | {:.1} µs CPU/tx |",
        with_outbox.rate() / plain.rate(),
        with_outbox.rate(),
        with_outbox.cpu_us()
    );
    println!(
        "| outbox on {label}: those {n} messages, first commit to last acknowledged delivery | {:.0} msg/s | |",
        n as f64 / (with_outbox.secs + to_delivery.secs)
    );
    commit_latency(b, label, &db, &topic).await?;

    // The relay alone: a backlog committed while no relay ran, then drained
    // by a freshly started one (the case after an outage, and the relay's
    // capacity whatever the writers' commit rate).
    let backlog = n * 10;
    let writer = Kontext::builder(b.model(&topic, 32, None)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            run_relay: false,
            ..OutboxSettings::default()
        })
        .start()
        .await?;
    let outbox = writer.outbox()?.clone();
    let more = events_from(n, backlog);
    for chunk in more.chunks(500) {
        let mut tx = outbox.begin().await?;
        for e in chunk {
            tx.publish(e).await?;
        }
        tx.commit().await?;
    }
    writer.shutdown(Duration::from_secs(10)).await?;
    let drained = measure(|| async {
        let relay = Kontext::builder(b.model(&topic, 32, None)?)
            .settings(b.settings.clone())
            .broker(b.broker.clone())
            .database(db.clone())
            .start()
            .await?;
        let outbox = relay.outbox()?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while outbox.pending().await? > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = outbox.pending().await?;
        relay.shutdown(Duration::from_secs(10)).await?;
        if left > 0 {
            return Err(format!("the relay left {left} messages").into());
        }
        Ok(backlog)
    })
    .await?;
    println!(
        "| outbox relay on {label}: a backlog of {backlog} committed messages, drained to acknowledged delivery | {:.0} msg/s | {:.1} µs CPU/msg |",
        drained.rate(),
        drained.cpu_us()
    );
    Ok(())
}

/// `writers` tasks commit one transaction per event: a business row, and
/// with `with_message` the event through the outbox.
pub(crate) async fn business_transactions(
    outbox: kontext::Result<&kontext::outbox::Outbox>,
    events: Arc<Vec<OrderPlaced>>,
    writers: u64,
    with_message: bool,
) -> Result<u64, BoxError> {
    let outbox = outbox?;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let outbox = outbox.clone();
        let events = Arc::clone(&events);
        tasks.push(tokio::spawn(async move {
            for e in events.iter().skip(w as usize).step_by(writers as usize) {
                let mut tx = outbox.begin().await?;
                let backend = tx.get_database_backend();
                let sql = if backend == sea_orm::DbBackend::Postgres {
                    "INSERT INTO bench_order (id, amount) VALUES ($1, $2)"
                } else {
                    "INSERT INTO bench_order (id, amount) VALUES (?, ?)"
                };
                tx.execute(sea_orm::Statement::from_sql_and_values(
                    backend,
                    sql,
                    [(e.id as i64).into(), (e.amount_cents as i64).into()],
                ))
                .await?;
                if with_message {
                    tx.publish(e).await?;
                }
                tx.commit().await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(events.len() as u64)
}

/// Commit-to-acknowledged latency, one transaction at a time: in immediate
/// mode with the relay idle (`commit()` returns once Kafka acknowledged),
/// and on PostgreSQL from a writer-only instance to a relay in another
/// instance woken by `LISTEN/NOTIFY` (until the relay deleted the row,
/// polled every millisecond).
pub(crate) async fn commit_latency(
    b: &Bench,
    label: &str,
    db: &sea_orm::DatabaseConnection,
    topic: &str,
) -> Result<(), BoxError> {
    use kontext::db::outbox_entity as row;
    use kontext::outbox::OutboxMode;
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    let model = |mode: OutboxMode| {
        Model::builder()
            .topic::<OrderPlaced>(move |t| {
                t.name(topic)
                    .partitions(32)
                    .key_ref(|e| &e.order_id)
                    .producer(|p| p.outbox(mode))
            })
            .build()
    };
    let rounds = 300u64;
    let kontext = Kontext::builder(model(OutboxMode::ImmediateWithFallback)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .start()
        .await?;
    let outbox = kontext.outbox()?.clone();
    let mut lat = Vec::with_capacity(rounds as usize);
    let mut pending = 0;
    for e in events_from(20_000_000, rounds) {
        let begun = Instant::now();
        let mut tx = outbox.begin().await?;
        tx.publish(&e).await?;
        pending += tx.commit().await?.pending;
        lat.push(begun.elapsed().as_micros() as u64);
    }
    kontext.shutdown(Duration::from_secs(10)).await?;
    lat.sort_unstable();
    println!(
        "| outbox on {label}, immediate mode, relay idle: commit to acknowledged, {rounds} sequential transactions ({pending} left pending) | p50 {:.2} ms | p99 {:.2} ms |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    let relay = Kontext::builder(model(OutboxMode::Background)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            // Only a notification wakes it in time.
            poll_interval: Duration::from_secs(60),
            ..OutboxSettings::default()
        })
        .start()
        .await?;
    let writer = Kontext::builder(model(OutboxMode::Background)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .outbox_writer(db.clone())
        .start()
        .await?;
    let outbox = writer.outbox()?.clone();
    let mut lat = Vec::with_capacity(rounds as usize);
    for e in events_from(30_000_000, rounds) {
        let begun = Instant::now();
        let mut tx = outbox.begin().await?;
        let id = tx.publish(&e).await?.to_string();
        tx.commit().await?;
        let deadline = begun + Duration::from_secs(30);
        while row::Entity::find()
            .filter(row::Column::MessageId.eq(id.as_str()))
            .count(db)
            .await?
            > 0
        {
            if Instant::now() > deadline {
                return Err("the relay was not woken".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(begun.elapsed().as_micros() as u64);
    }
    writer.shutdown(Duration::from_secs(10)).await?;
    relay.shutdown(Duration::from_secs(10)).await?;
    lat.sort_unstable();
    println!(
        "| outbox on {label}, writer-only instance to another instance's relay (LISTEN/NOTIFY): commit to acknowledged and deleted, {rounds} sequential transactions | p50 {:.2} ms | p99 {:.2} ms |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    Ok(())
}
