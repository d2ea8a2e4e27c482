//! Replicas sharing one Redis or PostgreSQL: duplicates run once across
//! them, a crashed holder's lock is taken over after its lease, and a store
//! that goes away makes the layer answer 503 (or fail open).
#![cfg(all(feature = "redis", feature = "postgres"))]

mod common;
#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/process.rs"]
mod process;
#[path = "common/proxy.rs"]
mod proxy;

use std::{collections::HashSet, sync::Arc, time::Duration};

use common::{app, free_port, json, post, send, unique_key, Counter};
use http::StatusCode;
use serde_json::{json, Value};
use tower_idempotency::{
    store::{PostgresStore, RedisStore},
    IdempotencyLayer, Store, StoreFailure,
};

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL")
        .expect("TEST_REDIS_URL is not set: run the tests with ./scripts/test")
}

fn database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL is not set: run the tests with ./scripts/test")
}

async fn create(client: &reqwest::Client, base: &str, key: &str) -> (u16, Option<String>, Value) {
    let response = client
        .post(format!("{base}/payments"))
        .header("idempotency-key", key)
        .json(&json!({"amount": 700, "currency": "NZD"}))
        .send()
        .await
        .expect("POST /payments");
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn payments(client: &reqwest::Client, base: &str) -> Vec<Value> {
    client
        .get(format!("{base}/payments"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn duplicates_across_two_replicas_run_once(store_url: &str) {
    let env = [
        ("IDEMPOTENCY_STORE", store_url),
        ("PAYMENT_DELAY_MS", "300"),
    ];
    let replicas = [
        process::start("payments", &env),
        process::start("payments", &env),
    ];
    let client = reqwest::Client::new();
    let key = unique_key("replicas");
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let (client, base, key) = (client.clone(), replicas[i % 2].base.clone(), key.clone());
            tokio::spawn(async move { create(&client, &base, &key).await })
        })
        .collect();
    let mut created = Vec::new();
    for task in tasks {
        let (status, _, body) = task.await.unwrap();
        assert!(status == 201 || status == 409, "status {status}: {body}");
        if status == 201 {
            created.push(body);
        }
    }
    assert_eq!(created.len(), 1, "exactly one duplicate runs the handler");

    // Each replica lists its own payments (or, on PostgreSQL, the one
    // table they share): one id in all.
    let mut executed = HashSet::new();
    for replica in &replicas {
        for payment in payments(&client, &replica.base).await {
            executed.insert(payment["id"].to_string());
        }
    }
    assert_eq!(executed.len(), 1, "one payment across both replicas");

    for replica in &replicas {
        let (status, replayed, body) = create(&client, &replica.base, &key).await;
        assert_eq!(status, 201);
        assert_eq!(replayed.as_deref(), Some("true"));
        assert_eq!(body["id"], created[0]["id"]);
    }
}

#[tokio::test]
async fn duplicates_across_two_replicas_sharing_redis_run_once() {
    duplicates_across_two_replicas_run_once(&redis_url()).await;
}

#[tokio::test]
async fn duplicates_across_two_replicas_sharing_postgres_run_once() {
    // A database of its own: the example keeps its payments in a table.
    duplicates_across_two_replicas_run_once(&postgres::fresh_database("duplicates").await).await;
}

async fn crashed_holder_is_taken_over_after_its_lease(store_url: &str) {
    let lease = Duration::from_millis(1500);
    let lease_ms = lease.as_millis().to_string();
    let mut holder = process::start(
        "payments",
        &[
            ("IDEMPOTENCY_STORE", store_url),
            ("PAYMENT_DELAY_MS", "30000"),
            ("IDEMPOTENCY_LEASE_MS", &lease_ms),
        ],
    );
    let other = process::start(
        "payments",
        &[
            ("IDEMPOTENCY_STORE", store_url),
            ("IDEMPOTENCY_LEASE_MS", &lease_ms),
        ],
    );
    let client = reqwest::Client::new();
    let key = unique_key("crash");
    let in_flight = tokio::spawn({
        let (client, base, key) = (client.clone(), holder.base.clone(), key.clone());
        async move { create(&client, &base, &key).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.child.kill().expect("kill -9 the holder");
    holder.child.wait().expect("reap the holder");
    assert!(
        in_flight.await.is_err(),
        "the client saw its connection die"
    );
    let killed_at = std::time::Instant::now();

    let (status, _, _) = create(&client, &other.base, &key).await;
    assert_eq!(status, 409, "the lease still protects the key");
    assert!(
        killed_at.elapsed() < lease,
        "the check ran within the lease"
    );

    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let (status, replayed, body) = create(&client, &other.base, &key).await;
    assert_eq!(status, 201, "{body}");
    assert!(
        replayed.is_none(),
        "the retry ran the request on the other replica"
    );
    assert_eq!(payments(&client, &other.base).await.len(), 1);
}

/// The shared test cluster as the payments example takes it.
fn redis_cluster_url() -> String {
    let nodes = std::env::var("TEST_REDIS_CLUSTER_URLS")
        .expect("TEST_REDIS_CLUSTER_URLS is not set: run the tests with ./scripts/test");
    format!("redis+cluster://{}", nodes.replace("redis://", ""))
}

#[tokio::test]
async fn duplicates_across_two_replicas_sharing_a_redis_cluster_run_once() {
    duplicates_across_two_replicas_run_once(&redis_cluster_url()).await;
}

#[tokio::test]
async fn crashed_holder_on_a_redis_cluster_is_taken_over_after_its_lease() {
    crashed_holder_is_taken_over_after_its_lease(&redis_cluster_url()).await;
}

#[tokio::test]
async fn crashed_holder_on_redis_is_taken_over_after_its_lease() {
    crashed_holder_is_taken_over_after_its_lease(&redis_url()).await;
}

#[tokio::test]
async fn crashed_holder_on_postgres_is_taken_over_after_its_lease() {
    crashed_holder_is_taken_over_after_its_lease(&postgres::fresh_database("crashed").await).await;
}

async fn unreachable_store_answers_503_unless_failing_open(
    store: Arc<dyn Store>,
    proxy: proxy::Proxy,
) {
    let counter = Counter::default();
    let closed = app(
        &IdempotencyLayer::with_shared_store(Arc::clone(&store)),
        counter.handler(Duration::ZERO),
    );
    let open = app(
        &IdempotencyLayer::with_shared_store(store).with_store_failure(StoreFailure::FailOpen),
        counter.handler(Duration::ZERO),
    );
    let before = send(&closed, post("/payments", Some(&unique_key("up")), "{}")).await;
    assert_eq!(before.status(), StatusCode::CREATED);

    proxy.cut();
    let (status, headers, problem) =
        json(send(&closed, post("/payments", Some(&unique_key("down")), "{}")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("store-unavailable"));
    assert_eq!(counter.runs(), 1, "nothing runs unprotected");

    let failed_open = send(&open, post("/payments", Some(&unique_key("open")), "{}")).await;
    assert_eq!(failed_open.status(), StatusCode::CREATED);
    assert_eq!(counter.runs(), 2);
}

#[tokio::test]
async fn unreachable_redis_answers_503_unless_failing_open() {
    let proxy = proxy::Proxy::start(proxy::url_addr(&redis_url())).await;
    let store = RedisStore::connect(&proxy::via(&redis_url(), proxy.addr))
        .await
        .unwrap();
    unreachable_store_answers_503_unless_failing_open(Arc::new(store), proxy).await;
}

#[tokio::test]
async fn unreachable_postgres_answers_503_unless_failing_open() {
    let proxy = proxy::Proxy::start(proxy::url_addr(&database_url())).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect(&proxy::via(&database_url(), proxy.addr))
        .await
        .unwrap();
    let store = PostgresStore::new(pool)
        .with_table("outage_records")
        .unwrap();
    store.migrate().await.unwrap();
    unreachable_store_answers_503_unless_failing_open(Arc::new(store), proxy).await;
}

#[tokio::test]
async fn postgres_cleanup_deletes_expired_rows() {
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let store = PostgresStore::new(pool.clone())
        .with_table("cleanup_records")
        .unwrap();
    store.migrate().await.unwrap();
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store.clone()).with_ttl(Duration::from_millis(200)),
        counter.handler(Duration::ZERO),
    );
    let keys: HashSet<String> = (0..5).map(|i| unique_key(&format!("cleanup{i}"))).collect();
    for key in &keys {
        send(&svc, post("/payments", Some(key), "{}")).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store.delete_expired().await.unwrap() >= 5);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cleanup_records WHERE expires_at <= now()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
}

/// A connection of the test's own to the Redis at `url`, beside the store's,
/// to look at or change what the store wrote.
async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key under `prefix` on the test Redis, with its PTTL.
async fn ttls_under(prefix: &str) -> Vec<(String, i64)> {
    let mut conn = redis_connection(&redis_url()).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut ttls = Vec::new();
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        ttls.push((key, ttl));
    }
    ttls
}

#[tokio::test]
async fn redis_keys_carry_the_prefix_and_a_ttl() {
    let store = RedisStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix("ttlcheck:");
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store).with_ttl(Duration::from_secs(100)),
        counter.handler(Duration::ZERO),
    );
    send(&svc, post("/payments", Some(&unique_key("ttl")), "{}")).await;
    let ttls = ttls_under("ttlcheck:").await;
    assert!(!ttls.is_empty());
    for (key, ttl) in ttls {
        assert!(ttl > 90_000 && ttl <= 100_000, "{key} has PTTL {ttl}");
    }
}

/// A Redis server of a test's own, stopped when this is dropped, however
/// the test ends.
struct OwnRedis(std::process::Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Redis server of a test's own on `port`, with `settings` besides, so
/// that what the test does to it leaves the shared test server alone.
fn own_redis(port: u16, settings: &[&str]) -> OwnRedis {
    own_server("redis-server", port, settings)
}

/// The same of `server`, `redis-server` or a Valkey.
fn own_server(server_name: &str, port: u16, settings: &[&str]) -> OwnRedis {
    let child = std::process::Command::new(server_name)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(settings)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("{server_name} is installed by scripts/test: {err}"));
    let server = OwnRedis(child);
    // Polled, not slept: on a loaded machine a start can outlast any fixed
    // wait, and a test that met a server still starting would fail at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !answers_ping(port) {
        assert!(
            std::time::Instant::now() < deadline,
            "{server_name} on port {port} did not answer in 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    server
}

/// Whether a Redis server on `port` answers `PING` with `PONG`.
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut answer = [0; 7];
    conn.write_all(b"PING\r\n").is_ok()
        && conn.read_exact(&mut answer).is_ok()
        && &answer == b"+PONG\r\n"
}

/// A completed record takes about its own size in Redis's memory, and
/// nothing but the record is left under the prefix.
#[tokio::test]
async fn redis_record_takes_about_its_own_size() {
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion},
    };
    let store = RedisStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix("memcheck:");
    let key = RecordKey::new(b"memory", &unique_key("size"));
    let fingerprint = Fingerprint::from_bytes([3; 32]);
    let Ok(BeginOutcome::Acquired(token)) = store
        .begin(&key, &fingerprint, Duration::from_secs(60))
        .await
    else {
        panic!("a fresh key is acquired");
    };
    let record = bytes::Bytes::from(vec![b'r'; 4096]);
    store
        .complete(
            &key,
            &fingerprint,
            token,
            Completion::Response(record),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let name = format!("memcheck:{}", key.to_hex());
    let mut conn = redis_connection(&redis_url()).await;
    let length: usize = redis::cmd("STRLEN")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    let usage: usize = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(length, 50 + 4096);
    assert!(
        usage * 2 < length * 3,
        "{usage} bytes of memory for a {length}-byte record"
    );
    // Staged records too, whose keys hold the record's in braces.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*memcheck:*{}*", key.to_hex()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys, [name]);
}

