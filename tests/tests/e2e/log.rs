//! The global log and the checkpointed consumers: no skip behind an open transaction, one
//! applier per projection across processes, takeover, and read models equal to the log's fold
//! under random interleavings of commands.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use aggregates::inventory::{Product, ProductCommand};
use aggregates::order::{Order, OrderCommand, OrderLine, RejectionReason};
use aggregates::payment::{AttemptOutcome, Payment, PaymentCommand};
use aggregates::values::{
    Currency, CustomerId, Money, OrderId, PaymentToken, Quantity, Reason, Sku,
};
use event_store::{EventStore, Metadata};
use futures::future::join_all;
use orderline::Parts;
use proptest::prelude::*;
use sqlx::Connection;
use testkit::{json_body, TestApp};
use uuid::Uuid;

fn quantity(n: i64) -> Quantity {
    Quantity::parse(n).unwrap()
}

fn restock(n: i64) -> ProductCommand {
    ProductCommand::Restock {
        quantity: quantity(n),
        note: None,
    }
}

/// Every consumer applied every event exactly once.
async fn applied_once(app: &TestApp) {
    app.assert_applied_once(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_open_transaction_stalls_projections_and_never_makes_them_skip() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("SLOW", 1, 0).await;
    for w in 0..8 {
        app.register_product(&format!("W{w}"), 3, 1_000_000).await;
    }
    let store = EventStore::new(app.pool.clone());
    for round in 0..3 {
        // A transaction appends one event and stays open for seconds.
        let loaded = store.load::<Product>("SLOW").await.unwrap();
        let events = loaded.aggregate.decide(restock(1)).unwrap();
        let mut after = loaded.aggregate.clone();
        events.iter().cloned().for_each(|e| after.apply_event(e));
        let mut slow = app.pool.begin().await.unwrap();
        event_store::locks::announce_writer(&mut slow)
            .await
            .unwrap();
        let metadata = Metadata {
            correlation_id: Uuid::new_v4(),
            causation_id: Uuid::new_v4(),
            actor_sub: "slow".into(),
            actor_role: "admin".into(),
            request_id: format!("slow-{round}"),
        };
        EventStore::append(&mut slow, "SLOW", &loaded, &after, &events, &metadata)
            .await
            .unwrap();
        let slow_xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
            .fetch_one(&mut *slow)
            .await
            .unwrap();

        // Meanwhile 8 writers commit hundreds of events.
        join_all((0..8).map(|w| {
            let app = &app;
            async move {
                for i in 0..30 {
                    app.execute::<Product>(&format!("W{w}"), restock(1))
                        .await
                        .unwrap();
                    if i % 10 == 0 {
                        app.place_order(&format!("c{w}"), &[(&format!("W{w}"), 1)])
                            .await;
                    }
                }
            }
        }))
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // No projection went past the open transaction.
        let passed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM checkpoints WHERE transaction_id::text::bigint >= $1",
        )
        .bind(slow_xid)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(
            passed, 0,
            "round {round}: a projection passed an open transaction"
        );

        slow.commit().await.unwrap();
        app.caught_up().await;
        app.assert_read_models_match_log().await;
        let on_hand: i64 =
            sqlx::query_scalar("SELECT on_hand FROM rm_inventory WHERE sku = 'SLOW'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(
            on_hand,
            round + 1,
            "round {round}: the slow event was skipped"
        );
    }
    applied_once(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_apply_each_projection_once_and_take_over_from_each_other() {
    let app = TestApp::spawn_with(Parts {
        api: true,
        ..Parts::NONE
    })
    .await;
    let projections_only = Parts {
        projections: true,
        ..Parts::NONE
    };
    app.register_product("A", 1, 1_000_000).await;
    let first = app.spawn_process(projections_only).await;
    app.caught_up().await;
    let second = app.spawn_process(projections_only).await;
    let writes = |n: usize| {
        let app = &app;
        async move {
            join_all((0..n).map(|i| async move {
                app.place_order(&format!("c{}", i % 5), &[("A", 1)]).await;
                app.restock("A", 1).await;
            }))
            .await;
        }
    };
    writes(40).await;
    app.caught_up().await;
    // The first process held every lease; when it stops, the second takes over.
    first.stop().await;
    writes(40).await;
    app.caught_up().await;
    second.stop().await;
    app.assert_read_models_match_log().await;
    applied_once(&app).await;
}

/// One step of a random history, on a few SKUs and orders.
#[derive(Debug, Clone)]
enum Step {
    Register(u8),
    Restock(u8, i64),
    Adjust(u8, i64),
    Place(u8, Vec<(u8, i64)>),
    Confirm(u8),
    Reject(u8),
    Cancel(u8),
    Ship(u8),
    Reserve(u8, u8, i64),
    Release(u8, u8),
    Commit(u8, u8),
    RequestPayment(u8, i64),
    Attempt(u8, u8, u8),
    Capture(u8, i64),
    Void(u8),
    Refund(u8, i64),
}

fn step() -> impl Strategy<Value = Step> {
    let sku = 0u8..3;
    let order = 0u8..4;
    prop_oneof![
        sku.clone().prop_map(Step::Register),
        (sku.clone(), 1i64..20).prop_map(|(s, n)| Step::Restock(s, n)),
        (sku.clone(), -10i64..10).prop_map(|(s, n)| Step::Adjust(s, n)),
        (
            order.clone(),
            prop::collection::vec((sku.clone(), 1i64..5), 1..3)
        )
            .prop_map(|(o, lines)| Step::Place(o, lines)),
        order.clone().prop_map(Step::Confirm),
        order.clone().prop_map(Step::Reject),
        order.clone().prop_map(Step::Cancel),
        order.clone().prop_map(Step::Ship),
        (sku.clone(), order.clone(), 1i64..6).prop_map(|(s, o, n)| Step::Reserve(s, o, n)),
        (sku.clone(), order.clone()).prop_map(|(s, o)| Step::Release(s, o)),
        (sku, order.clone()).prop_map(|(s, o)| Step::Commit(s, o)),
        (order.clone(), 1i64..500).prop_map(|(o, a)| Step::RequestPayment(o, a)),
        (order.clone(), 0u8..4, 0u8..4).prop_map(|(o, n, k)| Step::Attempt(o, n, k)),
        (order.clone(), 1i64..300).prop_map(|(o, a)| Step::Capture(o, a)),
        order.clone().prop_map(Step::Void),
        (order, 1i64..300).prop_map(|(o, a)| Step::Refund(o, a)),
    ]
}

fn order_id(case: Uuid, o: u8) -> OrderId {
    OrderId::from(Uuid::new_v5(&case, &[o]))
}

fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::parse("EUR").unwrap()).unwrap()
}

