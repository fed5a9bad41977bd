//! Rebuilding a projection from the start of the log while the live table keeps serving.
//!
//! 1. Take the projection's rebuild lock ([`RebuildLock`]; one rebuild at a time, whichever
//!    process asks).
//! 2. Create `TABLE__rebuild` like the live table and fill it from position zero, page by page
//!    (unlogged, with only its primary key; it is made logged and indexed before the swap).
//! 3. When a page comes back short, lock the projection's checkpoint row (the live consumer
//!    pauses at its next page), apply what is left, swap the tables by renaming them, and move the
//!    checkpoint to where the rebuild got. One transaction: readers see the old table or the new
//!    one, never neither, and the live consumer resumes from the rebuild's cursor.

use std::time::Instant;

use sqlx::{Connection, PgConnection, PgPool};

use event_log::checkpoints;
use event_log::subscription::ConsumerError;
use event_log::Cursor;
use event_store::locks;

use crate::Projection;

/// Events per page while rebuilding.
pub const PAGE: i64 = 5000;

/// How often a rebuild records how far it got (`rebuild_position`).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a rebuild did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Another rebuild of the same projection is running (here or in another process).
    #[error("a rebuild of {0} is already running")]
    AlreadyRunning(String),
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The projection could not apply an event (the same error would park the live one).
    #[error("the projection failed: {0}")]
    Projection(ConsumerError),
}

/// What a finished rebuild did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebuilt {
    /// Events read from the log (every event, whether the projection used it or not).
    pub events: u64,
    /// Where the live consumer continues from.
    pub cursor: Cursor,
    /// Events per second over the whole rebuild.
    pub events_per_second: f64,
}

/// The right to rebuild one projection: a session advisory lock on a connection of its own,
/// held until the rebuild ends (or the process dies).
pub struct RebuildLock(PgConnection);

impl RebuildLock {
    /// Takes the lock for `projection`.
    ///
    /// # Errors
    /// [`RebuildError::AlreadyRunning`] if another rebuild of it holds the lock.
    pub async fn acquire(pool: &PgPool, projection: &dyn Projection) -> Result<Self, RebuildError> {
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        if !locks::try_session(&mut conn, locks::REBUILD, projection.name()).await? {
            conn.close().await.ok();
            return Err(RebuildError::AlreadyRunning(projection.name().to_owned()));
        }
        Ok(Self(conn))
    }
}

/// Rebuilds `projection` under `lock`. `progress(events_read, log_head)` is called after every
/// page.
///
/// # Errors
/// The database or projection error, after which the live table is untouched.
pub async fn rebuild(
    pool: &PgPool,
    projection: &dyn Projection,
    RebuildLock(mut lock): RebuildLock,
    progress: &(dyn Fn(u64, i64) + Sync),
) -> Result<Rebuilt, RebuildError> {
    let name = projection.name();
    let twin = format!("{}__rebuild", projection.table());
    let result = fill_and_swap(pool, projection, &twin, progress).await;
    let cleanup = format!("DROP TABLE IF EXISTS {twin}");
    if result.is_err() {
        sqlx::query(&cleanup).execute(&mut lock).await.ok();
    }
    checkpoints::set_rebuild_position(&mut lock, name, None)
        .await
        .ok();
    lock.close().await.ok();
    result
}

/// A twin table filled from the log up to `cursor`.
struct Filled {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    cursor: Cursor,
    counted: Counted,
    head: i64,
    started: Instant,
}

/// Events read while a twin fills, in all and by partition (of `partitions`).
struct Counted {
    events: u64,
    by_partition: Vec<u64>,
    partitions: u32,
}

impl Counted {
    fn count(&mut self, page: &[event_log::LogEvent]) {
        self.events += page.len() as u64;
        for event in page {
            if let Some(n) = self
                .by_partition
                .get_mut(event.partition(self.partitions) as usize)
            {
                *n += 1;
            }
        }
    }
}

async fn fill_and_swap(
    pool: &PgPool,
    projection: &dyn Projection,
    twin: &str,
    progress: &(dyn Fn(u64, i64) + Sync),
) -> Result<Rebuilt, RebuildError> {
    let Filled {
        mut conn,
        cursor: filled_to,
        mut counted,
        head,
        started,
    } = fill(pool, projection, twin, progress).await?;
    let name = projection.name();
    let live = projection.table();
    let mut tx = conn.begin().await?;
    // Holding the checkpoint rows stops the live consumer's partitions between pages.
    checkpoints::lock(&mut tx, name).await?;
    let mut cursor = filled_to;
    loop {
        let page = event_log::read_page(&mut tx, cursor, PAGE).await?;
        let Some(last) = page.last() else { break };
        cursor = last.cursor();
        counted.count(&page);
        projection
            .apply(&mut tx, twin, &page)
            .await
            .map_err(RebuildError::Projection)?;
    }
    let old = format!("{live}__old");
    for sql in [
        format!("ALTER TABLE {live} RENAME TO {old}"),
        format!("ALTER TABLE {twin} RENAME TO {live}"),
        format!("DROP TABLE {old}"),
    ] {
        sqlx::query(&sql).execute(&mut *tx).await?;
    }
    checkpoints::reset(&mut tx, name, cursor, &counted.by_partition).await?;
    event_log::parked::clear(&mut tx, name).await?;
    tx.commit().await?;
    let events = counted.events;
    progress(events, head.max(cursor.position));
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    tracing::info!(projection = name, events, seconds, "rebuilt");
    Ok(Rebuilt {
        events,
        cursor,
        events_per_second: events as f64 / seconds,
    })
}

