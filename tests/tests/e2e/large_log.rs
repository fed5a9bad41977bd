//! An idle engine stays idle as the log grows: every statement a caught-up consumer polls with,
//! and every statement behind the admin views and `/metrics`, is bounded by an index. Checked
//! on a log of a million events by the blocks Postgres touches (EXPLAIN ANALYZE BUFFERS), which
//! does not depend on how busy the machine is; a sequential scan of this log touches tens of
//! thousands.

use orderline::Parts;
use reqwest::StatusCode;
use serde_json::Value;
use testkit::{json_body, TestApp};

const EVENTS: i64 = 1_000_000;

/// Blocks read or found in the buffer cache by one run of `sql`, planned as a long-running
/// process runs it: a prepared statement past its first executions gets Postgres's generic
/// plan, which knows nothing of the parameters' values (a bare `EXISTS` over the cursor then
/// scans the whole table). `types` and `args` are the parameters' SQL types and literal values.
async fn blocks(app: &TestApp, sql: &str, types: &str, args: &str) -> i64 {
    let mut conn = app.pool.acquire().await.unwrap();
    let prepare = if types.is_empty() {
        format!("PREPARE under_test AS {sql}")
    } else {
        format!("PREPARE under_test ({types}) AS {sql}")
    };
    let execute = if args.is_empty() {
        "EXECUTE under_test".to_owned()
    } else {
        format!("EXECUTE under_test ({args})")
    };
    for statement in ["SET plan_cache_mode = force_generic_plan", prepare.as_str()] {
        sqlx::raw_sql(statement).execute(&mut *conn).await.unwrap();
    }
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {execute}");
    let plan: Value = sqlx::query_scalar(&explain)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql("DEALLOCATE under_test; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await
        .unwrap();
    let top = &plan[0]["Plan"];
    top["Shared Hit Blocks"].as_i64().unwrap() + top["Shared Read Blocks"].as_i64().unwrap()
}

#[tokio::test]
async fn polling_and_admin_statements_stay_bounded_on_a_log_of_a_million_events() {
    // Only the API: the test sets the checkpoints itself instead of applying a million events.
    let app = TestApp::spawn_with(Parts::NONE).await;
    let mut tx = event_store::locks::begin_writer(&app.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         SELECT 'inventory', 'BULK-' || (g / 1000), g % 1000 + 1, 'ProductRestocked', '1',
                '{}'::jsonb, '{}'::jsonb
           FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(EVENTS)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("VACUUM ANALYZE events")
        .execute(&app.pool)
        .await
        .unwrap();
    // `orders` is caught up; `inventory` has applied nothing.
    sqlx::query(
        "INSERT INTO checkpoints (consumer, partition, transaction_id, position)
         SELECT 'orders', p, transaction_id, position
           FROM (SELECT transaction_id, position FROM events ORDER BY position DESC LIMIT 1) AS head,
                generate_series(0, 15) AS p",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO checkpoints (consumer, partition) SELECT 'inventory', p FROM generate_series(0, 15) AS p",
    )
        .execute(&app.pool)
        .await
        .unwrap();
    let (head_tx, head): (String, i64) = sqlx::query_as(
        "SELECT transaction_id::text, position FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    let table_blocks: i64 =
        sqlx::query_scalar("SELECT relpages::bigint FROM pg_class WHERE relname = 'events'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        table_blocks > 10_000,
        "the log must be large: {table_blocks}"
    );

    // An idle worker's poll first asks for the log's newest event (once per interval for
    // the whole process): an index probe from the end, not a sort of the log.
    let newest = blocks(&app, event_log::reader::NEWEST_SQL, "", "").await;
    assert!(newest < 20, "the log's head touched {newest} blocks");

    // A caught-up worker's poll looks past its cursor in the whole log and its partition.
    let poll = event_log::reader::partition_tail_sql(16, 3);
    let caught_up = blocks(&app, &poll, "text, bigint", &format!("'{head_tx}', {head}")).await;
    assert!(
        caught_up < 20,
        "a caught-up poll touched {caught_up} blocks"
    );
    let from_start = blocks(&app, &poll, "text, bigint", "'0', 0").await;
    assert!(
        from_start < 20,
        "a poll from the start touched {from_start} blocks"
    );

    // A partition's page reads its own events only, from wherever its cursor is.
    let page = event_log::reader::partition_page_sql(16, 3);
    let caught_up = blocks(
        &app,
        &page,
        "text, bigint, bigint",
        &format!("'{head_tx}', {head}, 1000"),
    )
    .await;
    assert!(
        caught_up < 20,
        "a caught-up partition page touched {caught_up} blocks"
    );
    let from_start = blocks(&app, &page, "text, bigint, bigint", "'0', 0, 1000").await;
    assert!(
        from_start < 1_200,
        "a partition page of 1000 events from the start touched {from_start} blocks"
    );

    // A group's page of several partitions walks each one's index range, as the page of one.
    let group = event_log::reader::partitions_page_sql(16);
    let types = "int4[], text[], int8[], bigint";
    let caught_up = blocks(
        &app,
        &group,
        types,
        &format!(
            "'{{3,7,12}}', '{{{head_tx},{head_tx},{head_tx}}}', '{{{head},{head},{head}}}', 300"
        ),
    )
    .await;
    assert!(
        caught_up < 40,
        "a caught-up group page of three partitions touched {caught_up} blocks"
    );
    let from_start = blocks(&app, &group, types, "'{3,7,12}', '{0,0,0}', '{0,0,0}', 300").await;
    assert!(
        from_start < 1_200,
        "a group page of 3 x 300 events from the start touched {from_start} blocks"
    );

    let limit = (event_log::checkpoints::EXACT_LAG_LIMIT / 16).to_string();
    let consumers = blocks(
        &app,
        &event_log::checkpoints::progress_sql(16),
        "bigint",
        &limit,
    )
    .await;
    assert!(
        consumers < 1_000,
        "the consumers view touched {consumers} blocks"
    );
    for sql in [
        sagas::store::LIVE_SQL,
        integrations::notifications::WAITING_SQL,
    ] {
        let touched = blocks(&app, sql, "", "").await;
        assert!(touched < 20, "{sql} touched {touched} blocks");
    }

    let view = json_body(app.get("/api/v1/admin/projections", &app.admin()).await).await;
    let lag = |name: &str| {
        view["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["lag"].as_i64().unwrap())
    };
    assert_eq!(lag("orders"), Some(0));
    assert_eq!(lag("inventory"), Some(EVENTS), "estimated from positions");
    let metrics = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("orderline_log_head_position {head}")),
        "{text}"
    );
}
