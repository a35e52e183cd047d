//! Settings from a file plus environment overrides, as a deployment loads them.
// figment::Jail closures return figment::Error, which is large; that is figment's API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use figment::Jail;
use kontext::KafkaSettings;
use kontext::config::{Acks, Compression, OffsetReset, SecurityProtocol};

const FILE: &str = r#"
[app]
name = "orders-api"

[kafka]
bootstrap_servers = "kafka-1:9092,kafka-2:9092"
client_id = "orders-api"

[kafka.topics.orders]
name = "orders"
group = "order-processing"
partitions = 10

[kafka.producer]
linger_ms = 10
compression = "lz4"

[kafka.consumer]
group_id = "orders-worker"
auto_offset_reset = "latest"

[kafka.security]
protocol = "sasl_ssl"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "orders"
sasl_password = "file-secret-123"

[kafka.librdkafka]
"socket.keepalive.enable" = "true"
"#;

#[test]
fn file_section_with_env_overrides_gives_client_settings() {
    Jail::expect_with(|jail| {
        jail.create_file("kontext.toml", FILE)?;
        jail.set_env("KONTEXT_PRODUCER__LINGER_MS", "25");
        jail.set_env("KONTEXT_TOPICS__ORDERS__NAME", "orders-eu");
        jail.set_env("KONTEXT_SECURITY__SASL_PASSWORD", "env-secret-456");
        // Not a setting: other KONTEXT_ variables are left alone.
        jail.set_env("KONTEXT_TEST_BOOTSTRAP", "elsewhere:9092");

        let s = KafkaSettings::from_file("kontext.toml", "kafka").unwrap();
        assert_eq!(
            s.bootstrap_servers.as_deref(),
            Some("kafka-1:9092,kafka-2:9092")
        );
        assert_eq!(s.producer.linger_ms, 25, "env wins over the file");
        assert_eq!(s.producer.compression, Compression::Lz4);
        assert_eq!(s.producer.acks, Acks::All, "default kept");
        assert_eq!(s.consumer.group_id.as_deref(), Some("orders-worker"));
        assert_eq!(s.consumer.auto_offset_reset, Some(OffsetReset::Latest));
        let orders = &s.topics["orders"];
        assert_eq!(orders.name.as_deref(), Some("orders-eu"));
        assert_eq!(orders.group.as_deref(), Some("order-processing"));
        assert_eq!(orders.partitions, Some(10));
        assert_eq!(s.security.protocol, Some(SecurityProtocol::SaslSsl));

        let c = s.producer_config("kafka-1:9092");
        assert_eq!(c.get("bootstrap.servers"), Some("kafka-1:9092"));
        assert_eq!(c.get("client.id"), Some("orders-api"));
        assert_eq!(c.get("linger.ms"), Some("25"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("orders"));
        assert_eq!(c.get("sasl.password"), Some("env-secret-456"));
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));

        // Secrets never show in Debug output, of the settings or the client config.
        for shown in [format!("{s:?}"), format!("{s:#?}"), format!("{c:?}")] {
            assert!(!shown.contains("env-secret-456"), "{shown}");
            assert!(!shown.contains("file-secret-123"), "{shown}");
        }
        Ok(())
    });
}

#[test]
fn json_files_and_env_only_work_too() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "appsettings.json",
            r#"{ "KafkaConfiguration": { "bootstrap_servers": "k:9092", "producer": { "acks": 1, "idempotence": false } } }"#,
        )?;
        let s = KafkaSettings::from_file("appsettings.json", "KafkaConfiguration").unwrap();
        assert_eq!(s.producer.acks, Acks::Leader);
        assert!(!s.producer.idempotence);

        jail.set_env("KONTEXT_CLIENT_ID", "worker-7");
        let s = KafkaSettings::from_env().unwrap();
        assert_eq!(s.client_id.as_deref(), Some("worker-7"));
        assert_eq!(s.bootstrap_servers, None, "no servers: embedded broker");
        Ok(())
    });
}

#[test]
fn mistakes_are_named() {
    Jail::expect_with(|jail| {
        jail.create_file("typo.toml", "[kafka.producer]\nlinger = 5\n")?;
        let err = KafkaSettings::from_file("typo.toml", "kafka").unwrap_err();
        assert!(err.to_string().contains("linger"), "{err}");

        jail.create_file("acks.toml", "[kafka.producer]\nacks = \"most\"\n")?;
        let err = KafkaSettings::from_file("acks.toml", "kafka").unwrap_err();
        assert!(err.to_string().contains("most"), "{err}");

        jail.create_file("idem.toml", "[kafka.producer]\nacks = \"leader\"\n")?;
        let err = KafkaSettings::from_file("idem.toml", "kafka").unwrap_err();
        assert!(err.to_string().contains("idempotence"), "{err}");

        let err = KafkaSettings::from_file("missing.toml", "kafka").unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
        Ok(())
    });
}
