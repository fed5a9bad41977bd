//! Saga rows: one per order in the `sagas` table, holding the [`Fulfillment`] as JSON beside the
//! columns operators and the gateway worker search by (state, due time, deadline).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use aggregates::values::OrderId;

use crate::fulfillment::{Entry, Fulfillment, Goal, PaymentProgress, SagaState};

/// Writes `sagas`, new or changed, in one statement: a page of the saga's consumer writes every
/// saga it started or moved at once. Their rows must be this transaction's: locked by
/// [`lock_many`], or new ones whose order only this transaction's partition moves (the
/// consumer's fencing token is checked at its commit), so the upsert overwrites no one.
///
/// # Errors
/// The database error; a saga that does not serialize is reported as `sqlx::Error::Encode`.
pub async fn write_many(conn: &mut PgConnection, sagas: &[&Fulfillment]) -> sqlx::Result<()> {
    if sagas.is_empty() {
        return Ok(());
    }
    let sql = "INSERT INTO sagas (order_id, state, due_at, deadline, data)
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[],
                                    $4::timestamptz[], $5::jsonb[])
               ON CONFLICT (order_id) DO UPDATE
                  SET state = EXCLUDED.state, due_at = EXCLUDED.due_at,
                      deadline = EXCLUDED.deadline, data = EXCLUDED.data, updated_at = now()";
    Columns::of(sagas)?.write(conn, sql).await
}

/// The columns of many sagas, as arrays to bind.
struct Columns<'a> {
    ids: Vec<Uuid>,
    states: Vec<&'a str>,
    due: Vec<Option<DateTime<Utc>>>,
    deadlines: Vec<Option<DateTime<Utc>>>,
    data: Vec<serde_json::Value>,
}

impl<'a> Columns<'a> {
    /// Runs `sql` with the columns bound as `$1` (order ids) to `$5` (the JSON states).
    async fn write(self, conn: &mut PgConnection, sql: &str) -> sqlx::Result<()> {
        sqlx::query(sql)
            .bind(&self.ids)
            .bind(&self.states)
            .bind(&self.due)
            .bind(&self.deadlines)
            .bind(&self.data)
            .execute(conn)
            .await?;
        Ok(())
    }

    fn of(sagas: &[&'a Fulfillment]) -> sqlx::Result<Self> {
        Ok(Self {
            ids: sagas.iter().map(|s| s.order_id().as_uuid()).collect(),
            states: sagas.iter().map(|s| s.state().as_str()).collect(),
            due: sagas.iter().map(|s| s.due()).collect(),
            deadlines: sagas.iter().map(|s| s.deadline()).collect(),
            data: sagas
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<serde_json::Value>, _>>()
                .map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
        })
    }
}

/// Reads the sagas of `order_ids` that exist, without locking them: their lines never change,
/// so what a transaction must lock for them can be read before it locks anything.
///
/// # Errors
/// The database error; a row that does not deserialize is reported as `sqlx::Error::Decode`.
pub async fn read_many(
    conn: &mut PgConnection,
    order_ids: &[OrderId],
) -> sqlx::Result<Vec<Fulfillment>> {
    many(
        conn,
        order_ids,
        "SELECT data FROM sagas WHERE order_id = ANY($1)",
    )
    .await
}

/// Reads the sagas of `order_ids` that exist and locks their rows until the transaction ends,
/// in order-id order (every path locks saga rows in this order, after the aggregates:
/// `runtime::Work::lock`).
///
/// # Errors
/// As [`read_many`].
pub async fn lock_many(
    conn: &mut PgConnection,
    order_ids: &[OrderId],
) -> sqlx::Result<Vec<Fulfillment>> {
    // The sort sits below the row locks in the plan, so rows are locked in this order.
    let sql = "SELECT data FROM sagas WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE";
    many(conn, order_ids, sql).await
}

async fn many(
    conn: &mut PgConnection,
    order_ids: &[OrderId],
    sql: &str,
) -> sqlx::Result<Vec<Fulfillment>> {
    if order_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = order_ids.iter().map(OrderId::as_uuid).collect();
    let rows: Vec<sqlx::types::Json<Fulfillment>> =
        sqlx::query_scalar(sql).bind(&ids).fetch_all(conn).await?;
    Ok(rows.into_iter().map(|json| json.0).collect())
}

/// A due saga this process claimed for its gateway call: the claim's fencing token, and the
/// saga as it was when claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The fencing token of the claim: one more on every claim of the saga.
    pub token: i64,
    /// The saga.
    pub saga: Fulfillment,
}