/// Creates `twin` like the projection's table and fills it from the whole log as it is now.
async fn fill(
    pool: &PgPool,
    projection: &dyn Projection,
    twin: &str,
    progress: &(dyn Fn(u64, i64) + Sync),
) -> Result<Filled, RebuildError> {
    let started = Instant::now();
    let name = projection.name();
    let live = projection.table();
    let mut conn = pool.acquire().await?;
    let partitions = event_log::partitions::current(&mut conn).await?;
    checkpoints::ensure(&mut conn, name, "projection", partitions).await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS {twin}"))
        .execute(&mut *conn)
        .await?;
    // The twin serves nothing until the swap, so it is filled unlogged and with its primary key
    // only (the upserts need it); it is made logged and gets its other indexes once, at the end.
    sqlx::query(&format!(
        "CREATE UNLOGGED TABLE {twin} (LIKE {live} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    ))
    .execute(&mut *conn)
    .await?;
    let primary_key: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint
          WHERE conrelid = $1::regclass AND contype = 'p'",
    )
    .bind(live)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(&format!("ALTER TABLE {twin} ADD {primary_key}"))
        .execute(&mut *conn)
        .await?;
    let secondary: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index
          WHERE indrelid = $1::regclass AND NOT indisprimary",
    )
    .bind(live)
    .fetch_all(&mut *conn)
    .await?;
    let head = event_log::head_position(&mut conn).await?;
    // Pages are read on a second connection while the previous one is applied.
    let mut reader = pool.acquire().await?;
    let mut cursor = Cursor::default();
    let mut counted = Counted {
        events: 0,
        by_partition: vec![0; partitions as usize],
        partitions,
    };
    let mut page = event_log::read_page(&mut reader, cursor, PAGE).await?;
    let mut reported = Instant::now();
    while let Some(last) = page.last() {
        cursor = last.cursor();
        let more = page.len() as i64 == PAGE;
        let read_next = async {
            match more {
                true => event_log::read_page(&mut reader, cursor, PAGE).await,
                false => Ok(Vec::new()),
            }
        };
        let report_progress = reported.elapsed() >= PROGRESS_EVERY || !more;
        let apply = async {
            // Writes to the unlogged twin commit without a WAL flush; progress, which is logged,
            // is written now and then rather than with every page.
            let mut tx = conn.begin().await?;
            projection
                .apply(&mut tx, twin, &page)
                .await
                .map_err(RebuildError::Projection)?;
            if report_progress {
                checkpoints::set_rebuild_position(&mut tx, name, Some(cursor.position)).await?;
            }
            tx.commit().await?;
            Ok::<_, RebuildError>(())
        };
        let (next, applied) = tokio::join!(read_next, apply);
        applied?;
        if report_progress {
            reported = Instant::now();
        }
        counted.count(&page);
        progress(counted.events, head);
        page = next?;
    }
    drop(reader);
    sqlx::query(&format!("ALTER TABLE {twin} SET LOGGED"))
        .execute(&mut *conn)
        .await?;
    for definition in &secondary {
        sqlx::query(&index_on(definition, twin))
            .execute(&mut *conn)
            .await?;
    }

    Ok(Filled {
        conn,
        cursor,
        counted,
        head,
        started,
    })
}

/// How a projection's live table compares with a fold of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    /// Row for row the same, at the live table's position.
    Same {
        /// Rows compared.
        rows: i64,
    },
    /// Rows differ: `missing` are in the fold but not (so) in the live table, `unexpected` the
    /// other way round; `example` is the primary key of one of them.
    Differs {
        /// Rows of the fold the live table lacks or has otherwise.
        missing: i64,
        /// Rows of the live table the fold does not have.
        unexpected: i64,
        /// One differing row, as JSON.
        example: String,
    },
    /// The live projection is behind the log (not running, or parked): nothing to compare yet.
    Behind {
        /// Where it is.
        position: i64,
        /// Where the log is.
        head: i64,
    },
}

/// Folds the whole log into a twin of `projection`'s table, brings it to exactly the live
/// table's position, and compares the two row for row. The live table is never touched; the
/// twin is dropped. Holds `lock` like a rebuild (one at a time).
///
/// # Errors
/// The database or projection error.
pub async fn compare(
    pool: &PgPool,
    projection: &dyn Projection,
    RebuildLock(mut lock): RebuildLock,
) -> Result<Comparison, RebuildError> {
    let twin = format!("{}__verify", projection.table());
    let result = fill_and_compare(pool, projection, &twin).await;
    sqlx::query(&format!("DROP TABLE IF EXISTS {twin}"))
        .execute(&mut lock)
        .await
        .ok();
    checkpoints::set_rebuild_position(&mut lock, projection.name(), None)
        .await
        .ok();
    lock.close().await.ok();
    result
}