/// A record longer than the server's strings may be (`proto-max-bulk-len`)
/// fails `complete` and leaves the lock as it was: a fenced key is still
/// recovered after its holder lets go, never run afresh.
#[tokio::test]
async fn redis_record_the_server_refuses_leaves_the_fenced_lock() {
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion},
    };
    // The smallest string limit Redis takes.
    let port = free_port();
    let _server = own_redis(port, &["--proto-max-bulk-len", "1mb"]);
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let key = RecordKey::new(b"limits", &unique_key("bulk"));
    let fingerprint = Fingerprint::from_bytes([4; 32]);
    let lease = Duration::from_secs(60);
    let Ok(BeginOutcome::Acquired(token)) = store.begin(&key, &fingerprint, lease).await else {
        panic!("a fresh key is acquired");
    };
    store.fence(&key, token, lease).await.unwrap();
    // Over the limit only once staged with the record's head.
    let record = bytes::Bytes::from(vec![b'r'; 1024 * 1024 - 20]);
    let completed = store
        .complete(
            &key,
            &fingerprint,
            token,
            Completion::Response(record),
            lease,
        )
        .await;
    assert!(completed.is_err(), "{completed:?}");
    assert!(matches!(
        store.begin(&key, &fingerprint, lease).await,
        Ok(BeginOutcome::InFlight)
    ));
    store.release(&key, token).await.unwrap();
    let recovered = store.begin(&key, &fingerprint, lease).await;
    assert!(
        matches!(recovered, Ok(BeginOutcome::Recover(_))),
        "{recovered:?}"
    );
}

