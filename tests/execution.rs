//! The handler sees the lock it runs under, fences its effect, and is told
//! when it runs as a recovery.

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use common::{post, read};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    body::RequestBody, key::RecordKey, store::StoreError, Execution, IdempotencyLayer,
};

type Req = Request<RequestBody<Full<Bytes>>>;

fn execution_of(request: &Req) -> Execution {
    request
        .extensions()
        .get::<Execution>()
        .expect("every keyed request carries its execution")
        .clone()
}

#[tokio::test]
async fn a_keyed_request_carries_its_execution() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let handler_seen = Arc::clone(&seen);
    let svc = IdempotencyLayer::default().layer(tower::service_fn(move |request: Req| {
        *handler_seen.lock().unwrap() = Some(execution_of(&request));
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    }));
    svc.oneshot(post("/payments", Some("seen"), "{}"))
        .await
        .unwrap();
    let execution = seen.lock().unwrap().take().unwrap();
    assert_eq!(execution.record_key(), RecordKey::new(b"", "seen"));
    assert!(!execution.is_recovery());
}

/// A handler that counts its effects: it fences, performs the effect, and
/// then fails the way a crash after the effect would look from the layer
/// (a 503, which releases the key). A recovery answers from what was done.
fn fails_after_its_effect(
    effects: Arc<AtomicUsize>,
) -> impl tower::Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future = impl Send>
       + Clone {
    tower::service_fn(move |request: Req| {
        let effects = Arc::clone(&effects);
        let execution = execution_of(&request);
        async move {
            let (status, body) = if execution.is_recovery() {
                let done = effects.load(Ordering::SeqCst);
                (StatusCode::CREATED, format!("recovered effect {done}"))
            } else {
                execution.fence().await.expect("the first holder fences");
                let done = effects.fetch_add(1, Ordering::SeqCst) + 1;
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("effect {done}, then lost"),
                )
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            Ok(response)
        }
    })
}

#[tokio::test]
async fn a_fenced_key_is_recovered_instead_of_run_again() {
    let effects = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::default().layer(fails_after_its_effect(Arc::clone(&effects)));
    let first = svc
        .clone()
        .oneshot(post("/payments", Some("fenced"), "{}"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (head, body) = read(
        svc.clone()
            .oneshot(post("/payments", Some("fenced"), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, StatusCode::CREATED);
    assert_eq!(body, "recovered effect 1");
    // The recovery's response is stored like any other.
    let (replay, body) = read(
        svc.oneshot(post("/payments", Some("fenced"), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(body, "recovered effect 1");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_recovery_that_fences_again_is_refused() {
    let refused = Arc::new(AtomicUsize::new(0));
    let handler_refused = Arc::clone(&refused);
    let svc = IdempotencyLayer::default().layer(tower::service_fn(move |request: Req| {
        let refused = Arc::clone(&handler_refused);
        let execution = execution_of(&request);
        async move {
            // Ignores recovery: fences every time, and fails after it.
            if let Err(StoreError::EffectCommitted) = execution.fence().await {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, Infallible>(response)
        }
    }));
    for _ in 0..3 {
        svc.clone()
            .oneshot(post("/payments", Some("ignores-recovery"), "{}"))
            .await
            .unwrap();
    }
    assert_eq!(refused.load(Ordering::SeqCst), 2);
}