async fn fill_and_compare(
    pool: &PgPool,
    projection: &dyn Projection,
    twin: &str,
) -> Result<Comparison, RebuildError> {
    let Filled {
        mut conn,
        mut cursor,
        head,
        counted: Counted { partitions, .. },
        ..
    } = fill(pool, projection, twin, &|_, _| {}).await?;
    let name = projection.name();
    let live = projection.table();
    let mut tx = conn.begin().await?;
    // Stop the live consumer between pages, and read where each partition is.
    let live_cursors = checkpoints::lock(&mut tx, name).await?;
    // Behind when some partition has not applied an event of its own that the twin has.
    let behind: bool = sqlx::query_scalar(&format!(
        "SELECT NOT EXISTS (SELECT 1 FROM checkpoints WHERE consumer = $1)
             OR EXISTS (SELECT 1 FROM checkpoints c WHERE c.consumer = $1 AND EXISTS (
                 SELECT 1 FROM events e
                  WHERE (e.key_hash & {mask}) = c.partition
                    AND (e.transaction_id, e.position) > (c.transaction_id, c.position)
                    AND (e.transaction_id, e.position) <= ($2::text::xid8, $3)))",
        mask = partitions - 1
    ))
    .bind(name)
    .bind(cursor.transaction_id.to_string())
    .bind(cursor.position)
    .fetch_one(&mut *tx)
    .await?;
    if behind {
        let position = live_cursors
            .iter()
            .map(|(_, c)| c.position)
            .min()
            .unwrap_or_default();
        return Ok(Comparison::Behind {
            position,
            head: head.max(cursor.position),
        });
    }
    // The live partitions may have gone further while the twin was filled: catch the twin up
    // to each of them, event by event.
    let live_at = |partition: u32| {
        live_cursors
            .iter()
            .find(|(p, _)| *p == partition)
            .map_or(Cursor::default(), |(_, c)| *c)
    };
    let furthest = live_cursors
        .iter()
        .map(|(_, c)| *c)
        .max()
        .unwrap_or_default();
    while cursor < furthest {
        let page = event_log::read_page(&mut tx, cursor, PAGE).await?;
        let Some(last) = page.last() else { break };
        cursor = last.cursor();
        let upto: Vec<_> = page
            .into_iter()
            .filter(|e| e.cursor() <= live_at(e.partition(partitions)))
            .collect();
        projection
            .apply(&mut tx, twin, &upto)
            .await
            .map_err(RebuildError::Projection)?;
    }
    let (missing, unexpected, rows, example): (i64, i64, i64, Option<String>) =
        sqlx::query_as(&format!(
            "WITH fold AS (SELECT to_jsonb(t) AS row FROM {twin} t),
                  live AS (SELECT to_jsonb(t) AS row FROM {live} t),
                  missing AS (SELECT row FROM fold EXCEPT SELECT row FROM live),
                  unexpected AS (SELECT row FROM live EXCEPT SELECT row FROM fold)
             SELECT (SELECT count(*) FROM missing), (SELECT count(*) FROM unexpected),
                    (SELECT count(*) FROM fold),
                    coalesce((SELECT row::text FROM missing LIMIT 1),
                             (SELECT row::text FROM unexpected LIMIT 1))"
        ))
        .fetch_one(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(match (missing, unexpected) {
        (0, 0) => Comparison::Same { rows },
        _ => Comparison::Differs {
            missing,
            unexpected,
            example: example.unwrap_or_default(),
        },
    })
}

/// Turns `CREATE [UNIQUE] INDEX name ON table USING ...` (as `pg_get_indexdef` prints it) into the
/// same index, unnamed, on `table`.
fn index_on(definition: &str, table: &str) -> String {
    let unique = if definition.starts_with("CREATE UNIQUE") {
        "UNIQUE "
    } else {
        ""
    };
    let rest = definition
        .find(" USING ")
        .map_or(definition, |at| &definition[at..]);
    format!("CREATE {unique}INDEX ON {table}{rest}")
}

#[cfg(test)]
mod tests {
    use super::index_on;

    #[test]
    fn an_index_definition_moves_to_the_twin_table() {
        assert_eq!(
            index_on(
                "CREATE INDEX rm_inventory_low_stock ON public.rm_inventory USING btree (sku) WHERE low_stock",
                "rm_inventory__rebuild"
            ),
            "CREATE INDEX ON rm_inventory__rebuild USING btree (sku) WHERE low_stock"
        );
        assert!(index_on("CREATE UNIQUE INDEX x ON t USING btree (a)", "u")
            .starts_with("CREATE UNIQUE INDEX ON u"));
    }
}
