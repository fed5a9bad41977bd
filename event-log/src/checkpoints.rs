//! The `checkpoints` table, one row per log consumer: where it is in the log, who holds its
//! lease (owner, expiry, fencing token), the version of its parked keys, its last error; and per
//! consumer its kind and a rebuild's progress (`consumers`). This module is the table's only owner:
//! the runner, the rebuilds, the read-your-writes wait and the admin view all come here.
//!
//! A checkpoint moves only in the transaction that applies the events before it (see
//! [`advance`]), so what a consumer wrote and where it is can never disagree.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::Cursor;

/// The channel `NOTIFY`ed, with the consumer's name as payload, in every transaction that moves
/// a checkpoint: a read model has advanced once the notification arrives.
pub const CHECKPOINT_CHANNEL: &str = "orderline_checkpoints";

/// Lag up to this many events per consumer is counted exactly (split evenly over its
/// partitions); beyond it, it is estimated from positions. Small, because counting a
/// partition's events visits the table (its index is an expression, which Postgres does not
/// answer from the index alone): the admin view stays cheap on any log.
pub const EXACT_LAG_LIMIT: i64 = 512;

fn cursor((transaction_id, position): (i64, i64)) -> Cursor {
    Cursor {
        transaction_id,
        position,
    }
}

/// Makes sure `consumer` is known with its `kind` and has a checkpoint row for each of
/// `partitions` partitions (new ones at the start of the log).
///
/// # Errors
/// The database error, if any.
pub async fn ensure(
    conn: &mut PgConnection,
    consumer: &str,
    kind: &str,
    partitions: u32,
) -> sqlx::Result<()> {
    sqlx::query(
        "WITH known AS (
            INSERT INTO consumers (consumer, kind) VALUES ($1, $2)
            ON CONFLICT (consumer) DO UPDATE SET kind = EXCLUDED.kind
             WHERE consumers.kind IS DISTINCT FROM EXCLUDED.kind)
         INSERT INTO checkpoints (consumer, partition)
         SELECT $1, p FROM generate_series(0, $3 - 1) AS p
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(kind)
    .bind(i32::try_from(partitions).unwrap_or(i32::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// Where one partition of `consumer` is, and the version of its set of parked keys
/// ([`crate::parked`]). The row must exist ([`ensure`]).
///
/// # Errors
/// The database error, if any.
pub async fn read(
    conn: &mut PgConnection,
    consumer: &str,
    partition: u32,
) -> sqlx::Result<(Cursor, i64)> {
    let (transaction_id, position, parked_version): (i64, i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, parked_version FROM checkpoints
          WHERE consumer = $1 AND partition = $2",
    )
    .bind(consumer)
    .bind(partition_param(partition))
    .fetch_one(conn)
    .await?;
    Ok((cursor((transaction_id, position)), parked_version))
}

fn partition_param(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

/// The lease a runner holds on one partition of a consumer: the fencing token it got when it
/// took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// Grows on every takeover; a page commits only while the row still carries it.
    pub token: i64,
}

/// Which partitions [`acquire`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Every partition whose holder let its lease expire (it died or froze): someone must
    /// take them now, whatever the even share says.
    Expired,
    /// Up to this many partitions that nobody holds (never held, or given up).
    Free(u32),
}

/// Takes `consumer`'s partitions as `claim` says for `owner` for `ttl`, each with a fencing
/// token one higher than any before. Rows another transaction has locked (a page in flight, a
/// rebuild's swap) are passed over. Takes nothing when the log does not have `partitions`
/// partitions any more (another process split them: this one must restart). The rows must
/// exist ([`ensure`]).
///
/// # Errors
/// The database error, if any.
pub async fn acquire(
    conn: &mut PgConnection,
    consumer: &str,
    owner: &str,
    ttl: std::time::Duration,
    partitions: u32,
    claim: Claim,
) -> sqlx::Result<Vec<Lease>> {
    let (expired, limit) = match claim {
        Claim::Expired => (true, i64::MAX),
        Claim::Free(n) => (false, i64::from(n)),
    };
    let taken: Vec<(i32, i64)> = sqlx::query_as(
        "UPDATE checkpoints c
            SET owner = $2, fencing_token = c.fencing_token + 1,
                lease_until = clock_timestamp() + make_interval(secs => $3)
          WHERE (c.consumer, c.partition) IN (
                SELECT f.consumer, f.partition FROM checkpoints f
                 WHERE f.consumer = $1
                   AND CASE WHEN $6 THEN f.owner IS NOT NULL AND f.lease_until < clock_timestamp()
                            ELSE f.owner IS NULL END
                   AND (SELECT partitions FROM log_partitions) = $4
                 ORDER BY f.partition
                 LIMIT $5
                   FOR UPDATE SKIP LOCKED)
      RETURNING c.partition, c.fencing_token",
    )
    .bind(consumer)
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .bind(partition_param(partitions))
    .bind(limit)
    .bind(expired)
    .fetch_all(conn)
    .await?;
    Ok(taken
        .into_iter()
        .map(|(partition, token)| Lease {
            partition: u32::try_from(partition).unwrap_or_default(),
            token,
        })
        .collect())
}

/// The CTE `locked`: the rows of consumer `$1` still held by the leases `$2` (partitions) and
/// `$3` (their tokens), locked in partition order (see [`advance_many_if_at`]).
macro_rules! locked_leases {
    () => {
        "WITH locked AS (
              SELECT c.partition FROM checkpoints c
                JOIN unnest($2::int4[], $3::int8[]) AS held(partition, token)
                  ON held.partition = c.partition AND held.token = c.fencing_token
               WHERE c.consumer = $1
               ORDER BY c.partition
                 FOR UPDATE OF c)"
    };
}

/// Extends `leases` by `ttl` from now and answers those still held; a lease missing from the
/// answer was taken over (its worker must stop). A lease that expired but was not taken is
/// still the holder's: no one else applied a page. Rows are locked in partition order, so a
/// renewal and a page of several partitions ([`advance_many_if_at`]) never deadlock.
///
/// # Errors
/// The database error, if any.
pub async fn renew(
    conn: &mut PgConnection,
    consumer: &str,
    leases: &[Lease],
    ttl: std::time::Duration,
) -> sqlx::Result<Vec<Lease>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (partitions, tokens) = columns(leases);
    let kept: Vec<(i32, i64)> = sqlx::query_as(concat!(
        locked_leases!(),
        " UPDATE checkpoints c SET lease_until = clock_timestamp() + make_interval(secs => $4)
           FROM locked
          WHERE c.consumer = $1 AND c.partition = locked.partition
      RETURNING c.partition, c.fencing_token"
    ))
    .bind(consumer)
    .bind(&partitions)
    .bind(&tokens)
    .bind(ttl.as_secs_f64())
    .fetch_all(conn)
    .await?;
    Ok(leases
        .iter()
        .filter(|l| {
            kept.iter()
                .any(|(p, t)| *p == partition_param(l.partition) && *t == l.token)
        })
        .copied()
        .collect())
}

