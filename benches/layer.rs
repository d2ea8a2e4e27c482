//! Layer overhead on the memory store, per path and body size, against the
//! same handler without the layer; SHA-256 throughput; and canonical JSON
//! written as it is parsed against written from a parsed tree.
//!
//! `cargo bench --bench layer`; BENCHMARKS.md records the ratios.
// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};

mod common;
use common::{drain, handler, keyed};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{fingerprint::BodyFingerprint, IdempotencyLayer};

const SIZES: [(&str, usize); 4] = [
    ("0B", 0),
    ("1KiB", 1024),
    ("64KiB", 64 * 1024),
    ("1MiB", 1024 * 1024),
];

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::default().with_body_limit(2 * 1024 * 1024)
}

/// Times `iters` requests, each made by `make(i)`, through a fresh service
/// built by `build`, after `setup` requests that are not timed.
macro_rules! timed {
    ($rt:expr, $iters:expr, $svc:expr, $setup:expr, $make:expr) => {{
        $rt.block_on(async {
            let mut svc = $svc;
            for req in $setup {
                drain(svc.ready().await.unwrap().call(req).await.unwrap()).await;
            }
            let start = Instant::now();
            for i in 0..$iters {
                let req = $make(i);
                drain(svc.ready().await.unwrap().call(req).await.unwrap()).await;
            }
            start.elapsed()
        })
    }};
}

fn paths(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (label, size) in SIZES {
        let body = Bytes::from(vec![b'x'; size]);
        let other = Bytes::from(vec![b'y'; size]);
        let mut group = c.benchmark_group(format!("layer/{label}"));
        group.throughput(Throughput::Elements(1));
        if size >= 64 * 1024 {
            group.sample_size(20);
        }
        let none = || std::iter::empty::<Request<Full<Bytes>>>();

        group.bench_function("baseline", |b| {
            b.iter_custom(|n| {
                timed!(
                    rt,
                    n,
                    tower::service_fn(handler::<Full<Bytes>>),
                    none(),
                    |i: u64| keyed(i, &body)
                )
            })
        });
        group.bench_function("pass_through", |b| {
            b.iter_custom(|n| {
                timed!(
                    rt,
                    n,
                    layer().layer(tower::service_fn(handler)),
                    none(),
                    // A method the layer leaves alone, with a key.
                    |i: u64| {
                        let mut req = keyed(i, &body);
                        *req.method_mut() = Method::GET;
                        req
                    }
                )
            })
        });
        group.bench_function("first_use", |b| {
            b.iter_custom(|n| {
                timed!(
                    rt,
                    n,
                    layer().layer(tower::service_fn(handler)),
                    none(),
                    |i: u64| keyed(i, &body)
                )
            })
        });
        group.bench_function("replay", |b| {
            b.iter_custom(|n| {
                timed!(
                    rt,
                    n,
                    layer().layer(tower::service_fn(handler)),
                    [keyed(0, &body)],
                    |_| keyed(0, &body)
                )
            })
        });
        group.bench_function("mismatch_422", |b| {
            b.iter_custom(|n| {
                timed!(
                    rt,
                    n,
                    layer().layer(tower::service_fn(handler)),
                    [keyed(0, &body)],
                    |_| keyed(0, &other)
                )
            })
        });
        // A 409 needs a key in flight: the first request's handler never ends.
        group.bench_function("conflict_409", |b| {
            b.iter_custom(|n| {
                rt.block_on(async {
                    let holding = std::sync::Arc::new(tokio::sync::Notify::new());
                    let signal = std::sync::Arc::clone(&holding);
                    let stuck = tower::service_fn(move |req: Request<_>| {
                        let signal = std::sync::Arc::clone(&signal);
                        async move {
                            if req.uri().path() == "/hang" {
                                signal.notify_one();
                                std::future::pending::<()>().await;
                            }
                            handler(req).await
                        }
                    });
                    let svc = layer().layer(stuck);
                    let mut hang = keyed(0, &body);
                    *hang.uri_mut() = "/hang".parse().unwrap();
                    let holder = tokio::spawn(svc.clone().oneshot(hang));
                    holding.notified().await;
                    let start = Instant::now();
                    for _ in 0..n {
                        let mut req = keyed(0, &body);
                        *req.uri_mut() = "/hang".parse().unwrap();
                        let response = svc.clone().oneshot(req).await.unwrap();
                        assert_eq!(response.status(), StatusCode::CONFLICT);
                        drain(response).await;
                    }
                    let elapsed = start.elapsed();
                    holder.abort();
                    elapsed
                })
            })
        });
        group.finish();
    }
}

fn hashing(c: &mut Criterion) {
    let mut group = c.benchmark_group("sha256");
    for (label, size) in SIZES.into_iter().skip(1) {
        let data = vec![0xa5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &data, |b, data| {
            b.iter(|| Sha256::digest(data))
        });
    }
    group.finish();
}

/// `CanonicalJson` writes the form as it parses; `CanonicalJsonExcept`
/// builds the tree to cut members from, so with a pointer that names
/// nothing it writes the same text from the tree.
fn canonical_json(c: &mut Criterion) {
    let payment = br#"{"amount": 1000, "currency": "EUR", "description": "load test"}"#.to_vec();
    let item = r#"{"sku": "A-1002", "name": "Tea, green \u00e9", "quantity": 2, "price": 4.5, "tags": ["food", "dry"]}"#;
    let order = format!(
        r#"{{"customer": {{"id": 81723, "email": "a@example.com"}}, "items": [{}], "note": null, "gift": false}}"#,
        [item; 9].join(", ")
    )
    .into_bytes();
    let mut group = c.benchmark_group("canonical_json");
    for (label, body) in [("payment", &payment), ("order_1KiB", &order)] {
        for (way, fingerprint) in [
            ("streamed", BodyFingerprint::canonical_json()),
            ("tree", BodyFingerprint::canonical_json_except(["/none"])),
        ] {
            group.bench_function(format!("{way}/{label}"), |b| {
                b.iter(|| fingerprint.bytes(body).len())
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = paths, hashing, canonical_json
}
criterion_main!(benches);