/// A `complete` that finds its lock lost answers so, and deletes the
/// record it staged beside the key.
#[tokio::test]
async fn redis_complete_after_a_lost_lock_leaves_no_staged_record() {
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion, StoreError},
    };
    let prefix = format!("{}:", unique_key("staged"));
    let store = RedisStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let key = RecordKey::new(b"staging", &unique_key("lost"));
    let fingerprint = Fingerprint::from_bytes([5; 32]);
    let Ok(BeginOutcome::Acquired(first)) = store
        .begin(&key, &fingerprint, Duration::from_millis(50))
        .await
    else {
        panic!("a fresh key is acquired");
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let Ok(BeginOutcome::Acquired(_)) = store
        .begin(&key, &fingerprint, Duration::from_secs(60))
        .await
    else {
        panic!("a lapsed lease is taken");
    };
    let late = store
        .complete(
            &key,
            &fingerprint,
            first,
            Completion::Response(bytes::Bytes::from_static(b"late")),
            Duration::from_secs(60),
        )
        .await;
    assert!(matches!(late, Err(StoreError::LockLost)), "{late:?}");
    let mut conn = redis_connection(&redis_url()).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys, [format!("{prefix}{}", key.to_hex())]);
    assert!(matches!(
        store
            .begin(&key, &fingerprint, Duration::from_secs(60))
            .await,
        Ok(BeginOutcome::InFlight)
    ));
}

