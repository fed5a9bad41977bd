//! The binary as a newcomer runs it: every `--help` says what the command does and which
//! settings it reads; output cut short by the reader (`| head`) ends the command quietly; Ctrl-C
//! ends `events --follow` cleanly; `--after` means the same when following; logs are coloured
//! only on a terminal; `verify` tells "not intact" from "could not check"; and the private
//! Postgres cluster is stopped on every exit path, including by the next process when the one
//! that started it was killed.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sqlx::PgPool;

mod support;
use support::{drop_database, free_port, fresh_database, until, wait_ready};

/// The binary with `args`, on `database_url` (or the private cluster in `data_dir`).
fn binary(args: &[&str], database_url: Option<&str>, data_dir: Option<&Path>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderline"));
    command
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    match database_url {
        Some(url) => command.env("DATABASE_URL", url),
        None => command.env_remove("DATABASE_URL"),
    };
    if let Some(dir) = data_dir {
        command.env("ORDERLINE_DATA_DIR", dir);
    }
    command
}

fn run(args: &[&str], database_url: Option<&str>) -> Output {
    binary(args, database_url, None).output().unwrap()
}

fn signal(child: &std::process::Child, name: &str) {
    let sent = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Adds `count` raw events to the log, one transaction each, and answers the head position.
async fn add_events(pool: &PgPool, count: i64) -> i64 {
    for _ in 0..count {
        let mut tx = event_store::locks::begin_writer(pool).await.unwrap();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             SELECT 'inventory', 'RAW', coalesce(max(sequence), 0) + 1, 'Restocked', '1',
                    '{}'::jsonb, '{}'::jsonb
               FROM events WHERE aggregate_type = 'inventory' AND aggregate_id = 'RAW'",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A migrated fresh database: its name, URL and a pool on it.
async fn database() -> (String, String, PgPool) {
    let (name, url) = fresh_database("orderline_cli").await;
    let migrated = run(&["migrate"], Some(&url));
    assert!(migrated.status.success(), "{migrated:?}");
    let pool = PgPool::connect(&url).await.unwrap();
    (name, url, pool)
}

async fn drop_with_pool(name: &str, pool: PgPool) {
    pool.close().await;
    drop_database(name).await;
}

#[test]
fn every_help_says_what_the_command_does_and_what_it_reads() {
    let help = String::from_utf8(run(&["--help"], None).stdout).unwrap();
    let summary = help.split("Usage:").next().unwrap();
    for command in [
        "serve", "migrate", "events", "audit", "state", "verify", "export", "import", "replay",
        "token",
    ] {
        let named = summary
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == command);
        assert!(named, "{command} missing from the summary:\n{summary}");
    }
    assert!(
        help.contains("DATABASE_URL") && help.contains("Exit codes"),
        "{help}"
    );
    let serve = String::from_utf8(run(&["serve", "--help"], None).stdout).unwrap();
    for variable in [
        "ORDERLINE_ADDR",
        "ORDERLINE_JWT_SECRET",
        "ORDERLINE_CORS_ORIGINS",
        "ORDERLINE_KAFKA_BROKERS",
        "DATABASE_URL",
    ] {
        assert!(serve.contains(variable), "{variable} missing:\n{serve}");
    }
    for command in ["events", "verify", "export", "import", "replay", "migrate"] {
        let text = String::from_utf8(run(&[command, "--help"], None).stdout).unwrap();
        assert!(text.contains("ORDERLINE_DATA_DIR"), "{command}:\n{text}");
    }
}

#[tokio::test]
async fn logs_are_plain_text_when_not_on_a_terminal_and_verify_tells_its_failures_apart() {
    let (name, url) = fresh_database("orderline_cli").await;
    let migrated = run(&["migrate"], Some(&url));
    assert!(migrated.status.success());
    let log = String::from_utf8(migrated.stderr).unwrap();
    assert!(log.contains("migrations applied"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
    assert_eq!(run(&["verify"], Some(&url)).status.code(), Some(0));
    let unreachable = run(&["verify"], Some("postgres://postgres@127.0.0.1:1/none"));
    assert_eq!(unreachable.status.code(), Some(2), "could not check");
    drop_database(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_after_a_position_not_written_yet_starts_after_it_and_ctrl_c_ends_it() {
    let (name, url, pool) = database().await;
    let head = add_events(&pool, 3).await;
    let after = head + 2;
    let mut follow = binary(
        &[
            "events",
            "--follow",
            "--json",
            "--after",
            &after.to_string(),
        ],
        Some(&url),
        None,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    add_events(&pool, 4).await;
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["position"], after + 1, "{first}");
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["position"], after + 2, "{second}");
    signal(&follow, "INT");
    let status = follow.wait().unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C is how a follow ends");
    // Without --follow, --after takes the same thing.
    let listed = run(
        &["events", "--json", "--after", &after.to_string()],
        Some(&url),
    );
    let positions: Vec<i64> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["position"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(positions, [after + 1, after + 2]);
    drop_with_pool(&name, pool).await;
}

#[tokio::test]
async fn output_cut_short_by_its_reader_ends_the_command_quietly() {
    let (name, url, pool) = database().await;
    let mut tx = event_store::locks::begin_writer(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         SELECT 'inventory', 'BULK', g, 'Restocked', '1', '{}'::jsonb, '{}'::jsonb
           FROM generate_series(1, 20000) AS g",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let mut events = binary(&["events", "--json"], Some(&url), None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(events.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().is_ok());
    drop(lines);
    let output = events.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    drop_with_pool(&name, pool).await;
}

/// Whether a Postgres server runs on `data_dir` (its `postmaster.pid` names a live process).
fn cluster_runs(data_dir: &Path) -> bool {
    std::fs::read_to_string(data_dir.join("postgres").join("postmaster.pid"))
        .ok()
        .and_then(|pid| pid.lines().next().map(str::to_owned))
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

fn data_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("orderline-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_cluster_is_stopped_on_every_exit_path() {
    let dir = data_dir();
    let client = reqwest::Client::new();

    // serve starts the cluster and is killed: the cluster is left running ...
    let port = free_port();
    let mut server = binary(&["serve"], None, Some(&dir))
        .env("ORDERLINE_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&client, &format!("http://127.0.0.1:{port}")).await;
    assert!(cluster_runs(&dir));
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(cluster_runs(&dir), "SIGKILL leaves the cluster behind");

    // ... until the next command takes it over, and stops it when it is done.
    let events = binary(&["events"], None, Some(&dir)).output().unwrap();
    assert!(events.status.success(), "{events:?}");
    let log = String::from_utf8_lossy(&events.stderr);
    assert!(log.contains("took over"), "{log}");
    assert!(!cluster_runs(&dir), "the command stopped what it took over");

    // A command whose reader goes away still stops the cluster it started.
    let mut cut = binary(&["events", "--json", "--follow"], None, Some(&dir))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until("the follower started the cluster", async || {
        cluster_runs(&dir)
    })
    .await;
    signal(&cut, "INT");
    assert_eq!(cut.wait().unwrap().code(), Some(0));
    assert!(!cluster_runs(&dir), "Ctrl-C stopped the cluster");
    drop(cut.stdout.take());

    // A command that fails (an unknown order) stops it too.
    let missing = binary(
        &["audit", "order", "00000000-0000-0000-0000-000000000000"],
        None,
        Some(&dir),
    )
    .output()
    .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(!cluster_runs(&dir));
    std::fs::remove_dir_all(&dir).ok();
}