fn columns(leases: &[Lease]) -> (Vec<i32>, Vec<i64>) {
    leases
        .iter()
        .map(|l| (partition_param(l.partition), l.token))
        .unzip()
}

/// Gives `leases` up (at shutdown, or to even out the partitions between processes), so that
/// another process takes them at once rather than after they expire; a lease taken over
/// already is left alone. Rows are locked in partition order, as in [`renew`].
///
/// # Errors
/// The database error, if any.
pub async fn release(
    conn: &mut PgConnection,
    consumer: &str,
    leases: &[Lease],
) -> sqlx::Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let (partitions, tokens) = columns(leases);
    sqlx::query(concat!(
        locked_leases!(),
        " UPDATE checkpoints c SET owner = NULL, lease_until = NULL
           FROM locked
          WHERE c.consumer = $1 AND c.partition = locked.partition"
    ))
    .bind(consumer)
    .bind(&partitions)
    .bind(&tokens)
    .execute(conn)
    .await?;
    Ok(())
}

/// One partition's part in [`advance_many_if_at`]: the page applied under `lease` after `at`
/// (filtered with the parked keys at `parked_version`), `applied` events up to `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    /// The partition and the lease its page was applied under.
    pub lease: Lease,
    /// Where the page started: the checkpoint must still be there.
    pub at: Cursor,
    /// The parked keys' version the page was filtered with.
    pub parked_version: i64,
    /// Where the checkpoint moves.
    pub next: Cursor,
    /// How many events the page applied.
    pub applied: usize,
}

