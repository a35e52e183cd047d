//! A service's whole kontext configuration from one file: the Kafka
//! settings and the database, so an API and a worker read the same file.

use std::path::Path;

use serde::Deserialize;

use crate::config::{ENV_PREFIX, KafkaSettings, RawEnv, Secret, file_figment};
use crate::error::{Error, Result};

/// What [`ServiceConfig::from_file`] reads:
///
/// ```toml
/// [kafka]                # KafkaSettings; KONTEXT_BOOTSTRAP_SERVERS etc. override
/// bootstrap_servers = "127.0.0.1:9092"   # omit for the embedded broker
/// client_id = "shipping"
///
/// [database]             # KONTEXT_DATABASE_URL etc. override
/// url = "postgres://app:secret@127.0.0.1/shipping"
/// migrate = true         # create kontext's tables at start (default)
/// ```
#[derive(Debug, Clone, Default)]
pub struct ServiceConfig {
    /// The `[kafka]` section.
    pub kafka: KafkaSettings,
    /// The `[database]` section, if it names a URL.
    pub database: Option<DatabaseSettings>,
}

/// The `[database]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://...` or `postgres://...`; kept out of logs (it may hold a
    /// password).
    pub url: Secret,
    /// Whether kontext creates its tables at start. Defaults to `true`.
    #[serde(default = "yes")]
    pub migrate: bool,
}

fn yes() -> bool {
    true
}

/// `[database]` as written, before it is known to name a URL.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseSection {
    url: Option<Secret>,
    #[serde(default = "yes")]
    migrate: bool,
}

impl ServiceConfig {
    /// Reads `path` (TOML, or JSON by extension): `[kafka]` as
    /// [`KafkaSettings::from_file`] reads it, `[database]` with
    /// `KONTEXT_DATABASE_URL` and `KONTEXT_DATABASE_MIGRATE` on top. A
    /// missing file is an error; missing sections are defaults (embedded
    /// broker, no database).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::read(path.as_ref(), "database", &format!("{ENV_PREFIX}DATABASE_"))
    }

    /// Like [`from_file`](Self::from_file) for one of several services
    /// sharing a file: the database is `[<service>.database]`, overridden
    /// by `KONTEXT_<SERVICE>_DATABASE_URL`; `[kafka]` is shared.
    pub fn from_file_for(path: impl AsRef<Path>, service: &str) -> Result<Self> {
        let env = format!(
            "{ENV_PREFIX}{}_DATABASE_",
            service.to_ascii_uppercase().replace(['-', '.'], "_")
        );
        Self::read(path.as_ref(), &format!("{service}.database"), &env)
    }

    fn read(path: &Path, database_section: &str, env_prefix: &str) -> Result<Self> {
        let kafka = KafkaSettings::from_file(path, "kafka")?;
        let section = file_figment(path).focus(database_section).merge(RawEnv {
            prefix: env_prefix.to_owned(),
            keys: &["url", "migrate"],
        });
        // Lossy: `migrate` may come as text (the environment).
        let database: DatabaseSection = section.extract_lossy().map_err(|e| Error::Config {
            message: format!("`[{database_section}]` in `{}`: {e}", path.display()),
            source: Some(Box::new(e)),
        })?;
        let database = match database.url {
            Some(url) if url.expose().trim().is_empty() => {
                return Err(Error::config(format!(
                    "`[{database_section}] url` in `{}` is empty; omit it to run without a database",
                    path.display()
                )));
            }
            Some(url) => Some(DatabaseSettings {
                url,
                migrate: database.migrate,
            }),
            None => None,
        };
        Ok(ServiceConfig { kafka, database })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    // figment::Jail's closures return figment's own (large) error type.
    #![allow(clippy::result_large_err)]

    use super::*;

    #[test]
    fn one_file_holds_kafka_and_the_database_and_the_environment_wins() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "service.toml",
                r#"
                    [kafka]
                    bootstrap_servers = "127.0.0.1:9092"
                    client_id = "shipping"

                    [database]
                    url = "sqlite://shipping.db?mode=rwc"
                    migrate = false

                    [http]
                    listen = "127.0.0.1:8080"
                "#,
            )?;
            let config = ServiceConfig::from_file("service.toml").unwrap();
            assert_eq!(
                config.kafka.bootstrap_servers.as_deref(),
                Some("127.0.0.1:9092")
            );
            assert_eq!(config.kafka.client_id.as_deref(), Some("shipping"));
            let db = config.database.unwrap();
            assert_eq!(db.url.expose(), "sqlite://shipping.db?mode=rwc");
            assert!(!db.migrate);

            jail.set_env("KONTEXT_DATABASE_URL", "postgres://u:p@127.0.0.1/db");
            jail.set_env("KONTEXT_BOOTSTRAP_SERVERS", "127.0.0.1:19092");
            let config = ServiceConfig::from_file("service.toml").unwrap();
            assert_eq!(
                config.kafka.bootstrap_servers.as_deref(),
                Some("127.0.0.1:19092")
            );
            let db = config.database.unwrap();
            assert_eq!(db.url.expose(), "postgres://u:p@127.0.0.1/db");
            assert!(
                !format!("{db:?}").contains("u:p@"),
                "the URL stays out of logs"
            );
            Ok(())
        });
    }

    #[test]
    fn services_sharing_a_file_have_their_own_database() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "config.toml",
                r#"
                    [kafka]
                    client_id = "shipping"
                    [shipping-api.database]
                    url = "sqlite://api.db"
                    [identity.database]
                    url = "sqlite://identity.db"
                "#,
            )?;
            jail.set_env("KONTEXT_IDENTITY_DATABASE_URL", "sqlite://other.db");
            let api = ServiceConfig::from_file_for("config.toml", "shipping-api").unwrap();
            let identity = ServiceConfig::from_file_for("config.toml", "identity").unwrap();
            assert_eq!(api.database.unwrap().url.expose(), "sqlite://api.db");
            assert_eq!(identity.database.unwrap().url.expose(), "sqlite://other.db");
            assert_eq!(api.kafka.client_id.as_deref(), Some("shipping"));
            Ok(())
        });
    }

    #[test]
    fn without_sections_it_is_the_embedded_defaults_and_mistakes_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("empty.toml", "")?;
            let config = ServiceConfig::from_file("empty.toml").unwrap();
            assert!(config.kafka.bootstrap_servers.is_none());
            assert!(config.database.is_none());

            jail.create_file("typo.toml", "[database]\nurll = \"sqlite::memory:\"\n")?;
            let message = ServiceConfig::from_file("typo.toml")
                .unwrap_err()
                .to_string();
            assert!(
                message.contains("[database]") && message.contains("urll"),
                "{message}"
            );

            let message = ServiceConfig::from_file("missing.toml")
                .unwrap_err()
                .to_string();
            assert!(message.contains("missing.toml"), "{message}");
            Ok(())
        });
    }
}
