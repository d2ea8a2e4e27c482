//! Migrations on PostgreSQL: replicas that start together on a fresh
//! database each create the store's table and function or find them made,
//! and none crashes; a table an earlier build made is brought up to date;
//! a tenant's schema gets its own; names PostgreSQL would cut are refused;
//! responses are compressed with lz4, changed only when the table is free;
//! a migration waiting for a busy table never holds up other queries, and
//! lands on a table never free of transactions.
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

/// PostgreSQL folds unquoted names to lower case, so `Payments_Records` and
/// `payments_records` are one table: their migrations take one lock.
#[tokio::test]
async fn concurrent_migrations_of_one_table_named_in_two_cases_all_succeed() {
    migrations_of_one_table_under_two_names("Payments_Records", "payments_records").await;
}

/// An unqualified name is the table in the first schema of the search path
/// (`public` here), so `payments_records` and `public.payments_records` are
/// one table: their migrations take one lock.
#[tokio::test]
async fn concurrent_migrations_of_one_table_with_and_without_its_schema_all_succeed() {
    migrations_of_one_table_under_two_names("public.payments_records", "payments_records").await;
}

/// Eight migrations at once on a fresh database, half of them naming the
/// table `one` way and half the `other`, five rounds: every one succeeds.
async fn migrations_of_one_table_under_two_names(one: &'static str, other: &'static str) {
    for round in 0..5 {
        let database = postgres::fresh_database("migrate_names").await;
        let pool = sqlx::PgPool::connect(&database).await.unwrap();
        let migrations: Vec<_> = (0..8)
            .map(|i| {
                let name = if i % 2 == 0 { one } else { other };
                let store = tower_idempotency::store::PostgresStore::new(pool.clone())
                    .with_table(name)
                    .unwrap();
                tokio::spawn(async move { store.migrate().await })
            })
            .collect();
        for migration in migrations {
            let migrated = migration.await.unwrap();
            assert!(migrated.is_ok(), "round {round}: {migrated:?}");
        }
    }
}

/// Makes the table as the first builds made it: no `effect` column, no
/// `begin` function.
async fn earlier_table(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE idempotency_records (
             key BYTEA PRIMARY KEY, fingerprint BYTEA NOT NULL, state SMALLINT NOT NULL,
             token BYTEA NOT NULL, lease_until TIMESTAMPTZ, response BYTEA,
             expires_at TIMESTAMPTZ NOT NULL);
         CREATE INDEX idempotency_records_expires_at ON idempotency_records (expires_at);",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Whether the table has the column the migration adds last.
async fn has_effect_column(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM pg_attribute
         WHERE attrelid = 'idempotency_records'::regclass AND attname = 'effect')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Adding a column to a table of an earlier build needs a lock that no
/// other transaction holds. While one holds the table, the migration waits
/// for it a while at a time: a query arriving meanwhile is never queued
/// behind it until that transaction ends, and the migration lands once it
/// has.
#[tokio::test]
async fn a_migration_waiting_for_a_busy_table_holds_up_no_other_query() {
    use std::time::Duration;

    let database = postgres::fresh_database("migrate_waits").await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    earlier_table(&pool).await;
    let mut busy = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM idempotency_records")
        .execute(&mut *busy)
        .await
        .unwrap();
    let store = tower_idempotency::store::PostgresStore::new(pool.clone());
    let migration = tokio::spawn(async move { store.migrate().await });
    for attempt in 0..5 {
        // Once the migration waits in the table's lock queue, where a
        // query arriving now would be queued behind it.
        let mut waiting = 0;
        for _ in 0..2_000 {
            waiting = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database()
                   AND wait_event_type = 'Lock' AND wait_event = 'relation'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            waiting, 1,
            "attempt {attempt}: the migration waits for the table"
        );
        let counted = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::query("SELECT count(*) FROM idempotency_records").execute(&pool),
        )
        .await;
        assert!(
            counted.is_ok(),
            "attempt {attempt}: a query waited behind the migration until its timeout"
        );
    }
    assert!(!migration.is_finished(), "the table is still held");
    busy.commit().await.unwrap();
    migration
        .await
        .unwrap()
        .expect("the migration lands once the table is free");
    assert!(has_effect_column(&pool).await);
}

