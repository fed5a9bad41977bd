//! The event store proper: loading aggregates under their write locks, appending with
//! optimistic concurrency and the hash chain, snapshots.

use cqrs_es::persist::{PersistedEventRepository, PersistenceError, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{chain, locks, replay};

use aggregates::inventory::Product;
use aggregates::operations::LogConsumer;
use aggregates::order::Order;
use aggregates::payment::Payment;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to the same aggregate after it was loaded. Reload and decide
    /// again; the command API does so a bounded number of times, then answers 409.
    #[error("the aggregate was changed concurrently")]
    Conflict,
    /// A stored event or snapshot does not deserialize into the current types. The log needs an
    /// upcaster or was edited by hand; nothing can be decided on this aggregate until fixed.
    #[error("stored {what} of {aggregate_type}/{aggregate_id} does not deserialize: {source}")]
    Corrupt {
        /// `event` or `snapshot`.
        what: &'static str,
        /// The aggregate type.
        aggregate_type: &'static str,
        /// The aggregate id.
        aggregate_id: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// Postgres failed or could not be reached: a server-side error (HTTP 500), safe to retry.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The postgres-es repository failed while loading: as [`StoreError::Database`].
    #[error("event repository error: {0}")]
    Repository(#[from] PersistenceError),
}

/// Who caused an event and within which flow. Stored as a flat JSON object of strings on every
/// event (the shape cqrs-es gives `EventEnvelope::metadata`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Groups every event of one business flow (one HTTP request, later one order's saga).
    pub correlation_id: Uuid,
    /// The command or event that directly led to this event.
    pub causation_id: Uuid,
    /// The token `sub` of the actor.
    pub actor_sub: String,
    /// The token role of the actor.
    pub actor_role: String,
    /// The HTTP request id (`X-Request-Id`), for finding the request in the logs.
    pub request_id: String,
}

/// How an aggregate is stored: whether and how often it is snapshotted.
pub trait StoredAggregate: Aggregate + Clone {
    /// Write a snapshot once this many events were appended since the last one; `None` never
    /// snapshots (the aggregate is short-lived and loads from its events).
    const SNAPSHOT_EVERY: Option<usize>;
}

impl StoredAggregate for Product {
    // Inventory aggregates are hot (every order reserves on them) and grow without bound.
    const SNAPSHOT_EVERY: Option<usize> = Some(20);
}

impl StoredAggregate for Order {
    const SNAPSHOT_EVERY: Option<usize> = None;
}

impl StoredAggregate for LogConsumer {
    // A handful of operators' actions per consumer.
    const SNAPSHOT_EVERY: Option<usize> = None;
}

impl StoredAggregate for Payment {
    const SNAPSHOT_EVERY: Option<usize> = None;
}

/// An aggregate as loaded, with what [`EventStore::append`] needs to append after it.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The state after every stored event.
    pub aggregate: A,
    /// The sequence number of the last stored event (0 for a new aggregate).
    pub version: usize,
    snapshot_version: usize,
    /// Hash of the newest event, as read under the write lock; what the next append chains to.
    last_hash: Option<Vec<u8>>,
}

impl<A: Default> Loaded<A> {
    /// An aggregate with no events.
    fn new() -> Self {
        Self {
            aggregate: A::default(),
            version: 0,
            snapshot_version: 0,
            last_hash: None,
        }
    }
}