/// Runs one step; refusals are part of a random history and change nothing.
async fn run(app: &TestApp, case: Uuid, step: Step) {
    let sku = |s: u8| format!("P{s}");
    let id = |o: u8| order_id(case, o);
    let order = |o: u8| id(o).to_string();
    let _ = match step {
        Step::Register(s) => app
            .register_product(&sku(s), 100, 5)
            .await
            .status()
            .is_success()
            .then_some(())
            .ok_or(()),
        Step::Restock(s, n) => app
            .execute::<Product>(&sku(s), restock(n))
            .await
            .map_err(drop),
        Step::Adjust(s, delta) => app
            .execute::<Product>(
                &sku(s),
                ProductCommand::Adjust {
                    delta,
                    reason: Reason::parse("count").unwrap(),
                },
            )
            .await
            .map_err(drop),
        Step::Place(o, lines) => {
            let lines = lines
                .into_iter()
                .map(|(s, n)| OrderLine {
                    sku: Sku::parse(&sku(s)).unwrap(),
                    quantity: quantity(n),
                    unit_price: eur(100),
                })
                .collect();
            let place = OrderCommand::Place {
                order_id: id(o),
                customer_id: CustomerId::parse(&format!("c{}", o % 2)).unwrap(),
                lines,
                payment_token: PaymentToken::parse("tok_visa").unwrap(),
                shipping_address: None,
            };
            app.execute::<Order>(&order(o), place).await.map_err(drop)
        }
        Step::Confirm(o) => app
            .execute::<Order>(&order(o), OrderCommand::Confirm)
            .await
            .map_err(drop),
        Step::Reject(o) => app
            .execute::<Order>(
                &order(o),
                OrderCommand::Reject {
                    reason: RejectionReason::OutOfStock,
                },
            )
            .await
            .map_err(drop),
        Step::Cancel(o) => app
            .execute::<Order>(&order(o), OrderCommand::Cancel { reason: None })
            .await
            .map_err(drop),
        Step::Ship(o) => app
            .execute::<Order>(
                &order(o),
                OrderCommand::Ship {
                    carrier: None,
                    tracking: None,
                },
            )
            .await
            .map_err(drop),
        Step::Reserve(s, o, n) => app
            .execute::<Product>(
                &sku(s),
                ProductCommand::Reserve {
                    order_id: id(o),
                    quantity: quantity(n),
                },
            )
            .await
            .map_err(drop),
        Step::Release(s, o) => app
            .execute::<Product>(&sku(s), ProductCommand::Release { order_id: id(o) })
            .await
            .map_err(drop),
        Step::Commit(s, o) => app
            .execute::<Product>(
                &sku(s),
                ProductCommand::CommitReservation { order_id: id(o) },
            )
            .await
            .map_err(drop),
        Step::RequestPayment(o, amount) => app
            .execute::<Payment>(
                &order(o),
                PaymentCommand::Request {
                    order_id: id(o),
                    amount: eur(amount),
                    token: PaymentToken::parse("tok_visa").unwrap(),
                },
            )
            .await
            .map_err(drop),
        Step::Attempt(o, n, kind) => {
            let outcome = match kind {
                0 => AttemptOutcome::Authorized {
                    provider_reference: format!("ref-{n}"),
                },
                1 => AttemptOutcome::Declined {
                    reason: "insufficient funds".into(),
                },
                2 => AttemptOutcome::Failed {
                    error: "timeout".into(),
                    retryable: true,
                },
                _ => AttemptOutcome::Failed {
                    error: "card blocked".into(),
                    retryable: false,
                },
            };
            app.execute::<Payment>(
                &order(o),
                PaymentCommand::RecordAttempt {
                    attempt_id: format!("a{n}"),
                    outcome,
                },
            )
            .await
            .map_err(drop)
        }
        Step::Capture(o, a) => app
            .execute::<Payment>(&order(o), PaymentCommand::Capture { amount: eur(a) })
            .await
            .map_err(drop),
        Step::Void(o) => app
            .execute::<Payment>(&order(o), PaymentCommand::Void)
            .await
            .map_err(drop),
        Step::Refund(o, a) => app
            .execute::<Payment>(&order(o), PaymentCommand::Refund { amount: eur(a) })
            .await
            .map_err(drop),
    };
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Three clients run random histories at once; afterwards every read model equals the
    /// fold of the log, and every event was applied once.
    #[test]
    fn read_models_equal_the_fold_of_the_log_for_random_interleavings(
        histories in prop::collection::vec(prop::collection::vec(step(), 5..25), 3)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let app = TestApp::spawn_without_sagas().await;
            let case = Uuid::new_v4();
            for s in 0..3 {
                run(&app, case, Step::Register(s)).await;
            }
            join_all(histories.into_iter().map(|history| {
                let app = &app;
                async move {
                    for step in history {
                        run(app, case, step).await;
                    }
                }
            }))
            .await;
            app.caught_up().await;
            app.assert_read_models_match_log().await;
            applied_once(&app).await;
        });
    }
}

