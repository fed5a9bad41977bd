//! The global log: every event of every aggregate, in an order that never skips an event.
//!
//! Readers page through the events table by the composite cursor `(transaction_id, position)`
//! and only read rows whose writing transaction is below a horizon that no writer of the log is
//! still behind. Every such row is final: committed, or gone with its aborted transaction. A
//! writer that stays open therefore stalls readers until it ends, and never makes them skip its
//! events. See `docs/adr/0002-global-log-order.md` and, for the horizon that waits only for
//! writers and for partitions, `docs/adr/0011-partitioned-log.md`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

/// The channel `NOTIFY`ed when events commit (by the `events_notify` trigger).
pub const NOTIFY_CHANNEL: &str = "orderline_events";

/// A place in the global log: just after the event with this transaction id and position.
/// `Cursor::default()` is the start of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// The event's `transaction_id` (an `xid8`, which fits in an `i64` in practice).
    pub transaction_id: i64,
    /// The event's `position`.
    pub position: i64,
}

impl fmt::Display for Cursor {
    /// `TRANSACTION-POSITION`, the form the admin API pages with.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.transaction_id, self.position)
    }
}

impl FromStr for Cursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a log cursor (TRANSACTION-POSITION)");
        let (tx, position) = s.split_once('-').ok_or_else(bad)?;
        let cursor = Self {
            transaction_id: tx.parse().map_err(|_| bad())?,
            position: position.parse().map_err(|_| bad())?,
        };
        if cursor.transaction_id < 0 || cursor.position < 0 {
            return Err(bad());
        }
        Ok(cursor)
    }
}

/// One event as the global log gives it. Payload and metadata stay raw JSON text: consumers
/// decode the payload straight into their event type, and APIs pass both on verbatim, so no
/// intermediate JSON tree is built on the hot path.
#[derive(Debug, Clone, Serialize)]
pub struct LogEvent {
    /// Global position (unique; allocation order).
    pub position: i64,
    /// Writing transaction.
    pub transaction_id: i64,
    /// Unique event id.
    pub event_id: Uuid,
    /// `inventory`, `order` or `payment`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// 1-based sequence in the aggregate's stream.
    pub sequence: i64,
    /// e.g. `OrderPlaced`.
    pub event_type: String,
    /// Schema version of the payload.
    pub event_version: String,
    /// When it was recorded (the writing transaction's start).
    pub recorded_at: DateTime<Utc>,
    /// Who and why (see `event_store::Metadata`).
    pub metadata: Box<RawValue>,
    /// The event itself, as the aggregate's event enum serializes it.
    pub payload: Box<RawValue>,
    /// `hashtext(aggregate_id)`, stored with the event: its partition in every consumer
    /// ([`partition_of`]).
    #[serde(skip)]
    pub key_hash: i32,
}

impl FromRow<'_, PgRow> for LogEvent {
    /// Reads a row of the `SELECT` in [`read_page`] (payload and metadata as text).
    fn from_row(row: &PgRow) -> sqlx::Result<Self> {
        let raw = |column: &str| -> sqlx::Result<Box<RawValue>> {
            RawValue::from_string(row.try_get(column)?).map_err(|e| sqlx::Error::ColumnDecode {
                index: column.to_owned(),
                source: Box::new(e),
            })
        };
        Ok(Self {
            position: row.try_get("position")?,
            transaction_id: row.try_get("transaction_id")?,
            event_id: row.try_get("event_id")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            recorded_at: row.try_get("recorded_at")?,
            metadata: raw("metadata")?,
            payload: raw("payload")?,
            key_hash: row.try_get("key_hash")?,
        })
    }
}

/// The columns of a [`LogEvent`], for `SELECT`s that read events (`FROM events`).
pub const LOG_EVENT_COLUMNS: &str =
    "events.position, events.transaction_id::text::bigint AS transaction_id,
       events.event_id, events.aggregate_type, events.aggregate_id, events.sequence,
       events.event_type, events.event_version, events.recorded_at,
       events.metadata::text AS metadata, events.payload::text AS payload, events.key_hash";

