//! Test harness: starts the real server on port 0 against a fresh Postgres database per test,
//! mints tokens with the server's own code, and has one helper per endpoint.
//!
//! The Postgres server is `ORDERLINE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each [`TestApp`] creates its own database
//! there, migrates it, and drops it when the test ends.

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

use aggregates::inventory::Product;
use aggregates::order::Order;
use aggregates::payment::{Payment, PaymentStatus};
use api_common::auth::{Role, TokenKeys};
use cqrs_es::persist::PersistedEventRepository;
use event_store::unit_of_work::UnitOfWork;
use event_store::{Metadata, StoreError, StoredAggregate};
use orderline::Parts;
use postgres_es::PostgresEventRepository;
use sagas::fulfillment::Timing;
use sagas::runtime::SagaConfig;

fn server_url() -> String {
    std::env::var("ORDERLINE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Another server process on a test's database.
pub struct Sibling {
    /// `http://127.0.0.1:PORT` if it serves the API.
    pub address: Option<String>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Sibling {
    /// Stops it and waits until it has (its projections finished their page).
    pub async fn stop(self) {
        self.stop.send(()).ok();
        self.task.await.expect("join").expect("serve");
    }
}

/// A running server with its own database.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// HTTP client.
    pub client: Client,
    /// Pool on the test's database, for looking at the events table.
    pub pool: PgPool,
    /// Keys the server verifies tokens with.
    pub keys: TokenKeys,
    database: String,
    shutdown: Option<oneshot::Sender<()>>,
    /// Log consumers the server runs (projections, and the saga when it runs).
    consumers: Vec<&'static str>,
}

/// The saga's timing in tests: the production rules, with retries quick enough that a test of
/// a flaky provider takes well under a second.
pub fn saga_config() -> SagaConfig {
    SagaConfig {
        timing: Timing {
            retry_base: chrono::Duration::milliseconds(20),
            retry_cap: chrono::Duration::milliseconds(500),
            ..Timing::default()
        },
        idle_poll: Duration::from_millis(100),
        ..SagaConfig::default()
    }
}

impl TestApp {
    /// Creates a database, migrates it and starts the server on a free port.
    ///
    /// # Panics
    /// When Postgres is unreachable: the end-to-end tests need it.
    pub async fn spawn() -> Self {
        Self::spawn_with(Parts::ALL).await
    }

    /// As [`TestApp::spawn`], without the fulfillment saga: for tests that play the saga's part
    /// themselves (with [`TestApp::execute`]) or count the events of the log exactly.
    pub async fn spawn_without_sagas() -> Self {
        Self::spawn_with(Parts {
            sagas: false,
            ..Parts::ALL
        })
        .await
    }

    /// As [`TestApp::spawn`], running only `parts` (the API always runs).
    pub async fn spawn_with(parts: Parts) -> Self {
        Self::spawn_configured(parts, saga_config()).await
    }

    /// As [`TestApp::spawn_with`], verifying tokens with the HS256 `secret` (for tests that
    /// sign tokens themselves, as another issuer would).
    pub async fn spawn_with_secret(parts: Parts, secret: &str) -> Self {
        Self::spawn_keyed(parts, saga_config(), TokenKeys::hs256(secret.as_bytes())).await
    }

    /// As [`TestApp::spawn_with`], with the fulfillment saga configured by `saga`.
    pub async fn spawn_configured(parts: Parts, saga: SagaConfig) -> Self {
        let keys = TokenKeys::hs256(Uuid::new_v4().to_string().as_bytes());
        Self::spawn_keyed(parts, saga, keys).await
    }

    async fn spawn_keyed(parts: Parts, saga: SagaConfig, keys: TokenKeys) -> Self {
        let parts = Parts { api: true, ..parts };
        let database = format!("orderline_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server_url())
            .await
            .expect("Postgres must be reachable at ORDERLINE_TEST_DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = database_url(&database);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .expect("connect to test database");
        event_store::MIGRATOR.run(&pool).await.expect("migrate");
        let app = orderline::Application::new(
            ([127, 0, 0, 1], 0).into(),
            pool.clone(),
            keys.clone(),
            parts,
        )
        .await
        .expect("bind")
        .with_saga_config(saga);
        let address = format!("http://{}", app.local_addr().expect("address"));
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(app.run_until(async {
            rx.await.ok();
        }));
        Self {
            address,
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            pool,
            keys,
            database,
            shutdown: Some(tx),
            consumers: if parts.sagas {
                vec!["orders", "inventory", "payments", "fulfillment"]
            } else {
                vec!["orders", "inventory", "payments"]
            },
        }
    }

    /// Starts a second server on the same database, as a second orderline process would be,
    /// and returns its address. It stops when the test's runtime ends.
    pub async fn spawn_sibling(&self) -> String {
        let sibling = self
            .spawn_process(Parts {
                sagas: self.consumers.contains(&"fulfillment"),
                ..Parts::ALL
            })
            .await;
        let address = sibling.address.clone().expect("the API runs");
        std::mem::forget(sibling.stop);
        address
    }

    /// Starts another server process (in this test process) with `parts` on the same
    /// database. Dropping or [`Sibling::stop`]ping it stops it, as a process exiting would:
    /// its leases are released.
    pub async fn spawn_process(&self, parts: Parts) -> Sibling {
        let app = orderline::Application::new(
            ([127, 0, 0, 1], 0).into(),
            self.pool.clone(),
            self.keys.clone(),
            parts,
        )
        .await
        .expect("bind")
        .with_saga_config(saga_config());
        let address = app.local_addr().ok().map(|a| format!("http://{a}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            stopped.await.ok();
        }));
        Sibling {
            address,
            stop,
            task,
        }
    }

    /// Starts another API (only) on the same database that lets browser front-ends on
    /// `origins` call it, and returns its address. It stops when the test's runtime ends.
    pub async fn spawn_api_with_cors(&self, origins: &[&str]) -> String {
        let origins: Vec<_> = origins
            .iter()
            .map(|o| orderline::cors_origin(o).expect("an origin"))
            .collect();
        let app = orderline::Application::new(
            ([127, 0, 0, 1], 0).into(),
            self.pool.clone(),
            self.keys.clone(),
            Parts {
                api: true,
                ..Parts::NONE
            },
        )
        .await
        .expect("bind")
        .with_cors_origins(&origins);
        let address = format!("http://{}", app.local_addr().expect("address"));
        tokio::spawn(app.run_until(std::future::pending()));
        address
    }

    /// A token for `sub` with `role`, valid for an hour.
    pub fn token(&self, sub: &str, role: Role) -> String {
        self.keys
            .mint(sub, role, Duration::from_secs(3600))
            .expect("mint")
    }

    /// An admin's token.
    pub fn admin(&self) -> String {
        self.token("ops", Role::Admin)
    }

    /// A customer's token.
    pub fn customer(&self, id: &str) -> String {
        self.token(id, Role::Customer)
    }

    /// POSTs JSON with an optional token and extra headers.
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut request = self
            .client
            .post(format!("{}{path}", self.address))
            .json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request")
    }

    /// `POST /api/v1/products` as admin.
    pub async fn register_product(&self, sku: &str, price_minor: i64, stock: i64) -> Response {
        let body = json!({
            "sku": sku, "name": format!("Product {sku}"),
            "price": {"amount_minor": price_minor, "currency": "EUR"},
            "initial_stock": stock, "low_stock_threshold": 2
        });
        self.post("/api/v1/products", Some(&self.admin()), &body, &[])
            .await
    }

    /// `POST /api/v1/inventory/{sku}/restock` as admin.
    pub async fn restock(&self, sku: &str, quantity: i64) -> Response {
        self.post(
            &format!("/api/v1/inventory/{sku}/restock"),
            Some(&self.admin()),
            &json!({ "quantity": quantity }),
            &[],
        )
        .await
    }

    /// `POST /api/v1/orders` as `customer` with `(sku, quantity)` lines.
    pub async fn place_order(&self, customer: &str, lines: &[(&str, i64)]) -> Response {
        self.place_order_paying(customer, lines, "tok_visa").await
    }

    /// As [`TestApp::place_order`], paying with `token`.
    pub async fn place_order_paying(
        &self,
        customer: &str,
        lines: &[(&str, i64)],
        token: &str,
    ) -> Response {
        let lines: Vec<Value> = lines
            .iter()
            .map(|(sku, quantity)| json!({ "sku": sku, "quantity": quantity }))
            .collect();
        self.post(
            "/api/v1/orders",
            Some(&self.customer(customer)),
            &json!({ "lines": lines, "payment": { "token": token } }),
            &[],
        )
        .await
    }

    /// Places an order that must succeed and returns its id.
    pub async fn placed_order(&self, customer: &str, lines: &[(&str, i64)]) -> String {
        let response = self.place_order(customer, lines).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.expect("json");
        body["order_id"].as_str().expect("order_id").to_owned()
    }

    /// `(event_type, sequence)` of one stream, oldest first.
    pub async fn stream(&self, aggregate_type: &str, id: &str) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT event_type, sequence FROM events
              WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
        )
        .bind(aggregate_type)
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .expect("stream")
    }
}

