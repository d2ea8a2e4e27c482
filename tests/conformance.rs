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

/// A store on the test server (or, with `cluster`, the test cluster)
/// whose URL (or comma-separated node URLs) `scripts/with-servers` put in
/// the variable `var`.
#[cfg(feature = "redis")]
async fn redis_store(var: &str, cluster: bool) -> tower_idempotency::store::RedisStore {
    use tower_idempotency::store::RedisStore;
    let urls = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: run the tests with ./scripts/test"));
    let store = if cluster {
        RedisStore::connect_cluster(urls.split(',')).await
    } else {
        RedisStore::connect(&urls).await
    };
    store
        .unwrap_or_else(|err| panic!("connect to the server in {var}: {err}"))
        .with_prefix("conformance:")
}

#[cfg(feature = "redis")]
mod redis {
    tower_idempotency::store_conformance_tests!(super::redis_store("TEST_REDIS_URL", false));
}

#[cfg(feature = "redis")]
mod redis_cluster {
    tower_idempotency::store_conformance_tests!(super::redis_store(
        "TEST_REDIS_CLUSTER_URLS",
        true
    ));
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
    tower_idempotency::store_conformance_tests!(super::redis_store("TEST_VALKEY_URL", false));
}

/// A Valkey cluster completes natively too: `SET … IFEQ` follows the key's
/// slot as any one-key command does.
#[cfg(feature = "redis")]
mod valkey_cluster {
    tower_idempotency::store_conformance_tests!(super::redis_store(
        "TEST_VALKEY_CLUSTER_URLS",
        true
    ));
}
