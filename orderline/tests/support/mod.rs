//! What the process-level tests share: the Postgres server, fresh databases, free ports and the
//! real `orderline` binary.

// Each process test compiles this module on its own and uses some of the helpers; which ones
// differs from file to file, so `expect` cannot say it.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

use sqlx::PgConnection;

/// The token secret every spawned server uses.
pub const SECRET: &str = "process-test-secret-that-is-long-enough";

/// A token for `sub` with `role`, valid for ten minutes, signed with [`SECRET`].
pub fn token(sub: &str, role: api_common::auth::Role) -> String {
    api_common::auth::TokenKeys::hs256(SECRET.as_bytes())
        .mint(sub, role, std::time::Duration::from_secs(600))
        .unwrap()
}

/// The server on which tests create their databases.
pub fn server_url() -> String {
    std::env::var("ORDERLINE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates a fresh database named `{prefix}_{random}`; returns its name and URL.
pub async fn fresh_database(admin: &mut PgConnection, prefix: &str) -> (String, String) {
    let database = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&mut *admin)
        .await
        .unwrap();
    let url = match server_url().rsplit_once('/') {
        Some((server, _)) => format!("{server}/{database}"),
        None => unreachable!("the URL has a database part"),
    };
    (database, url)
}

/// Runs the real binary with `args` and `env` against `database_url`, listening on `port`.
pub fn orderline(database_url: &str, port: u16, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_orderline"))
        .args(args)
        .envs(env.iter().copied())
        .env("DATABASE_URL", database_url)
        .env("ORDERLINE_ADDR", format!("127.0.0.1:{port}"))
        .env("ORDERLINE_JWT_SECRET", SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (up to 10 s) until the server at `base` answers `/health/ready`.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/health/ready")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("server did not become ready");
}

/// Polls `done` every 50 ms until it answers `true`; fails the test after 60 s.
pub async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "timed out: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Registers `sku` at `price_minor` EUR cents with `stock` units through the API, as `admin`.
pub async fn register_product(
    client: &reqwest::Client,
    base: &str,
    admin: &str,
    sku: &str,
    price_minor: i64,
    stock: i64,
) {
    let created = client
        .post(format!("{base}/api/v1/products"))
        .bearer_auth(admin)
        .json(&serde_json::json!({
            "sku": sku, "name": sku, "initial_stock": stock,
            "price": {"amount_minor": price_minor, "currency": "EUR"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "registering {sku}");
}

/// Places an order of `(sku, quantity)` lines paid with `token`, as `customer`; answers its id.
pub async fn place_order(
    client: &reqwest::Client,
    base: &str,
    customer: &str,
    lines: &[(&str, i64)],
    token: &str,
) -> String {
    let lines: Vec<serde_json::Value> = lines
        .iter()
        .map(|(sku, quantity)| serde_json::json!({"sku": sku, "quantity": quantity}))
        .collect();
    let placed = client
        .post(format!("{base}/api/v1/orders"))
        .bearer_auth(customer)
        .json(&serde_json::json!({"lines": lines, "payment": {"token": token}}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 202);
    let body: serde_json::Value = placed.json().await.unwrap();
    body["order_id"].as_str().unwrap().to_owned()
}