fn database_url(database: &str) -> String {
    let base = server_url();
    match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{database}"),
        None => format!("{base}/{database}"),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            tx.send(()).ok();
        }
        let database = self.database.clone();
        // Dropping needs async I/O; do it on a private runtime so Drop works in any context.
        // A database left behind by a failure here is harmless and named for cleanup.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&server_url()).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                Ok::<_, sqlx::Error>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
    }
}

impl TestApp {
    /// GETs `path` with a token.
    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.client
            .get(format!("{}{path}", self.address))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    /// Runs `command` on aggregate `id` straight through the event store, as the saga will:
    /// load, decide, append (retrying on a concurrent append). `Err` is the domain refusal.
    pub async fn execute<A>(&self, id: &str, command: A::Command) -> Result<(), A::Error>
    where
        A: StoredAggregate<Services = ()> + Send + Sync + 'static,
        A::Command: Clone,
    {
        let metadata = Metadata {
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            actor_sub: "test".into(),
            actor_role: "service".into(),
            request_id: "test".into(),
        };
        loop {
            let mut tx = self.pool.begin().await.expect("begin");
            let mut work = UnitOfWork::new();
            match work
                .execute::<A>(&mut tx, id, command.clone(), &metadata)
                .await
            {
                Ok(Ok(_)) => {
                    tx.commit().await.expect("commit");
                    return Ok(());
                }
                Ok(Err(refused)) => return Err(refused),
                Err(StoreError::Conflict) => continue,
                Err(e) => panic!("append failed: {e}"),
            }
        }
    }