impl LogEvent {
    /// This event's partition among `partitions`.
    pub fn partition(&self, partitions: u32) -> u32 {
        partition_of(self.key_hash, partitions)
    }

    /// The cursor just after this event.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            transaction_id: self.transaction_id,
            position: self.position,
        }
    }

    /// Deserializes the payload into an aggregate's event type. For an event stored in the
    /// current shape; consumers read pages through [`LogEvent::current`] first.
    ///
    /// # Errors
    /// The serde error when the payload does not match `E`.
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        serde_json::from_str(self.payload.get())
    }

    /// The current-shape events this stored event stands for ([`event_store::upcast`]): `None` when
    /// it is current already (the common case, with no copy), else its upcast events, possibly
    /// none. They keep this event's position, ids and metadata.
    ///
    /// # Errors
    /// The serde error when an old payload is not JSON.
    pub fn current(&self) -> Result<Option<Vec<LogEvent>>, serde_json::Error> {
        if !event_store::upcast::is_old(&self.aggregate_type, &self.event_type, &self.event_version)
        {
            return Ok(None);
        }
        let payload: serde_json::Value = serde_json::from_str(self.payload.get())?;
        event_store::upcast::upcast(
            &self.aggregate_type,
            &self.event_type,
            &self.event_version,
            payload,
        )
        .into_iter()
        .map(|current| {
            Ok(LogEvent {
                event_type: current.event_type,
                event_version: current.event_version,
                payload: serde_json::value::to_raw_value(&current.payload)?,
                metadata: self.metadata.clone(),
                aggregate_type: self.aggregate_type.clone(),
                aggregate_id: self.aggregate_id.clone(),
                ..*self
            })
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map(Some)
    }

    /// Calls `each` with every current-shape event of `events`, in order (see
    /// [`LogEvent::current`]).
    ///
    /// # Errors
    /// The first error `each` returns, or a payload that is not JSON.
    pub fn for_each_current<'e, E: From<serde_json::Error>>(
        events: impl IntoIterator<Item = &'e LogEvent>,
        mut each: impl FnMut(&LogEvent) -> Result<(), E>,
    ) -> Result<(), E> {
        for event in events {
            match event.current()? {
                None => each(event)?,
                Some(upcast) => {
                    for current in &upcast {
                        each(current)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The horizon as an SQL expression (`xid8`): events whose transaction id is below it are final.
///
/// It is the statement's snapshot's `xmax`, lowered to the oldest transaction of the snapshot's
/// in-progress list that is not known for sure to be a running non-writer. A transaction is
/// passed over only when, in one snapshot of the lock table, its own backend holds its
/// transaction id (the `ExclusiveLock` every transaction holds on its id) and not the shared
/// lock of `event_store::locks::WRITER` in this database, and it is still in progress after
/// that snapshot was taken. Writers announce before they have a transaction id and keep the
/// lock until they end, and a transaction releases its locks only after its end is recorded,
/// so a transaction passed over can never commit an event below the horizon; one that ended
/// meanwhile (the statement's snapshot does not see its events) always counts. Passed over:
/// transactions in other databases, an idle `psql`, a projection's page, a lease renewal.
/// Prepared transactions (no backend) are never passed over.
///
/// Until 2026-12-06 any granted lock on a transaction id counted as that transaction's, and the
/// lock table was read twice. The three-process test then caught one event a projection never
/// applied. The likely way: a non-writer that has just waited for a writer (a lease renewal
/// waiting for a page that holds its checkpoint row) holds a `ShareLock` on the writer's id for
/// an instant after the writer commits, and a reader that looked then passed the writer's
/// events over; a writer that ended between the two reads of the lock table was passed over
/// too.
pub const HORIZON_SQL: &str = "(WITH locks AS MATERIALIZED (
        SELECT locktype, transactionid, mode, pid, granted, classid, objid, objsubid, database
          FROM pg_locks)
    SELECT least(pg_snapshot_xmax(snap.s), (
        SELECT min(x) FROM pg_snapshot_xip(snap.s) AS x
         WHERE NOT EXISTS (
               SELECT 1 FROM locks l
                WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
                  AND l.pid IS NOT NULL
                  AND l.transactionid::text::bigint = x::text::bigint % 4294967296
                  AND NOT EXISTS (
                      SELECT 1 FROM locks w
                       WHERE w.pid = l.pid AND w.locktype = 'advisory' AND w.granted
                         AND w.classid = 8106 AND w.objid = 0 AND w.objsubid = 2
                         AND w.database = (SELECT oid FROM pg_database
                                            WHERE datname = current_database()))
                  AND pg_xact_status(x) = 'in progress')))
   FROM (SELECT pg_current_snapshot() AS s) AS snap)";

/// Which partition of `partitions` (a power of two) an event whose `key_hash` column is
/// `key_hash` belongs to: the low bits, as the `key_hash & (partitions - 1)` of the SQL and its
/// index compute it.
pub fn partition_of(key_hash: i32, partitions: u32) -> u32 {
    u32::from_ne_bytes(key_hash.to_ne_bytes()) & (partitions - 1)
}

/// The condition "event of `table` is in partition `partition`" for a partition `mask`, in the
/// one form that makes Postgres walk the partition index: the expression is spliced as
/// literals so that it is textually the index's, and it is a range rather than an equality.
/// With an equality the planner drops the partition from the ordering (it is constant), and a
/// walk of the global `(transaction_id, position)` index filtering out the other partitions'
/// rows can look as cheap to it, though it reads every partition's events; with a range, only
/// the partition index gives the order [`PARTITION_ORDER`] asks for.
pub fn in_partition(table: &str, mask: u32, partition: &str) -> String {
    format!("({table}.key_hash & {mask}) BETWEEN {partition} AND {partition}")
}

/// The order of a partition's events, to go with [`in_partition`] (`{t}` the table, `{mask}`
/// the mask): the partition expression first, which the partition index alone provides.
pub const PARTITION_ORDER: &str = "({t}.key_hash & {mask}), {t}.transaction_id, {t}.position";

/// The statement behind [`read_partition`] (`$1` the cursor's transaction id as text, `$2` its
/// position, `$3` the limit), public so that tests can check its plan on a large log.
pub fn partition_page_sql(partitions: u32, partition: u32) -> String {
    let mask = partitions - 1;
    format!(
        "SELECT {LOG_EVENT_COLUMNS}
           FROM events
          WHERE {}
            AND (events.transaction_id, events.position) > ($1::text::xid8, $2)
            AND events.transaction_id < {HORIZON_SQL}
          ORDER BY {}
          LIMIT $3",
        in_partition("events", mask, &partition.to_string()),
        PARTITION_ORDER
            .replace("{t}", "events")
            .replace("{mask}", &mask.to_string()),
    )
}

/// Reads up to `limit` events of one partition (of `partitions`) after `after`, in log order,
/// stopping below the horizon ([`HORIZON_SQL`]). Run it outside a transaction, or before the
/// calling transaction writes anything.
///
/// # Errors
/// The database error, if any.
pub async fn read_partition(
    conn: &mut PgConnection,
    partitions: u32,
    partition: u32,
    after: Cursor,
    limit: i64,
) -> sqlx::Result<Vec<LogEvent>> {
    sqlx::query_as(&partition_page_sql(partitions, partition))
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .bind(limit)
        .persistent(true)
        .fetch_all(conn)
        .await
}

/// The statement behind [`read_partitions`] (`$1` the partitions, `$2` their cursors'
/// transaction ids as text, `$3` their positions, `$4` the limit per partition), public so that
/// tests can check its plan on a large log. Each partition's page is a lateral walk of the
/// partition index from its cursor, as [`partition_page_sql`]'s, below one horizon computed
/// once for all of them.
pub fn partitions_page_sql(partitions: u32) -> String {
    let mask = partitions.max(1) - 1;
    format!(
        "WITH h AS MATERIALIZED (SELECT {HORIZON_SQL} AS horizon)
         SELECT page.*
           FROM unnest($1::int4[], $2::text[], $3::int8[]) AS p(partition, transaction_id, position),
                LATERAL (
                  SELECT {LOG_EVENT_COLUMNS}
                    FROM events
                   WHERE {}
                     AND (events.transaction_id, events.position) > (p.transaction_id::xid8, p.position)
                     AND events.transaction_id < (SELECT horizon FROM h)
                   ORDER BY {}
                   LIMIT $4) AS page",
        in_partition("events", mask, "p.partition"),
        PARTITION_ORDER
            .replace("{t}", "events")
            .replace("{mask}", &mask.to_string()),
    )
}

/// [`read_partition`] for several partitions (of `partitions`) in one statement: up to `limit`
/// events of each after its cursor in `after`, below one horizon, each partition's in log
/// order. The same rules: outside a transaction, or before it writes.
///
/// # Errors
/// The database error, if any.
pub async fn read_partitions(
    conn: &mut PgConnection,
    partitions: u32,
    after: &[(u32, Cursor)],
    limit: i64,
) -> sqlx::Result<Vec<LogEvent>> {
    let mut numbers = Vec::with_capacity(after.len());
    let mut transaction_ids = Vec::with_capacity(after.len());
    let mut positions = Vec::with_capacity(after.len());
    for (partition, cursor) in after {
        numbers.push(i32::try_from(*partition).unwrap_or(i32::MAX));
        transaction_ids.push(cursor.transaction_id.to_string());
        positions.push(cursor.position);
    }
    sqlx::query_as(&partitions_page_sql(partitions))
        .bind(numbers)
        .bind(transaction_ids)
        .bind(positions)
        .bind(limit)
        .persistent(true)
        .fetch_all(conn)
        .await
}

/// Reads up to `limit` events of one key (an aggregate id) of one partition (of `partitions`),
/// in log order, from `from` (the event at `from` itself too when `inclusive`) up to and
/// including `upto`: the events a parked key holds back (see [`crate::parked`]). They are all
/// at or below a checkpoint, so no horizon is needed. It walks the partition's index from
/// `from`, which only an operator's retry does.
///
/// # Errors
/// The database error, if any.
pub async fn read_key(
    conn: &mut PgConnection,
    partitions: u32,
    key: &str,
    from: Cursor,
    inclusive: bool,
    upto: Cursor,
    limit: i64,
) -> sqlx::Result<Vec<LogEvent>> {
    let mask = partitions.max(1) - 1;
    let sql = format!(
        "SELECT {LOG_EVENT_COLUMNS}
           FROM events
          WHERE {}
            AND events.key_hash = hashtext($1) AND events.aggregate_id = $1
            AND (events.transaction_id, events.position) {} ($2::text::xid8, $3)
            AND (events.transaction_id, events.position) <= ($4::text::xid8, $5)
          ORDER BY {}
          LIMIT $6",
        in_partition("events", mask, &format!("(hashtext($1) & {mask})")),
        if inclusive { ">=" } else { ">" },
        PARTITION_ORDER
            .replace("{t}", "events")
            .replace("{mask}", &mask.to_string()),
    );
    sqlx::query_as(&sql)
        .bind(key)
        .bind(from.transaction_id.to_string())
        .bind(from.position)
        .bind(upto.transaction_id.to_string())
        .bind(upto.position)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// What lies after a partition's cursor when [`read_partition`] found nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The partition has no event after its cursor. `passed` is the newest event of the whole
    /// log below the horizon, if it is after the cursor: the partition can move its cursor
    /// there.
    Nothing {
        /// Where the partition's cursor can move.
        passed: Option<Cursor>,
    },
    /// The partition's next event is readable now (its writer ended since the page was read).
    Readable,
    /// The partition's next event lies above the horizon: a writer is still open.
    HeldBack,
}

/// The statement behind [`partition_tail`] (`$1` the cursor's transaction id as text, `$2` its
/// position): what every caught-up worker asks on every poll, so it must cost the same on a
/// log of a million events as on an empty one. Both scalar subqueries' `ORDER BY ... LIMIT 1`
/// walk an index (an `EXISTS` would drop them and let the prepared statement's generic plan
/// scan the table): the partition's forward from the cursor, and the global order's backward
/// from the horizon to the newest event, compared with the cursor only then. A backward scan
/// bounded below by the row comparison `(transaction_id, position) > cursor` stops only at
/// the first column, so it would walk every event of the cursor's transaction: a whole
/// import, on every poll. When no event at all lies past the cursor (an idle log), the newest
/// event says so and the horizon, which reads the lock table, is not computed: an idle
/// server's polls then cost Postgres one index probe each. Public so that tests can check its
/// plan on a large log.
pub fn partition_tail_sql(partitions: u32, partition: u32) -> String {
    let mask = partitions.max(1) - 1;
    format!(
        "WITH newest AS MATERIALIZED (
                  SELECT (e.transaction_id, e.position) > ($1::text::xid8, $2) AS past
                    FROM events e ORDER BY e.transaction_id DESC, e.position DESC LIMIT 1),
              h AS MATERIALIZED (SELECT {HORIZON_SQL} AS horizon)
         SELECT CASE WHEN (SELECT past FROM newest) THEN
                (SELECT CASE WHEN (n.transaction_id, n.position) > ($1::text::xid8, $2)
                             THEN ARRAY[n.transaction_id::text::bigint, n.position] END
                   FROM (SELECT e.transaction_id, e.position FROM events e
                          WHERE e.transaction_id < (SELECT horizon FROM h)
                          ORDER BY e.transaction_id DESC, e.position DESC LIMIT 1) AS n) END,
                CASE WHEN (SELECT past FROM newest) THEN
                (SELECT e.transaction_id < h.horizon FROM events e, h
                  WHERE {}
                    AND (e.transaction_id, e.position) > ($1::text::xid8, $2)
                  ORDER BY {} LIMIT 1) END",
        in_partition("e", mask, &partition.to_string()),
        PARTITION_ORDER
            .replace("{t}", "e")
            .replace("{mask}", &mask.to_string()),
    )
}

/// The statement behind [`newest`], public so that tests can check its plan on a large log. The
/// order names the table's columns: unqualified, they would be the output's casts, and
/// Postgres would sort the whole log.
pub const NEWEST_SQL: &str = "SELECT transaction_id::text::bigint, position FROM events
  ORDER BY events.transaction_id DESC, events.position DESC LIMIT 1";

/// The newest event of the whole log visible now (`None` when the log is empty): one probe of
/// the log-order index from its end. Nothing at or before it can still appear, except from
/// writers in progress, which announce themselves by NOTIFY at commit.
///
/// # Errors
/// The database error, if any.
pub async fn newest(conn: &mut PgConnection) -> sqlx::Result<Option<Cursor>> {
    let row: Option<(i64, i64)> = sqlx::query_as(NEWEST_SQL).fetch_optional(conn).await?;
    Ok(row.map(|(transaction_id, position)| Cursor {
        transaction_id,
        position,
    }))
}

/// Looks past an idle partition's cursor (see [`Tail`]).
///
/// # Errors
/// The database error, if any.
pub async fn partition_tail(
    conn: &mut PgConnection,
    partitions: u32,
    partition: u32,
    after: Cursor,
) -> sqlx::Result<Tail> {
    let sql = partition_tail_sql(partitions, partition);
    let (passed, next_readable): (Option<Vec<i64>>, Option<bool>) = sqlx::query_as(&sql)
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .fetch_one(conn)
        .await?;
    Ok(match next_readable {
        Some(true) => Tail::Readable,
        Some(false) => Tail::HeldBack,
        None => Tail::Nothing {
            passed: passed.and_then(|p| match p[..] {
                [transaction_id, position] => Some(Cursor {
                    transaction_id,
                    position,
                }),
                _ => None,
            }),
        },
    })
}

/// A transaction that holds the horizon back: a writer of this log still open, oldest first.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct HorizonHolder {
    /// Its backend's process id (`pg_terminate_backend` takes it).
    pub pid: i32,
    /// The database it is connected to.
    pub database: Option<String>,
    /// Its transaction id.
    pub transaction_id: i64,
    /// When its transaction began.
    pub since: Option<DateTime<Utc>>,
    /// `active`, `idle in transaction`, ...
    pub state: Option<String>,
    /// The application name it gave (orderline's connections name their process).
    pub application: Option<String>,
}

/// The writers of this log whose transactions are open, oldest first (at most 10): what a
/// stalled consumer waits for.
///
/// # Errors
/// The database error, if any.
pub async fn horizon_holders(pool: &sqlx::PgPool) -> sqlx::Result<Vec<HorizonHolder>> {
    sqlx::query_as(
        "SELECT a.pid, a.datname::text AS database, a.backend_xid::text::bigint AS transaction_id,
                a.xact_start AS since, a.state, a.application_name AS application
           FROM pg_locks w JOIN pg_stat_activity a ON a.pid = w.pid
          WHERE w.locktype = 'advisory' AND w.granted AND w.classid = 8106 AND w.objid = 0
            AND w.objsubid = 2
            AND w.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
          ORDER BY a.xact_start LIMIT 10",
    )
    .fetch_all(pool)
    .await
}

// ORDER BY names the table's columns: unqualified, `transaction_id` would mean the output
// column (the bigint cast), which no index serves, and every page would sort the whole table.
fn read_page_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "SELECT {LOG_EVENT_COLUMNS}
               FROM events
              WHERE (events.transaction_id, events.position) > ($1::text::xid8, $2)
                AND events.transaction_id < {HORIZON_SQL}
              ORDER BY events.transaction_id, events.position
              LIMIT $3"
        )
    })
}