/// A server that lost its scripts (`SCRIPT FLUSH`, a restart) between
/// `begin` and `complete` still gets the record: the store loads the
/// script and runs it on the record it staged.
#[tokio::test]
async fn redis_complete_loads_the_script_a_server_forgot() {
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion},
    };
    let port = free_port();
    let _server = own_redis(port, &[]);
    let url = format!("redis://127.0.0.1:{port}");
    let store = RedisStore::connect(&url).await.unwrap();
    let key = RecordKey::new(b"scripts", &unique_key("flushed"));
    let fingerprint = Fingerprint::from_bytes([6; 32]);
    let lease = Duration::from_secs(60);
    let Ok(BeginOutcome::Acquired(token)) = store.begin(&key, &fingerprint, lease).await else {
        panic!("a fresh key is acquired");
    };
    let mut conn = redis_connection(&url).await;
    let (): () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    store
        .complete(
            &key,
            &fingerprint,
            token,
            Completion::Response(bytes::Bytes::from_static(b"charged")),
            lease,
        )
        .await
        .unwrap();
    let replay = store.begin(&key, &fingerprint, lease).await;
    assert!(
        matches!(&replay, Ok(BeginOutcome::Completed(record)) if record == "charged"),
        "{replay:?}"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
}

#[tokio::test]
async fn redis_key_holding_another_type_answers_503_even_failing_open() {
    let prefix = format!("{}:", unique_key("wrongtype"));
    let store = RedisStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store).with_store_failure(StoreFailure::FailOpen),
        counter.handler(Duration::ZERO),
    );
    let key = unique_key("charged");
    send(&svc, post("/payments", Some(&key), "{}")).await;
    let [(name, _)] = &ttls_under(&prefix).await[..] else {
        panic!("one record under {prefix}")
    };
    // The record as a hash, as a store of another layout would leave it.
    let mut conn = redis_connection(&redis_url()).await;
    let _: () = redis::pipe()
        .del(name)
        .hset(name, "s", "c")
        .pexpire(name, 60_000)
        .query_async(&mut conn)
        .await
        .unwrap();

    let (status, _, problem) = json(send(&svc, post("/payments", Some(&key), "{}")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("store-unavailable"));
    assert_eq!(
        counter.runs(),
        1,
        "a key the store has seen is never failed open"
    );
}

