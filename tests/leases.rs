//! How long a key stays locked: leases renewed while their request runs,
//! never longer than the longest holding time, whatever one slow store
//! call or one runtime does.

mod common;

use std::{future::Future, sync::Arc, task::Context, time::Duration};

use common::{app, faulty::Faulty, post, read, send, spawn_send, Counter};
use http::StatusCode;
use tower::{Layer, ServiceExt};
use tower_idempotency::{key::RecordKey, IdempotencyLayer, Store};

const LEASE: Duration = Duration::from_millis(150);

fn layer_on(store: Faulty) -> IdempotencyLayer {
    IdempotencyLayer::new(store).with_lease(LEASE)
}

#[tokio::test]
async fn a_slow_completion_keeps_its_lease_until_the_store_has_it() {
    let counter = Counter::default();
    let layer = layer_on(Faulty {
        complete_delay: LEASE * 3,
        ..Faulty::default()
    });
    let svc = app(&layer, counter.handler(Duration::ZERO));
    let first = spawn_send(&svc, post("/payments", Some("slow-complete"), "{}"));
    // Past a whole lease into the completion: the key must still be held.
    tokio::time::sleep(LEASE * 2).await;
    let during = send(&svc, post("/payments", Some("slow-complete"), "{}")).await;
    assert_eq!(during.status(), StatusCode::CONFLICT);
    let (head, _) = first.await.unwrap();
    assert_eq!(head.status, StatusCode::CREATED);
    let (after, _) = read(send(&svc, post("/payments", Some("slow-complete"), "{}")).await).await;
    assert_eq!(after.headers["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn a_renewal_that_never_returns_does_not_hold_up_the_others() {
    let counter = Counter::default();
    let store = Arc::new(Faulty {
        hang_first_renewal: true,
        ..Faulty::default()
    });
    let layer =
        IdempotencyLayer::with_shared_store(Arc::clone(&store) as Arc<dyn Store>).with_lease(LEASE);
    let svc = app(&layer, counter.handler(LEASE * 5));
    let first = spawn_send(&svc, post("/payments", Some("renew-a"), "{}"));
    let second = spawn_send(&svc, post("/payments", Some("renew-b"), "{}"));
    // Three leases in, the key whose renewal did not hang must have been
    // renewed all along, and still be held.
    tokio::time::sleep(LEASE * 3).await;
    let hung = store.hung.lock().unwrap().expect("a renewal was attempted");
    let healthy = if hung == RecordKey::new(b"", "renew-a") {
        "renew-b"
    } else {
        "renew-a"
    };
    let during = send(&svc, post("/payments", Some(healthy), "{}")).await;
    assert_eq!(during.status(), StatusCode::CONFLICT);
    first.await.unwrap();
    second.await.unwrap();
}

#[tokio::test]
async fn a_key_held_past_the_longest_holding_time_frees_itself() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::default()
        .with_lease(Duration::from_millis(60))
        .with_max_hold(Duration::from_millis(200));
    // A handler that never answers, left running in the background.
    let svc = app(&layer, counter.handler(Duration::from_secs(3600)));
    let endless = spawn_send(&svc, post("/payments", Some("endless"), "{}"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held = send(&svc, post("/payments", Some("endless"), "{}")).await;
    assert_eq!(held.status(), StatusCode::CONFLICT);
    // Past the holding time and one lease more, the key is free again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retry = tokio::time::timeout(
        Duration::from_millis(100),
        send(&svc, post("/payments", Some("endless"), "{}")),
    )
    .await;
    assert!(retry.is_err(), "the retry should be running the handler");
    assert_eq!(counter.runs(), 2);
    endless.abort();
}

#[test]
fn leases_are_renewed_again_after_the_first_runtime_has_gone() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::default().with_lease(Duration::from_millis(60));
    let svc = app(&layer, counter.handler(Duration::from_millis(300)));
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    // The first runtime runs a request long enough to start the renewals,
    // then shuts down with them.
    runtime().block_on(async {
        let (head, _) =
            read(send(&svc, post("/payments", Some("first-runtime"), "{}")).await).await;
        assert_eq!(head.status, StatusCode::CREATED);
    });
    runtime().block_on(async {
        let long = spawn_send(&svc, post("/payments", Some("second-runtime"), "{}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let during = send(&svc, post("/payments", Some("second-runtime"), "{}")).await;
        assert_eq!(during.status(), StatusCode::CONFLICT);
        long.await.unwrap();
    });
    assert_eq!(counter.runs(), 2);
}

/// A lock taken just after a round of renewals is renewed at the next
/// round, well before its lease ends: when that renewal fails, the one
/// after still lands in time, and a retry past the end of the first lease
/// finds the key in flight. Time is paused, so the rounds fall where the
/// test puts them: one a second for a lease of three.
#[tokio::test(start_paused = true)]
async fn a_lock_whose_first_renewal_fails_keeps_its_lease() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(Faulty {
        renew_delay: Duration::from_millis(300),
        fail_first_renewals: true,
        ..Faulty::default()
    })
    .with_lease(Duration::from_secs(3));
    let svc = app(&layer, counter.handler(Duration::from_secs(10)));
    let first = spawn_send(&svc, post("/payments", Some("starts-the-rounds"), "{}"));
    tokio::time::sleep(Duration::from_millis(1_010)).await;
    let second = spawn_send(&svc, post("/payments", Some("just-after-a-round"), "{}"));
    // Past the end of the second key's first lease, and before a renewal
    // one round later than due would land.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let retry = send(&svc, post("/payments", Some("just-after-a-round"), "{}")).await;
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(counter.runs(), 2);
}

#[test]
fn a_request_polled_outside_a_tokio_runtime_does_not_panic() {
    let layer = IdempotencyLayer::default();
    let svc = layer.layer(tower::service_fn(|_: http::Request<_>| {
        std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
    }));
    let mut call = Box::pin(svc.oneshot(post("/payments", Some("no-runtime"), "{}")));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(call.as_mut().poll(&mut cx).is_pending());
}

/// Drives `future` to its end on this thread, outside any Tokio runtime.
fn outside_a_runtime<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

/// A handler that answers 201 at once, needing no runtime.
fn created<B>() -> impl tower::Service<
    http::Request<B>,
    Response = http::Response<String>,
    Error = std::convert::Infallible,
    Future = impl Future + Send,
> + Clone {
    tower::service_fn(|_: http::Request<B>| async {
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .status(StatusCode::CREATED)
                .body(String::new())
                .unwrap(),
        )
    })
}

/// Outside a Tokio runtime a completion the store failed is asked again at
/// once, with no timer to wait on, and lands.
#[test]
fn a_completion_retried_outside_a_tokio_runtime_lands() {
    let svc = IdempotencyLayer::new(Faulty {
        failing_completions: std::sync::atomic::AtomicUsize::new(1),
        ..Faulty::default()
    })
    .layer(created());
    let request = || post("/payments", Some("retried-outside"), "{}");
    let first = outside_a_runtime(svc.clone().oneshot(request())).unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let again = outside_a_runtime(svc.oneshot(request())).unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

/// Outside a Tokio runtime a duplicate that would wait for the key is
/// answered 409 at once: there is no timer to wait on.
#[test]
fn a_waiting_duplicate_outside_a_tokio_runtime_is_answered_at_once() {
    let layer = IdempotencyLayer::default().with_in_flight(
        tower_idempotency::InFlightPolicy::Wait(Duration::from_secs(5)),
    );
    let pending = layer.layer(tower::service_fn(|_: http::Request<_>| {
        std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
    }));
    let request = || post("/payments", Some("waiting-outside"), "{}");
    let mut holder = Box::pin(pending.clone().oneshot(request()));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(holder.as_mut().poll(&mut cx).is_pending());
    let duplicate = outside_a_runtime(pending.oneshot(request())).unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
}

/// A request body still arriving is read outside a Tokio runtime too,
/// without the body timeout's timer.
#[test]
fn a_body_in_transit_outside_a_tokio_runtime_is_read() {
    use http_body::{Body, Frame};
    /// One frame, sent once the test says so.
    struct Later(tokio::sync::oneshot::Receiver<bytes::Bytes>, bool);
    impl Body for Later {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
            if self.1 {
                return std::task::Poll::Ready(None);
            }
            let data = std::task::ready!(std::pin::Pin::new(&mut self.0).poll(cx)).unwrap();
            self.1 = true;
            std::task::Poll::Ready(Some(Ok(Frame::data(data))))
        }
    }
    let (send, arrives) = tokio::sync::oneshot::channel();
    let request = http::Request::post("/payments")
        .header("idempotency-key", "in-transit-outside")
        .body(Later(arrives, false))
        .unwrap();
    let svc = IdempotencyLayer::default().layer(created());
    let mut call = Box::pin(svc.oneshot(request));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(call.as_mut().poll(&mut cx).is_pending());
    send.send(bytes::Bytes::from_static(b"{}")).unwrap();
    let response = outside_a_runtime(call).unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}