/// Reads up to `limit` events of the whole log after `after`, in log order, stopping below the
/// horizon ([`HORIZON_SQL`]). Run it before the calling transaction writes anything: a transaction with its
/// own transaction id would hold back its own reads.
///
/// # Errors
/// The database error, if any.
pub async fn read_page(
    conn: &mut PgConnection,
    after: Cursor,
    limit: i64,
) -> sqlx::Result<Vec<LogEvent>> {
    sqlx::query_as(read_page_sql())
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// The highest position allocated so far (0 for an empty log): the head that lag is measured
/// against.
///
/// # Errors
/// The database error, if any.
pub async fn head_position(conn: &mut PgConnection) -> sqlx::Result<i64> {
    let head: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(conn)
        .await?;
    Ok(head.unwrap_or(0))
}

/// Every event of the streams `id` of the given aggregate types (an order and its payment share
/// the id), in log order. Reads committed events as the caller's snapshot sees them; for a
/// page of the live log use [`read_page`].
///
/// # Errors
/// The database error, if any.
pub async fn streams(
    pool: &sqlx::PgPool,
    aggregate_types: &[&str],
    id: &str,
) -> sqlx::Result<Vec<LogEvent>> {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        format!(
            "SELECT {LOG_EVENT_COLUMNS} FROM events
              WHERE events.aggregate_type = ANY($1) AND events.aggregate_id = $2
              ORDER BY events.transaction_id, events.position"
        )
    });
    sqlx::query_as(sql)
        .bind(aggregate_types)
        .bind(id)
        .fetch_all(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_through_text() {
        let cursor = Cursor {
            transaction_id: 812,
            position: 40,
        };
        assert_eq!(cursor.to_string().parse::<Cursor>(), Ok(cursor));
        assert!("12".parse::<Cursor>().is_err());
        assert!("a-1".parse::<Cursor>().is_err());
    }

    #[test]
    fn cursors_order_by_transaction_then_position() {
        let a = Cursor {
            transaction_id: 1,
            position: 9,
        };
        let b = Cursor {
            transaction_id: 2,
            position: 3,
        };
        assert!(a < b);
    }
}
