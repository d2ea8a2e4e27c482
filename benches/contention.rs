//! Many tasks on the multi-threaded runtime: distinct keys (should scale
//! with cores) and one hot key (replays of one record), each against the
//! same load without the layer.
// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tower::{Layer, ServiceExt};
use tower_idempotency::IdempotencyLayer;

mod common;
use common::{drain, handler, request};

const TASKS: u64 = 64;
const PER_TASK: u64 = 200;

#[derive(Clone, Copy)]
enum Keys {
    None,
    Distinct,
    Hot,
}

fn run(workers: usize, keys: Keys, layered: bool) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    let body = Bytes::from(vec![b'x'; 1024]);
    rt.block_on(async move {
        let layer = IdempotencyLayer::default();
        let svc = layer.layer(tower::service_fn(handler));
        let base = tower::service_fn(handler);
        drain(
            svc.clone()
                .oneshot(request(Some("hot"), &body))
                .await
                .unwrap(),
        )
        .await;
        let body = Arc::new(body);
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (svc, body) = (svc.clone(), Arc::clone(&body));
                tokio::spawn(async move {
                    for i in 0..PER_TASK {
                        let key = match keys {
                            Keys::None => None,
                            Keys::Distinct => Some(format!("k-{t}-{i}")),
                            Keys::Hot => Some("hot".to_owned()),
                        };
                        let req = request(key.as_deref(), &body);
                        if layered {
                            drain(svc.clone().oneshot(req).await.unwrap()).await;
                        } else {
                            drain(base.oneshot(req).await.unwrap()).await;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        start.elapsed()
    })
}

fn contention(c: &mut Criterion) {
    let mut group = c.benchmark_group("contention");
    group.throughput(Throughput::Elements(TASKS * PER_TASK));
    group.sample_size(20);
    for workers in [1, 2] {
        for (name, keys, layered) in [
            ("baseline", Keys::None, false),
            ("distinct_keys", Keys::Distinct, true),
            ("hot_key", Keys::Hot, true),
        ] {
            group.bench_function(format!("{name}/{workers}w"), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| run(workers, keys, layered)).sum())
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = contention
}
criterion_main!(benches);