/// [`advance_if_at`] for several partitions of `consumer` in one statement: every row is
/// checked and locked (in partition order, as every statement that locks several rows does,
/// so two of them never wait for each other) and moved, or none is. Answers whether all moved;
/// if not, the caller must abandon the transaction (some rows may be moved in it) and look at
/// each partition alone.
///
/// # Errors
/// The database error, if any.
pub async fn advance_many_if_at(
    conn: &mut PgConnection,
    consumer: &str,
    pages: &[Advance],
) -> sqlx::Result<bool> {
    let mut partitions = Vec::with_capacity(pages.len());
    let mut tokens = Vec::with_capacity(pages.len());
    let mut at_ids = Vec::with_capacity(pages.len());
    let mut at_positions = Vec::with_capacity(pages.len());
    let mut versions = Vec::with_capacity(pages.len());
    let mut next_ids = Vec::with_capacity(pages.len());
    let mut next_positions = Vec::with_capacity(pages.len());
    let mut applied = Vec::with_capacity(pages.len());
    for page in pages {
        partitions.push(partition_param(page.lease.partition));
        tokens.push(page.lease.token);
        at_ids.push(page.at.transaction_id.to_string());
        at_positions.push(page.at.position);
        versions.push(page.parked_version);
        next_ids.push(page.next.transaction_id.to_string());
        next_positions.push(page.next.position);
        applied.push(i64::try_from(page.applied).unwrap_or(i64::MAX));
    }
    let moved: i64 = sqlx::query_scalar(
        "WITH page AS (
              SELECT * FROM unnest($2::int4[], $3::int8[], $4::text[], $5::int8[], $6::int8[],
                                   $7::text[], $8::int8[], $9::int8[])
                         AS p(partition, token, at_id, at_position, parked_version,
                              next_id, next_position, applied)),
              locked AS (
              SELECT c.partition FROM checkpoints c JOIN page p ON p.partition = c.partition
               WHERE c.consumer = $1 AND c.fencing_token = p.token
                 AND c.transaction_id = p.at_id::xid8 AND c.position = p.at_position
                 AND c.parked_version = p.parked_version
               ORDER BY c.partition
                 FOR UPDATE OF c),
              moved AS (
              UPDATE checkpoints c
                 SET transaction_id = p.next_id::xid8, position = p.next_position,
                     events_applied = c.events_applied + p.applied, last_error = NULL,
                     updated_at = now()
                FROM page p, locked l
               WHERE c.consumer = $1 AND c.partition = l.partition AND p.partition = l.partition
           RETURNING c.consumer)
         SELECT count(pg_notify($10, consumer)) FROM moved",
    )
    .bind(consumer)
    .bind(&partitions)
    .bind(&tokens)
    .bind(&at_ids)
    .bind(&at_positions)
    .bind(&versions)
    .bind(&next_ids)
    .bind(&next_positions)
    .bind(&applied)
    .bind(CHECKPOINT_CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(usize::try_from(moved).is_ok_and(|moved| moved == pages.len()))
}

/// What [`lock_if_at`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The row is locked for this transaction, at the expected cursor, under this lease.
    Ours,
    /// Another page moved the checkpoint, or the partition's parked keys changed, meanwhile:
    /// throw the page away and read again.
    Moved,
    /// The lease was taken over (fenced off): commit nothing and stop.
    Fenced,
}

/// Locks the row of `lease`'s partition of `consumer` for the rest of the transaction if
/// `lease` still holds it, it is still at `at`, and its parked keys are still at
/// `parked_version` (the page was filtered with them). The fencing check and the row lock are
/// one statement, and a takeover must lock the row too, so a lease cannot move between this
/// check and the commit.
///
/// # Errors
/// The database error, if any.
pub async fn lock_if_at(
    conn: &mut PgConnection,
    consumer: &str,
    at: Cursor,
    lease: Lease,
    parked_version: i64,
) -> sqlx::Result<Held> {
    let row: Option<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, position, fencing_token, parked_version
           FROM checkpoints
          WHERE consumer = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(consumer)
    .bind(partition_param(lease.partition))
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((_, _, token, _)) if token != lease.token => Held::Fenced,
        Some((transaction_id, position, _, version))
            if cursor((transaction_id, position)) == at && version == parked_version =>
        {
            Held::Ours
        }
        Some(_) => Held::Moved,
        None => Held::Fenced,
    })
}

