//! Migrations on PostgreSQL: replicas that start together on a fresh
//! database each create the store's table and function or find them made,
//! and none crashes; a table an earlier build made is brought up to date.
#![cfg(feature = "postgres")]

#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/process.rs"]
mod process;

use std::sync::{Arc, Barrier};

const ROUNDS: usize = 20;
const REPLICAS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_on_a_fresh_database_all_start() {
    for round in 0..ROUNDS {
        let database = postgres::fresh_database("start_together").await;
        let barrier = Arc::new(Barrier::new(REPLICAS));
        let starts: Vec<_> = (0..REPLICAS)
            .map(|_| {
                let (database, barrier) = (database.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    // Panics if the replica exits before it listens.
                    process::start("payments", &[("IDEMPOTENCY_STORE", &database)])
                })
            })
            .collect();
        let replicas: Vec<_> = starts
            .into_iter()
            .map(|start| {
                start
                    .join()
                    .unwrap_or_else(|_| panic!("a replica crashed in round {round}"))
            })
            .collect();
        let client = reqwest::Client::new();
        for replica in &replicas {
            let listed = client
                .get(format!("{}/payments", replica.base))
                .send()
                .await
                .unwrap();
            assert_eq!(listed.status(), 200, "round {round}");
        }
    }
}

#[tokio::test]
async fn concurrent_migrations_of_one_store_all_succeed() {
    let database = postgres::fresh_database("migrate_together").await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let store = tower_idempotency::store::PostgresStore::new(pool);
    let migrations: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for migration in migrations {
        migration.await.unwrap().expect("every migration succeeds");
    }
}

/// A table as the first builds made it (no `effect` column, no `begin`
/// function) is brought up to date by `migrate`, and its store then takes,
/// completes and replays keys.
#[tokio::test]
async fn migrating_a_table_of_an_earlier_build_makes_it_usable() {
    use std::time::Duration;

    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion, PostgresStore},
        Store,
    };

    let database = postgres::fresh_database("migrate_earlier").await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE idempotency_records (
             key BYTEA PRIMARY KEY, fingerprint BYTEA NOT NULL, state SMALLINT NOT NULL,
             token BYTEA NOT NULL, lease_until TIMESTAMPTZ, response BYTEA,
             expires_at TIMESTAMPTZ NOT NULL);
         CREATE INDEX idempotency_records_expires_at ON idempotency_records (expires_at);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let store = PostgresStore::new(pool);
    store
        .migrate()
        .await
        .expect("the earlier table is migrated");

    let (key, fingerprint) = (
        RecordKey::new(b"", "earlier"),
        Fingerprint::from_bytes([7; 32]),
    );
    let lease = Duration::from_secs(60);
    let Ok(BeginOutcome::Acquired(token)) = store.begin(&key, &fingerprint, lease).await else {
        panic!("a fresh key is acquired on the migrated table");
    };
    let record = bytes::Bytes::from_static(b"record");
    store
        .complete(&key, token, Completion::Response(record.clone()), lease)
        .await
        .unwrap();
    assert!(matches!(
        store.begin(&key, &fingerprint, lease).await,
        Ok(BeginOutcome::Completed(found)) if found == record
    ));
}