#[tokio::test]
async fn slow_handler_on_redis_renews_its_lease() {
    let store = RedisStore::connect(&redis_url()).await.unwrap();
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store).with_lease(Duration::from_millis(600)),
        counter.handler(Duration::from_millis(2000)),
    );
    let key = unique_key("renew");
    let first = tokio::spawn({
        let (svc, key) = (svc.clone(), key.clone());
        async move {
            send(&svc, post("/payments", Some(&key), "{}"))
                .await
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let during = send(&svc, post("/payments", Some(&key), "{}")).await;
    assert_eq!(
        during.status(),
        StatusCode::CONFLICT,
        "the renewed lease still holds"
    );
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    let after = send(&svc, post("/payments", Some(&key), "{}")).await;
    assert_eq!(after.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn stopped_redis_server_answers_503_then_recovers_when_it_returns() {
    let port = free_port();
    let start = || own_redis(port, &[]);
    let server = start();
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store),
        counter.handler(Duration::ZERO),
    );
    assert_eq!(
        send(&svc, post("/payments", Some("before"), "{}"))
            .await
            .status(),
        StatusCode::CREATED
    );

    drop(server);
    let (status, _, problem) =
        json(send(&svc, post("/payments", Some("during"), "{}")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("store-unavailable"));
    assert_eq!(counter.runs(), 1, "nothing runs while the store is down");

    let _server = start();
    let mut recovered = false;
    for _ in 0..50 {
        if send(&svc, post("/payments", Some("after"), "{}"))
            .await
            .status()
            == StatusCode::CREATED
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the reconnecting connection serves again once Redis is back"
    );
    assert_eq!(counter.runs(), 2);
}

/// A store asked for the longest lease and TTL a `Duration` can say keeps
/// them (shortened to `MAX_EXPIRY`) rather than failing halfway.
async fn longest_durations_are_kept_not_refused(store: &dyn Store) {
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion, StoredResponse},
    };
    let key = RecordKey::new(b"durations", &unique_key("max"));
    let fingerprint = Fingerprint::from_bytes([9; 32]);
    let BeginOutcome::Acquired(token) = store
        .begin(&key, &fingerprint, Duration::MAX)
        .await
        .expect("begin with Duration::MAX")
    else {
        panic!("a fresh key is acquired");
    };
    store
        .renew(&key, token, Duration::MAX)
        .await
        .expect("renew with Duration::MAX");
    let response = StoredResponse::new(
        StatusCode::CREATED,
        http::HeaderMap::new(),
        "ok".into(),
        None,
    );
    store
        .complete(
            &key,
            &fingerprint,
            token,
            Completion::Response(response.encode()),
            Duration::MAX,
        )
        .await
        .expect("complete with Duration::MAX");
    match store.begin(&key, &fingerprint, Duration::MAX).await {
        Ok(BeginOutcome::Completed(record)) => assert_eq!(record, response.encode()),
        other => panic!("expected the stored response, got {other:?}"),
    }
}

#[tokio::test]
async fn redis_keeps_the_longest_durations() {
    let store = RedisStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix("maxduration:");
    longest_durations_are_kept_not_refused(&store).await;
    for (key, ttl) in ttls_under("maxduration:").await {
        assert!(ttl > 0, "{key} has no expiry (PTTL {ttl})");
    }
}

#[tokio::test]
async fn postgres_keeps_the_longest_durations() {
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let store = PostgresStore::new(pool)
        .with_table("max_duration_records")
        .unwrap();
    store.migrate().await.unwrap();
    longest_durations_are_kept_not_refused(&store).await;
}

/// The Valkey that scripts/with-servers built, which takes `SET … IFEQ`.
fn valkey_server() -> String {
    std::env::var("TEST_VALKEY_SERVER")
        .expect("TEST_VALKEY_SERVER is not set: run the tests with ./scripts/test")
}

/// How often the server at `url` has run `command`, and how often it
/// failed, from `INFO commandstats`.
async fn command_calls(url: &str, command: &str) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis_connection(url).await)
        .await
        .unwrap();
    let Some(line) = info
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
    else {
        return (0, 0);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .map_or(0, |n| n.parse().unwrap())
    };
    (field("calls"), field("failed_calls"))
}