/// Locks every partition row of `consumer` for the rest of the transaction, whatever their
/// positions, and answers each partition's cursor (none when the consumer is unknown): its live
/// runners then wait before their next page. Rebuilds and comparisons stop the live consumer
/// this way.
///
/// # Errors
/// The database error, if any.
pub async fn lock(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<Vec<(u32, Cursor)>> {
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, transaction_id::text::bigint, position FROM checkpoints
          WHERE consumer = $1 ORDER BY partition FOR UPDATE",
    )
    .bind(consumer)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(p, tx, pos)| (u32::try_from(p).unwrap_or_default(), cursor((tx, pos))))
        .collect())
}

/// Moves one partition of `consumer` to `next` after applying `applied` events, clears its last
/// error, and notifies [`CHECKPOINT_CHANNEL`] at commit (listeners learn that the read model
/// moved once it really has). Run it in the transaction that applied the events.
///
/// # Errors
/// The database error, if any.
pub async fn advance(
    conn: &mut PgConnection,
    consumer: &str,
    partition: u32,
    next: Cursor,
    applied: usize,
) -> sqlx::Result<()> {
    sqlx::query(
        "WITH moved AS (
            UPDATE checkpoints
               SET transaction_id = $3::text::xid8, position = $4,
                   events_applied = events_applied + $5, last_error = NULL, updated_at = now()
             WHERE consumer = $1 AND partition = $2
         RETURNING consumer)
         SELECT pg_notify($6, consumer) FROM moved",
    )
    .bind(consumer)
    .bind(partition_param(partition))
    .bind(next.transaction_id.to_string())
    .bind(next.position)
    .bind(i64::try_from(applied).unwrap_or(i64::MAX))
    .bind(CHECKPOINT_CHANNEL)
    .execute(conn)
    .await?;
    Ok(())
}

/// [`lock_if_at`] and [`advance`] in one statement, the end of every page: moves `lease`'s
/// partition of `consumer` from `at` to `next` after applying `applied` events, if `lease`
/// still holds it, it is still at `at` and its parked keys are still at `parked_version`, and
/// answers [`Held::Ours`]; otherwise changes nothing and answers why. The update locks the row
/// to the commit, and a takeover must lock it too, so the lease cannot move between this check
/// and the commit. Run it in the transaction that applied the events, after them.
///
/// # Errors
/// The database error, if any.
pub async fn advance_if_at(
    conn: &mut PgConnection,
    consumer: &str,
    at: Cursor,
    lease: Lease,
    parked_version: i64,
    next: Cursor,
    applied: usize,
) -> sqlx::Result<Held> {
    let moved: i64 = sqlx::query_scalar(
        "WITH moved AS (
            UPDATE checkpoints
               SET transaction_id = $3::text::xid8, position = $4,
                   events_applied = events_applied + $5, last_error = NULL, updated_at = now()
             WHERE consumer = $1 AND partition = $2 AND fencing_token = $7
               AND transaction_id = $8::text::xid8 AND position = $9 AND parked_version = $10
         RETURNING consumer)
         SELECT count(pg_notify($6, consumer)) FROM moved",
    )
    .bind(consumer)
    .bind(partition_param(lease.partition))
    .bind(next.transaction_id.to_string())
    .bind(next.position)
    .bind(i64::try_from(applied).unwrap_or(i64::MAX))
    .bind(CHECKPOINT_CHANNEL)
    .bind(lease.token)
    .bind(at.transaction_id.to_string())
    .bind(at.position)
    .bind(parked_version)
    .fetch_one(&mut *conn)
    .await?;
    if moved == 1 {
        return Ok(Held::Ours);
    }
    // Rare: say why, for the runner (stop, or read again). The transaction is abandoned.
    lock_if_at(conn, consumer, at, lease, parked_version).await
}

