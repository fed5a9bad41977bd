//! A private PostgreSQL cluster for `DATABASE_URL`-less runs: created with the installed
//! `initdb` in a data folder, started with `pg_ctl` on a free loopback port (its Unix socket
//! stays inside the folder), reused on the next start. This is what lets the README's first
//! command run with no database set-up.
//!
//! Postgres refuses to run as root; when orderline runs as root it runs the Postgres tools as
//! the `postgres` user (present wherever Debian's PostgreSQL is installed).

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::process::Command;

/// Name of the database orderline uses inside the private cluster.
pub const DATABASE: &str = "orderline";

/// A running private cluster.
#[derive(Debug)]
pub struct LocalPostgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as_postgres: bool,
    port: u16,
    started_here: bool,
}

impl LocalPostgres {
    /// Creates the cluster under `folder` if needed and starts it unless it runs already.
    ///
    /// # Errors
    /// When no PostgreSQL installation is found, or `initdb`/`pg_ctl` fail (their output is in
    /// the error and in `folder/postgres.log`).
    pub async fn start(folder: &Path) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let folder = folder.canonicalize()?;
        let data_dir = folder.join("postgres");
        let run_as_postgres = is_root().await;
        let mut cluster = Self {
            data_dir,
            bin_dir,
            run_as_postgres,
            port: 0,
            started_here: false,
        };
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.init(&folder).await?;
        }
        if let Some(port) = cluster.running_port().await {
            cluster.port = port;
            tracing::info!(port, data_dir = %cluster.data_dir.display(), "using the private PostgreSQL cluster that is already running");
        } else {
            cluster.port = free_port()?;
            let log = folder.join("postgres.log");
            let options = format!(
                "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories='{}'",
                cluster.port,
                cluster.data_dir.display()
            );
            cluster
                .tool("pg_ctl")
                .arg("start")
                .arg("-w")
                .arg("-D")
                .arg(&cluster.data_dir)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(options)
                .run()
                .await
                .with_context(|| format!("pg_ctl start failed; see {}", log.display()))?;
            cluster.started_here = true;
            tracing::info!(port = cluster.port, data_dir = %cluster.data_dir.display(), "started a private PostgreSQL cluster (DATABASE_URL is unset)");
        }
        Ok(cluster)
    }

    /// URL of the server's maintenance database `postgres`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// URL of orderline's database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Stops the cluster if this process started it; one that was running before is left alone.
    pub async fn stop(&self) {
        if !self.started_here {
            return;
        }
        let result = self
            .tool("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-D"])
            .arg(&self.data_dir)
            .run()
            .await;
        match result {
            Ok(()) => tracing::info!("stopped the private PostgreSQL cluster"),
            Err(e) => tracing::warn!(error = %e, "could not stop the private PostgreSQL cluster"),
        }
    }

    async fn init(&self, folder: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        if self.run_as_postgres {
            // The postgres user must own the data folder and reach it through its parents.
            Tool::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(folder)
                .run()
                .await
                .context("cannot give the data folder to the postgres user")?;
        }
        self.tool("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions"])
            .run()
            .await
            .with_context(|| {
                format!(
                    "initdb failed in {}; if the postgres user cannot reach that folder, set ORDERLINE_DATA_DIR to one it can",
                    self.data_dir.display()
                )
            })?;
        tracing::info!(data_dir = %self.data_dir.display(), "created a private PostgreSQL cluster");
        Ok(())
    }

    /// The port of a cluster already running on this data folder, from its `postmaster.pid`.
    async fn running_port(&self) -> Option<u16> {
        let status = self
            .tool("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.data_dir)
            .run()
            .await;
        status.ok()?;
        let pid_file = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        // Line 4 of postmaster.pid is the port.
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    fn tool(&self, name: &str) -> Tool {
        let program = self.bin_dir.join(name);
        if self.run_as_postgres {
            Tool::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
        } else {
            Tool::new(program)
        }
    }
}

/// A command whose failure carries its output.
struct Tool(Command);

impl Tool {
    fn new(program: impl AsRef<std::ffi::OsStr>) -> Self {
        let mut command = Command::new(program);
        command.kill_on_drop(true);
        Self(command)
    }

    fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.0.arg(arg);
        self
    }

    fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, args: I) -> Self {
        self.0.args(args);
        self
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let output = self.0.output().await.context("cannot run the command")?;
        if !output.status.success() {
            bail!(
                "{} exited with {}: {}{}",
                self.0.as_std().get_program().to_string_lossy(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            );
        }
        Ok(())
    }
}

/// `ORDERLINE_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian), else the folder of
/// `initdb` on the `PATH`.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ORDERLINE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let newest_debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    if let Some((_, bin)) = newest_debian {
        return Ok(bin);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").exists());
    on_path.context(
        "no PostgreSQL installation found (looked for initdb in /usr/lib/postgresql/*/bin and on PATH); \
         install PostgreSQL (e.g. apt-get install postgresql) or set DATABASE_URL",
    )
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("no free loopback port")?;
    Ok(listener.local_addr()?.port())
}

async fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().await;
    output.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