#[tokio::test]
async fn a_lease_taken_over_fences_off_its_old_holder() {
    use event_log::checkpoints::{self, Claim, Held};
    let app = TestApp::spawn_with(Parts {
        api: true,
        ..Parts::NONE
    })
    .await;
    let name = "fencing-test";
    let ttl = Duration::from_secs(60);
    let partitions = 16;
    let mut conn = app.pool.acquire().await.unwrap();
    checkpoints::ensure(&mut conn, name, "test", partitions)
        .await
        .unwrap();
    let taken = checkpoints::acquire(&mut conn, name, "a", ttl, partitions, Claim::Free(1))
        .await
        .unwrap();
    let [a] = taken[..] else {
        panic!("one free partition is taken: {taken:?}")
    };
    assert_eq!(a.partition, 0, "the lowest free partition first");
    let rest = checkpoints::acquire(&mut conn, name, "b", ttl, partitions, Claim::Free(16))
        .await
        .unwrap();
    assert_eq!(rest.len(), 15, "a running lease is not taken: {rest:?}");
    assert!(rest.iter().all(|l| l.partition != 0));
    assert_eq!(
        checkpoints::renew(&mut conn, name, &[a], ttl)
            .await
            .unwrap(),
        [a]
    );

    // `a` freezes: its lease runs out, and `b` takes it with a higher token.
    sqlx::query(
        "UPDATE checkpoints SET lease_until = now() - interval '1 second'
          WHERE consumer = $1 AND partition = 0",
    )
    .bind(name)
    .execute(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        checkpoints::acquire(&mut conn, name, "c", ttl, partitions, Claim::Free(16))
            .await
            .unwrap(),
        [],
        "an expired lease is not free"
    );
    let taken = checkpoints::acquire(&mut conn, name, "b", ttl, partitions, Claim::Expired)
        .await
        .unwrap();
    let [b] = taken[..] else {
        panic!("the expired partition is taken: {taken:?}")
    };
    assert_eq!(b.partition, 0);
    assert!(b.token > a.token);

    // `a` wakes with a page in hand: it can neither commit it nor renew.
    let mut stale = app.pool.begin().await.unwrap();
    let (at, parked) = checkpoints::read(&mut stale, name, 0).await.unwrap();
    assert_eq!(
        checkpoints::lock_if_at(&mut stale, name, at, a, parked)
            .await
            .unwrap(),
        Held::Fenced
    );
    stale.rollback().await.unwrap();
    assert_eq!(
        checkpoints::renew(&mut conn, name, &[a], ttl)
            .await
            .unwrap(),
        []
    );
    checkpoints::release(&mut conn, name, &[a]).await.unwrap();
    let mut fresh = app.pool.begin().await.unwrap();
    assert_eq!(
        checkpoints::lock_if_at(&mut fresh, name, at, b, parked)
            .await
            .unwrap(),
        Held::Ours,
        "the old holder's release does not free the new holder's lease"
    );
    fresh.rollback().await.unwrap();

    // A released lease is taken at once, again with a higher token.
    checkpoints::release(&mut conn, name, &[b]).await.unwrap();
    assert_eq!(
        checkpoints::acquire(&mut conn, name, "c", ttl, 32, Claim::Free(16))
            .await
            .unwrap(),
        [],
        "a process with another partition count takes nothing"
    );
    let taken = checkpoints::acquire(&mut conn, name, "c", ttl, partitions, Claim::Free(16))
        .await
        .unwrap();
    let [c] = taken[..] else {
        panic!("the released partition is taken: {taken:?}")
    };
    assert!(c.token > b.token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactions_that_never_write_events_do_not_hold_consumers_back() {
    let app = TestApp::spawn_without_sagas().await;
    app.register_product("A", 1, 5).await;
    app.caught_up().await;
    // An idle transaction with an id in another database of the same server, and one in this
    // database that writes something else: neither can ever append events.
    let mut elsewhere = sqlx::PgConnection::connect(&testkit::database::server_url())
        .await
        .unwrap();
    let mut idle = elsewhere.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *idle)
        .await
        .unwrap();
    let mut here = app.pool.begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE scratch (x int)")
        .execute(&mut *here)
        .await
        .unwrap();
    let held: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *here)
        .await
        .unwrap();
    for n in 0..5 {
        app.register_product(&format!("B{n}"), 1, 5).await;
    }
    // Every consumer applies what was written after them, while both stay open.
    app.caught_up().await;
    let passed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM checkpoints WHERE transaction_id::text::bigint > $1",
    )
    .bind(held)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(passed > 0, "no consumer went past the idle transactions");
    let products = json_body(app.get("/api/v1/products", &app.admin()).await).await;
    assert_eq!(products["items"].as_array().map(Vec::len), Some(6));
    here.rollback().await.unwrap();
    idle.rollback().await.unwrap();
}