/// Unique first uses, then a replay of each, through the layer on `store`:
/// each runs its handler once and replays what it answered.
async fn first_uses_then_replays(store: RedisStore, keys: usize) {
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store),
        counter.handler(Duration::ZERO),
    );
    let keys: Vec<String> = (0..keys).map(|_| unique_key("native")).collect();
    for key in &keys {
        let first = send(&svc, post("/payments", Some(key), "{}")).await;
        assert_eq!(first.status(), StatusCode::CREATED);
    }
    for key in &keys {
        let replay = send(&svc, post("/payments", Some(key), "{}")).await;
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(counter.runs(), keys.len());
}

/// On a server with `SET … IFEQ` (Valkey 8.1), a first use is two native
/// commands: no script runs, and every record replays.
#[tokio::test]
async fn first_uses_on_valkey_run_no_script() {
    let port = free_port();
    let _server = own_server(&valkey_server(), port, &[]);
    let url = format!("redis://127.0.0.1:{port}");
    let store = RedisStore::connect(&url).await.unwrap();
    first_uses_then_replays(store, 20).await;
    for script in ["evalsha", "eval"] {
        assert_eq!(command_calls(&url, script).await, (0, 0), "{script}");
    }
    // A begin for each of the 40 requests, a complete for each first use.
    assert_eq!(command_calls(&url, "set").await, (60, 0), "SETs, refused");
}

/// On Redis 7.0, which has no `SET … IFEQ`, a store that connected knows
/// it from the server's version: each completion runs its script, and no
/// `SET` is refused.
#[tokio::test]
async fn first_uses_on_redis_7_run_scripts_without_asking_for_ifeq() {
    let port = free_port();
    let _server = own_redis(port, &[]);
    let url = format!("redis://127.0.0.1:{port}");
    let store = RedisStore::connect(&url).await.unwrap();
    first_uses_then_replays(store, 20).await;
    let (scripts, _) = command_calls(&url, "evalsha").await;
    assert!(scripts >= 20, "{scripts} scripts for 20 first uses");
    assert_eq!(command_calls(&url, "set").await.1, 0, "SETs refused");
}

