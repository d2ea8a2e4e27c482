//! Exactly once when the server dies: two replicas of the payments example
//! on real PostgreSQL, whose payments commit in the same transaction as the
//! layer's fence. A holder killed after its commit, stopped past its lease
//! before its commit, or cut off from the store before `complete`, never
//! leads to a second payment; nor do replicas killed at random.
#![cfg(feature = "postgres")]

#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/process.rs"]
mod process;
#[path = "common/proxy.rs"]
mod proxy;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

const LEASE_MS: &str = "1500";
const LEASE: Duration = Duration::from_millis(1500);

fn replica(database: &str, extra: &[(&str, &str)]) -> process::Example {
    let mut env = vec![
        ("IDEMPOTENCY_STORE", database),
        ("IDEMPOTENCY_LEASE_MS", LEASE_MS),
    ];
    env.extend_from_slice(extra);
    process::start("payments", &env)
}

/// POSTs the payment under `key`: status, whether it was a replay, body.
async fn pay(
    client: &reqwest::Client,
    base: &str,
    key: &str,
) -> reqwest::Result<(u16, bool, Value)> {
    let response = client
        .post(format!("{base}/payments"))
        .header("idempotency-key", key)
        .json(&json!({"amount": 1200, "currency": "EUR"}))
        .send()
        .await?;
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    Ok((
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    ))
}

/// The ids of every payment in the table.
async fn payment_ids(database: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(database).await.unwrap();
    let ids = sqlx::query_scalar("SELECT id FROM payments ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    ids
}

/// Waits until the table holds `count` payments.
async fn until_committed(database: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ids = payment_ids(database).await;
        if ids.len() >= count {
            return ids;
        }
        assert!(Instant::now() < deadline, "no payment was committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {}", child.id());
}

#[tokio::test]
async fn holder_killed_after_its_commit_is_recovered_with_the_same_payment() {
    let database = postgres::fresh_database("killed_after_commit").await;
    let mut holder = replica(&database, &[("PAYMENT_AFTER_COMMIT_MS", "30000")]);
    let other = replica(&database, &[]);
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let (client, base) = (client.clone(), holder.base.clone());
        async move { pay(&client, &base, "killed-after-commit").await }
    });
    let committed = until_committed(&database, 1).await;
    holder.child.kill().expect("kill -9 the holder");
    holder.child.wait().expect("reap the holder");
    assert!(
        in_flight.await.unwrap().is_err(),
        "the client lost its connection"
    );

    let (status, _, _) = pay(&client, &other.base, "killed-after-commit")
        .await
        .unwrap();
    assert_eq!(status, 409, "the lease still protects the key");
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    let (status, replayed, body) = pay(&client, &other.base, "killed-after-commit")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert!(!replayed, "a recovery, not a replay");
    assert_eq!(body["id"], committed[0], "the payment that was committed");
    let (_, replayed, again) = pay(&client, &other.base, "killed-after-commit")
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(again["id"], committed[0]);
    assert_eq!(payment_ids(&database).await, committed, "one payment");
}

#[tokio::test]
async fn holder_stopped_past_its_lease_before_its_commit_is_fenced_out() {
    let database = postgres::fresh_database("stopped_before_commit").await;
    let holder = replica(&database, &[("PAYMENT_DELAY_MS", "2500")]);
    let other = replica(&database, &[]);
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let (client, base) = (client.clone(), holder.base.clone());
        async move { pay(&client, &base, "stopped-before-commit").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&holder.child, "STOP");
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    // The other replica takes the key over and charges.
    let (status, _, taken_over) = pay(&client, &other.base, "stopped-before-commit")
        .await
        .unwrap();
    assert_eq!(status, 201, "{taken_over}");
    // The stopped holder wakes up: its fence is refused, its transaction
    // rolls back, and its client is told nothing was charged there.
    signal(&holder.child, "CONT");
    let (status, _, _) = in_flight.await.unwrap().expect("the holder answers");
    assert_eq!(status, 409);
    assert_eq!(
        payment_ids(&database).await,
        vec![taken_over["id"].as_str().unwrap().to_owned()]
    );
    let (_, replayed, again) = pay(&client, &holder.base, "stopped-before-commit")
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(again["id"], taken_over["id"]);
}

