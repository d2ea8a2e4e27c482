//! A fixed number of first uses or replays on the PostgreSQL store, or the
//! raw client's statements in their place, over one connection, so that
//! `scripts/count-pg-instructions` can count what the server process spends
//! on each under callgrind.
//!
//! `TEST_DATABASE_URL` names the server; `STEP` is `first_use`, `replay`,
//! `raw_first_use` or `raw_replay`; `CALLS` defaults to 1,000.
// A bench target without criterion: nothing here is public API.
#![allow(missing_docs)]

mod common;

#[cfg(all(feature = "postgres", feature = "conformance"))]
fn main() {
    use std::time::Duration;

    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion, PostgresStore},
        Store,
    };

    use crate::common::raw_postgres;

    const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
    const LEASE: Duration = Duration::from_secs(60);
    const TTL: Duration = Duration::from_secs(600);

    let url = std::env::var("TEST_DATABASE_URL").expect("TEST_DATABASE_URL");
    let step = std::env::var("STEP").unwrap_or_else(|_| "first_use".to_owned());
    let calls: u64 = std::env::var("CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect");
        let store = PostgresStore::new(pool.clone())
            .with_table("bench_records")
            .expect("table name");
        store.migrate().await.expect("migrate");
        raw_postgres::create_table(&pool).await;
        let encoded = tower_idempotency::conformance::sample_response().encode();
        let run = format!("{:?}", std::time::SystemTime::now());
        let key = |i: u64| RecordKey::new(run.as_bytes(), &i.to_string());
        let hot = key(u64::MAX);
        if let Ok(BeginOutcome::Acquired(token)) = store.begin(&hot, &FP, LEASE).await {
            store
                .complete(&hot, token, Completion::Response(encoded.clone()), TTL)
                .await
                .expect("complete");
        }
        raw_postgres::store_hot(&pool, &hot, &encoded).await;
        for i in 0..calls {
            match step.as_str() {
                "first_use" => {
                    let k = key(i);
                    let Ok(BeginOutcome::Acquired(token)) = store.begin(&k, &FP, LEASE).await
                    else {
                        panic!("a fresh key must be acquired")
                    };
                    let record = Completion::Response(encoded.clone());
                    store
                        .complete(&k, token, record, TTL)
                        .await
                        .expect("complete");
                }
                "replay" => assert!(matches!(
                    store.begin(&hot, &FP, LEASE).await,
                    Ok(BeginOutcome::Completed(_))
                )),
                "raw_first_use" => raw_postgres::insert_then_update(&pool, &key(i), &encoded).await,
                "raw_replay" => raw_postgres::select(&pool, &hot).await,
                other => panic!(
                    "STEP must be first_use, replay, raw_first_use or raw_replay, not {other:?}"
                ),
            }
        }
        // The server process ends with the connection, and writes its count.
        pool.close().await;
    });
}

#[cfg(not(all(feature = "postgres", feature = "conformance")))]
fn main() {
    eprintln!("pg_instructions needs the postgres and conformance features");
}
