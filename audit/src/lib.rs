//! Auditing the log: everything that reads the whole history rather than following it.
//!
//! - [`filter`]: which events (`orderline events`, `orderline audit`): by stream, flow or
//!   position, listed or followed live, and an order's whole story;
//! - [`history`]: time travel, an aggregate as it was at a version or a moment
//!   (`orderline state`, `GET /api/v1/admin/streams/...`);
//! - [`verify`] and [`report`]: `orderline verify`, the hash chains (ADR 9) and the read models
//!   against a fold of the log;
//! - [`transfer`]: `orderline export` and `import`, the log as NDJSON.

pub mod filter;
pub mod history;
pub mod report;
pub mod transfer;
pub mod verify;
