//! No secret in any error, log line or `Debug` output a test can reach:
//! every path below is walked with a recognisable password, and the
//! messages (with their whole source chain) and the captured log are
//! searched for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use kontext::config::{KafkaSettings, ServiceConfig};
use kontext::prelude::*;

/// The password every path below is given.
const PASSWORD: &str = "Zq7-Hunter2-Pw";

/// A message and its whole source chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(" | ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    format!("{out} | {e:?}")
}

/// Log lines written by kontext while the test runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

fn assert_hidden(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD) && !text.contains("Zq7"),
        "{what} shows the password: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_error_or_log_line_quotes_a_password() {
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_env_filter("trace")
        .finish();
    // Global: kontext's tasks and librdkafka's threads log too. The only
    // test in this binary.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    // Database URLs: a typo in the scheme, another driver, a URL that does
    // not parse, a password written with percent-encoding, no scheme.
    for url in [
        format!("postgress://app:{PASSWORD}@db.internal/shop"),
        format!("mysql://app:{PASSWORD}@db.internal/shop"),
        format!("postgres://app:{PASSWORD}@[::1/shop"),
        format!("postgres://app:{PASSWORD}@db.internal:99999/shop"),
        "postgresq://app:Zq7%2DHunter2%2DPw@db.internal/shop".to_owned(),
        format!("app:{PASSWORD}@db.internal/shop"),
    ] {
        let e = kontext::db::connect(&url).await.unwrap_err();
        assert_hidden(
            &format!("connect({})", kontext::config::redact_url(&url)),
            &chain(&e),
        );
    }

    // Configuration: secrets as numbers or of the wrong shape, from the
    // environment and from a file.
    figment::Jail::expect_with(|jail| {
        // Leading zeros: the text as written, not a number.
        jail.set_env("KONTEXT_SECURITY__SASL_PASSWORD", "0073019284");
        jail.set_env("KONTEXT_SECURITY__SSL_KEY_PASSWORD", "55501234");
        jail.set_env("KONTEXT_SECURITY__SASL_USERNAME", "4242");
        jail.set_env("KONTEXT_CLIENT_ID", "012345");
        jail.set_env("KONTEXT_PRODUCER__LINGER_MS", "12");
        jail.set_env("KONTEXT_PROVISION_TOPICS", "false");
        let s = KafkaSettings::from_env().unwrap();
        // Numbers and booleans still read from text.
        assert_eq!(s.producer.linger_ms, 12);
        assert_eq!(s.provision_topics, Some(false));
        let security = &s.security;
        assert_eq!(
            security.sasl_password.as_ref().unwrap().expose(),
            "0073019284"
        );
        assert_eq!(
            security.ssl_key_password.as_ref().unwrap().expose(),
            "55501234"
        );
        assert_eq!(security.sasl_username.as_ref().unwrap().expose(), "4242");
        assert_eq!(s.client_id.as_deref(), Some("012345"));
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("73019284") && !shown.contains("4242"),
            "{shown}"
        );

        jail.create_file(
            "service.toml",
            &format!(
                "[kafka.security]\nsasl_password = 73019284\n\n[kafka.topics.orders.configs]\n\"retention.ms\" = 604800000\n\n[database]\nurl = \"postgres://app:{PASSWORD}@db/x\"\n"
            ),
        )?;
        jail.set_env("KONTEXT_SECURITY__SASL_PASSWORD", "[abc]");
        let c = ServiceConfig::from_file("service.toml").unwrap();
        assert_eq!(
            c.kafka.security.sasl_password.as_ref().unwrap().expose(),
            "[abc]",
            "the environment's text wins, brackets and all"
        );
        assert_eq!(
            c.kafka.topics["orders"].configs.get("retention.ms"),
            Some("604800000")
        );
        assert_hidden("ServiceConfig's Debug", &format!("{c:?}"));

        jail.clear_env();
        jail.create_file(
            "bad.toml",
            &format!("[kafka.security]\nsasl_password = [\"{PASSWORD}\"]\n"),
        )?;
        let e = ServiceConfig::from_file("bad.toml").unwrap_err();
        assert_hidden("a secret of the wrong shape", &chain(&e));
        jail.create_file(
            "bad-db.toml",
            &format!("[database]\nurl = [\"postgres://app:{PASSWORD}@db/x\"]\n"),
        )?;
        let e = ServiceConfig::from_file("bad-db.toml").unwrap_err();
        assert_hidden("a database URL of the wrong shape", &chain(&e));
        Ok(())
    });

    // Starting with a database URL that cannot work.
    let model = Model::builder().build().unwrap();
    let e = Kontext::builder(model)
        .database_url(format!("postgress://app:{PASSWORD}@db.internal/shop"))
        .start()
        .await
        .unwrap_err();
    assert_hidden("start()", &chain(&e));

    let logged = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert_hidden("the log", &logged);
}
