use aggregates::inventory::{Product, ProductCommand, ProductEvent};
use aggregates::values::{Quantity, Reason};
use cqrs_es::persist::{PersistedEventRepository, SerializedEvent};
use cqrs_es::DomainEvent;
use event_store::store::LoadMany;
use event_store::unit_of_work::UnitOfWork;
use event_store::{EventStore, Metadata, StoreError};
use postgres_es::PostgresEventRepository;
use testkit::TestApp;
use uuid::Uuid;

fn metadata() -> Metadata {
    Metadata {
        correlation_id: Uuid::new_v4(),
        causation_id: Uuid::new_v4(),
        actor_sub: "test".into(),
        actor_role: "admin".into(),
        request_id: "t".into(),
    }
}

async fn restock(store: &EventStore, sku: &str, n: i64) {
    let loaded = store.load::<Product>(sku).await.unwrap();
    let command = ProductCommand::Restock {
        quantity: Quantity::parse(n).unwrap(),
        note: None,
    };
    let events = loaded.aggregate.decide(command).unwrap();
    let mut after = loaded.aggregate.clone();
    events.iter().cloned().for_each(|e| after.apply_event(e));
    let mut tx = event_store::locks::begin_writer(store.pool())
        .await
        .unwrap();
    EventStore::append(&mut tx, sku, &loaded, &after, &events, &metadata())
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_snapshot_plus_newer_events_loads_the_same_state_as_the_whole_log() {
    let app = TestApp::spawn().await;
    app.register_product("S", 1, 0).await;
    let store = EventStore::new(app.pool.clone());
    for n in 1..=45 {
        restock(&store, "S", n).await;
    }
    let (snapshot_at,): (i64,) =
        sqlx::query_as("SELECT last_sequence FROM snapshots WHERE aggregate_id = 'S'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(snapshot_at, 40);
    let loaded = store.load::<Product>("S").await.unwrap();
    assert_eq!(loaded.version, 46);
    let mut folded = Product::default();
    let repository = PostgresEventRepository::new(app.pool.clone());
    for event in repository.get_events::<Product>("S").await.unwrap() {
        folded.apply_event(serde_json::from_value(event.payload).unwrap());
    }
    assert_eq!(loaded.aggregate, folded);
    assert_eq!(folded.on_hand(), (1..=45).sum::<u64>());
}

#[tokio::test]
async fn appending_after_a_stale_load_is_a_conflict() {
    let app = TestApp::spawn().await;
    app.register_product("S", 1, 0).await;
    let store = EventStore::new(app.pool.clone());
    let stale = store.load::<Product>("S").await.unwrap();
    restock(&store, "S", 1).await;
    let event = ProductEvent::StockAdjusted {
        delta: 1,
        reason: Reason::parse("count").unwrap(),
    };
    let mut tx = event_store::locks::begin_writer(&app.pool).await.unwrap();
    let result = EventStore::append(
        &mut tx,
        "S",
        &stale,
        &stale.aggregate,
        &[event],
        &metadata(),
    )
    .await;
    assert!(matches!(result, Err(StoreError::Conflict)));
}

#[tokio::test]
async fn a_writer_that_did_not_announce_itself_is_refused_and_postgres_es_still_reads() {
    let app = TestApp::spawn().await;
    let repository = PostgresEventRepository::new(app.pool.clone());
    let event = ProductEvent::Restocked {
        quantity: Quantity::parse(3).unwrap(),
        note: None,
    };
    app.register_product("S", 1, 0).await;
    let serialized = SerializedEvent::new(
        "S".into(),
        2,
        "inventory".into(),
        event.event_type(),
        event.event_version(),
        serde_json::to_value(&event).unwrap(),
        serde_json::json!({}),
    );
    // postgres-es opens its own transaction and cannot take the writer lock: readers of the
    // log could pass over such a transaction, so the table refuses its insert.
    let refused = repository.persist::<Product>(&[serialized], None).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("writer lock")),
        "{refused:?}"
    );
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    sqlx::query("CREATE TEMP TABLE has_an_id (x int)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let late = event_store::locks::announce_writer(&mut tx).await;
    assert!(
        late.as_ref()
            .is_err_and(|e| e.to_string().contains("too late")),
        "announcing after the first write is refused: {late:?}"
    );
    tx.rollback().await.unwrap();
    // Reading through postgres-es still works on the extended table.
    let events = repository.get_events::<Product>("S").await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "ProductRegistered");
}

#[tokio::test]
async fn a_unit_of_work_writes_many_streams_at_once_in_the_order_it_decided() {
    let app = TestApp::spawn_with(orderline::Parts::NONE).await;
    app.register_product("A", 1, 0).await;
    app.register_product("B", 1, 0).await;
    let mut tx = event_store::locks::begin_writer(&app.pool).await.unwrap();
    let mut unit = UnitOfWork::new();
    let mut wanted = LoadMany::new();
    wanted.add::<Product>(&["B", "A"]);
    unit.prefetch(&mut tx, &wanted).await.unwrap();
    let restock = |n: i64| ProductCommand::Restock {
        quantity: Quantity::parse(n).unwrap(),
        note: None,
    };
    let mut decided = Vec::new();
    for n in 1..=45 {
        unit.execute::<Product>(&mut tx, "A", restock(n), &metadata())
            .await
            .unwrap()
            .unwrap();
        decided.push("A");
        if n % 3 == 0 {
            unit.execute::<Product>(&mut tx, "B", restock(n), &metadata())
                .await
                .unwrap()
                .unwrap();
            decided.push("B");
        }
    }
    // Staged, not written: the log still holds the two registrations only.
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(count, 2);
    unit.flush(&mut tx).await.unwrap();
    tx.commit().await.unwrap();

    // In the log in the order decided, each stream in sequence order without a gap.
    let written: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, sequence FROM events WHERE sequence > 1 ORDER BY position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        written
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        decided
    );
    for sku in ["A", "B"] {
        let sequences: Vec<i64> = written
            .iter()
            .filter(|(id, _)| id == sku)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            sequences,
            (2..2 + sequences.len() as i64).collect::<Vec<_>>()
        );
    }
    // A crossed two snapshot points in the one batch: only the newer snapshot is written.
    let snapshots: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, last_sequence FROM snapshots ORDER BY 1")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(snapshots, vec![("A".to_owned(), 40)]);
    let store = EventStore::new(app.pool.clone());
    let a = store.load::<Product>("A").await.unwrap();
    assert_eq!(
        (a.version, a.aggregate.on_hand()),
        (46, (1..=45).sum::<u64>())
    );
    let b = store.load::<Product>("B").await.unwrap();
    assert_eq!(
        (b.version, b.aggregate.on_hand()),
        (16, (1..=15).map(|n| n * 3).sum::<u64>())
    );
    // The hash chain runs through the batch.
    assert!(audit::verify::verify(&app.pool, &|_| {})
        .await
        .unwrap()
        .is_ok());
}
