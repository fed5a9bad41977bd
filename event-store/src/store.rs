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
    /// next command in the same transaction. The command API comes here; the unit of work
    /// decides with [`Loaded::decide_into`] and writes many commands' events at once.
    ///
    /// Returns the events (empty when the command changed nothing, and then nothing is
    /// written) with where they landed, or the domain's refusal (nothing written, `self`
    /// unchanged).
    ///
    /// # Errors
    /// As [`Batch::write`]; the transaction must then be rolled back, `self` discarded, and the
    /// command decided again on a fresh load.
    pub async fn decide_and_append(
        &mut self,
        conn: &mut PgConnection,
        id: &str,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Result<Decided<A>, A::Error>, StoreError> {
        let mut batch = Batch::default();
        let events = match self.decide_into(&mut batch, id, command, metadata).await? {
            Ok(events) => events,
            Err(refused) => return Ok(Err(refused)),
        };
        if events.is_empty() {
            return Ok(Ok(Decided {
                events,
                appended: None,
            }));
        }
        let snapshotted = batch.snapshots.contains_key(&(A::TYPE, id.to_owned()));
        let position = batch.write(conn).await?;
        Ok(Ok(Decided {
            events,
            appended: Some(Appended {
                position: position.unwrap_or_default(),
                version: self.version,
                snapshotted,
                last_hash: self.last_hash.clone().unwrap_or_default(),
            }),
        }))
    }

    /// The one place commands are decided: decides `command` on this state and stages the
    /// events it produces in `batch` ([`Batch::stage`]); `self` becomes the state after them,
    /// ready for the next command. Nothing is written until the batch is; the caller holds the
    /// aggregate's write lock until then. Returns the events (empty when the command changed
    /// nothing) or the domain's refusal (nothing staged, `self` unchanged).
    ///
    /// # Errors
    /// As [`Batch::stage`].
    pub async fn decide_into(
        &mut self,
        batch: &mut Batch,
        id: &str,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Result<Vec<A::Event>, A::Error>, StoreError> {
        let mut after = self.aggregate.clone();
        let sink = cqrs_es::event_sink::EventSink::<A>::default();
        if let Err(refused) = after.handle(command, &(), &sink).await {
            return Ok(Err(refused));
        }
        let events = sink.collect().await;
        if events.is_empty() {
            return Ok(Ok(events));
        }
        let staged = batch.stage(id, self, &after, &events, metadata)?;
        if staged.snapshotted {
            self.snapshot_version = staged.version;
        }
        self.version = staged.version;
        self.last_hash = Some(staged.last_hash);
        self.aggregate = after;
        Ok(Ok(events))
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

/// Events decided but not written yet, of any number of aggregates, in the order they were
/// decided: [`Batch::write`] inserts them all in one statement and the snapshots due in one
/// more. A transaction that decides many commands (a saga page) writes them together.
#[derive(Debug, Default)]
pub struct Batch {
    aggregate_types: Vec<&'static str>,
    aggregate_ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    event_versions: Vec<String>,
    payloads: Vec<Value>,
    metadata: Vec<Value>,
    event_ids: Vec<Uuid>,
    hashes: Vec<Vec<u8>>,
    /// The newest snapshot due per aggregate; one row each, as `ON CONFLICT` allows.
    snapshots: std::collections::BTreeMap<(&'static str, String), (i64, Value)>,
}

/// Where the events [`Batch::stage`] took leave their aggregate once written.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The aggregate's version after them.
    pub version: usize,
    /// Whether a snapshot at `version` is due with them.
    pub snapshotted: bool,
    /// Hash of the last of them: what the aggregate's next event chains to.
    pub last_hash: Vec<u8>,
}

impl Batch {
    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Takes `events` of aggregate `id` (decided on `loaded`, giving `after`) to be written
    /// after `loaded.version`, chained to its newest hash. The caller must hold the aggregate's
    /// write lock until the batch is written and committed, and decide the aggregate's next
    /// command on the state this leaves ([`Staged`]), not on `loaded`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if an event or the metadata does not serialize.
    pub fn stage<A: StoredAggregate>(
        &mut self,
        id: &str,
        loaded: &Loaded<A>,
        after: &A,
        events: &[A::Event],
        metadata: &Metadata,
    ) -> Result<Staged, StoreError> {
        let corrupt = |what, source| StoreError::Corrupt {
            what,
            aggregate_type: A::TYPE,
            aggregate_id: id.to_owned(),
            source,
        };
        let metadata = serde_json::to_value(metadata).map_err(|e| corrupt("metadata", e))?;
        let mut previous = loaded.last_hash.clone();
        for (i, event) in events.iter().enumerate() {
            let sequence = i64::try_from(loaded.version + i + 1).unwrap_or(i64::MAX);
            let event_type = event.event_type();
            let event_version = event.event_version();
            let payload = serde_json::to_value(event).map_err(|e| corrupt("event", e))?;
            let event_id = Uuid::new_v4();
            let hash = chain::Hashed {
                event_id,
                aggregate_type: A::TYPE,
                aggregate_id: id,
                sequence,
                event_type: &event_type,
                event_version: &event_version,
                payload: &payload,
                metadata: &metadata,
            }
            .hash(previous.as_deref());
            self.aggregate_types.push(A::TYPE);
            self.aggregate_ids.push(id.to_owned());
            self.sequences.push(sequence);
            self.event_types.push(event_type);
            self.event_versions.push(event_version);
            self.payloads.push(payload);
            self.metadata.push(metadata.clone());
            self.event_ids.push(event_id);
            self.hashes.push(hash.clone());
            previous = Some(hash);
        }
        let version = loaded.version + events.len();
        let snapshotted =
            A::SNAPSHOT_EVERY.is_some_and(|every| version - loaded.snapshot_version >= every);
        if snapshotted {
            let state = serde_json::to_value(after).map_err(|e| corrupt("snapshot", e))?;
            self.snapshots.insert(
                (A::TYPE, id.to_owned()),
                (i64::try_from(version).unwrap_or(i64::MAX), state),
            );
        }
        Ok(Staged {
            version,
            snapshotted,
            last_hash: previous.unwrap_or_default(),
        })
    }

    /// Writes every staged event in one statement, then the snapshots due in one more, inside
    /// `conn`'s transaction, and empties the batch. Answers the global position of the last
    /// event written (`None` when there was none).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when another writer appended to one of the aggregates first (the
    /// transaction is then aborted and must be rolled back); [`StoreError::Database`] otherwise.
    pub async fn write(&mut self, conn: &mut PgConnection) -> Result<Option<i64>, StoreError> {
        let batch = std::mem::take(self);
        if batch.is_empty() {
            return Ok(None);
        }
        let position: Option<i64> = sqlx::query_scalar(INSERT_EVENTS)
            .bind(&batch.aggregate_types)
            .bind(&batch.aggregate_ids)
            .bind(&batch.metadata)
            .bind(&batch.sequences)
            .bind(&batch.event_types)
            .bind(&batch.event_versions)
            .bind(&batch.payloads)
            .bind(&batch.event_ids)
            .bind(&batch.hashes)
            .fetch_one(&mut *conn)
            .await
            .map_err(conflict_or_database)?;
        if !batch.snapshots.is_empty() {
            let mut types = Vec::with_capacity(batch.snapshots.len());
            let mut ids = Vec::with_capacity(batch.snapshots.len());
            let mut versions = Vec::with_capacity(batch.snapshots.len());
            let mut states = Vec::with_capacity(batch.snapshots.len());
            for ((aggregate_type, id), (version, state)) in batch.snapshots {
                types.push(aggregate_type);
                ids.push(id);
                versions.push(version);
                states.push(state);
            }
            sqlx::query(UPSERT_SNAPSHOTS)
                .bind(&types)
                .bind(&ids)
                .bind(&versions)
                .bind(&states)
                .execute(&mut *conn)
                .await?;
        }
        Ok(position)
    }
}

/// The event store. Cheap to clone: it shares one connection pool.
#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    repository: std::sync::Arc<PostgresEventRepository>,
}

const INSERT_EVENTS: &str = include_str!("sql/insert_events.sql");

const UPSERT_SNAPSHOTS: &str = include_str!("sql/upsert_snapshots.sql");

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

    /// Loads aggregates `ids` of type `A` in one query, without locks: each one's snapshot and
    /// the events after it (at most `SNAPSHOT_EVERY`), so the cost does not grow with a hot
    /// stream's history. Answers each id with its state, in no particular order; an id with no
    /// events is a new aggregate. Placing an order prices all its lines with one call.
    ///
    /// # Errors
    /// As [`EventStore::load`].
    pub async fn load_many<A: StoredAggregate>(
        &self,
        ids: &[&str],
    ) -> Result<Vec<(String, Loaded<A>)>, StoreError> {
        let types = vec![A::TYPE; ids.len()];
        let snapshots = vec![A::SNAPSHOT_EVERY.is_some(); ids.len()];
        let rows: Vec<LockedRow> = sqlx::query_as(LOAD_LOCKED)
            .bind(&types)
            .bind(ids)
            .bind(&snapshots)
            .fetch_all(&self.pool)
            .await?;
        fold_locked::<A>(rows, ids)
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
        let mut batch = Batch::default();
        let staged = batch.stage(id, loaded, after, events, metadata)?;
        let position = batch.write(conn).await?;
        Ok(Appended {
            position: position.unwrap_or_default(),
            version: staged.version,
            snapshotted: staged.snapshotted,
            last_hash: staged.last_hash,
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

/// Aggregates of several types to lock and load together ([`LoadMany::lock_and_load`]): a saga
/// page needs its SKUs, payments and orders, in that lock order, in two round trips.
#[derive(Default)]
pub struct LoadMany {
    kinds: Vec<Kind>,
}

/// One aggregate type of a [`LoadMany`].
struct Kind {
    aggregate_type: &'static str,
    snapshots: bool,
    ids: Vec<String>,
    fold: FoldKind,
}

/// One aggregate as [`LoadMany::lock_and_load`] answers it: type, id, and its [`Loaded`] state
/// (of the type's aggregate), boxed.
pub type LoadedAny = (&'static str, String, Box<dyn std::any::Any + Send + Sync>);

type FoldKind = fn(Vec<LockedRow>, &[&str]) -> Result<Vec<LoadedAny>, StoreError>;

fn fold_kind<A: StoredAggregate + Send + Sync + 'static>(
    rows: Vec<LockedRow>,
    ids: &[&str],
) -> Result<Vec<LoadedAny>, StoreError> {
    Ok(fold_locked::<A>(rows, ids)?
        .into_iter()
        .map(|(id, loaded)| {
            (
                A::TYPE,
                id,
                Box::new(loaded) as Box<dyn std::any::Any + Send + Sync>,
            )
        })
        .collect())
}

impl LoadMany {
    /// Nothing to load yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds aggregates `ids` of type `A`, to be locked after every type added before it (a type
    /// added again keeps its first place).
    pub fn add<A: StoredAggregate + Send + Sync + 'static>(&mut self, ids: &[&str]) -> &mut Self {
        let at = match self.kinds.iter().position(|k| k.aggregate_type == A::TYPE) {
            Some(at) => at,
            None => {
                self.kinds.push(Kind {
                    aggregate_type: A::TYPE,
                    snapshots: A::SNAPSHOT_EVERY.is_some(),
                    ids: Vec::new(),
                    fold: fold_kind::<A>,
                });
                self.kinds.len() - 1
            }
        };
        let kind = &mut self.kinds[at];
        kind.ids.extend(ids.iter().map(|id| (*id).to_owned()));
        kind.ids.sort_unstable();
        kind.ids.dedup();
        self
    }

    /// The same types in the same order, without the aggregates `held` answers true for.
    pub fn without(&self, held: impl Fn(&'static str, &str) -> bool) -> LoadMany {
        LoadMany {
            kinds: self
                .kinds
                .iter()
                .map(|kind| Kind {
                    aggregate_type: kind.aggregate_type,
                    snapshots: kind.snapshots,
                    ids: kind
                        .ids
                        .iter()
                        .filter(|id| !held(kind.aggregate_type, id))
                        .cloned()
                        .collect(),
                    fold: kind.fold,
                })
                .collect(),
        }
    }

    /// Takes every write lock, type by type in the order added and each type's in key order (so
    /// two callers that add types in the same order never wait on each other crosswise), then
    /// loads every state in one query, inside `conn`'s transaction. Answers each aggregate with
    /// its state, in no particular order.
    ///
    /// # Errors
    /// As [`EventStore::lock_and_load`].
    pub async fn lock_and_load(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Vec<LoadedAny>, StoreError> {
        let mut keys = Vec::new();
        let (mut types, mut ids, mut snapshots) = (Vec::new(), Vec::new(), Vec::new());
        for kind in &self.kinds {
            let mut kind_keys: Vec<i32> = kind
                .ids
                .iter()
                .map(|id| locks::write_lock_key(kind.aggregate_type, id))
                .collect();
            kind_keys.sort_unstable();
            kind_keys.dedup();
            keys.extend(kind_keys);
            for id in &kind.ids {
                types.push(kind.aggregate_type);
                ids.push(id.as_str());
                snapshots.push(kind.snapshots);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query(
            "SELECT pg_advisory_xact_lock($1, k)
               FROM (SELECT k FROM unnest($2::int4[]) WITH ORDINALITY AS t(k, n) ORDER BY n) AS keys",
        )
        .bind(locks::WRITE)
        .bind(&keys)
        .execute(&mut *conn)
        .await?;
        let rows: Vec<LockedRow> = sqlx::query_as(LOAD_LOCKED)
            .bind(&types)
            .bind(&ids)
            .bind(&snapshots)
            .fetch_all(&mut *conn)
            .await?;
        let mut by_type: std::collections::HashMap<String, Vec<LockedRow>> = Default::default();
        for row in rows {
            by_type.entry(row.0.clone()).or_default().push(row);
        }
        let mut loaded = Vec::with_capacity(ids.len());
        for kind in &self.kinds {
            let rows = by_type.remove(kind.aggregate_type).unwrap_or_default();
            let ids: Vec<&str> = kind.ids.iter().map(String::as_str).collect();
            loaded.extend((kind.fold)(rows, &ids)?);
        }
        Ok(loaded)
    }
}

/// For many aggregates of any types: each one's snapshot and events, sorted by aggregate.
const LOAD_LOCKED: &str = include_str!("sql/load_locked.sql");

type LockedRow = (
    String,
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

/// Folds the rows of [`LOAD_LOCKED`] of one aggregate type (sorted by aggregate, snapshot first)
/// into each aggregate's state; `ids` without rows are new aggregates.
fn fold_locked<A: StoredAggregate>(
    rows: Vec<LockedRow>,
    ids: &[&str],
) -> Result<Vec<(String, Loaded<A>)>, StoreError> {
    let mut done: Vec<(String, Loaded<A>)> = Vec::with_capacity(ids.len());
    let mut overtaken = None;
    for (_, id, snapshot, sequence, event_type, event_version, payload, hash, younger) in rows {
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
