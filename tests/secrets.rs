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
    let _guard = tracing::subscriber::set_default(subscriber);

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
        jail.set_env("KONTEXT_SECURITY__SASL_PASSWORD", "73019284");
        jail.set_env("KONTEXT_SECURITY__SSL_KEY_PASSWORD", "55501234");
        jail.set_env("KONTEXT_SECURITY__SASL_USERNAME", "4242");
        jail.set_env("KONTEXT_CLIENT_ID", "12345");
        let s = KafkaSettings::from_env().unwrap();
        let security = &s.security;
        assert_eq!(
            security.sasl_password.as_ref().unwrap().expose(),
            "73019284"
        );
        assert_eq!(
            security.ssl_key_password.as_ref().unwrap().expose(),
            "55501234"
        );
        assert_eq!(security.sasl_username.as_ref().unwrap().expose(), "4242");
        assert_eq!(s.client_id.as_deref(), Some("12345"));
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("73019284") && !shown.contains("4242"),
            "{shown}"
        );

        jail.create_file(
            "service.toml",
            &format!(
                "[kafka.security]\nsasl_password = 73019284\n\n[database]\nurl = \"postgres://app:{PASSWORD}@db/x\"\n"
            ),
        )?;
        let c = ServiceConfig::from_file("service.toml").unwrap();
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
