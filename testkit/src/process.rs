//! The real `orderline` binary as a child process (what an operator runs), free ports, and the
//! waits tests use around it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api_common::auth::{Role, TokenKeys};

/// The token secret every child server gets (`ORDERLINE_JWT_SECRET`).
pub const SECRET: &str = "process-test-secret-that-is-long-enough";

/// A token for `sub` with `role`, valid for ten minutes, that a child server accepts.
///
/// # Panics
/// Never for these inputs (minting fails only for an empty subject).
pub fn token(sub: &str, role: Role) -> String {
    TokenKeys::hs256(SECRET.as_bytes())
        .mint(sub, role, Duration::from_secs(600))
        .expect("mint a token")
}

/// A loopback port nobody listens on right now.
///
/// # Panics
/// When the machine has no free port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The command running `binary` (the `orderline` executable) with `args` against
/// `database_url`, listening on `port`, accepting [`token`]s, logging errors only, with its
/// output discarded. Add to it before spawning (a tokio `Command` converts from it).
pub fn orderline(binary: &Path, database_url: &str, port: u16, args: &[&str]) -> Command {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("ORDERLINE_ADDR", format!("127.0.0.1:{port}"))
        .env("ORDERLINE_JWT_SECRET", SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Waits (up to 10 s) until the server at `base` answers `/health/ready` with success.
///
/// # Panics
/// When it does not.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/health/ready")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {base} did not become ready");
}

/// Polls `done` every 50 ms until it answers `true`.
///
/// # Panics
/// After 60 s, naming `what`.
pub async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