/// A table of an earlier build that is never free of other transactions,
/// each shorter than half a second but overlapping the next: the
/// migration's waits for the table grow until one outlasts the
/// transactions already open, and it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_on_a_table_never_free_of_transactions_lands() {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::Duration,
    };

    let database = postgres::fresh_database("migrate_never_free").await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    earlier_table(&pool).await;
    let stop = Arc::new(AtomicBool::new(false));
    let holders = {
        let (pool, stop) = (pool.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut open = tokio::task::JoinSet::new();
            // A new one every 100 ms, each open for 300 ms: some are always
            // open, and none is ever within 100 ms of its end alone.
            while !stop.load(Ordering::SeqCst) {
                let pool = pool.clone();
                open.spawn(async move {
                    let mut held = pool.begin().await.unwrap();
                    sqlx::query("SELECT count(*) FROM idempotency_records")
                        .execute(&mut *held)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    held.commit().await.unwrap();
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            while let Some(held) = open.join_next().await {
                held.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store = tower_idempotency::store::PostgresStore::new(
        sqlx::PgPool::connect(&database).await.unwrap(),
    );
    let migrated = tokio::time::timeout(Duration::from_secs(60), store.migrate()).await;
    stop.store(true, Ordering::SeqCst);
    holders.await.unwrap();
    migrated
        .expect("the migration lands while the table is in use")
        .unwrap();
    assert!(has_effect_column(&pool).await);
}

/// A table as the first builds made it is brought up to date by `migrate`, and its store then takes,
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
    earlier_table(&pool).await;
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
        .complete(
            &key,
            &fingerprint,
            token,
            Completion::Response(record.clone()),
            lease,
        )
        .await
        .unwrap();
    assert!(matches!(
        store.begin(&key, &fingerprint, lease).await,
        Ok(BeginOutcome::Completed(found)) if found == record
    ));
}

/// A build whose `begin` has another body makes its function under a new
/// name beside the earlier build's, which replicas of that build still
/// call while both run.
#[tokio::test]
async fn migrating_keeps_the_function_of_an_earlier_build() {
    use tower_idempotency::store::PostgresStore;

    let database = postgres::fresh_database("migrate_keeps").await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let store = PostgresStore::new(pool.clone());
    store.migrate().await.unwrap();
    // An earlier build's function, as its migration left it.
    sqlx::raw_sql(
        "CREATE FUNCTION idempotency_records_begin_v1(k BYTEA, fp BYTEA, tok BYTEA, lease_ms BIGINT)
         RETURNS idempotency_records LANGUAGE sql AS 'SELECT NULL::idempotency_records'",
    )
    .execute(&pool)
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT proname::text FROM pg_proc WHERE proname LIKE 'idempotency_records_begin_%'
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        functions,
        [
            "idempotency_records_begin_v1",
            "idempotency_records_begin_v3"
        ]
    );
}

/// With a schema per tenant ahead of `public` on the search path, a tenant's
/// store gets an index and a function of its own beside its table, even
/// though `public` already has a store of the same name, and its records
/// go to its own table.
#[tokio::test]
async fn a_tenants_schema_gets_its_own_index_and_function() {
    use std::{str::FromStr, time::Duration};

    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, PostgresStore},
        Store,
    };

    let database = postgres::fresh_database("migrate_tenant").await;
    let public = sqlx::PgPool::connect(&database).await.unwrap();
    PostgresStore::new(public.clone()).migrate().await.unwrap();
    sqlx::raw_sql("CREATE SCHEMA tenant_a")
        .execute(&public)
        .await
        .unwrap();
    let options = PgConnectOptions::from_str(&database)
        .unwrap()
        .options([("search_path", "tenant_a,public")]);
    let tenant = PgPoolOptions::new().connect_with(options).await.unwrap();
    let store = PostgresStore::new(tenant);
    store.migrate().await.unwrap();

    let made: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'tenant_a'::regnamespace
         UNION ALL
         SELECT proname::text FROM pg_proc WHERE pronamespace = 'tenant_a'::regnamespace
         ORDER BY 1",
    )
    .fetch_all(&public)
    .await
    .unwrap();
    for name in [
        "idempotency_records",
        "idempotency_records_begin_v3",
        "idempotency_records_expires_at",
    ] {
        assert!(made.iter().any(|m| m == name), "{name} not in {made:?}");
    }
    let key = RecordKey::new(b"", "tenant");
    let fingerprint = Fingerprint::from_bytes([3; 32]);
    assert!(matches!(
        store
            .begin(&key, &fingerprint, Duration::from_secs(60))
            .await,
        Ok(BeginOutcome::Acquired(_))
    ));
    let rows = |table: &'static str| {
        let public = public.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&public)
                .await
                .unwrap()
        }
    };
    assert_eq!(rows("tenant_a.idempotency_records").await, 1);
    assert_eq!(rows("public.idempotency_records").await, 0);
}

