//! [`TestApp`]: one end-to-end test's world. A fresh migrated database, the server on a free
//! port (with the saga's retries made quick), tokens minted with the server's own keys, one
//! helper per endpoint, the log's quiet point and the oracle; the database is dropped when the
//! test ends.

use std::time::Duration;

use reqwest::{Client, Response};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use api_common::auth::{Role, TokenKeys};
use event_store::unit_of_work::UnitOfWork;
use event_store::{Metadata, StoreError, StoredAggregate};
use orderline::Parts;
use sagas::fulfillment::Timing;
use sagas::runtime::SagaConfig;

use crate::server::{InProcess, Options};
use crate::{client, database};

/// Another server process on a test's database.
pub struct Sibling {
    /// `http://127.0.0.1:PORT` if it serves the API.
    pub address: Option<String>,
    server: InProcess,
}

impl Sibling {
    /// Stops it and waits until it has (its projections finished their page).
    pub async fn stop(self) {
        self.server.stop().await.expect("serve");
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
    server: Option<InProcess>,
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
        let (database, url) = database::create("orderline_test")
            .await
            .expect("Postgres must be reachable at ORDERLINE_TEST_DATABASE_URL");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .expect("connect to test database");
        event_store::MIGRATOR.run(&pool).await.expect("migrate");
        let server = InProcess::start(
            &pool,
            &keys,
            Options {
                saga: Some(saga),
                ..Options::parts(parts)
            },
        )
        .await
        .expect("start the server");
        Self {
            address: server.address.clone().expect("the API runs"),
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            pool,
            keys,
            database,
            server: Some(server),
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
        sibling.server.detach().expect("the API runs")
    }

    /// Starts another server process (in this test process) with `parts` on the same
    /// database. Dropping or [`Sibling::stop`]ping it stops it, as a process exiting would:
    /// its leases are released.
    pub async fn spawn_process(&self, parts: Parts) -> Sibling {
        let options = Options {
            saga: Some(saga_config()),
            ..Options::parts(parts)
        };
        let server = InProcess::start(&self.pool, &self.keys, options)
            .await
            .expect("start the server");
        Sibling {
            address: server.address.clone(),
            server,
        }
    }

    /// Starts another API (only) on the same database that lets browser front-ends on
    /// `origins` call it, and returns its address. It stops when the test's runtime ends.
    pub async fn spawn_api_with_cors(&self, origins: &[&str]) -> String {
        let options = Options {
            cors_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            ..Options::parts(Parts {
                api: true,
                ..Parts::NONE
            })
        };
        InProcess::start(&self.pool, &self.keys, options)
            .await
            .expect("start the server")
            .detach()
            .expect("the API runs")
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

    /// `POST /api/v1/products` as admin ([`client::register_product`]), with a low-stock
    /// threshold of 2.
    pub async fn register_product(&self, sku: &str, price_minor: i64, stock: i64) -> Response {
        let product = (sku, price_minor, stock);
        client::register_product(&self.client, &self.address, &self.admin(), product, Some(2)).await
    }

    /// `POST /api/v1/inventory/{sku}/restock` as admin.
    pub async fn restock(&self, sku: &str, quantity: i64) -> Response {
        client::restock(&self.client, &self.address, &self.admin(), sku, quantity).await
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
        let customer = self.customer(customer);
        client::place_order(&self.client, &self.address, &customer, lines, token).await
    }

    /// Places an order that must succeed and returns its id.
    pub async fn placed_order(&self, customer: &str, lines: &[(&str, i64)]) -> String {
        let customer = self.customer(customer);
        client::placed_order(&self.client, &self.address, &customer, lines, "tok_visa").await
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

impl Drop for TestApp {
    fn drop(&mut self) {
        // Ending the server's task is enough: the database is dropped WITH (FORCE).
        drop(self.server.take());
        database::drop_blocking(&self.database);
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
            event_store::locks::announce_writer(&mut tx)
                .await
                .expect("announce the writer");
            let mut work = UnitOfWork::new();
            match work
                .execute::<A>(&mut tx, id, command.clone(), &metadata)
                .await
            {
                Ok(Ok(_)) => {
                    match work.flush(&mut tx).await {
                        Ok(()) => {}
                        Err(StoreError::Conflict) => continue,
                        Err(e) => panic!("append failed: {e}"),
                    }
                    tx.commit().await.expect("commit");
                    return Ok(());
                }
                Ok(Err(refused)) => return Err(refused),
                Err(StoreError::Conflict) => continue,
                Err(e) => panic!("append failed: {e}"),
            }
        }
    }

    /// Asserts that every consumer with checkpoints here (`consumers` of them) applied every
    /// event of the log exactly once, summed over its partitions.
    ///
    /// # Panics
    /// When one did not, or the count of consumers differs.
    pub async fn assert_applied_once(&self, consumers: usize) {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .expect("count the log");
        let applied: Vec<(String, i64)> = sqlx::query_as(
            "SELECT consumer, sum(events_applied)::bigint FROM checkpoints
              GROUP BY consumer ORDER BY consumer",
        )
        .fetch_all(&self.pool)
        .await
        .expect("read the checkpoints");
        assert_eq!(applied.len(), consumers, "{applied:?}");
        for (consumer, n) in applied {
            assert_eq!(n, events, "{consumer} applied every event exactly once");
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
                      + (SELECT count(*) FROM checkpoints c, log_partitions lp
                          WHERE c.consumer = ANY($1) AND EXISTS (
                          SELECT 1 FROM events e
                           WHERE (e.transaction_id, e.position) > (c.transaction_id, c.position)
                             AND (e.key_hash & (lp.partitions - 1)) = c.partition))
                      + (SELECT count(*) FROM sagas WHERE due_at IS NOT NULL)",
            )
            .bind(&self.consumers)
            .fetch_one(&self.pool)
            .await
            .expect("lag");
            if behind == 0 {
                return;
            }
            let parked: Option<(String, Option<String>)> =
                sqlx::query_as("SELECT consumer || ' key ' || key, error FROM parked_keys LIMIT 1")
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
        crate::oracle::dump(&self.pool, table, key).await
    }

    /// Asserts that every read model equals an independent fold of the events table
    /// ([`crate::oracle`]).
    pub async fn assert_read_models_match_log(&self) {
        crate::oracle::assert_read_models_match_log(&self.pool).await;
    }
}

/// Reads a JSON body.
pub async fn json_body(response: Response) -> Value {
    response.json().await.expect("json body")
}