/// For `seconds`: writers on eight connections commit one-event transactions as fast as they
/// can, each also updating one hot row, while two sessions that never write events update the
/// same row in a loop (so they keep waiting for writers' transactions, as a lease renewal waits
/// for a page holding its checkpoint row). Answers how many events were written.
async fn race_writers(app: &TestApp, seconds: u64) -> usize {
    sqlx::raw_sql("CREATE TABLE race_hot (n bigint NOT NULL); INSERT INTO race_hot VALUES (0)")
        .execute(&app.pool)
        .await
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(seconds);
    let bystanders = join_all((0..2).map(|_| {
        let pool = app.pool.clone();
        async move {
            while std::time::Instant::now() < until {
                sqlx::query("UPDATE race_hot SET n = n + 1")
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
    }));
    let writers = join_all((0..8).map(|w| {
        let pool = app.pool.clone();
        async move {
            let mut n = 0;
            while std::time::Instant::now() < until {
                let mut tx = event_store::locks::begin_writer(&pool).await.unwrap();
                sqlx::query(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                     VALUES ('race', $1, 1, 'Ticked', '1', '{}', '{}')",
                )
                .bind(format!("w{w}-{n}"))
                .execute(&mut *tx)
                .await
                .unwrap();
                if n % 4 == 0 {
                    sqlx::query("UPDATE race_hot SET n = n + 1")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                n += 1;
            }
            n
        }
    }));
    let (written, ()) = tokio::join!(writers, async {
        bystanders.await;
    });
    written.into_iter().sum()
}

/// Follows one partition as a worker does (pages after the cursor; when none, the tail: an
/// idle partition moves its cursor past other partitions' events) until `done` and caught up;
/// answers the positions it read.
async fn race_reader(app: &TestApp, partition: u32, done: &AtomicBool) -> Vec<i64> {
    use event_log::reader::{self, Tail};
    let mut conn = app.pool.acquire().await.unwrap();
    let mut cursor = event_log::Cursor::default();
    let mut seen = Vec::new();
    let mut quiet = 0;
    while quiet < 20 {
        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
        let page = reader::read_partition(&mut conn, 16, partition, cursor, 100)
            .await
            .unwrap();
        if let Some(last) = page.last() {
            cursor = last.cursor();
            seen.extend(page.iter().map(|e| e.position));
            continue;
        }
        match reader::partition_tail(&mut conn, 16, partition, cursor)
            .await
            .unwrap()
        {
            Tail::Nothing {
                passed: Some(passed),
            } => cursor = passed,
            Tail::Nothing { passed: None } if finished => quiet += 1,
            _ => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_racing_many_short_writers_never_pass_an_event() {
    let app = TestApp::spawn_with(Parts {
        api: true,
        ..Parts::NONE
    })
    .await;
    let done = AtomicBool::new(false);
    let app = &app;
    let done = &done;
    let writing = async {
        let n = race_writers(app, 6).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        n
    };
    // Four of the sixteen partitions, a connection each beside the writers' and bystanders'.
    let reading = join_all((0..4).map(|p| race_reader(app, p, done)));
    let (written, seen) = tokio::join!(writing, reading);
    let mut all: Vec<i64> = seen.into_iter().flatten().collect();
    all.sort_unstable();
    let read = all.len();
    all.dedup();
    assert_eq!(all.len(), read, "an event was read twice");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(usize::try_from(total).unwrap(), written);
    let logged: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM events WHERE (key_hash & 15) < 4 ORDER BY position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let missed: Vec<&i64> = logged
        .iter()
        .filter(|p| all.binary_search(p).is_err())
        .collect();
    assert!(
        missed.is_empty(),
        "{} of {} events were passed over: {:?}",
        missed.len(),
        logged.len(),
        &missed[..missed.len().min(10)]
    );
}
