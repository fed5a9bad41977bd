//! The whole orderline server running inside the bench process (`testkit`'s in-process server),
//! with a catalog to order from.

use std::time::Duration;

use sqlx::PgPool;

use api_common::auth::{Role, TokenKeys};
use orderline::Parts;
use testkit::server::{InProcess, Options};

/// A running server and what a load generator needs to talk to it.
pub struct BenchServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// HTTP client.
    pub client: reqwest::Client,
    /// An admin's token.
    pub admin: String,
    /// A customer's token.
    pub customer: String,
    server: InProcess,
}

impl BenchServer {
    /// Starts every part of the server on a free port and registers SKUs `P0` to
    /// `P{products-1}` at 1.00 EUR with a million units each.
    pub async fn start(pool: &PgPool, products: usize) -> anyhow::Result<Self> {
        Self::start_with(pool, products, Parts::ALL).await
    }

    /// [`BenchServer::start`] with only `parts` (the API must be one of them).
    pub async fn start_with(pool: &PgPool, products: usize, parts: Parts) -> anyhow::Result<Self> {
        let keys = TokenKeys::hs256(b"bench-secret-bench-secret-bench-secret");
        let server = InProcess::start(pool, &keys, Options::parts(parts))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let server = Self {
            base: server
                .address
                .clone()
                .ok_or_else(|| anyhow::anyhow!("the API runs"))?,
            client: reqwest::Client::new(),
            admin: keys.mint("bench", Role::Admin, Duration::from_secs(3600))?,
            customer: keys.mint("bench-customer", Role::Customer, Duration::from_secs(3600))?,
            server,
        };
        crate::api::register_products(
            &server.client,
            &server.base,
            &server.admin,
            products,
            1_000_000,
        )
        .await?;
        Ok(server)
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop().await?;
        Ok(())
    }
}