/// Puts every partition of a rebuilt projection's consumer at `at`, without error, with
/// `events[p]` events applied by partition `p`: the swap of a rebuild, in its transaction
/// (which also frees the consumer's parked keys: the rebuild applied their events). Bumps
/// every partition's `parked_version`, so no page filtered with the old parked keys commits.
///
/// # Errors
/// The database error, if any.
pub async fn reset(
    conn: &mut PgConnection,
    consumer: &str,
    at: Cursor,
    events: &[u64],
) -> sqlx::Result<()> {
    let events: Vec<i64> = events
        .iter()
        .map(|n| i64::try_from(*n).unwrap_or(i64::MAX))
        .collect();
    sqlx::query(
        "UPDATE checkpoints
            SET transaction_id = $2::text::xid8, position = $3,
                events_applied = coalesce(($4::int8[])[partition + 1], 0),
                last_error = NULL, parked_version = parked_version + 1, updated_at = now()
          WHERE consumer = $1",
    )
    .bind(consumer)
    .bind(at.transaction_id.to_string())
    .bind(at.position)
    .bind(&events)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records how far a rebuild of `consumer`'s projection got (`None` once it ended).
///
/// # Errors
/// The database error, if any.
pub async fn set_rebuild_position(
    conn: &mut PgConnection,
    consumer: &str,
    position: Option<i64>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE consumers SET rebuild_position = $2 WHERE consumer = $1")
        .bind(consumer)
        .bind(position)
        .execute(conn)
        .await?;
    Ok(())
}

/// Counts `applied` more events applied by one partition of `consumer` without moving it
/// (a parked key's held events, applied on an operator's retry), in their transaction.
///
/// # Errors
/// The database error, if any.
pub async fn count_applied(
    conn: &mut PgConnection,
    consumer: &str,
    partition: u32,
    applied: usize,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE checkpoints SET events_applied = events_applied + $3, last_error = NULL,
                updated_at = now()
          WHERE consumer = $1 AND partition = $2",
    )
    .bind(consumer)
    .bind(partition_param(partition))
    .bind(i64::try_from(applied).unwrap_or(i64::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// Shows a transient error on one partition's row (cleared by the next [`advance`]).
///
/// # Errors
/// The database error, if any.
pub async fn note_error(
    pool: &PgPool,
    consumer: &str,
    partition: u32,
    error: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE checkpoints SET last_error = $3, last_error_at = now()
          WHERE consumer = $1 AND partition = $2",
    )
    .bind(consumer)
    .bind(partition_param(partition))
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// The consumer's cursor as one value: its partition furthest behind in the log. Every event
/// up to it is applied, so it is a safe `min_position` to hand out.
const LOW_CURSOR_SQL: &str = "(SELECT ARRAY[c.transaction_id::text::bigint, c.position]
    FROM checkpoints c WHERE c.consumer = $1 ORDER BY c.transaction_id, c.position LIMIT 1)";

fn low_cursor(row: Option<Vec<i64>>) -> Cursor {
    match row.as_deref() {
        Some([transaction_id, position]) => cursor((*transaction_id, *position)),
        _ => Cursor::default(),
    }
}

/// Where `consumer` is (its partition furthest behind), whether it has applied every event
/// up to the one at `min_position` (always `true` without one), and the log's head, in one
/// statement: the read-your-writes check of every query.
///
/// A partition has reached an event when no event of its own lies between its cursor and that
/// event, so an idle partition never holds a read back.
///
/// # Errors
/// The database error, if any.
pub async fn reached(
    pool: &PgPool,
    consumer: &str,
    min_position: Option<i64>,
) -> sqlx::Result<(Cursor, bool, i64)> {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        format!(
            "SELECT {LOW_CURSOR_SQL},
                    $2::bigint IS NULL OR (
                    EXISTS (SELECT 1 FROM checkpoints WHERE consumer = $1)
                    AND EXISTS (
                        SELECT 1 FROM events n, log_partitions lp
                         WHERE n.position = $2
                           AND NOT EXISTS (
                               SELECT 1 FROM checkpoints c
                                WHERE c.consumer = $1
                                  AND (c.transaction_id, c.position) < (n.transaction_id, n.position)
                                  AND EXISTS (
                                      SELECT 1 FROM events e
                                       WHERE (e.transaction_id, e.position)
                                             > (c.transaction_id, c.position)
                                         AND (e.transaction_id, e.position)
                                             <= (n.transaction_id, n.position)
                                         AND (e.key_hash & (lp.partitions - 1)) = c.partition)))),
                    coalesce((SELECT max(position) FROM events), 0)"
        )
    });
    let (low, applied, head): (Option<Vec<i64>>, bool, i64) = sqlx::query_as(sql)
        .bind(consumer)
        .bind(min_position)
        .fetch_one(pool)
        .await?;
    Ok((low_cursor(low), applied, head))
}

