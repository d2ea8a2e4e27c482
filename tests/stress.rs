//! Thousands of requests over hundreds of keys against a real server, with
//! client cancellations, failing and panicking handlers mixed in. At the end
//! every key has run successfully at most once, none is stuck, and every
//! replay equals its original byte for byte.

mod common;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tower::{service_fn, Layer};
use tower_idempotency::{body::RequestBody, IdempotencyLayer};

const REQUESTS: usize = 3000;
const KEYS: u64 = 200;
const CLIENTS: usize = 32;

/// A small deterministic generator, so a failure can be replayed.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[derive(Default)]
struct Ledger {
    /// Successful executions per key.
    succeeded: Mutex<HashMap<String, u64>>,
    executions: AtomicU64,
}

fn handler(
    ledger: Arc<Ledger>,
) -> impl tower::Service<
    Request<RequestBody<Incoming>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req: Request<RequestBody<Incoming>>| {
        let ledger = Arc::clone(&ledger);
        async move {
            let key = req.headers()["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned();
            let execution = ledger.executions.fetch_add(1, Ordering::SeqCst);
            let roll = mix(execution ^ 0x5eed);
            tokio::time::sleep(Duration::from_millis(roll % 15)).await;
            match roll % 20 {
                0 => panic!("injected handler panic"),
                1 | 2 => {
                    return Ok(Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(Full::new(Bytes::from_static(b"try again")))
                        .unwrap())
                }
                _ => {}
            }
            *ledger
                .succeeded
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default() += 1;
            let body = format!(
                "{{\"key\":\"{key}\",\"execution\":{execution},\"pad\":\"{}\"}}",
                "x".repeat((roll % 2000) as usize)
            );
            Ok(Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "application/json")
                .header("x-execution", execution.to_string())
                .body(Full::new(Bytes::from(body)))
                .unwrap())
        }
    })
}

#[derive(Debug)]
struct Seen {
    status: u16,
    execution: Option<String>,
    body: Bytes,
}

async fn attempt(client: &reqwest::Client, base: &str, key: &str) -> Result<Seen, reqwest::Error> {
    let response = client
        .post(format!("{base}/payments"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(format!("{{\"for\":\"{key}\"}}"))
        .send()
        .await?;
    let status = response.status().as_u16();
    let execution = response
        .headers()
        .get("x-execution")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.bytes().await?;
    Ok(Seen {
        status,
        execution,
        body,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_never_runs_a_key_twice_and_leaves_none_stuck() {
    let ledger = Arc::new(Ledger::default());
    let layer = IdempotencyLayer::default().with_lease(Duration::from_secs(5));
    let addr = common::serve(layer.layer(handler(Arc::clone(&ledger)))).await;
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let seen: Arc<Mutex<HashMap<String, Vec<Seen>>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));

    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, base, seen, next) = (
                client.clone(),
                base.clone(),
                Arc::clone(&seen),
                Arc::clone(&next),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= REQUESTS as u64 {
                        return;
                    }
                    let roll = mix(n);
                    let key = format!("chaos-{}", roll % KEYS);
                    let result = if roll % 10 == 0 {
                        // Hang up after a few milliseconds, mid-request.
                        let wait = Duration::from_millis(roll % 8);
                        match tokio::time::timeout(wait, attempt(&client, &base, &key)).await {
                            Ok(result) => result,
                            Err(_) => continue,
                        }
                    } else {
                        attempt(&client, &base, &key).await
                    };
                    if let Ok(response) = result {
                        seen.lock().unwrap().entry(key).or_default().push(response);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }

    // Every key settles: a final retry is answered, within the lease, by a
    // replay or a fresh run, never a lock left behind.
    for k in 0..KEYS {
        let key = format!("chaos-{k}");
        let mut settled = None;
        for _ in 0..100 {
            match attempt(&client, &base, &key).await {
                Ok(seen) if seen.status == 409 || seen.status == 503 => {}
                Ok(seen) => {
                    settled = Some(seen);
                    break;
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let settled = settled.unwrap_or_else(|| panic!("{key} is stuck"));
        assert_eq!(settled.status, 201, "{key}: {settled:?}");
        seen.lock().unwrap().entry(key).or_default().push(settled);
    }

    let succeeded = ledger.succeeded.lock().unwrap();
    let seen = seen.lock().unwrap();
    let mut replays = 0;
    for k in 0..KEYS {
        let key = format!("chaos-{k}");
        assert_eq!(
            succeeded.get(&key),
            Some(&1),
            "{key} ran successfully more than once, or never"
        );
        let created: Vec<&Seen> = seen[&key].iter().filter(|s| s.status == 201).collect();
        let original = created[0];
        for other in &created[1..] {
            assert_eq!(
                other.execution, original.execution,
                "{key}: two executions answered 201"
            );
            assert_eq!(
                other.body, original.body,
                "{key}: a replay differs from the original"
            );
        }
        replays += created.len() - 1;
    }
    assert!(replays > 1000, "the run exercised replays ({replays})");
    assert!(
        ledger.executions.load(Ordering::SeqCst) > KEYS,
        "failures were injected and retried"
    );
}
