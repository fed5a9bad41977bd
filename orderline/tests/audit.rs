//! The audit commands of the real binary against a real database: an order's story, the log
//! filtered and followed, time travel at a version and at a moment (the same as the HTTP
//! route), export and import into an empty database reproducing the same log, and `verify`
//! passing on a clean log and naming the event after an UPDATE of a payload and after a DELETE.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use api_common::auth::{Role, TokenKeys};
use serde_json::{json, Value};
use sqlx::PgPool;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, until,
    wait_ready, SECRET,
};

/// Runs `orderline ARGS` against `url` and waits for it.
fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orderline"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Shop {
    client: reqwest::Client,
    base: String,
    admin: String,
    customer: String,
}

impl Shop {
    async fn order(&self) -> String {
        place_order(
            &self.client,
            &self.base,
            &self.customer,
            &[("A", 2)],
            "tok_visa",
        )
        .await
    }
}

async fn until_saga(pool: &PgPool, order: &str, state: &str) {
    until(&format!("the saga of {order} is {state}"), async || {
        let now: Option<String> =
            sqlx::query_scalar("SELECT state FROM sagas WHERE order_id = $1::uuid")
                .bind(order)
                .fetch_optional(pool)
                .await
                .unwrap();
        now.as_deref() == Some(state)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orders_story_time_travel_and_verify_from_the_command_line() {
    let (database, url) = fresh_database("orderline_audit").await;
    let port = free_port();
    let keys = TokenKeys::hs256(SECRET.as_bytes());
    let shop = Shop {
        client: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{port}"),
        admin: keys
            .mint("ops", Role::Admin, Duration::from_secs(600))
            .unwrap(),
        customer: keys
            .mint("ana", Role::Customer, Duration::from_secs(600))
            .unwrap(),
    };
    let mut server = orderline(&url, port, &["serve"], &[]);
    wait_ready(&shop.client, &shop.base).await;
    let pool = PgPool::connect(&url).await.unwrap();
    register_product(&shop.client, &shop.base, &shop.admin, "A", 150, 10).await;
    let order = shop.order().await;
    until_saga(&pool, &order, "confirmed").await;
    let before_cancel = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    shop.client
        .post(format!("{}/api/v1/orders/{order}/cancel", shop.base))
        .bearer_auth(&shop.customer)
        .json(&json!({"reason": "changed my mind"}))
        .send()
        .await
        .unwrap();
    until_saga(&pool, &order, "completed").await;

    // The order's own stream.
    let text = stdout(&cli(
        &url,
        &["events", "--aggregate", &format!("order/{order}")],
    ));
    let types: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().nth(5).unwrap())
        .collect();
    assert_eq!(
        types,
        ["OrderPlaced", "OrderConfirmed", "OrderCancelled"],
        "{text}"
    );
    assert!(text.contains("by ana (customer)"), "{text}");

    // Its whole story across streams, with actors: the saga's steps carry the order's flow.
    let story = json_lines(&stdout(&cli(&url, &["audit", "order", &order, "--json"])));
    let steps: Vec<(&str, &str)> = story
        .iter()
        .map(|e| {
            (
                e["aggregate_type"].as_str().unwrap(),
                e["event_type"].as_str().unwrap(),
            )
        })
        .collect();
    for step in [
        ("order", "OrderPlaced"),
        ("inventory", "StockReserved"),
        ("payment", "PaymentRequested"),
        ("payment", "AuthorizationAttempted"),
        ("order", "OrderConfirmed"),
        ("order", "OrderCancelled"),
        ("payment", "PaymentVoided"),
        ("inventory", "ReservationReleased"),
    ] {
        assert!(steps.contains(&step), "{step:?} missing from {steps:?}");
    }
    let correlation = story[0]["metadata"]["correlation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let flow = json_lines(&stdout(&cli(
        &url,
        &["events", "--correlation", &correlation, "--json"],
    )));
    assert!(flow
        .iter()
        .all(|e| e["metadata"]["correlation_id"] == correlation.as_str()));
    assert!(flow.iter().any(|e| e["event_type"] == "StockReserved"));

    // Time travel: by version, by time, and now; the CLI and the HTTP route agree.
    let state = |args: &[&str]| -> Value {
        let mut all = vec!["state", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&stdout(&cli(&url, &all))).unwrap()
    };
    let stream = format!("order/{order}");
    let confirmed = state(&[&stream, "--version", "2"]);
    assert_eq!(confirmed["version"], 2);
    assert_eq!(confirmed["state"]["status"], "confirmed");
    let at = before_cancel.to_rfc3339();
    assert_eq!(
        state(&[&stream, "--at", &at])["state"]["status"],
        "confirmed"
    );
    assert_eq!(state(&[&stream])["state"]["status"], "cancelled");
    let http: Value = shop
        .client
        .get(format!(
            "{}/api/v1/admin/streams/order/{order}?version=2",
            shop.base
        ))
        .bearer_auth(&shop.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http, confirmed);
    let stock = state(&["inventory/A", "--at", &at]);
    assert_eq!(stock["state"]["on_hand"], 10);

    // --follow prints what commits next.
    let head: i64 = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut tail = Command::new(env!("CARGO_BIN_EXE_orderline"))
        .args(["events", "--follow", "--json", "--after", &head.to_string()])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let second = shop.order().await;
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let first_new: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    tail.kill().unwrap();
    tail.wait().unwrap();
    assert_eq!(first_new["aggregate_id"], second.as_str());
    assert_eq!(first_new["event_type"], "OrderPlaced");
    until_saga(&pool, &second, "confirmed").await;
    until("the projections caught up", async || {
        let behind: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM checkpoints c, events e
                             WHERE c.consumer IN ('orders', 'inventory', 'payments')
                               AND (e.transaction_id, e.position) > (c.transaction_id, c.position))",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        !behind
    })
    .await;
    server.kill().unwrap();
    server.wait().unwrap();

    // verify: clean, then after an UPDATE, then after a DELETE.
    let clean = stdout(&cli(&url, &["verify"]));
    assert!(clean.starts_with("ok: "), "{clean}");
    for projection in ["orders", "inventory", "payments"] {
        assert!(
            clean.contains(&format!("ok: projection {projection} matches the log")),
            "{clean}"
        );
    }
    // A read model edited by hand no longer matches the fold of the log.
    sqlx::query("UPDATE rm_orders SET status = 'shipped' WHERE order_id = $1::uuid")
        .bind(&order)
        .execute(&pool)
        .await
        .unwrap();
    let drifted = cli(&url, &["verify"]);
    assert_eq!(drifted.status.code(), Some(1));
    let text = String::from_utf8_lossy(&drifted.stdout);
    assert!(text.contains("projection orders differs"), "{text}");
    sqlx::query("UPDATE rm_orders SET status = 'cancelled' WHERE order_id = $1::uuid")
        .bind(&order)
        .execute(&pool)
        .await
        .unwrap();
    assert!(cli(&url, &["verify"]).status.success());

    // export, then import into an empty database: the same streams, order and hashes.
    let exported = stdout(&cli(&url, &["export"]));
    let file = std::env::temp_dir().join(format!("{database}.ndjson"));
    std::fs::write(&file, &exported).unwrap();
    let (copy, copy_url) = fresh_database("orderline_import").await;
    let imported = stdout(&cli(&copy_url, &["import", file.to_str().unwrap()]));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(imported.trim(), format!("imported {count} events"));
    let copy_pool = PgPool::connect(&copy_url).await.unwrap();
    let log = "SELECT position, event_id, aggregate_type, aggregate_id, sequence, event_type,
                      event_version, recorded_at, metadata, payload, hash
                 FROM events ORDER BY transaction_id, position";
    type Row = (
        i64,
        uuid::Uuid,
        String,
        String,
        i64,
        String,
        String,
        chrono::DateTime<chrono::Utc>,
        Value,
        Value,
        Option<Vec<u8>>,
    );
    let original: Vec<Row> = sqlx::query_as(log).fetch_all(&pool).await.unwrap();
    let copied: Vec<Row> = sqlx::query_as(log).fetch_all(&copy_pool).await.unwrap();
    assert_eq!(copied, original);
    assert!(stdout(&cli(&copy_url, &["verify"])).starts_with("ok: "));
    let again = cli(&copy_url, &["import", file.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "import into a database with events must refuse"
    );
    copy_pool.close().await;
    drop_database(&copy).await;
    std::fs::remove_file(&file).ok();
    let (position, original): (i64, Value) = sqlx::query_as(
        "SELECT position, payload FROM events WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(&order)
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE events SET payload = jsonb_set(payload, '{OrderPlaced,total,amount_minor}', '1')
          WHERE position = $1",
    )
    .bind(position)
    .execute(&pool)
    .await
    .unwrap();
    let edited = cli(&url, &["verify", "--json"]);
    assert_eq!(edited.status.code(), Some(1));
    let verdict: Value = serde_json::from_slice(&edited.stdout).unwrap();
    assert_eq!(verdict["first_bad_event"]["position"], position);
    assert!(verdict["first_bad_event"]["problem"]
        .as_str()
        .unwrap()
        .contains("hash"));
    sqlx::query("UPDATE events SET payload = $2 WHERE position = $1")
        .bind(position)
        .bind(&original)
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        cli(&url, &["verify"]).status.success(),
        "restored, it verifies again"
    );
    let (deleted_after, sequence): (i64, i64) = sqlx::query_as(
        "DELETE FROM events WHERE aggregate_id = $1 AND aggregate_type = 'order' AND sequence = 2
         RETURNING (SELECT position FROM events WHERE aggregate_id = $1
                       AND aggregate_type = 'order' AND sequence = 3), sequence",
    )
    .bind(&order)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sequence, 2);
    let gap = cli(&url, &["verify"]);
    assert_eq!(gap.status.code(), Some(1));
    let text = String::from_utf8_lossy(&gap.stdout);
    assert!(
        text.contains(&format!("position {deleted_after} ")),
        "{text}"
    );
    assert!(text.contains("missing"), "{text}");

    pool.close().await;
    drop_database(&database).await;
}
