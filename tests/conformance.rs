//! Every store passes the same conformance suite.

mod memory {
    tower_idempotency::store_conformance_tests!(async { tower_idempotency::MemoryStore::new() });
}

/// The store the README's guide points to, written as a user would.
#[path = "../examples/custom_store.rs"]
#[allow(dead_code, reason = "the example's main is not run here")]
mod custom_store;

mod hash_map_store {
    tower_idempotency::store_conformance_tests!(async {
        super::custom_store::HashMapStore::default()
    });
}

#[cfg(feature = "redis")]
mod redis {
    async fn store() -> tower_idempotency::store::RedisStore {
        let url = std::env::var("TEST_REDIS_URL")
            .expect("TEST_REDIS_URL is not set: run the tests with ./scripts/test");
        tower_idempotency::store::RedisStore::connect(&url)
            .await
            .expect("connect to the test Redis")
            .with_prefix("conformance:")
    }

    tower_idempotency::store_conformance_tests!(store());
}

#[cfg(feature = "redis")]
mod redis_cluster {
    async fn store() -> tower_idempotency::store::RedisStore {
        let nodes = std::env::var("TEST_REDIS_CLUSTER_URLS")
            .expect("TEST_REDIS_CLUSTER_URLS is not set: run the tests with ./scripts/test");
        tower_idempotency::store::RedisStore::connect_cluster(nodes.split(','))
            .await
            .expect("connect to the test cluster")
            .with_prefix("conformance:")
    }

    tower_idempotency::store_conformance_tests!(store());
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn store() -> tower_idempotency::store::PostgresStore {
        static TABLES: AtomicUsize = AtomicUsize::new(0);
        let url = std::env::var("TEST_DATABASE_URL")
            .expect("TEST_DATABASE_URL is not set: run the tests with ./scripts/test");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect to the test PostgreSQL");
        // One table per test: concurrent CREATE TABLE IF NOT EXISTS on one
        // name can fail on PostgreSQL's catalog constraints.
        let table = format!(
            "conformance_{}_{}",
            std::process::id(),
            TABLES.fetch_add(1, Ordering::Relaxed)
        );
        let store = tower_idempotency::store::PostgresStore::new(pool)
            .with_table(&table)
            .expect("valid table name");
        store.migrate().await.expect("migrate");
        store
    }

    tower_idempotency::store_conformance_tests!(store());
}

/// Valkey 8.1 takes `SET … IFEQ`, so a completion there is one native
/// command, where Redis 7.0 runs a script.
#[cfg(feature = "redis")]
mod valkey {
    async fn store() -> tower_idempotency::store::RedisStore {
        let url = std::env::var("TEST_VALKEY_URL")
            .expect("TEST_VALKEY_URL is not set: run the tests with ./scripts/test");
        tower_idempotency::store::RedisStore::connect(&url)
            .await
            .expect("connect to the test Valkey")
            .with_prefix("conformance:")
    }

    tower_idempotency::store_conformance_tests!(store());
}