/// Claims up to `limit` sagas whose gateway call is due and that nobody holds a live claim on,
/// most overdue first, for `owner` for `ttl`, in one statement. Rows a transaction has locked
/// (a page moving the saga) are passed over.
///
/// # Errors
/// The database error, if any.
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    ttl: std::time::Duration,
    limit: i64,
) -> sqlx::Result<Vec<Claimed>> {
    let rows: Vec<(i64, sqlx::types::Json<Fulfillment>)> = sqlx::query_as(
        "UPDATE sagas s
            SET claim_owner = $1, claim_token = s.claim_token + 1,
                claim_until = clock_timestamp() + make_interval(secs => $2)
          WHERE s.order_id IN (
                SELECT order_id FROM sagas
                 WHERE due_at <= now()
                   AND (claim_until IS NULL OR claim_until < clock_timestamp())
                 ORDER BY due_at
                 LIMIT $3
                   FOR UPDATE SKIP LOCKED)
      RETURNING s.claim_token, s.data",
    )
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(token, json)| Claimed {
            token,
            saga: json.0,
        })
        .collect())
}

/// Extends `owner`'s claims `held` (order and token) by `ttl` from now, in one statement;
/// answers how many it extended (a claim taken over, or a row locked right now, is not).
///
/// # Errors
/// The database error, if any.
pub async fn renew_claims(
    pool: &PgPool,
    owner: &str,
    held: &[(OrderId, i64)],
    ttl: std::time::Duration,
) -> sqlx::Result<u64> {
    if held.is_empty() {
        return Ok(0);
    }
    let (ids, tokens): (Vec<Uuid>, Vec<i64>) = held
        .iter()
        .map(|(id, token)| (id.as_uuid(), *token))
        .unzip();
    // Rows a transaction has locked (a page moving the saga, or this worker recording an
    // answer) are passed over until the next round rather than waited for: a renewal waiting
    // while it holds other rows it renewed would close a cycle with those transactions, and
    // Postgres would break it by aborting one, perhaps a step whose call was made.
    let renewed = sqlx::query(
        "UPDATE sagas s SET claim_until = clock_timestamp() + make_interval(secs => $4)
          WHERE s.order_id IN (
                SELECT r.order_id FROM sagas r
                  JOIN unnest($2::uuid[], $3::int8[]) AS held(order_id, token)
                    ON r.order_id = held.order_id AND r.claim_token = held.token
                 WHERE r.claim_owner = $1
                   FOR UPDATE OF r SKIP LOCKED)",
    )
    .bind(owner)
    .bind(&ids)
    .bind(&tokens)
    .bind(ttl.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(renewed.rows_affected())
}

/// Lets go of a claim without recording anything (the step failed): the saga can be claimed
/// again at once. A claim taken over already is left alone.
///
/// # Errors
/// The database error, if any.
pub async fn release_claim(pool: &PgPool, order_id: OrderId, token: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE sagas SET claim_owner = NULL, claim_until = NULL
          WHERE order_id = $1 AND claim_token = $2",
    )
    .bind(order_id.as_uuid())
    .bind(token)
    .execute(pool)
    .await?;
    Ok(())
}

/// Reads the sagas of `held` (order and claim token) whose claim is still that token and locks
/// their rows until the transaction ends, in order-id order (as [`lock_many`]). A saga that is
/// gone or whose claim was taken over is left out: its answer is not recorded, the new
/// claimant asks again with the same key.
///
/// # Errors
/// As [`lock_many`].
pub async fn lock_claimed_many(
    conn: &mut PgConnection,
    held: &[(OrderId, i64)],
) -> sqlx::Result<Vec<Fulfillment>> {
    let (ids, tokens): (Vec<Uuid>, Vec<i64>) = held
        .iter()
        .map(|(id, token)| (id.as_uuid(), *token))
        .unzip();
    // The sort sits below the row locks in the plan, so rows are locked in this order.
    let rows: Vec<sqlx::types::Json<Fulfillment>> = sqlx::query_scalar(
        "SELECT s.data FROM sagas s
           JOIN unnest($1::uuid[], $2::int8[]) AS held(order_id, token)
             ON s.order_id = held.order_id AND s.claim_token = held.token
          ORDER BY s.order_id
            FOR UPDATE OF s",
    )
    .bind(&ids)
    .bind(&tokens)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|json| json.0).collect())
}

/// Writes claimed sagas back and ends their claims, in one statement, in the transaction of
/// [`lock_claimed_many`].
///
/// # Errors
/// The database error; a saga that does not serialize is reported as `sqlx::Error::Encode`.
pub async fn save_claimed_many(
    conn: &mut PgConnection,
    sagas: &[&Fulfillment],
) -> sqlx::Result<()> {
    if sagas.is_empty() {
        return Ok(());
    }
    let sql = "UPDATE sagas s
                  SET state = u.state, due_at = u.due_at, deadline = u.deadline, data = u.data,
                      updated_at = now(), claim_owner = NULL, claim_until = NULL
                 FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                             $5::jsonb[]) AS u(order_id, state, due_at, deadline, data)
                WHERE s.order_id = u.order_id";
    Columns::of(sagas)?.write(conn, sql).await
}

/// When the next gateway call can be claimed (due, and any claim on it expired), if any is
/// pending.
///
/// # Errors
/// The database error, if any.
pub async fn next_due(pool: &PgPool) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT min(greatest(due_at, coalesce(claim_until, due_at))) FROM sagas
          WHERE due_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await
}

