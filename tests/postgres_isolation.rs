//! PostgreSQL servers that do not run `begin` the way the default does: a
//! stricter default isolation, under which racing first uses fail with
//! serialization errors, and a `lock_timeout`, under which a takeover
//! waiting on a busy row gives up. Either way one request holds the key,
//! every other is told it is in flight, and none runs beside it, even
//! with `StoreFailure::FailOpen`.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::time::Duration;

use common::{app, post, send, unique_key, Counter};
use http::StatusCode;
use tower_idempotency::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, PostgresStore},
    IdempotencyLayer, Store, StoreFailure,
};

/// A store on a fresh database whose sessions start with `setting`.
async fn store_where(purpose: &str, setting: &str) -> (PostgresStore, sqlx::PgPool) {
    let database = postgres::fresh_database(purpose).await;
    let admin = sqlx::PgPool::connect(&database).await.unwrap();
    let name: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&admin)
        .await
        .unwrap();
    sqlx::raw_sql(&format!("ALTER DATABASE {name} SET {setting}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&database)
        .await
        .unwrap();
    let store = PostgresStore::new(pool.clone());
    store.migrate().await.unwrap();
    (store, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_first_uses_under_serializable_isolation_take_each_key_once() {
    let (store, _pool) = store_where(
        "serializable",
        "default_transaction_isolation = 'serializable'",
    )
    .await;
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    for round in 0..10 {
        let key = RecordKey::new(b"", &unique_key("raced"));
        let racers: Vec<_> = (0..16)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .begin(&key, &fingerprint, Duration::from_secs(60))
                        .await
                })
            })
            .collect();
        let mut acquired = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Ok(BeginOutcome::Acquired(_)) => acquired += 1,
                Ok(BeginOutcome::InFlight) => {}
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(acquired, 1, "round {round}");
    }
}

/// A fenced key whose lease ran out, with its row locked by a transaction
/// that has not ended (a stalled holder's `fence_in`): the retry's takeover
/// waits on the row until `lock_timeout`, and is then answered 409 without
/// running, even failing open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_gives_up_waiting_on_the_row_is_answered_in_flight() {
    let (store, pool) = store_where("lock_timeout", "lock_timeout = '200ms'").await;
    let key = unique_key("stalled");
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(store).with_store_failure(StoreFailure::FailOpen);
    let svc = app(&layer, counter.handler(Duration::ZERO));
    // The first request runs; its record is then turned back into a fenced
    // lock whose lease has run out, as a holder that stalled leaves it.
    assert_eq!(
        send(&svc, post("/payments", Some(&key), "{}"))
            .await
            .status(),
        StatusCode::CREATED
    );
    sqlx::raw_sql(
        "UPDATE idempotency_records SET state = 0, effect = TRUE, response = NULL,
                lease_until = now() - interval '1 second'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::raw_sql("SELECT 1 FROM idempotency_records FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let retry = send(&svc, post("/payments", Some(&key), "{}")).await;
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert_eq!(counter.runs(), 1, "the retry never runs beside the holder");
    holder.rollback().await.unwrap();
}
