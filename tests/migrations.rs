//! Replicas that start together on a fresh PostgreSQL: every one of them
//! creates its tables or finds them made, none crashes.
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
