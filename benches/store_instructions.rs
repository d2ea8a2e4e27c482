//! A fixed number of first uses or replays on the PostgreSQL or Redis
//! store, or the raw client's commands in their place, over one
//! connection, so that `scripts/count-store-instructions` can count what
//! the server process spends on each under callgrind.
//!
//! `STORE` is `postgres` (at `TEST_DATABASE_URL`) or `redis` (at
//! `TEST_REDIS_URL`); `STEP` is `first_use`, `replay`, `raw_first_use` or
//! `raw_replay`; `CALLS` defaults to 1,000.
// A bench target without criterion: nothing here is public API.
#![allow(missing_docs)]

mod common;

#[cfg(all(feature = "postgres", feature = "redis", feature = "conformance"))]
fn main() {
    use tower_idempotency::{
        key::RecordKey,
        store::{PostgresStore, RedisStore},
        Store,
    };

    use crate::common::{
        raw_postgres, raw_redis,
        store_steps::{first_use, replay, store_hot},
    };

    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let (store_name, step) = (var("STORE"), var("STEP"));
    let calls: u64 = std::env::var("CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let encoded = tower_idempotency::conformance::sample_response().encode();
        let run = format!("{:?}", std::time::SystemTime::now());
        let key = |i: u64| RecordKey::new(run.as_bytes(), &i.to_string());
        let hot = key(u64::MAX);
        let (store, raw): (Box<dyn Store>, Raw) = match store_name.as_str() {
            "postgres" => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&var("TEST_DATABASE_URL"))
                    .await
                    .expect("connect");
                let store = PostgresStore::new(pool.clone())
                    .with_table("bench_records")
                    .expect("table name");
                store.migrate().await.expect("migrate");
                raw_postgres::create_table(&pool).await;
                raw_postgres::store_hot(&pool, &hot, &encoded).await;
                (Box::new(store), Raw::Postgres(pool))
            }
            "redis" => {
                let url = var("TEST_REDIS_URL");
                let store = RedisStore::connect(&url).await.expect("connect");
                let mut conn = redis::Client::open(url.as_str())
                    .expect("client")
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect");
                raw_redis::store_hot(&mut conn, &encoded).await;
                (Box::new(store), Raw::Redis(conn))
            }
            other => panic!("STORE must be postgres or redis, not {other:?}"),
        };
        store_hot(&*store, &hot, &encoded).await;
        for i in 0..calls {
            match (step.as_str(), &raw) {
                ("first_use", _) => first_use(&*store, &key(i), encoded.clone()).await,
                ("replay", _) => replay(&*store, &hot).await,
                ("raw_first_use", Raw::Postgres(pool)) => {
                    raw_postgres::insert_then_update(pool, &key(i), &encoded).await
                }
                ("raw_first_use", Raw::Redis(conn)) => {
                    raw_redis::first_use(&mut conn.clone(), &key(i), &encoded).await
                }
                ("raw_replay", Raw::Postgres(pool)) => raw_postgres::select(pool, &hot).await,
                ("raw_replay", Raw::Redis(conn)) => raw_redis::get(&mut conn.clone()).await,
                (other, _) => panic!(
                    "STEP must be first_use, replay, raw_first_use or raw_replay, not {other:?}"
                ),
            }
        }
        // A PostgreSQL server process ends with its connection, and writes
        // its count then.
        if let Raw::Postgres(pool) = raw {
            pool.close().await;
        }
    });

    enum Raw {
        Postgres(sqlx::PgPool),
        Redis(redis::aio::MultiplexedConnection),
    }
}

#[cfg(not(all(feature = "postgres", feature = "redis", feature = "conformance")))]
fn main() {
    eprintln!("store_instructions needs the postgres, redis and conformance features");
}
