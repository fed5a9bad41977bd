//! The orderline event store on Postgres.
//!
//! - Writers load inside their own transaction, under the aggregate's write lock
//!   ([`EventStore::begin_locked`], [`EventStore::lock_and_load`]): snapshot plus the events
//!   after it in one query. Readers outside a transaction go through postgres-es's
//!   [`PostgresEventRepository`](postgres_es::PostgresEventRepository) ([`EventStore::load`]); the table layout stays the one
//!   postgres-es knows.
//! - Appending is ours ([`EventStore::append`]): it runs inside a transaction the caller owns, so
//!   the idempotency record of an HTTP command and the aggregate's snapshot commit atomically with
//!   the events, and it returns the global position the API answers with. postgres-es's own
//!   `persist` commits a transaction of its own and returns nothing; see
//!   `docs/adr/0001-event-store-writes.md`.
//! - Optimistic concurrency: events carry the next sequence numbers after the version that was
//!   loaded; a concurrent writer that got there first makes the primary key refuse the insert,
//!   which surfaces as [`StoreError::Conflict`].

//!
//! Modules: [`store`] (load, append, snapshots), [`replay`] (the one fold of stored events into
//! an aggregate), [`upcast`] (old event shapes), [`chain`] (the hash chain), [`locks`] (every
//! advisory lock class), [`unit_of_work`] (several aggregates in one transaction), [`database`]
//! (pool and migrations). The log reader and consumers are in `event-log`; audit, time travel
//! and export in `audit`.

pub mod chain;
pub mod database;
pub mod locks;
pub mod replay;
pub mod store;
pub mod unit_of_work;
pub mod upcast;

pub use database::{connect, migrations_applied, MIGRATOR};
pub use store::{
    Appended, Batch, Decided, EventStore, Loaded, Metadata, Staged, StoreError, StoredAggregate,
};