/// `consumer`'s cursor (as [`reached`] gives it) alongside one more value read in the same
/// statement (one snapshot, one round trip): `also` is a scalar `SELECT` of one text value
/// whose only parameter is `$2` (given as text; cast it), such as a read model's row as JSON.
/// The hottest query, one order by id, reads this way.
///
/// # Errors
/// The database error, if any.
pub async fn cursor_with(
    pool: &PgPool,
    consumer: &str,
    also: &'static str,
    parameter: &str,
) -> sqlx::Result<(Cursor, Option<String>)> {
    let sql = format!("SELECT {LOW_CURSOR_SQL}, ({also})");
    let (low, row): (Option<Vec<i64>>, Option<String>) = sqlx::query_as(&sql)
        .bind(consumer)
        .bind(parameter)
        .fetch_one(pool)
        .await?;
    Ok((low_cursor(low), row))
}

/// One consumer's progress, as the admin API and `/metrics` show it: the sums and extremes of
/// its partitions, and each partition.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// The consumer's name.
    pub name: String,
    /// What it is: `projection`, `saga`, `relay`, `notifications`, ...
    pub kind: String,
    /// The lowest of its partitions' positions (the position of each one's last event applied
    /// or passed); `X-Orderline-Position` uses the lowest cursor in log order instead.
    pub position: i64,
    /// Events in the log it has not applied yet, over all partitions (exact up to
    /// [`EXACT_LAG_LIMIT`] per partition, an upper bound beyond).
    pub lag: i64,
    /// Age of the oldest event not applied yet, in seconds (0 when caught up).
    pub lag_seconds: f64,
    /// `parked` while it has parked keys (`GET /api/v1/admin/parked` lists them), else
    /// `running`.
    pub state: String,
    /// Keys parked on a poison event; their later events wait, every other key flows.
    pub parked_keys: i64,
    /// Events applied since the consumer began (or since its last rebuild).
    pub events_applied: i64,
    /// The last error of a page of any partition, until a page of that partition succeeds.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// While keys are parked: the lowest position of an event they are parked on.
    pub parked_position: Option<i64>,
    /// While a rebuild runs: the position it has reached.
    pub rebuild_position: Option<i64>,
    /// Each partition: who holds it and how far it is.
    pub partitions: Vec<PartitionProgress>,
}

/// One partition of a consumer.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PartitionProgress {
    /// The consumer's name (not shown; the partition is listed under it).
    #[serde(skip)]
    pub consumer: String,
    /// What the consumer is (not shown per partition).
    #[serde(skip)]
    pub kind: Option<String>,
    /// A rebuild's position (not shown per partition).
    #[serde(skip)]
    pub rebuild_position: Option<i64>,
    /// Its number, `0..partitions`.
    pub partition: i32,
    /// Who holds its lease (`host:pid:runner`, as `/health/ready` names a process), if anyone.
    pub owner: Option<String>,
    /// The lease's fencing token: one more on every takeover.
    pub fencing_token: i64,
    /// Until when the lease runs unless renewed.
    pub lease_until: Option<DateTime<Utc>>,
    /// Position of the last event it applied.
    pub position: i64,
    /// Its events not applied yet (exact up to [`EXACT_LAG_LIMIT`], an upper bound beyond).
    pub lag: i64,
    /// Age of its oldest event not applied yet, in seconds.
    pub lag_seconds: f64,
    /// Its keys parked on a poison event.
    pub parked_keys: i64,
    /// Events it applied.
    pub events_applied: i64,
    /// Its last error, until a page succeeds.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// While keys are parked: the lowest position of an event they are parked on.
    pub parked_position: Option<i64>,
}

