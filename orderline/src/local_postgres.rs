//! A private PostgreSQL cluster for `DATABASE_URL`-less runs: created with the installed
//! `initdb` in a data folder, started with `pg_ctl` on a free loopback port (its Unix socket
//! stays inside the folder), reused on the next start. This is what lets the README's first
//! command run with no database set-up.
//!
//! Postgres refuses to run as root; when orderline runs as root it runs the Postgres tools as
//! the `postgres` user (present wherever Debian's PostgreSQL is installed).
//!
//! Several orderline processes may use one cluster at once (`serve` and a CLI command, say).
//! Each registers itself in `FOLDER/users/` (its pid and its start time, so a reused pid is not
//! mistaken for it) under the lock `FOLDER/cluster.lock`; the last one to leave stops a cluster
//! that orderline started (`FOLDER/started-by-orderline`). Entries of processes that died
//! without leaving (SIGKILL, a crash) are pruned by the next process, which so takes over a
//! cluster orphaned by a dead orderline and stops it when it exits. A cluster that was
//! running without that marker was started by someone else and is never stopped. Leaving runs
//! on every exit path: [`LocalPostgres::stop`], or its `Drop` when a command fails or panics.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::process::Command;

/// Name of the database orderline uses inside the private cluster.
pub const DATABASE: &str = "orderline";

/// A running private cluster, used by this process until [`LocalPostgres::stop`] (or drop).
#[derive(Debug)]
pub struct LocalPostgres {
    folder: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as_postgres: bool,
    port: u16,
    /// This process's entry in `FOLDER/users/`; `None` once it left.
    registered: Option<PathBuf>,
}

/// Marks a cluster that orderline started, and so stops when its last user leaves.
const STARTED_MARKER: &str = "started-by-orderline";

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
        let _lock = lock(&folder)?;
        let mut cluster = Self {
            folder: folder.clone(),
            data_dir,
            bin_dir,
            run_as_postgres,
            port: 0,
            registered: None,
        };
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.init(&folder).await?;
        }
        let others = live_users(&folder)?;
        cluster.registered = Some(register(&folder)?);
        if let Some(port) = cluster.running_port().await {
            cluster.port = port;
            let ours = folder.join(STARTED_MARKER).exists();
            if ours && others == 0 {
                tracing::info!(port, data_dir = %cluster.data_dir.display(), "took over the private PostgreSQL cluster a stopped orderline process left running");
            } else {
                tracing::info!(port, data_dir = %cluster.data_dir.display(), "using the private PostgreSQL cluster that is already running");
            }
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
            File::create(folder.join(STARTED_MARKER))
                .context("cannot mark the private cluster as started by orderline")?;
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

    /// Leaves the cluster: the last orderline process to leave stops a cluster orderline
    /// started; one that someone else started is left alone.
    pub async fn stop(mut self) {
        // Stopping waits for Postgres (a second at most with `-m fast`); off the async threads.
        let leave = tokio::task::spawn_blocking(move || self.leave());
        if let Err(e) = leave.await {
            tracing::warn!(error = %e, "could not leave the private PostgreSQL cluster");
        }
    }

    /// Removes this process's entry and, when no live user is left and orderline started the
    /// cluster, stops it. Idempotent; runs from [`LocalPostgres::stop`] or from `Drop`.
    fn leave(&mut self) {
        let Some(entry) = self.registered.take() else {
            return;
        };
        let _lock = match lock(&self.folder) {
            Ok(lock) => lock,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lock the private cluster's folder; leaving it running");
                return;
            }
        };
        std::fs::remove_file(&entry).ok();
        let others = live_users(&self.folder).unwrap_or(1);
        let marker = self.folder.join(STARTED_MARKER);
        if others > 0 || !marker.exists() {
            return;
        }
        let mut stop = self.tool_blocking("pg_ctl");
        stop.args(["stop", "-m", "fast", "-w", "-D"])
            .arg(&self.data_dir);
        match stop.output() {
            Ok(output) if output.status.success() => {
                std::fs::remove_file(&marker).ok();
                tracing::info!("stopped the private PostgreSQL cluster");
            }
            Ok(output) => tracing::warn!(
                stderr = %String::from_utf8_lossy(&output.stderr).trim(),
                "could not stop the private PostgreSQL cluster"
            ),
            Err(e) => tracing::warn!(error = %e, "could not stop the private PostgreSQL cluster"),
        }
    }

    fn tool_blocking(&self, name: &str) -> std::process::Command {
        let program = self.bin_dir.join(name);
        if self.run_as_postgres {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            std::process::Command::new(program)
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

impl Drop for LocalPostgres {
    /// A command that fails or panics still leaves the cluster as it found it.
    fn drop(&mut self) {
        self.leave();
    }
}

/// Takes the folder's lock (blocking until another orderline process releases it).
fn lock(folder: &Path) -> anyhow::Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(folder.join("cluster.lock"))
        .context("cannot open the private cluster's lock file")?;
    file.lock()
        .context("cannot lock the private cluster's folder")?;
    Ok(file)
}

/// When a process started, in clock ticks since boot (field 22 of `/proc/PID/stat`): with the
/// pid, it names one process even after the pid is reused.
fn started_at(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(19).map(str::to_owned)
}

/// Registers this process as a user of the cluster; returns its entry.
fn register(folder: &Path) -> anyhow::Result<PathBuf> {
    let pid = std::process::id();
    let entry = folder.join("users").join(pid.to_string());
    std::fs::write(&entry, started_at(pid).unwrap_or_default())
        .with_context(|| format!("cannot register in {}", folder.join("users").display()))?;
    Ok(entry)
}

/// Removes the entries of processes that are gone; answers how many live users remain.
fn live_users(folder: &Path) -> anyhow::Result<usize> {
    let users = folder.join("users");
    std::fs::create_dir_all(&users)
        .with_context(|| format!("cannot create {}", users.display()))?;
    let mut live = 0;
    for entry in std::fs::read_dir(&users)?.flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .is_some_and(|pid| {
                let recorded = std::fs::read_to_string(entry.path()).unwrap_or_default();
                started_at(pid).is_some_and(|now| now == recorded.trim())
            });
        if alive {
            live += 1;
        } else {
            std::fs::remove_file(entry.path()).ok();
        }
    }
    Ok(live)
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