impl<A: StoredAggregate<Services = ()>> Loaded<A> {
    /// Decides `command` on this state and appends the events it produces after it, inside
    /// `conn`'s transaction (which must hold the aggregate's write lock, as every load of
    /// [`EventStore`] takes it). On success `self` is the state after the events, ready for the
    /// next command in the same transaction. The one place commands are decided: the command
    /// API and the unit of work both come here.
    ///
    /// Returns the events (empty when the command changed nothing, and then nothing is
    /// written) with where they landed, or the domain's refusal (nothing written, `self`
    /// unchanged).
    ///
    /// # Errors
    /// As [`EventStore::append`]; on [`StoreError::Conflict`] the transaction must be rolled
    /// back and the command decided again on a fresh load.
    pub async fn decide_and_append(
        &mut self,
        conn: &mut PgConnection,
        id: &str,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Result<Decided<A>, A::Error>, StoreError> {
        let mut after = self.aggregate.clone();
        let sink = cqrs_es::event_sink::EventSink::<A>::default();
        if let Err(refused) = after.handle(command, &(), &sink).await {
            return Ok(Err(refused));
        }
        let events = sink.collect().await;
        if events.is_empty() {
            return Ok(Ok(Decided {
                events,
                appended: None,
            }));
        }
        let appended = EventStore::append(conn, id, self, &after, &events, metadata).await?;
        if appended.snapshotted {
            self.snapshot_version = appended.version;
        }
        self.version = appended.version;
        self.last_hash = Some(appended.last_hash.clone());
        self.aggregate = after;
        Ok(Ok(Decided {
            events,
            appended: Some(appended),
        }))
    }
}

/// What a command decided with [`Loaded::decide_and_append`] wrote.
#[derive(Debug)]
pub struct Decided<A: cqrs_es::Aggregate> {
    /// The events, in order; empty when the command changed nothing.
    pub events: Vec<A::Event>,
    /// Where they landed; `None` when there were none.
    pub appended: Option<Appended>,
}

/// Where an append landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Global position of the last event written.
    pub position: i64,
    /// The aggregate's new version.
    pub version: usize,
    /// Whether a snapshot at `version` was written with the events.
    pub snapshotted: bool,
    /// Hash of the last event written (see [`chain`]).
    pub last_hash: Vec<u8>,
}

/// The event store. Cheap to clone: it shares one connection pool.
#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    repository: std::sync::Arc<PostgresEventRepository>,
}

const INSERT_EVENTS: &str = include_str!("sql/insert_events.sql");

const UPSERT_SNAPSHOT: &str = include_str!("sql/upsert_snapshot.sql");

const STREAM_POSITION: &str = include_str!("sql/stream_position.sql");

impl EventStore {
    /// Wraps a pool whose database has been migrated with [`MIGRATOR`](crate::MIGRATOR).
    pub fn new(pool: PgPool) -> Self {
        let repository = std::sync::Arc::new(PostgresEventRepository::new(pool.clone()));
        Self { pool, repository }
    }

    /// The connection pool, for transactions that span the store and other tables.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Loads an aggregate: its snapshot, if any, then the events after it.
    ///
    /// # Errors
    /// [`StoreError::Database`]/[`StoreError::Repository`] if Postgres fails;
    /// [`StoreError::Corrupt`] if a stored event or snapshot does not deserialize.
    pub async fn load<A: StoredAggregate>(&self, id: &str) -> Result<Loaded<A>, StoreError> {
        let corrupt = |what, source| StoreError::Corrupt {
            what,
            aggregate_type: A::TYPE,
            aggregate_id: id.to_owned(),
            source,
        };
        let snapshot = match A::SNAPSHOT_EVERY {
            Some(_) => self.repository.get_snapshot::<A>(id).await?,
            None => None,
        };
        let (mut aggregate, snapshot_version, events) = match snapshot {
            Some(s) => (
                serde_json::from_value::<A>(s.aggregate).map_err(|e| corrupt("snapshot", e))?,
                s.current_sequence,
                self.repository
                    .get_last_events::<A>(id, s.current_sequence)
                    .await?,
            ),
            None => (A::default(), 0, self.repository.get_events::<A>(id).await?),
        };
        let mut version = snapshot_version;
        for SerializedEvent {
            sequence,
            event_type,
            event_version,
            payload,
            ..
        } in events
        {
            replay::apply(
                &mut aggregate,
                &event_type,
                &event_version,
                replay::Payload::Json(&payload),
            )
            .map_err(|e| corrupt("event", e))?;
            version = sequence;
        }
        Ok(Loaded {
            aggregate,
            version,
            snapshot_version,
            last_hash: None,
        })
    }