    /// Waits (up to 30 s) until every projection (and the saga, when it runs) has applied every
    /// event in the log and no saga waits on a gateway call: the log is quiet.
    ///
    /// # Panics
    /// When they do not catch up in time.
    pub async fn caught_up(&self) {
        for _ in 0..1500 {
            let behind: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM unnest($1::text[]) AS p(name)
                          WHERE NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.consumer = p.name))
                      + (SELECT count(*) FROM checkpoints c WHERE c.consumer = ANY($1) AND EXISTS (
                          SELECT 1 FROM events e
                           WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)))
                      + (SELECT count(*) FROM sagas WHERE due_at IS NOT NULL)",
            )
            .bind(&self.consumers)
            .fetch_one(&self.pool)
            .await
            .expect("lag");
            if behind == 0 {
                return;
            }
            let parked: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT consumer, last_error FROM checkpoints WHERE state = 'parked' LIMIT 1",
            )
            .fetch_optional(&self.pool)
            .await
            .expect("state");
            if let Some((consumer, error)) = parked {
                panic!("consumer {consumer} is parked: {error:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the projections and sagas did not settle");
    }

    /// Every row of `table`, as JSON, ordered by `key`: for byte-for-byte comparisons.
    pub async fn dump(&self, table: &str, key: &str) -> Value {
        sqlx::query_scalar(&format!(
            "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY {key}), '[]') FROM {table} t"
        ))
        .fetch_one(&self.pool)
        .await
        .expect("dump")
    }

    /// Asserts that every read model equals an independent fold of the events table: each
    /// aggregate's own `apply` over its raw events.
    pub async fn assert_read_models_match_log(&self) {
        // Consumers fold each aggregate's events in log order: it must be sequence order.
        let inverted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (
                SELECT sequence, lag(sequence) OVER (PARTITION BY aggregate_type, aggregate_id
                                                     ORDER BY transaction_id, position) AS before
                  FROM events) AS stream
              WHERE before IS NOT NULL AND sequence <> before + 1",
        )
        .fetch_one(&self.pool)
        .await
        .expect("log order");
        assert_eq!(inverted, 0, "events out of sequence order in the log");
        let repository = PostgresEventRepository::new(self.pool.clone());
        let ids = |aggregate_type: &'static str| {
            sqlx::query_scalar::<_, String>(
                "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = $1",
            )
            .bind(aggregate_type)
            .fetch_all(&self.pool)
        };
        let inventory = self.dump("rm_inventory", "sku").await;
        let skus = ids("inventory").await.expect("skus");
        assert_eq!(
            inventory.as_array().map(Vec::len),
            Some(skus.len()),
            "inventory rows"
        );
        for row in inventory.as_array().into_iter().flatten() {
            let sku = row["sku"].as_str().expect("sku");
            let product: Product = fold(&repository, sku).await;
            let expected = json!({
                "on_hand": product.on_hand(), "reserved": product.reserved(),
                "available": product.available(), "low_stock": product.is_low(),
                "price": product.catalog().map(|c| c.price),
            });
            let actual = json!({
                "on_hand": row["on_hand"], "reserved": row["reserved"],
                "available": row["available"], "low_stock": row["low_stock"], "price": row["price"],
            });
            assert_eq!(actual, expected, "inventory {sku}");
        }
        let orders = self.dump("rm_orders", "order_id").await;
        let order_ids = ids("order").await.expect("orders");
        assert_eq!(
            orders.as_array().map(Vec::len),
            Some(order_ids.len()),
            "order rows"
        );
        let payments = self.dump("rm_payments", "order_id").await;
        let paid: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT aggregate_id) FROM events
              WHERE aggregate_type IN ('order', 'payment')",
        )
        .fetch_one(&self.pool)
        .await
        .expect("count");
        assert_eq!(
            payments.as_array().map(Vec::len),
            usize::try_from(paid).ok(),
            "payment rows"
        );
        for row in orders.as_array().into_iter().flatten() {
            let id = row["order_id"].as_str().expect("id");
            let order: Order = fold(&repository, id).await;
            let placed = order.placed().expect("placed");
            assert_eq!(row["status"], json!(order.status()), "order {id}");
            assert_eq!(row["customer_id"], json!(placed.customer_id), "order {id}");
            assert_eq!(row["total"], json!(placed.total), "order {id}");
            let changes: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE aggregate_type = 'order' AND aggregate_id = $1",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("count");
            assert_eq!(
                row["history"].as_array().map(Vec::len),
                usize::try_from(changes).ok(),
                "order {id} history"
            );
        }
        for row in payments.as_array().into_iter().flatten() {
            let id = row["order_id"].as_str().expect("id");
            let payment: Payment = fold(&repository, id).await;
            if payment.status() == PaymentStatus::New {
                assert_eq!(row["status"], "pending", "payment {id}");
                continue;
            }
            assert_eq!(row["status"], json!(payment.status()), "payment {id}");
            assert_eq!(row["captured"], payment.captured_minor(), "payment {id}");
            assert_eq!(row["refunded"], payment.refunded_minor(), "payment {id}");
            assert_eq!(
                row["attempts"].as_array().map(Vec::len),
                Some(payment.attempts().len()),
                "payment {id}"
            );
        }
    }
}

/// An aggregate folded from all its raw events with its own `apply` (no snapshot), old shapes
/// read through the upcasters as every reader does.
async fn fold<A: cqrs_es::Aggregate>(repository: &PostgresEventRepository, id: &str) -> A {
    let mut aggregate = A::default();
    for event in repository.get_events::<A>(id).await.expect("events") {
        let current = event_store::upcast::upcast(
            A::TYPE,
            &event.event_type,
            &event.event_version,
            event.payload,
        );
        for current in current {
            aggregate.apply(serde_json::from_value(current.payload).expect("event"));
        }
    }
    aggregate
}

/// Reads a JSON body.
pub async fn json_body(response: Response) -> Value {
    response.json().await.expect("json body")
}
