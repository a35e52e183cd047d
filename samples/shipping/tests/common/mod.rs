//! What the sample's process tests share: its binaries as child
//! processes, polling with a deadline, and a configuration file.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A process this test started: its stdout lines arrive on a channel;
/// it is killed if the test ends first.
pub(crate) struct Process {
    name: &'static str,
    pub(crate) child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    pub(crate) fn start(name: &'static str, args: &[&str], env: &[(&str, String)]) -> Process {
        let mut command = Command::new(match name {
            "dev-broker" => env!("CARGO_BIN_EXE_dev-broker"),
            "shipping-api" => env!("CARGO_BIN_EXE_shipping-api"),
            "identity-worker" => env!("CARGO_BIN_EXE_identity-worker"),
            other => panic!("no binary {other}"),
        });
        command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the sample's binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process { name, child, lines }
    }

    /// The first stdout line starting with `prefix`, without it.
    pub(crate) fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line[prefix.len()..].to_owned(),
                Ok(_) => continue,
                Err(e) => panic!("{} never printed `{prefix}`: {e}", self.name),
            }
        }
    }

    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.child.id());
    }

    /// Waits for the process to exit by itself.
    pub(crate) fn exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` until it returns `Some`, for at most `within`.
pub(crate) async fn until<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `status`: the worker serves its status page on a port of its own (it
/// runs until its signal otherwise, as `config.toml` ships).
pub(crate) fn write_config(
    dir: &Path,
    created: &str,
    recorded: &str,
    group: &str,
    status: bool,
) -> String {
    let status_listen = if status {
        "status_listen = \"127.0.0.1:0\""
    } else {
        ""
    };
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kafka.consumer]
# A member killed with SIGKILL is replaced after this, not librdkafka's 45 s.
session_timeout_ms = 6000
heartbeat_interval_ms = 1000

[kafka.topics."shipping.shipment.created"]
name = "{created}"
group = "{group}"

[kafka.topics."identity.user-activity.recorded"]
name = "{recorded}"

[shipping-api]
listen = "127.0.0.1:0"
max_body_bytes = 4096
shutdown_timeout_secs = 10

[identity-worker]
shutdown_timeout_secs = 10
{status_listen}
"#
        ),
    )
    .unwrap();
    path.display().to_string()
}