/// A store on a connection of the application's own, which has not read
/// the server's version, asks once: Redis 7.0 refuses the `SET … IFEQ`,
/// and every completion runs its script from then on.
#[tokio::test]
async fn a_store_on_a_connection_of_its_own_asks_redis_7_for_ifeq_once() {
    let port = free_port();
    let _server = own_redis(port, &[]);
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.as_str()).unwrap();
    let connection = redis::aio::ConnectionManager::new(client).await.unwrap();
    first_uses_then_replays(RedisStore::new(connection), 20).await;
    let (scripts, _) = command_calls(&url, "evalsha").await;
    assert!(scripts >= 20, "{scripts} scripts for 20 first uses");
    assert_eq!(command_calls(&url, "set").await.1, 1, "SETs refused");
}

/// The server applies a completion and the connection goes before its
/// answer does (`proxy` drops it): the layer asks again, over a new
/// connection. The handler ran once for the key, and the key replays what
/// it answered. Another key is used first, so that the server has every
/// script and statement the store runs before the answer is lost. The
/// retry finds the record its own token wrote and takes it for done: the
/// store's completions answer a backend error, then `Ok`, and the layer
/// logs nothing above `DEBUG`.
async fn completion_whose_answer_is_lost<F, Settled>(
    proxy: Arc<proxy::Proxy>,
    store: Arc<dyn Store>,
    settled: F,
) where
    F: Fn() -> Settled + Clone + Send + Sync + 'static,
    Settled: std::future::Future<Output = ()> + Send,
{
    let store = Arc::new(CompletionsSeen {
        store,
        seen: std::sync::Mutex::default(),
    });
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = Arc::new(AtomicUsize::new(0));
    let (counted, in_handler) = (Arc::clone(&runs), Arc::clone(&proxy));
    let handler = tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |_: http::Request<
            tower_idempotency::body::RequestBody<http_body_util::Full<bytes::Bytes>>,
        >| {
            let (runs, proxy, settled) = (
                Arc::clone(&counted),
                Arc::clone(&in_handler),
                settled.clone(),
            );
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                if run == 2 {
                    // Once the store is quiet, the next answer is this
                    // key's completion's.
                    settled().await;
                    proxy.lose_next_answer();
                }
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(StatusCode::CREATED)
                        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                            "run {run}"
                        ))))
                        .unwrap(),
                )
            }
        },
    ));
    let svc = app(
        &IdempotencyLayer::with_shared_store(Arc::clone(&store) as Arc<dyn Store>),
        handler,
    );
    let warm_up = send(&svc, post("/payments", Some(&unique_key("warm-up")), "{}")).await;
    assert_eq!(warm_up.status(), StatusCode::CREATED);
    store.seen.lock().unwrap().clear();
    let key = unique_key("lost-answer");
    let (logs, _guard) = common::capture_logs();
    let (first, first_body) =
        common::read(send(&svc, post("/payments", Some(&key), "{}")).await).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(proxy.answers_lost(), 1, "the completion's answer was lost");
    let (replay, replay_body) =
        common::read(send(&svc, post("/payments", Some(&key), "{}")).await).await;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay_body, first_body);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        *store.seen.lock().unwrap(),
        ["backend", "ok"],
        "the key's completions"
    );
    // The client's own complaints about the connection that went are not
    // the layer's.
    let logs = logs.text();
    let warned = logs.lines().any(|line| {
        (line.contains(" WARN ") || line.contains(" ERROR ")) && line.contains("tower_idempotency")
    });
    assert!(!warned, "{logs}");
}

/// A store that notes what each of its completions answered.
#[derive(Debug)]
struct CompletionsSeen {
    store: Arc<dyn Store>,
    seen: std::sync::Mutex<Vec<&'static str>>,
}

