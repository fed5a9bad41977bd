//! Partition leases under random process joins, graceful leaves, kills (`kill -9`-like aborts
//! that release nothing) and freezes (SIGSTOP-like: no renewals, pages stopped just before
//! their lock, for longer than the lease), with short leases so that takeovers happen all the
//! time.
//! Every page a consumer commits records, from inside its transaction, the lease it committed
//! under (the partition row's owner and fencing token, which the page's lock checked).
//! Afterwards: each event was applied exactly once, each partition's commits carry
//! non-decreasing tokens (no stale owner committed after a takeover), and each token belonged
//! to one owner only: at any time at most one owner could commit in a partition.

use std::sync::Arc;
use std::time::Duration;

use event_log::subscription::{Consumer, ConsumerError, RunnerConfig, Subscriptions};
use event_log::LogEvent;
use orderline::Parts;
use proptest::prelude::*;
use sqlx::PgConnection;
use testkit::TestApp;

const CONSUMER: &str = "lease-recorder";
const PARTITIONS: u32 = 16;

/// Records each event it applies with the lease its page's transaction holds.
struct Recorder;

#[async_trait::async_trait]
impl Consumer for Recorder {
    fn name(&self) -> &str {
        CONSUMER
    }

    async fn apply(&self, tx: &mut PgConnection, events: &[LogEvent]) -> Result<(), ConsumerError> {
        // A page may hold several partitions' events (a group's page); each is recorded with
        // its own partition's lease.
        let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
        let partitions = events
            .iter()
            .map(|e| i32::try_from(e.partition(PARTITIONS)))
            .collect::<Result<Vec<i32>, _>>()?;
        // The runner checks each partition's row (and its token) in the page's transaction
        // after this and commits only if it still holds it, so what a row holds now is the
        // lease its partition's events commit under, or the page does not commit.
        sqlx::query(
            "INSERT INTO lease_record (position, partition, owner, token)
             SELECT e.position, c.partition, c.owner, c.fencing_token
               FROM unnest($1::int8[], $2::int4[]) AS e(position, partition)
               JOIN checkpoints c ON c.consumer = $3 AND c.partition = e.partition",
        )
        .bind(&positions)
        .bind(&partitions)
        .bind(CONSUMER)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// One step of a random schedule.
#[derive(Debug, Clone)]
enum Op {
    /// A new process starts following the log.
    Join,
    /// The process at this index (modulo the live ones) shuts down, releasing its leases.
    Leave(usize),
    /// The process at this index is killed: no page finishes, no lease is released.
    Kill(usize),
    /// The process at this index freezes for this long (milliseconds, longer than the lease
    /// and shorter than the idle-transaction limit of three leases), then wakes with its
    /// pages in hand.
    Freeze(usize, u16),
    /// This many events are appended, over 24 keys.
    Write(u8),
    /// Time passes (milliseconds).
    Wait(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        1 => any::<usize>().prop_map(Op::Leave),
        2 => any::<usize>().prop_map(Op::Kill),
        3 => (any::<usize>(), 700u16..1500).prop_map(|(i, ms)| Op::Freeze(i, ms)),
        4 => (1u8..40).prop_map(Op::Write),
        2 => (50u16..1500).prop_map(Op::Wait),
    ]
}

fn config(owner: String) -> RunnerConfig {
    RunnerConfig {
        batch_size: 7,
        poll_interval: Duration::from_millis(50),
        lease_retry: Duration::from_millis(100),
        lease_ttl: Duration::from_millis(600),
        partitions: PARTITIONS,
        owner,
        ..RunnerConfig::default()
    }
}

async fn write(app: &TestApp, n: u8, written: &mut u64) {
    let mut tx = event_store::locks::begin_writer(&app.pool).await.unwrap();
    for _ in 0..n {
        *written += 1;
        let key = format!("k{}", *written % 24);
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'lease-test', $1, coalesce(max(sequence), 0) + 1, 'Ticked', '1', '{}', '{}'
               FROM events WHERE aggregate_type = 'lease-test' AND aggregate_id = $1",
        )
        .bind(&key)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

async fn run(ops: Vec<Op>) {
    let app = TestApp::spawn_with(Parts {
        api: true,
        ..Parts::NONE
    })
    .await;
    sqlx::raw_sql(
        "CREATE TABLE lease_record (position bigint NOT NULL, partition int NOT NULL,
                                    owner text, token bigint NOT NULL)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let recorder: Arc<dyn Consumer> = Arc::new(Recorder);
    let mut live: Vec<Subscriptions> = Vec::new();
    let mut started = 0;
    let mut written = 0u64;
    let mut join = |live: &mut Vec<Subscriptions>| {
        started += 1;
        let subs = Subscriptions::spawn(
            &app.pool,
            vec![recorder.clone()],
            &config(format!("p{started}")),
        );
        live.push(subs);
    };
    for op in ops {
        match op {
            Op::Join => join(&mut live),
            Op::Leave(i) if !live.is_empty() => {
                let n = live.len();
                live.swap_remove(i % n).shutdown().await;
            }
            Op::Kill(i) if !live.is_empty() => {
                let n = live.len();
                live.swap_remove(i % n).abort();
            }
            Op::Freeze(i, ms) if !live.is_empty() => {
                let n = live.len();
                live[i % n].freeze(Duration::from_millis(u64::from(ms)));
            }
            Op::Leave(_) | Op::Kill(_) | Op::Freeze(..) => {}
            Op::Write(n) => write(&app, n, &mut written).await,
            Op::Wait(ms) => tokio::time::sleep(Duration::from_millis(u64::from(ms))).await,
        }
    }
    // One process left (or started) applies the rest: killed holders' leases expire first.
    if live.is_empty() {
        join(&mut live);
    }
    let events = i64::try_from(written).unwrap();
    for _ in 0..400 {
        let recorded: i64 = sqlx::query_scalar("SELECT count(DISTINCT position) FROM lease_record")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if recorded == events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for subs in live {
        subs.shutdown().await;
    }

    let (recorded, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT position) FROM lease_record")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(distinct, events, "every event applied");
    assert_eq!(recorded, events, "no event applied twice");
    let stale: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, position, token FROM (
            SELECT partition, position, token,
                   max(token) OVER (PARTITION BY partition ORDER BY e.transaction_id, e.position
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
              FROM lease_record r JOIN events e USING (position)) AS t
          WHERE token < before",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(stale, [], "a commit under an older token after a newer one");
    let shared: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, token, count(DISTINCT owner) FROM lease_record
          GROUP BY partition, token HAVING count(DISTINCT owner) > 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(shared, [], "one token held by two owners");
    let counted: i64 = sqlx::query_scalar(
        "SELECT sum(events_applied)::bigint FROM checkpoints WHERE consumer = $1",
    )
    .bind(CONSUMER)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(counted, events, "the checkpoints counted each event once");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Random joins, leaves and kills while events arrive: each event applied once, and per
    /// partition one committing owner at a time.
    #[test]
    fn at_most_one_owner_commits_in_a_partition_whatever_processes_join_leave_or_die(
        ops in prop::collection::vec(op(), 8..20)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // The first process is there from the start, so that most of the schedule has
        // partitions to hand over.
        let ops: Vec<Op> = std::iter::once(Op::Join).chain(ops).collect();
        runtime.block_on(run(ops));
    }
}
