//! Compile-time behaviour of `#[derive(Topic)]`: what compiles, and the
//! exact errors for what does not (snapshots in `tests/ui/fail/*.stderr`).
//!
//! Compiler messages change between Rust releases, so the snapshots are
//! pinned to the toolchain they were recorded with; on another toolchain the
//! test says so and checks nothing. Re-record with `TRYBUILD=overwrite`.

const PINNED: &str = "rustc 1.95.";

#[test]
fn derive_topic() {
    let version =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
    if !version.starts_with(PINNED) {
        eprintln!("skipping: UI snapshots are pinned to {PINNED}x, this is {version}");
        return;
    }
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
