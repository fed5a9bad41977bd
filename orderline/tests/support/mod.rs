//! What the process-level tests share, over `testkit`: the real `orderline` binary of this
//! package (only its own tests know its path) and the helpers in the forms these tests use.

// Each process test compiles this module on its own and uses some of the helpers; which ones
// differs from file to file, so `expect` cannot say it.
#![allow(dead_code, unused_imports)]

use std::process::Child;

pub use testkit::database::server_url;
pub use testkit::process::{free_port, token, until, wait_ready, SECRET};

/// Creates a fresh database named `{prefix}_{random}`; returns its name and URL.
pub async fn fresh_database(prefix: &str) -> (String, String) {
    testkit::database::create(prefix).await.unwrap()
}

/// Runs the real binary with `args` and `env` against `database_url`, listening on `port`.
pub fn orderline(database_url: &str, port: u16, args: &[&str], env: &[(&str, &str)]) -> Child {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_orderline"));
    testkit::process::orderline(binary, database_url, port, args)
        .envs(env.iter().copied())
        .spawn()
        .unwrap()
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
    let product = (sku, price_minor, stock);
    let created = testkit::client::register_product(client, base, admin, product, None).await;
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
    testkit::client::placed_order(client, base, customer, lines, token).await
}

/// Drops database `name` (made by [`fresh_database`]), disconnecting whoever is still on it.
pub async fn drop_database(name: &str) {
    testkit::database::drop(name).await.unwrap();
}

/// Sends `signal` (`-STOP`, `-CONT`, ...) to the process `child`.
pub fn signal(child: &Child, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}