    /// Appends `events` after `loaded.version` inside the caller's transaction, and snapshots
    /// `after` (the state with the events applied) when the aggregate's policy says so.
    /// Returns the global position of the last event; `events` must not be empty.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when another writer appended after `loaded` was read (the
    /// transaction is then aborted and must be rolled back); [`StoreError::Database`] otherwise.
    pub async fn append<A: StoredAggregate>(
        conn: &mut PgConnection,
        id: &str,
        loaded: &Loaded<A>,
        after: &A,
        events: &[A::Event],
        metadata: &Metadata,
    ) -> Result<Appended, StoreError> {
        let n = events.len();
        let sequences: Vec<i64> = (1..=n)
            .map(|i| i64::try_from(loaded.version + i).unwrap_or(i64::MAX))
            .collect();
        let types: Vec<String> = events.iter().map(DomainEvent::event_type).collect();
        let versions: Vec<String> = events.iter().map(DomainEvent::event_version).collect();
        let payloads = events
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|source| StoreError::Corrupt {
                what: "event",
                aggregate_type: A::TYPE,
                aggregate_id: id.to_owned(),
                source,
            })?;
        let event_ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let metadata_value =
            serde_json::to_value(metadata).map_err(|source| StoreError::Corrupt {
                what: "metadata",
                aggregate_type: A::TYPE,
                aggregate_id: id.to_owned(),
                source,
            })?;
        let mut hashes: Vec<Vec<u8>> = Vec::with_capacity(n);
        for i in 0..n {
            let previous = match i {
                0 => loaded.last_hash.as_deref(),
                _ => Some(hashes[i - 1].as_slice()),
            };
            let hash = chain::Hashed {
                event_id: event_ids[i],
                aggregate_type: A::TYPE,
                aggregate_id: id,
                sequence: sequences[i],
                event_type: &types[i],
                event_version: &versions[i],
                payload: &payloads[i],
                metadata: &metadata_value,
            }
            .hash(previous);
            hashes.push(hash);
        }
        let metadata = sqlx::types::Json(metadata);
        let position: Option<i64> = sqlx::query_scalar(INSERT_EVENTS)
            .bind(A::TYPE)
            .bind(id)
            .bind(metadata)
            .bind(&sequences)
            .bind(&types)
            .bind(&versions)
            .bind(&payloads)
            .bind(&event_ids)
            .bind(&hashes)
            .fetch_one(&mut *conn)
            .await
            .map_err(conflict_or_database)?;
        let version = loaded.version + n;
        let snapshotted =
            A::SNAPSHOT_EVERY.is_some_and(|every| version - loaded.snapshot_version >= every);
        if snapshotted {
            sqlx::query(UPSERT_SNAPSHOT)
                .bind(A::TYPE)
                .bind(id)
                .bind(i64::try_from(version).unwrap_or(i64::MAX))
                .bind(sqlx::types::Json(after))
                .execute(&mut *conn)
                .await?;
        }
        Ok(Appended {
            position: position.unwrap_or_default(),
            version,
            snapshotted,
            last_hash: hashes.pop().unwrap_or_default(),
        })
    }

    /// Starts a transaction on a pooled connection that holds aggregate `id`'s write lock, and
    /// loads the aggregate inside it: the hot path of a command, in two round trips (`BEGIN`
    /// with the lock, then the load) before the append and the commit.
    ///
    /// # Errors
    /// As [`EventStore::lock_and_load`].
    pub async fn begin_locked<A: StoredAggregate>(
        &self,
        id: &str,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, Loaded<A>), StoreError> {
        // The key is a number computed here, so the statement can go in the simple-query `BEGIN`
        // without binding anything; nothing from the request is spliced into SQL.
        let mut tx = self
            .pool
            .begin_with(format!(
                "BEGIN; {}; SELECT pg_advisory_xact_lock({}, {})",
                locks::ANNOUNCE_WRITER_SQL,
                locks::WRITE,
                locks::write_lock_key(A::TYPE, id)
            ))
            .await?;
        let loaded = load_locked::<A>(&mut tx, id).await?;
        Ok((tx, loaded))
    }

    /// Takes aggregate `id`'s transaction-scoped write lock on `conn` (inside the caller's
    /// transaction), then loads the aggregate: its snapshot, the events after it, and the hash
    /// the next append chains to.
    ///
    /// Every orderline writer loads this way before it decides, so writers in every process
    /// take turns instead of racing: after this returns, nobody else appends to the aggregate
    /// until the caller's transaction ends, and the state is current. The lock is released at
    /// commit or rollback. See `docs/adr/0001-event-store-writes.md`.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when this transaction already has a transaction id and a
    /// younger transaction has appended to the aggregate since (its events would come out of
    /// the log before this one's, against their sequence): roll back and start over.
    /// [`StoreError::Database`] if Postgres fails; [`StoreError::Corrupt`] if a stored event or
    /// snapshot does not deserialize.
    pub async fn lock_and_load<A: StoredAggregate>(
        conn: &mut PgConnection,
        id: &str,
    ) -> Result<Loaded<A>, StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(locks::WRITE)
            .bind(locks::write_lock_key(A::TYPE, id))
            .execute(&mut *conn)
            .await?;
        load_locked(conn, id).await
    }

    /// [`EventStore::lock_and_load`] for many aggregates of one type in two round trips: the
    /// write locks in key order (so two callers never wait on each other crosswise), then one
    /// query for all their states. Answers each id with its state, in no particular order.
    ///
    /// # Errors
    /// As [`EventStore::lock_and_load`].
    pub async fn lock_and_load_many<A: StoredAggregate>(
        conn: &mut PgConnection,
        ids: &[&str],
    ) -> Result<Vec<(String, Loaded<A>)>, StoreError> {
        let keys: Vec<i32> = ids
            .iter()
            .map(|id| locks::write_lock_key(A::TYPE, id))
            .collect();
        sqlx::query(
            "SELECT pg_advisory_xact_lock($1, k)
               FROM (SELECT DISTINCT k FROM unnest($2::int4[]) AS k ORDER BY k) AS keys",
        )
        .bind(locks::WRITE)
        .bind(&keys)
        .execute(&mut *conn)
        .await?;
        load_locked_many(conn, ids).await
    }

    /// The global position of the newest event of one aggregate, 0 if it has none. Commands that
    /// change nothing (a repeated cancel) answer with it.
    ///
    /// # Errors
    /// [`StoreError::Database`] if Postgres fails.
    pub async fn stream_position<A: Aggregate>(
        conn: &mut PgConnection,
        id: &str,
    ) -> Result<i64, StoreError> {
        let position: Option<i64> = sqlx::query_scalar(STREAM_POSITION)
            .bind(A::TYPE)
            .bind(id)
            .fetch_one(conn)
            .await?;
        Ok(position.unwrap_or(0))
    }
}

