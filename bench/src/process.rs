//! The real `orderline serve` binary as a child process, so the HTTP scenarios go through the
//! same program an operator runs, over loopback, and its memory is measured on its own.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use api_common::auth::{Role, TokenKeys};

const SECRET: &str = "bench-secret-bench-secret-bench-secret";

/// A running `orderline serve` and the credentials to talk to it.
pub struct ServerProcess {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// An admin's bearer token.
    pub admin: String,
    /// A customer's bearer token.
    pub customer: String,
    child: Child,
    pid: u32,
    peak_rss_kib: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

/// Where the `orderline` binary is: `ORDERLINE_BIN`, else next to this executable (cargo puts
/// both in the same `target/<profile>/`).
fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORDERLINE_BIN") {
        return Ok(path.into());
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("orderline");
    anyhow::ensure!(
        beside.exists(),
        "no orderline binary at {} (build it: cargo build --release -p orderline, or set ORDERLINE_BIN)",
        beside.display()
    );
    Ok(beside)
}

/// The resident set of process `pid` in KiB, read from `/proc` (0 where there is no `/proc`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The pool of a whole server (`orderline serve`'s default).
const DEFAULT_POOL_SIZE: u32 = 16;

/// The pool of a process that runs one part (`serve --only`): with up to three of them (each
/// also opening its gateway worker's 9 and its listeners), the bench's server (16) and the
/// bench's own connections, 16 each would pass Postgres's 100 and refuse connections.
pub const PART_POOL_SIZE: u32 = 8;

impl ServerProcess {
    /// Starts `orderline serve` (every part, default settings, the relay off) on the database at
    /// `database_url` and waits until it answers `/health/ready`.
    pub async fn start(database_url: &str) -> anyhow::Result<Self> {
        let mut server = Self::spawn(database_url, &[], DEFAULT_POOL_SIZE).await?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Starts `orderline serve --only PART` on the database at `database_url` without waiting
    /// (a part other than `api` answers no HTTP; the caller watches the database instead).
    /// Each part's process pools [`PART_POOL_SIZE`] connections, so that three of them, their
    /// gateway workers and the bench's own server stay within Postgres's default 100.
    pub async fn start_part(database_url: &str, part: &str) -> anyhow::Result<Self> {
        Self::spawn(database_url, &["--only", part], PART_POOL_SIZE).await
    }

    async fn spawn(database_url: &str, args: &[&str], pool_size: u32) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary()?)
            .arg("serve")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("ORDERLINE_ADDR", format!("127.0.0.1:{port}"))
            .env("ORDERLINE_JWT_SECRET", SECRET)
            .env("ORDERLINE_DB_POOL_SIZE", pool_size.to_string())
            .env(
                "RUST_LOG",
                std::env::var("ORDERLINE_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the orderline binary")?;
        let pid = child.id().context("the server exited at once")?;
        let peak_rss_kib = Arc::new(AtomicU64::new(0));
        let sampler = {
            let peak = peak_rss_kib.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let keys = TokenKeys::hs256(SECRET.as_bytes());
        Ok(Self {
            base: format!("http://127.0.0.1:{port}"),
            admin: keys.mint("bench", Role::Admin, Duration::from_secs(7200))?,
            customer: keys.mint("bench-customer", Role::Customer, Duration::from_secs(7200))?,
            child,
            pid,
            peak_rss_kib,
            sampler,
        })
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the server exited before it was ready: {status}");
            }
            let ready = client
                .get(format!("{}/health/ready", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the server was not ready within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The largest resident set seen so far, sampled every 100 ms, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// Kills the server (the bench's database is dropped afterwards; nothing needs a clean exit).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.sampler.abort();
        self.child.kill().await?;
        Ok(())
    }
}