// Two workers: the proxy forwards while the test waits for a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_cut_off_after_the_commit_is_recovered_with_the_same_payment() {
    let database = postgres::fresh_database("cut_after_commit").await;
    let cut = proxy::Proxy::start(proxy::url_addr(&database)).await;
    let holder = replica(
        &proxy::via(&database, cut.addr),
        &[("PAYMENT_AFTER_COMMIT_MS", "1000")],
    );
    let other = replica(&database, &[]);
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let (client, base) = (client.clone(), holder.base.clone());
        async move { pay(&client, &base, "cut-after-commit").await }
    });
    let committed = until_committed(&database, 1).await;
    // The payment is committed; the store goes away before `complete`.
    cut.cut();
    let (status, _, body) = in_flight.await.unwrap().expect("the holder answers");
    assert_eq!(status, 201, "the charge itself succeeded: {body}");
    assert_eq!(body["id"], committed[0]);
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    let (status, replayed, body) = pay(&client, &other.base, "cut-after-commit").await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert!(!replayed, "a recovery, not a replay");
    assert_eq!(body["id"], committed[0]);
    assert_eq!(payment_ids(&database).await, committed, "one payment");
}

/// Two replicas under clients that retry every key until it is paid,
/// while a killer SIGKILLs a replica at a random point every few hundred
/// milliseconds and starts it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_at_random_never_pay_a_key_twice() {
    const KEYS: usize = 1000;
    const CLIENTS: usize = 8;
    let database = postgres::fresh_database("chaos").await;
    let start = |database: &str| {
        process::start(
            "payments",
            &[
                ("IDEMPOTENCY_STORE", database),
                ("IDEMPOTENCY_LEASE_MS", "600"),
                ("PAYMENT_DELAY_MS", "20"),
                ("PAYMENT_AFTER_COMMIT_MS", "20"),
            ],
        )
    };
    let replicas = Arc::new(Mutex::new(vec![start(&database), start(&database)]));
    let base_of = |replicas: &Mutex<Vec<process::Example>>, n: usize| {
        replicas.lock().unwrap()[n % 2].base.clone()
    };
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (replicas, done, kills, database) = (
            Arc::clone(&replicas),
            Arc::clone(&done),
            Arc::clone(&kills),
            database.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(150 + next() % 350));
                let victim = (next() % 2) as usize;
                let fresh = start(&database);
                let mut replicas = replicas.lock().unwrap();
                let old = std::mem::replace(&mut replicas[victim], fresh);
                drop(replicas);
                drop(old); // SIGKILL, at whatever point it had reached
                kills.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let requests = Arc::new(AtomicUsize::new(0));
    // A second charge of a key would break the table's unique record key
    // and answer 500: counted, so that "paid twice" cannot hide there.
    let failed = Arc::new(AtomicUsize::new(0));
    let paid: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let next_key = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|worker| {
            let (client, requests, paid, next_key, failed) = (
                client.clone(),
                Arc::clone(&requests),
                Arc::clone(&paid),
                Arc::clone(&next_key),
                Arc::clone(&failed),
            );
            let replicas = Arc::clone(&replicas);
            tokio::spawn(async move {
                loop {
                    let n = next_key.fetch_add(1, Ordering::SeqCst);
                    if n >= KEYS {
                        return;
                    }
                    let key = format!("chaos-{n}");
                    let deadline = Instant::now() + Duration::from_secs(60);
                    for attempt in 0.. {
                        assert!(Instant::now() < deadline, "{key} was never paid");
                        let base = base_of(&replicas, worker + attempt);
                        requests.fetch_add(1, Ordering::SeqCst);
                        match pay(&client, &base, &key).await {
                            Ok((201, _, body)) => {
                                let id = body["id"].as_str().unwrap().to_owned();
                                paid.lock().unwrap().insert(key, id);
                                break;
                            }
                            Ok((500, _, _)) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {}
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    killer.await.unwrap();

    // After the last lease, every key answers its one payment: none stuck.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let base = base_of(&replicas, 0);
    let mut stuck = 0;
    for n in 0..KEYS {
        let key = format!("chaos-{n}");
        requests.fetch_add(1, Ordering::SeqCst);
        match pay(&client, &base, &key).await {
            Ok((201, _, body)) => {
                assert_eq!(
                    body["id"].as_str(),
                    paid.lock().unwrap().get(&key).map(String::as_str)
                )
            }
            _ => stuck += 1,
        }
    }
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let (payments, keys, twice): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT record_key),
                (SELECT count(*) FROM (SELECT record_key FROM payments
                                       GROUP BY record_key HAVING count(*) > 1) t)
         FROM payments",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let failed = failed.load(Ordering::SeqCst);
    eprintln!(
        "chaos: {} requests over {KEYS} keys, {} replicas killed; {payments} payments, \
         {twice} keys paid twice, {failed} answers 500, {stuck} keys stuck after the last lease",
        requests.load(Ordering::SeqCst),
        kills.load(Ordering::SeqCst),
    );
    assert_eq!(twice, 0, "keys paid twice");
    assert_eq!(failed, 0, "no second charge was refused by the table");
    assert_eq!(stuck, 0, "keys stuck after the last lease");
    assert_eq!((payments, keys), (KEYS as i64, KEYS as i64));
}