/// For each aggregate of `$2`: its snapshot (if any, first, with a NULL sequence), then every
/// event from the snapshot's sequence on (the one at it only gives the hash), each with whether a
/// younger transaction than the current one wrote it.
const LOAD_LOCKED: &str = include_str!("sql/load_locked.sql");

type LockedRow = (
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    String,
    Option<Vec<u8>>,
    Option<bool>,
);

/// [`LOAD_LOCKED`] for one aggregate: the snapshot's sequence is a scalar the index scan can
/// use directly, and the plan is the simplest (the hot path of every command).
const LOAD_ONE_LOCKED: &str = include_str!("sql/load_one_locked.sql");

/// Loads aggregate `id` in one query, on a connection that holds its write lock.
async fn load_locked<A: StoredAggregate>(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Loaded<A>, StoreError> {
    let rows: Vec<LockedRow> = sqlx::query_as(LOAD_ONE_LOCKED)
        .bind(A::TYPE)
        .bind(id)
        .bind(A::SNAPSHOT_EVERY.is_some())
        .fetch_all(&mut *conn)
        .await?;
    let mut loaded = fold_locked::<A>(rows, &[id])?;
    Ok(loaded.pop().map(|(_, l)| l).unwrap_or_else(Loaded::new))
}

/// Loads aggregates `ids` in one query, on a connection that holds their write locks; answers
/// each id with its state, in no particular order.
async fn load_locked_many<A: StoredAggregate>(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<Vec<(String, Loaded<A>)>, StoreError> {
    let rows: Vec<LockedRow> = sqlx::query_as(LOAD_LOCKED)
        .bind(A::TYPE)
        .bind(ids)
        .bind(A::SNAPSHOT_EVERY.is_some())
        .fetch_all(&mut *conn)
        .await?;
    fold_locked(rows, ids)
}

/// Folds the rows of [`LOAD_LOCKED`] (sorted by aggregate, snapshot first) into each aggregate's
/// state; `ids` without rows are new aggregates.
fn fold_locked<A: StoredAggregate>(
    rows: Vec<LockedRow>,
    ids: &[&str],
) -> Result<Vec<(String, Loaded<A>)>, StoreError> {
    let mut done: Vec<(String, Loaded<A>)> = Vec::with_capacity(ids.len());
    let mut overtaken = None;
    for (id, snapshot, sequence, event_type, event_version, payload, hash, younger) in rows {
        let corrupt = |what, source| StoreError::Corrupt {
            what,
            aggregate_type: A::TYPE,
            aggregate_id: id.clone(),
            source,
        };
        if done.last().is_none_or(|(last, _)| *last != id) {
            check_overtaken(overtaken.take())?;
            done.push((id.clone(), Loaded::new()));
        }
        let Some((_, loaded)) = done.last_mut() else {
            continue;
        };
        if let Some(last_sequence) = snapshot {
            loaded.aggregate =
                serde_json::from_str(&payload).map_err(|e| corrupt("snapshot", e))?;
            loaded.snapshot_version = usize::try_from(last_sequence).unwrap_or(usize::MAX);
            loaded.version = loaded.snapshot_version;
            continue;
        }
        let (Some(sequence), Some(event_type), Some(event_version)) =
            (sequence, event_type, event_version)
        else {
            continue;
        };
        let sequence = usize::try_from(sequence).unwrap_or(usize::MAX);
        (loaded.last_hash, overtaken) = (hash, younger);
        if sequence <= loaded.version {
            // The event the snapshot already holds: read only for its hash.
            continue;
        }
        replay::apply(
            &mut loaded.aggregate,
            &event_type,
            &event_version,
            replay::Payload::Text(&payload),
        )
        .map_err(|e| corrupt("event", e))?;
        loaded.version = sequence;
    }
    check_overtaken(overtaken)?;
    for id in ids {
        if !done.iter().any(|(loaded, _)| loaded == id) {
            done.push(((*id).to_owned(), Loaded::new()));
        }
    }
    Ok(done)
}

/// The log is ordered by transaction id, and one aggregate's events must come out of it in
/// sequence order. A transaction that got its id (by an earlier write) before another one
/// appended to an aggregate and committed would put its event after theirs in sequence but
/// before it in the log: `younger` (of the aggregate's newest event) says so, and the
/// transaction must start over with a new, larger id.
fn check_overtaken(younger: Option<bool>) -> Result<(), StoreError> {
    match younger {
        Some(true) => Err(StoreError::Conflict),
        _ => Ok(()),
    }
}

/// A duplicate `(aggregate_type, aggregate_id, sequence)` means someone appended first.
fn conflict_or_database(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.constraint() == Some("events_pkey") => StoreError::Conflict,
        _ => StoreError::Database(error),
    }
}
