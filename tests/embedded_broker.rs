//! The in-process broker is for demos and tests: a service that meant a
//! real cluster and runs on it by mistake (no `bootstrap_servers`, or a
//! misspelt environment variable) is told loudly, and refused where it
//! would lose data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

mod common;

use common::*;
use kontext::config::{KafkaSettings, env_near_misses};
use kontext::prelude::*;
use sea_orm::ConnectionTrait as _;

fn model() -> Model {
    Model::builder().build().unwrap()
}

/// Runs first in the one test below: it sets environment variables, which
/// must not change while another thread of this binary reads them.
fn a_misspelt_variable_is_named_with_the_setting_meant() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("KONTEXT_BOOTSTRAP_SERVER", "kafka-1:9092");
        jail.set_env("KONTEXT_EMBEDED_BROKER", "false");
        // One `_` where levels need two.
        jail.set_env("KONTEXT_PRODUCER_LINGER_MS", "10");
        // Not near any setting: left alone.
        jail.set_env("KONTEXT_TEST_SOMETHING", "1");
        let misses = env_near_misses();
        assert!(
            misses.contains(&(
                "KONTEXT_PRODUCER_LINGER_MS".into(),
                "KONTEXT_PRODUCER__LINGER_MS".into()
            )),
            "{misses:?}"
        );
        assert!(
            misses.contains(&(
                "KONTEXT_BOOTSTRAP_SERVER".into(),
                "KONTEXT_BOOTSTRAP_SERVERS".into()
            )),
            "{misses:?}"
        );
        assert!(
            misses.contains(&(
                "KONTEXT_EMBEDED_BROKER".into(),
                "KONTEXT_EMBEDDED_BROKER".into()
            )),
            "{misses:?}"
        );
        assert!(
            !misses
                .iter()
                .any(|(found, _)| found == "KONTEXT_TEST_SOMETHING"),
            "{misses:?}"
        );

        // Forbidding the implicit broker makes the typo an error that names it.
        jail.set_env("KONTEXT_EMBEDDED_BROKER", "false");
        let settings = KafkaSettings::from_env().unwrap();
        assert_eq!(settings.embedded_broker, Some(false));
        let e = Broker::from_settings(&settings).unwrap_err().to_string();
        assert!(e.contains("embedded_broker = false"), "{e}");
        assert!(
            e.contains("`KONTEXT_BOOTSTRAP_SERVER` (did you mean `KONTEXT_BOOTSTRAP_SERVERS`?)"),
            "{e}"
        );
        Ok(())
    });
}

/// One test in this binary, so the environment changes of the first part
/// never race a read of the environment (kontext reads it when it starts
/// an implicit broker, to name misspelt variables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_implicit_broker_is_shown_in_health_and_refused_beside_postgres() {
    a_misspelt_variable_is_named_with_the_setting_meant();
    init_tracing();
    let db = kontext::testing::database().await.unwrap();
    let postgres = db.get_database_backend() == sea_orm::DbBackend::Postgres;

    // No broker named, a database: on SQLite (demos) it runs, and says so.
    let started = Kontext::builder(model())
        .database(db.clone())
        .producer()
        .start()
        .await;
    if postgres {
        let e = started.unwrap_err().to_string();
        assert!(
            e.contains("no bootstrap_servers configured, beside a PostgreSQL database"),
            "{e}"
        );
        assert!(e.contains("embedded_broker = true"), "{e}");
    } else {
        let kontext = started.unwrap();
        let health = kontext.health();
        assert!(health.is_healthy(), "{:?}", health.reasons);
        assert!(
            health.notes.iter().any(|n| n
                .contains("broker: embedded, in this process (no bootstrap_servers configured)")),
            "{:?}",
            health.notes
        );
        kontext
            .shutdown(std::time::Duration::from_secs(10))
            .await
            .unwrap();
    }

    // Asked for, it runs beside PostgreSQL too.
    let kontext = Kontext::builder(model())
        .settings(KafkaSettings {
            embedded_broker: Some(true),
            ..KafkaSettings::new()
        })
        .database(db.clone())
        .producer()
        .start()
        .await
        .unwrap();
    assert!(!kontext.health().notes.is_empty());
    kontext
        .shutdown(std::time::Duration::from_secs(10))
        .await
        .unwrap();

    // Forbidden, it never starts.
    let e = Kontext::builder(model())
        .settings(KafkaSettings {
            embedded_broker: Some(false),
            ..KafkaSettings::new()
        })
        .producer()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("forbids the in-process broker"), "{e}");

    // An embedded broker passed explicitly is a choice: no refusal.
    let kontext = Kontext::builder(model())
        .broker(Broker::embedded().unwrap())
        .database(db)
        .producer()
        .start()
        .await
        .unwrap();
    assert!(
        kontext
            .health()
            .notes
            .iter()
            .any(|n| n.contains("asked for")),
        "{:?}",
        kontext.health().notes
    );
    kontext
        .shutdown(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}