/// One saga as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct SagaView {
    /// The order.
    pub order_id: Uuid,
    /// Overall state.
    pub state: SagaState,
    /// What it works towards.
    pub goal: Goal,
    /// Each step and its status.
    pub steps: Vec<StepView>,
    /// Where the payment is.
    pub payment: PaymentProgress,
    /// When the pending gateway call may run.
    pub due_at: Option<DateTime<Utc>>,
    /// When authorization gives up.
    pub deadline: Option<DateTime<Utc>>,
    /// The last error met.
    pub last_error: Option<String>,
    /// What happened, oldest first.
    pub history: Vec<Entry>,
    /// When the saga started.
    pub started_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// One step of a saga.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    /// `reserve_stock`, `authorize_payment` or `confirm_order`.
    pub name: &'static str,
    /// Where it is (e.g. `reserved`, `authorizing`, `voided`).
    pub status: &'static str,
}

/// A page of sagas, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct SagaPage {
    /// The sagas.
    pub items: Vec<SagaView>,
    /// Pass as `cursor` for the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

type SagaRow = (sqlx::types::Json<Fulfillment>, DateTime<Utc>, DateTime<Utc>);

fn view((data, started_at, updated_at): SagaRow) -> SagaView {
    let saga = data.0;
    SagaView {
        order_id: saga.order_id().as_uuid(),
        state: saga.state(),
        goal: saga.goal(),
        steps: saga
            .steps()
            .into_iter()
            .map(|(name, status)| StepView { name, status })
            .collect(),
        payment: saga.payment().clone(),
        due_at: saga.due(),
        deadline: saga.deadline(),
        last_error: saga.last_error().map(str::to_owned),
        history: saga.history().to_vec(),
        started_at,
        updated_at,
    }
}

/// Lists sagas, optionally in one state, newest first; `cursor` is a previous page's
/// `next_cursor`.
///
/// # Errors
/// The database error, if any.
pub async fn list(
    pool: &PgPool,
    state: Option<SagaState>,
    limit: i64,
    cursor: Option<(DateTime<Utc>, Uuid)>,
) -> sqlx::Result<SagaPage> {
    let rows: Vec<(sqlx::types::Json<Fulfillment>, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT data, started_at, updated_at FROM sagas
          WHERE ($1::text IS NULL OR state = $1)
            AND ($2::timestamptz IS NULL OR (started_at, order_id) < ($2, $3))
          ORDER BY started_at DESC, order_id DESC
          LIMIT $4",
    )
    .bind(state.map(SagaState::as_str))
    .bind(cursor.map(|c| c.0))
    .bind(cursor.map(|c| c.1))
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    let items: Vec<SagaView> = rows
        .into_iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(view)
        .collect();
    let next_cursor = if more {
        items
            .last()
            .map(|last| format!("{}_{}", last.started_at.to_rfc3339(), last.order_id))
    } else {
        None
    };
    Ok(SagaPage { items, next_cursor })
}

/// Parses a `next_cursor` of [`list`].
pub fn parse_cursor(raw: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (at, id) = raw.rsplit_once('_')?;
    Some((
        DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc),
        Uuid::parse_str(id).ok()?,
    ))
}

/// One saga, for operators.
///
/// # Errors
/// The database error, if any.
pub async fn get(pool: &PgPool, order_id: Uuid) -> sqlx::Result<Option<SagaView>> {
    let row: Option<SagaRow> =
        sqlx::query_as("SELECT data, started_at, updated_at FROM sagas WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(view))
}

/// What [`retry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retried {
    /// The saga was stuck and is due again now.
    Yes,
    /// The saga is not stuck; nothing changed.
    NotStuck,
    /// No saga for this order.
    NotFound,
}

/// An operator's retry of a stuck saga: its pending step runs again at once.
///
/// # Errors
/// The database error, if any.
pub async fn retry(pool: &PgPool, order_id: Uuid) -> sqlx::Result<Retried> {
    let mut tx = pool.begin().await?;
    let Some(mut saga) = lock_many(&mut tx, &[OrderId::from(order_id)]).await?.pop() else {
        return Ok(Retried::NotFound);
    };
    if !saga.retry(Utc::now()) {
        return Ok(Retried::NotStuck);
    }
    write_many(&mut tx, &[&saga]).await?;
    tx.commit().await?;
    Ok(Retried::Yes)
}

/// Sagas by state, for every state but `completed`: live work only, so the count walks the
/// `sagas_state` index over the sagas still in flight, never the whole history. (Finished work
/// is what the log and the consumers' applied counts already tell.) Public so that tests can
/// check its plan on a large table.
pub const LIVE_SQL: &str = "SELECT state, count(*) FROM sagas
  WHERE state IN ('running', 'compensating', 'confirmed', 'settling', 'stuck')
  GROUP BY state ORDER BY state";

/// How many sagas are in flight, by state (for `/metrics`).
///
/// # Errors
/// The database error, if any.
pub async fn count_live(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(LIVE_SQL).fetch_all(pool).await
}
