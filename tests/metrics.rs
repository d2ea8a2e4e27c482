//! The layer's reports through the `metrics` facade (feature `metrics`),
//! read back with a debugging recorder.

mod common;

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use common::{faulty::Faulty, post, send, Counter};
use http::StatusCode;
use metrics_util::{
    debugging::{DebugValue, DebuggingRecorder, Snapshot},
    MetricKind,
};
use tower_idempotency::{metrics::Decision, IdempotencyLayer, MemoryStore};

const KEY: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

/// Runs `test` on a runtime of this thread with a recorder of its own, so
/// that tests running at once never see each other's metrics.
fn recorded<F: Future>(test: impl FnOnce() -> F) -> Snapshot {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test())
    });
    snapshotter.snapshot()
}

/// Each metric of `kind` named `name`, by its labels as `k=v,k=v`.
fn series(snapshot: Snapshot, kind: MetricKind, name: &str) -> BTreeMap<String, DebugValue> {
    snapshot
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.kind() == kind && key.key().name() == name)
        .map(|(key, _, _, value)| {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()))
                .collect();
            (labels.join(","), value)
        })
        .collect()
}

fn counts(snapshot: Snapshot) -> BTreeMap<String, u64> {
    series(snapshot, MetricKind::Counter, "idempotency_requests_total")
        .into_iter()
        .map(|(labels, value)| match value {
            DebugValue::Counter(n) => (labels, n),
            other => panic!("not a counter: {other:?}"),
        })
        .collect()
}

/// How many durations each `operation=..,result=..` recorded.
fn timings(snapshot: Snapshot) -> BTreeMap<String, usize> {
    series(
        snapshot,
        MetricKind::Histogram,
        "idempotency_store_call_duration_seconds",
    )
    .into_iter()
    .map(|(labels, value)| match value {
        DebugValue::Histogram(durations) => {
            assert!(durations.iter().all(|d| d.0 >= 0.0 && d.0 < 60.0));
            (labels, durations.len())
        }
        other => panic!("not a histogram: {other:?}"),
    })
    .collect()
}

fn expected<T: Copy>(pairs: &[(&str, T)]) -> BTreeMap<String, T> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn every_decision_is_counted_under_its_outcome_label() {
    let snapshot = recorded(|| async {
        let counter = Counter::default();
        let service = common::app(
            &IdempotencyLayer::default(),
            counter.handler(Duration::ZERO),
        );
        let first = send(&service, post("/pay", Some(KEY), "{}")).await;
        assert_eq!(first.status(), StatusCode::CREATED);
        let retry = send(&service, post("/pay", Some(KEY), "{}")).await;
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        let reused = send(&service, post("/pay", Some(KEY), "{\"other\":1}")).await;
        assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let bad = send(&service, post("/pay", Some(""), "{}")).await;
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        send(&service, post("/pay", None, "{}")).await;
        assert_eq!(counter.runs(), 2);
    });
    assert_eq!(
        counts(snapshot),
        expected(&[
            ("outcome=executed", 1),
            ("outcome=mismatch", 1),
            ("outcome=pass_through", 1),
            ("outcome=rejected", 1),
            ("outcome=replayed", 1),
        ])
    );
}

#[test]
fn the_facade_and_the_built_in_handle_count_alike() {
    let layer = IdempotencyLayer::default();
    let handle = layer.metrics();
    let snapshot = recorded(|| async {
        let service = common::app(&layer, Counter::default().handler(Duration::ZERO));
        for _ in 0..3 {
            send(&service, post("/pay", Some(KEY), "{}")).await;
        }
    });
    assert_eq!(handle.count(Decision::Executed), 1);
    assert_eq!(handle.count(Decision::Replayed), 2);
    assert_eq!(
        counts(snapshot),
        expected(&[("outcome=executed", 1), ("outcome=replayed", 2)])
    );
}

#[test]
fn each_store_call_is_timed_by_operation_and_result() {
    let store = Arc::new(Faulty {
        failing_completions: 1.into(),
        ..Faulty::default()
    });
    let snapshot = recorded(|| async {
        let layer = IdempotencyLayer::with_shared_store(Arc::clone(&store) as _);
        let service = common::app(&layer, Counter::default().handler(Duration::ZERO));
        let first = send(&service, post("/pay", Some(KEY), "{}")).await;
        common::read(first).await;
        let retry = send(&service, post("/pay", Some(KEY), "{}")).await;
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
    });
    assert_eq!(
        timings(snapshot),
        expected(&[
            ("operation=begin,result=ok", 2),
            ("operation=complete,result=error", 1),
            ("operation=complete,result=ok", 1),
        ])
    );
}

#[test]
fn a_fence_through_the_execution_is_timed() {
    use axum::{routing::post as route, Extension, Router};
    use tower::ServiceExt;
    use tower_idempotency::Execution;

    let snapshot = recorded(|| async {
        let app = Router::new()
            .route(
                "/pay",
                route(|Extension(execution): Extension<Execution>| async move {
                    execution.fence().await.expect("fenced");
                    StatusCode::CREATED
                }),
            )
            .layer(IdempotencyLayer::new(MemoryStore::new()));
        let request = post("/pay", Some(KEY), "{}").map(axum::body::Body::new);
        assert_eq!(
            app.oneshot(request).await.unwrap().status(),
            StatusCode::CREATED
        );
    });
    let timings = timings(snapshot);
    assert_eq!(timings.get("operation=fence,result=ok"), Some(&1));
    assert_eq!(timings.get("operation=complete,result=ok"), Some(&1));
}

#[test]
fn describe_gives_each_metric_its_unit_and_help() {
    let snapshot = recorded(|| async {
        tower_idempotency::metrics::describe();
        let service = common::app(
            &IdempotencyLayer::default(),
            Counter::default().handler(Duration::ZERO),
        );
        send(&service, post("/pay", Some(KEY), "{}")).await;
    });
    let units: BTreeMap<String, &str> = snapshot
        .into_vec()
        .into_iter()
        .map(|(key, unit, help, _)| {
            assert!(help.is_some_and(|help| !help.is_empty()));
            (key.key().name().to_owned(), unit.expect("unit").as_str())
        })
        .collect();
    assert_eq!(
        units,
        expected(&[
            ("idempotency_requests_total", "count"),
            ("idempotency_store_call_duration_seconds", "seconds"),
        ])
    );
}

#[test]
fn a_store_call_dropped_before_it_finished_is_timed_as_cancelled() {
    let store = Arc::new(Faulty {
        hang_first_renewal: true,
        ..Faulty::default()
    });
    let snapshot = recorded(|| async {
        let layer = IdempotencyLayer::with_shared_store(Arc::clone(&store) as _)
            .with_lease(Duration::from_millis(60));
        let service = common::app(
            &layer,
            Counter::default().handler(Duration::from_millis(200)),
        );
        let response = send(&service, post("/pay", Some(KEY), "{}")).await;
        common::read(response).await;
    });
    let timings = timings(snapshot);
    assert!(
        timings
            .get("operation=renew,result=cancelled")
            .is_some_and(|n| *n >= 1),
        "{timings:?}"
    );
}