/// The statement behind [`progress`] for a log of `partitions` partitions, one row per
/// partition (`$1` the exact limit per partition, [`EXACT_LAG_LIMIT`] over `partitions`): each
/// subquery walks the partition's index from its checkpoint and stops after `$1` events, so
/// the cost is bounded whatever the log's size; a partition further behind reports `max(position) - its position` (an upper bound). Public so that tests
/// can check its plan on a large log.
pub fn progress_sql(partitions: u32) -> String {
    let mask = partitions.max(1) - 1;
    format!(
        "SELECT c.consumer, k.kind, k.rebuild_position, c.partition, c.owner, c.fencing_token,
            c.lease_until, c.position, c.events_applied, c.last_error, c.last_error_at,
            parked.n AS parked_keys, parked.low AS parked_position,
            CASE WHEN behind.n > $1
                 THEN greatest((SELECT max(position) FROM events) - c.position, behind.n)
                 ELSE behind.n END AS lag,
            coalesce(extract(epoch FROM now() - (
                SELECT e.recorded_at FROM events e
                 WHERE {within}
                   AND (e.transaction_id, e.position) > (c.transaction_id, c.position)
                 ORDER BY {order} LIMIT 1))::float8, 0) AS lag_seconds
       FROM checkpoints c
       LEFT JOIN consumers k ON k.consumer = c.consumer
       CROSS JOIN LATERAL (
            SELECT count(*) AS n FROM (
                SELECT 1 FROM events e
                 WHERE {within}
                   AND (e.transaction_id, e.position) > (c.transaction_id, c.position)
                 ORDER BY {order} LIMIT $1 + 1) AS page) AS behind
       CROSS JOIN LATERAL (
            SELECT count(*) AS n, min(pk.position) AS low FROM parked_keys pk
             WHERE pk.consumer = c.consumer AND (pk.key_hash & {mask}) = c.partition) AS parked
      WHERE c.partition < {partitions}
      ORDER BY c.consumer, c.partition",
        within = crate::reader::in_partition("e", mask, "c.partition"),
        order = crate::reader::PARTITION_ORDER
            .replace("{t}", "e")
            .replace("{mask}", &mask.to_string()),
    )
}

/// Every consumer's progress, by name, with its partitions.
///
/// # Errors
/// The database error, if any.
pub async fn progress(pool: &PgPool) -> sqlx::Result<Vec<Progress>> {
    let mut conn = pool.acquire().await?;
    let partitions = crate::partitions::current(&mut conn).await?;
    let rows: Vec<PartitionProgress> = sqlx::query_as(&progress_sql(partitions))
        .bind(EXACT_LAG_LIMIT / i64::from(partitions.max(1)))
        .fetch_all(&mut *conn)
        .await?;
    let head = crate::head_position(&mut conn).await?;
    let mut consumers: Vec<Progress> = Vec::new();
    for row in rows {
        let fresh = consumers.last().is_none_or(|c| c.name != row.consumer);
        if fresh {
            consumers.push(Progress {
                name: row.consumer.clone(),
                kind: row.kind.clone().unwrap_or_else(|| "consumer".into()),
                position: row.position,
                lag: 0,
                lag_seconds: 0.0,
                state: "running".into(),
                parked_keys: 0,
                events_applied: 0,
                last_error: None,
                last_error_at: None,
                parked_position: None,
                rebuild_position: row.rebuild_position,
                partitions: Vec::new(),
            });
        }
        let Some(consumer) = consumers.last_mut() else {
            continue;
        };
        consumer.position = consumer.position.min(row.position);
        consumer.lag += row.lag;
        consumer.lag_seconds = consumer.lag_seconds.max(row.lag_seconds);
        consumer.events_applied += row.events_applied;
        if row.parked_keys > 0 {
            consumer.state = "parked".into();
            consumer.parked_keys += row.parked_keys;
            consumer.parked_position = match (consumer.parked_position, row.parked_position) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if row.last_error_at > consumer.last_error_at {
            consumer.last_error.clone_from(&row.last_error);
            consumer.last_error_at = row.last_error_at;
        }
        consumer.partitions.push(row);
    }
    for consumer in &mut consumers {
        // Partitions far behind each estimate from the whole log's positions; the consumer as a
        // whole is behind by at most the distance from its lowest partition to the head.
        consumer.lag = consumer.lag.min((head - consumer.position).max(0));
    }
    Ok(consumers)
}