#[async_trait::async_trait]
impl Store for CompletionsSeen {
    async fn begin(
        &self,
        key: &tower_idempotency::key::RecordKey,
        fingerprint: &tower_idempotency::key::Fingerprint,
        lease: Duration,
    ) -> Result<tower_idempotency::store::BeginOutcome, tower_idempotency::store::StoreError> {
        self.store.begin(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &tower_idempotency::key::RecordKey,
        fingerprint: &tower_idempotency::key::Fingerprint,
        token: tower_idempotency::store::LockToken,
        outcome: tower_idempotency::store::Completion,
        ttl: Duration,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        use tower_idempotency::store::StoreError;
        let done = self
            .store
            .complete(key, fingerprint, token, outcome, ttl)
            .await;
        self.seen.lock().unwrap().push(match &done {
            Ok(()) => "ok",
            Err(StoreError::Backend(_)) => "backend",
            Err(StoreError::LockLost) => "lock lost",
            Err(_) => "another error",
        });
        done
    }

    async fn release(
        &self,
        key: &tower_idempotency::key::RecordKey,
        token: tower_idempotency::store::LockToken,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.store.release(key, token).await
    }

    async fn fence(
        &self,
        key: &tower_idempotency::key::RecordKey,
        token: tower_idempotency::store::LockToken,
        ttl: Duration,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.store.fence(key, token, ttl).await
    }

    async fn renew(
        &self,
        key: &tower_idempotency::key::RecordKey,
        token: tower_idempotency::store::LockToken,
        lease: Duration,
    ) -> Result<(), tower_idempotency::store::StoreError> {
        self.store.renew(key, token, lease).await
    }
}

/// [`completion_whose_answer_is_lost`] on the Redis or Valkey at `url`.
async fn redis_completion_whose_answer_is_lost(url: &str) {
    let proxy = Arc::new(proxy::Proxy::start(proxy::url_addr(url)).await);
    let store = RedisStore::connect(&proxy::via(url, proxy.addr))
        .await
        .unwrap();
    completion_whose_answer_is_lost(proxy, Arc::new(store), || async {}).await;
}

/// On Valkey the retry is the same `SET … IFEQ`, which answers the record.
#[tokio::test]
async fn a_native_completion_whose_answer_is_lost_is_retried_and_finds_its_own_record() {
    let port = free_port();
    let _server = own_server(&valkey_server(), port, &[]);
    let url = format!("redis://127.0.0.1:{port}");
    redis_completion_whose_answer_is_lost(&url).await;
    // The warm-up's begin and completion, the key's begin, its completion
    // twice and its replay's begin.
    assert_eq!(command_calls(&url, "set").await, (6, 0), "SETs, refused");
    assert_eq!(command_calls(&url, "evalsha").await, (0, 0));
}

/// On Redis 7.0 the retry stages the record again, and the script, finding
/// the record, drops what was staged: only the record is left.
#[tokio::test]
async fn a_scripted_completion_whose_answer_is_lost_is_retried_and_finds_its_own_record() {
    let port = free_port();
    let _server = own_redis(port, &[]);
    let url = format!("redis://127.0.0.1:{port}");
    redis_completion_whose_answer_is_lost(&url).await;
    // The warm-up's completion (once refused, as the fresh server had not
    // the script yet), the key's completion and its retry.
    let (calls, refused) = command_calls(&url, "evalsha").await;
    assert_eq!(calls - refused, 3, "{calls} scripts run, {refused} refused");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis_connection(&url).await)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|key| !key.contains(":staged:")), "{keys:?}");
}

/// On PostgreSQL the retried `UPDATE` finds the row its token completed,
/// and writes the same record again.
#[tokio::test]
async fn a_postgres_completion_whose_answer_is_lost_is_retried_and_finds_its_own_record() {
    let proxy = Arc::new(proxy::Proxy::start(proxy::url_addr(&database_url())).await);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        // No ping before the completion's `UPDATE`: the answer lost is its.
        .test_before_acquire(false)
        .connect(&proxy::via(&database_url(), proxy.addr))
        .await
        .unwrap();
    let store = PostgresStore::new(pool.clone())
        .with_table("lost_answer_records")
        .unwrap();
    store.migrate().await.unwrap();
    // sqlx pings a connection given back to the pool before it is idle:
    // that answer must come before the one to lose.
    let settled = move || {
        let pool = pool.clone();
        async move {
            for _ in 0..5_000 {
                if pool.num_idle() == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("the pool's connection never came back");
        }
    };
    completion_whose_answer_is_lost(proxy, Arc::new(store), settled).await;
}
