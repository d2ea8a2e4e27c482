//! A fixed number of requests down one path, for instruction counting.
//!
//! Timings on shared machines drift; instruction counts do not. This runs
//! `REQUESTS` requests (default 1,000) of one `PATH` (`baseline`,
//! `first_use` or `replay`) through the benches' handler with a 0-byte
//! body, so that `scripts/count-instructions` can run it under callgrind at
//! two counts and take the difference per request.
// A bench target without criterion: nothing here is public API.
#![allow(missing_docs)]

use bytes::Bytes;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::IdempotencyLayer;

mod common;
use common::{drain, handler, request};

fn main() {
    let path = std::env::var("PATH_UNDER_TEST").unwrap_or_else(|_| "first_use".to_owned());
    let requests: usize = std::env::var("REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    // Made before the loop, so that every path pays the same for them.
    let keys: Vec<String> = (0..requests).map(|i| format!("key-{i}")).collect();
    let body = Bytes::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut bare = tower::service_fn(handler);
        let mut layered = IdempotencyLayer::default().layer(tower::service_fn(handler));
        for key in &keys {
            match path.as_str() {
                // The same keyed request as a first use, which the bare
                // handler ignores: what is counted is the layer's own work.
                "baseline" => {
                    let svc = bare.ready().await.expect("ready");
                    drain(svc.call(request(Some(key), &body)).await.expect("response")).await;
                }
                "first_use" => {
                    let svc = layered.ready().await.expect("ready");
                    drain(svc.call(request(Some(key), &body)).await.expect("response")).await;
                }
                "replay" => {
                    let svc = layered.ready().await.expect("ready");
                    drain(
                        svc.call(request(Some("one-key"), &body))
                            .await
                            .expect("response"),
                    )
                    .await;
                }
                other => {
                    panic!("PATH_UNDER_TEST must be baseline, first_use or replay, not {other:?}")
                }
            }
        }
    });
}