/// PostgreSQL cuts names to 63 bytes, so two long table names could share
/// an index or a function: a table whose index name would be cut is
/// refused, as is anything but a plain, optionally qualified, name.
#[tokio::test]
async fn table_names_that_would_be_cut_or_are_not_plain_are_refused() {
    use tower_idempotency::store::PostgresStore;

    let pool = sqlx::PgPool::connect_lazy("postgres://127.0.0.1:1/unused").unwrap();
    let store = || PostgresStore::new(pool.clone());
    let longest = "t".repeat(52);
    assert!(store().with_table(&longest).is_ok());
    for refused in [
        "t".repeat(53),
        format!("s.{}", "t".repeat(51)),
        "records; DROP TABLE x".to_owned(),
        "a.b.c".to_owned(),
    ] {
        let err = store().with_table(&refused).unwrap_err();
        assert!(err.to_string().contains(&refused), "{err}");
    }
}

/// The compression of a table's responses, as `pg_attribute` records it:
/// `l` for lz4, `p` for pglz, empty for the server's default.
async fn response_compression(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar(
        "SELECT attcompression::text FROM pg_attribute
         WHERE attrelid = 'idempotency_records'::regclass AND attname = 'response'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Long responses are compressed with lz4, which costs the server far less
/// per first use than PostgreSQL's default pglz.
#[tokio::test]
async fn a_migrated_table_compresses_responses_with_lz4() {
    let database = postgres::fresh_database("migrate_lz4").await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    tower_idempotency::store::PostgresStore::new(pool.clone())
        .migrate()
        .await
        .unwrap();
    assert_eq!(response_compression(&pool).await, "l");
}

/// Changing the compression locks the table: while a transaction holds it,
/// a migration waits a moment, leaves the compression as it was and
/// succeeds; the next migration, once the table is free, changes it.
#[tokio::test]
async fn a_migration_on_a_busy_table_leaves_its_compression_to_a_later_one() {
    let database = postgres::fresh_database("migrate_busy").await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let store = tower_idempotency::store::PostgresStore::new(pool.clone());
    store.migrate().await.unwrap();
    sqlx::raw_sql("ALTER TABLE idempotency_records ALTER COLUMN response SET COMPRESSION pglz")
        .execute(&pool)
        .await
        .unwrap();
    let mut busy = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM idempotency_records")
        .execute(&mut *busy)
        .await
        .unwrap();

    store
        .migrate()
        .await
        .expect("a busy table does not fail the migration");
    assert_eq!(response_compression(&pool).await, "p");
    busy.commit().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(response_compression(&pool).await, "l");
}
