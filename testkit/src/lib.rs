//! What every test above the unit level and the bench share, so there is one way to do each:
//!
//! - [`database`]: the Postgres server of the tests and a fresh database per test;
//! - [`server`]: the whole server in this process on a free port, stopped on demand;
//! - [`process`]: the real `orderline` binary as a child process, free ports and waits;
//! - [`client`]: one helper per command endpoint, over any HTTP base address;
//! - [`smtp`]: a mail server that keeps what it receives;
//! - [`kafka`]: the Kafka broker of the test run, and clusters of a test's own to kill brokers in;
//! - [`oracle`]: the check that every read model equals an independent fold of the log;
//! - [`TestApp`]: all of it for one end-to-end test (a database, a server, tokens, helpers).
//!
//! The Postgres server is `ORDERLINE_TEST_DATABASE_URL` (default
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`).

mod app;
pub mod client;
pub mod database;
pub mod kafka;
pub mod oracle;
pub mod process;
pub mod server;
pub mod smtp;

pub use app::{json_body, saga_config, Sibling, TestApp};
