//! What the layer guarantees when things go wrong: panics, errors, failing
//! bodies, oversized responses, a dead store and clients that hang up.

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use common::{app, faulty::Faulty, json, post, read, send, serve, Counter, Scripted};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{service_fn, ServiceExt};
use tower_idempotency::{
    body::RequestBody,
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, LockToken, MemoryStore, StoreError},
    ClientDisconnect, IdempotencyLayer, Store, StoreFailure,
};

const KEY: &str = "failure-key";

/// A store whose backend is down.
#[derive(Debug)]
struct DeadStore;

#[async_trait]
impl Store for DeadStore {
    async fn begin(
        &self,
        _: &RecordKey,
        _: &Fingerprint,
        _: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn complete(
        &self,
        _: &RecordKey,
        _: &Fingerprint,
        _: LockToken,
        _: Completion,
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn release(&self, _: &RecordKey, _: LockToken) -> Result<(), StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn fence(&self, _: &RecordKey, _: LockToken, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn renew(&self, _: &RecordKey, _: LockToken, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::backend("connection refused"))
    }
}

#[tokio::test]
async fn completion_under_way_lands_when_the_client_goes_away() {
    let counter = Counter::default();
    // A `complete` that takes a while, like a remote store's.
    let store = Arc::new(Faulty {
        complete_delay: Duration::from_millis(100),
        ..Faulty::default()
    });
    let svc = app(
        &IdempotencyLayer::with_shared_store(Arc::clone(&store) as Arc<dyn Store>),
        counter.handler(Duration::ZERO),
    );
    // The client gives up while the store is still recording the response.
    tokio::select! {
        _ = svc.clone().oneshot(post("/payments", Some(KEY), "{}")) => {
            panic!("the response was returned before it was stored")
        }
        () = store.completing.notified() => {}
    }
    tokio::time::timeout(Duration::from_secs(10), store.completed.notified())
        .await
        .expect("the completion was dropped with the request");
    let retry = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn dead_store_answers_503_and_does_not_run_the_handler() {
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(DeadStore),
        counter.handler(Duration::ZERO),
    );
    let (status, headers, problem) =
        json(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(headers.contains_key("retry-after"));
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("store-unavailable"));
    assert_eq!(counter.runs(), 0);
}

#[tokio::test]
async fn dead_store_runs_the_handler_when_failing_open() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(DeadStore).with_store_failure(StoreFailure::FailOpen);
    let svc = app(&layer, counter.handler(Duration::ZERO));
    assert_eq!(
        send(&svc, post("/payments", Some(KEY), "{}"))
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(counter.runs(), 1);
}

fn panicking_handler(runs: Arc<AtomicUsize>) -> common::Handler {
    tower::util::BoxCloneSyncService::new(service_fn(
        move |_: Request<RequestBody<Full<Bytes>>>| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    panic!("handler bug");
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"second run"))))
            }
        },
    ))
}

#[tokio::test]
async fn handler_panic_propagates_and_releases_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = app(
        &IdempotencyLayer::default(),
        panicking_handler(Arc::clone(&runs)),
    );
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, post("/payments", Some(KEY), "{}")).await }
    })
    .await;
    let panic = first.expect_err("the panic must reach the caller");
    assert!(panic.is_panic());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (retry, body) = read(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(body, "second run");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A call that panics when first polled and answers if polled again, as a
/// call future resumed after its panic might.
struct PanicsThenAnswers {
    polled: bool,
}

impl std::future::Future for PanicsThenAnswers {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if !std::mem::replace(&mut self.polled, true) {
            panic!("handler bug");
        }
        std::task::Poll::Ready(Ok(Response::new(Full::new(Bytes::from_static(
            b"resumed after its panic",
        )))))
    }
}

#[tokio::test]
async fn a_panic_caught_above_the_layer_releases_the_key_and_nothing_runs_on() {
    type Call = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>,
    >;
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        service_fn(move |_: Request<RequestBody<Full<Bytes>>>| -> Call {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                return Box::pin(PanicsThenAnswers { polled: false });
            }
            Box::pin(async { Ok(Response::new(Full::new(Bytes::from_static(b"second run")))) })
        })
    };
    let svc = app(
        &IdempotencyLayer::default(),
        tower::util::BoxCloneSyncService::new(handler),
    );
    // What a panic-catching layer above this one does: the panic is caught
    // where the future is polled, and the future is dropped afterwards.
    let mut call = svc.clone().oneshot(post("/payments", Some(KEY), "{}"));
    let caught = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || std::future::Future::poll(std::pin::Pin::new(&mut call), cx),
        )))
    })
    .await;
    assert!(caught.is_err(), "the handler's panic reaches the caller");
    drop(call);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (retry, body) = read(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(body, "second run");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn service_error_is_returned_and_releases_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    Err("database down")
                } else {
                    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            }
        })
    };
    let svc = tower::Layer::layer(&IdempotencyLayer::default(), handler);
    let err = svc
        .clone()
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap_err();
    assert_eq!(err, "database down");
    let retry = svc
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn response_body_that_fails_is_not_stored() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = common::scripted_handler(Arc::clone(&runs), |run| {
        let body = common::Scripted::new(Duration::ZERO).data("partial");
        if run == 1 {
            body.error("disk on fire")
        } else {
            body.data(" and whole")
        }
    });
    let svc = tower::Layer::layer(&IdempotencyLayer::default(), handler);
    let first = svc
        .clone()
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    assert!(first.into_body().collect().await.is_err());
    let (_, body) = read(
        svc.oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body, "partial and whole");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A 1,200-byte response under a 1,000-byte capture limit reaches the
/// client whole; its retry is refused with 409 and the handler runs once.
async fn assert_delivered_then_not_replayed(body: fn() -> Scripted) {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = common::scripted_handler(Arc::clone(&runs), move |_| body());
    let svc = tower::Layer::layer(
        &IdempotencyLayer::default().with_response_limit(1000),
        handler,
    );
    let (first, body) = read(
        svc.clone()
            .oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(body.len(), 1200);
    let (status, _, problem) = json(
        svc.oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("response-not-replayable"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn response_over_the_capture_limit_is_delivered_then_not_replayed() {
    assert_delivered_then_not_replayed(|| {
        Scripted::new(Duration::ZERO)
            .data(vec![b'a'; 600])
            .data(vec![b'b'; 600])
    })
    .await;
}

#[tokio::test]
async fn whole_response_over_the_capture_limit_is_delivered_then_not_replayed() {
    assert_delivered_then_not_replayed(|| Scripted::new(Duration::ZERO).data(vec![b'a'; 1200]))
        .await;
}

#[tokio::test]
async fn trailers_are_stored_and_replayed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = common::scripted_handler(Arc::clone(&runs), |_| {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        Scripted::new(Duration::ZERO)
            .data("message")
            .trailers(trailers)
    });
    let svc = tower::Layer::layer(&IdempotencyLayer::default(), handler);
    for _ in 0..2 {
        let response = svc
            .clone()
            .oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap();
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "message");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn first_response_streams_before_the_handler_finishes() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = common::scripted_handler(Arc::clone(&runs), |_| {
        Scripted::new(Duration::from_millis(300))
            .data("one")
            .data("two")
    });
    let svc = tower::Layer::layer(&IdempotencyLayer::default(), handler);
    let response = svc
        .clone()
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    let mut body = response.into_body();
    let started = tokio::time::Instant::now();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "one");
    let first_at = started.elapsed();
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(second, "two");
    assert!(
        started.elapsed() >= first_at + Duration::from_millis(250),
        "the second chunk came with the first"
    );
    assert!(body.frame().await.is_none());
    let (_, replay) = read(
        svc.oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(replay, "onetwo");
}

/// Sends a POST with a key over a raw connection and hangs up after `wait`.
async fn post_and_hang_up(addr: std::net::SocketAddr, wait: Duration) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /payments HTTP/1.1\r\nhost: test\r\nidempotency-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(wait).await;
    drop(stream);
}

/// Sends a POST with a key over a raw connection and reads the response.
async fn post_and_read(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /payments HTTP/1.1\r\nhost: test\r\nconnection: close\r\nidempotency-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn slow_app(
    layer: &IdempotencyLayer,
    counter: &Counter,
) -> impl tower::Service<
    Request<hyper::body::Incoming>,
    Response = Response<tower_idempotency::body::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    let handler = counter.handler::<hyper::body::Incoming>(Duration::from_millis(300));
    tower::Layer::layer(layer, handler)
}

#[tokio::test]
async fn client_hang_up_finishes_the_handler_and_the_retry_gets_the_replay() {
    let counter = Counter::default();
    let addr = serve(slow_app(&IdempotencyLayer::default(), &counter)).await;
    post_and_hang_up(addr, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counter.runs(), 1);
    let retry = post_and_read(addr).await;
    assert!(retry.starts_with("HTTP/1.1 201"), "{retry}");
    assert!(retry.contains("idempotent-replayed: true"), "{retry}");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn client_hang_up_with_cancel_releases_the_key_and_the_retry_runs() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::default().with_client_disconnect(ClientDisconnect::Cancel);
    let addr = serve(slow_app(&layer, &counter)).await;
    post_and_hang_up(addr, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = post_and_read(addr).await;
    assert!(retry.starts_with("HTTP/1.1 201"), "{retry}");
    assert!(!retry.contains("idempotent-replayed"), "{retry}");
    assert_eq!(counter.runs(), 2);
}

/// A client that hangs up after the first chunk of a streamed response:
/// the rest is still read and stored, and the retry gets it all.
async fn assert_hang_up_mid_body_stores_the_whole_response(layer: IdempotencyLayer) {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = common::scripted_handler(Arc::clone(&runs), |_| {
        Scripted::new(Duration::from_millis(100))
            .data("one,")
            .data("two,")
            .data("three")
    });
    let svc = tower::Layer::layer(&layer, handler);
    let response = svc
        .clone()
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    let mut body = response.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "one,"
    );
    drop(body);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (head, replay) = read(
        svc.oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(head.headers["idempotent-replayed"], "true");
    assert_eq!(replay, "one,two,three");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client_hang_up_mid_body_still_stores_the_whole_response() {
    assert_hang_up_mid_body_stores_the_whole_response(IdempotencyLayer::default()).await;
}

#[tokio::test]
async fn client_hang_up_mid_body_with_cancel_still_stores_the_response() {
    // The handler has answered: its work is done, so no policy may let a
    // retry run it again.
    assert_hang_up_mid_body_stores_the_whole_response(
        IdempotencyLayer::default().with_client_disconnect(ClientDisconnect::Cancel),
    )
    .await;
}

#[tokio::test]
async fn dropped_response_future_with_cancel_leaves_no_lock_behind() {
    let store = MemoryStore::new();
    let counter = Counter::default();
    let layer =
        IdempotencyLayer::new(store.clone()).with_client_disconnect(ClientDisconnect::Cancel);
    let svc = app(&layer, counter.handler(Duration::from_millis(500)));
    let pending = tokio::time::timeout(
        Duration::from_millis(50),
        send(&svc, post("/payments", Some(KEY), "{}")),
    )
    .await;
    assert!(pending.is_err(), "the request should still be running");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.len(), 0);
}

/// Sends raw bytes and reads whatever the server answers until it closes.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// A real server whose layer waits 300 ms for a request body.
async fn serve_with_short_body_timeout() -> (std::net::SocketAddr, Counter) {
    let counter = Counter::default();
    let layer = IdempotencyLayer::default().with_body_timeout(Duration::from_millis(300));
    let addr = serve(tower::Layer::layer(
        &layer,
        counter.handler::<hyper::body::Incoming>(Duration::ZERO),
    ))
    .await;
    (addr, counter)
}

#[tokio::test]
async fn body_shorter_than_its_content_length_gets_408() {
    let (addr, counter) = serve_with_short_body_timeout().await;
    let response = raw_exchange(
        addr,
        format!("POST /payments HTTP/1.1\r\nhost: t\r\nidempotency-key: {KEY}\r\ncontent-length: 100\r\n\r\nonly ten b").as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("body-timeout"), "{response}");
    assert_eq!(counter.runs(), 0);
}

#[tokio::test]
async fn chunked_body_that_never_ends_gets_408() {
    let (addr, counter) = serve_with_short_body_timeout().await;
    let response = raw_exchange(
        addr,
        format!("POST /payments HTTP/1.1\r\nhost: t\r\nidempotency-key: {KEY}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n").as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert_eq!(counter.runs(), 0);
}

#[tokio::test]
async fn oversized_content_length_over_the_wire_gets_413() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::default().with_body_limit(64);
    let addr = serve(tower::Layer::layer(
        &layer,
        counter.handler::<hyper::body::Incoming>(Duration::ZERO),
    ))
    .await;
    let response = raw_exchange(
        addr,
        format!("POST /payments HTTP/1.1\r\nhost: t\r\nconnection: close\r\nidempotency-key: {KEY}\r\ncontent-length: 1000000000\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(counter.runs(), 0);
}

/// A store that answers `begin` with a record it cannot have written.
#[derive(Debug)]
struct CorruptStore;

#[async_trait]
impl Store for CorruptStore {
    async fn begin(
        &self,
        _: &RecordKey,
        _: &Fingerprint,
        _: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        Ok(BeginOutcome::Completed(Bytes::from_static(
            b"written by a newer build",
        )))
    }
    async fn complete(
        &self,
        _: &RecordKey,
        _: &Fingerprint,
        _: LockToken,
        _: Completion,
        _: Duration,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    async fn release(&self, _: &RecordKey, _: LockToken) -> Result<(), StoreError> {
        Ok(())
    }
    async fn fence(&self, _: &RecordKey, _: LockToken, _: Duration) -> Result<(), StoreError> {
        Ok(())
    }
    async fn renew(&self, _: &RecordKey, _: LockToken, _: Duration) -> Result<(), StoreError> {
        Ok(())
    }
}

#[tokio::test]
async fn undecodable_record_answers_503_even_when_failing_open() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(CorruptStore).with_store_failure(StoreFailure::FailOpen);
    let svc = app(&layer, counter.handler(Duration::ZERO));
    let response = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counter.runs(), 0);
}

#[tokio::test]
async fn full_store_answers_503_even_when_failing_open() {
    let counter = Counter::default();
    let store = MemoryStore::builder()
        .with_limits(tower_idempotency::store::MemoryLimits::new(1, 1024))
        .build();
    let layer = IdempotencyLayer::new(store).with_store_failure(StoreFailure::FailOpen);
    let svc = app(&layer, counter.handler(Duration::ZERO));
    assert_eq!(
        send(&svc, post("/payments", Some("first"), "{}"))
            .await
            .status(),
        StatusCode::CREATED
    );
    let refused = send(&svc, post("/payments", Some("second"), "{}")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counter.runs(), 1);
}

/// A response body whose frames are always ready: `frames` of 8 KiB, each
/// counted in `produced` as it is read.
struct AlwaysReady {
    frames: usize,
    produced: Arc<AtomicUsize>,
}

impl http_body::Body for AlwaysReady {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.frames == 0 {
            return std::task::Poll::Ready(None);
        }
        self.frames -= 1;
        self.produced.fetch_add(1, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            &[b'x'; 8192],
        )))))
    }
}

/// A handler that counts its runs and answers with an [`AlwaysReady`]
/// body of `frames` frames, which count what is read of them.
fn always_ready_handler(
    frames: usize,
    runs: Arc<AtomicUsize>,
    produced: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<AlwaysReady>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
        runs.fetch_add(1, Ordering::SeqCst);
        let produced = Arc::clone(&produced);
        async move { Ok(Response::new(AlwaysReady { frames, produced })) }
    })
}

#[tokio::test]
async fn always_ready_body_sends_its_head_before_reading_itself_whole() {
    let produced = Arc::new(AtomicUsize::new(0));
    // 64 MiB in all.
    let handler = always_ready_handler(8 * 1024, Arc::default(), Arc::clone(&produced));
    let svc = tower::Layer::layer(&IdempotencyLayer::default(), handler);
    let response = svc
        .clone()
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    let read_before_head = produced.load(Ordering::SeqCst);
    assert!(
        read_before_head <= 16,
        "{read_before_head} frames of 8 KiB were read before the head went out"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 64 * 1024 * 1024);
    // Over the capture limit: done, and not run again.
    let retry = svc
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
}

/// Sends a keyed POST over a fresh HTTP/1.1 connection with `TE: trailers`
/// and returns the response's head, body and trailers.
async fn http1_post_with_trailers(
    addr: std::net::SocketAddr,
) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::post("/payments")
        .header("host", "test")
        .header("idempotency-key", KEY)
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (head, body) = sender.send_request(request).await.unwrap().into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (head, collected.to_bytes(), trailers)
}

#[tokio::test]
async fn http1_replay_carries_the_trailers_of_the_original() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler_runs = Arc::clone(&runs);
    let handler = tower::service_fn(move |_: Request<RequestBody<hyper::body::Incoming>>| {
        handler_runs.fetch_add(1, Ordering::SeqCst);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc123".parse().unwrap());
        let body = Scripted::new(Duration::ZERO)
            .data("message")
            .trailers(trailers);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("trailer", "x-checksum")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let addr = serve(tower::Layer::layer(&IdempotencyLayer::default(), handler)).await;
    let (first, first_body, first_trailers) = http1_post_with_trailers(addr).await;
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(first_body, "message");
    assert_eq!(first_trailers.expect("trailers")["x-checksum"], "abc123");
    let (replay, replay_body, replay_trailers) = http1_post_with_trailers(addr).await;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.headers["trailer"], "x-checksum");
    assert_eq!(replay_body, "message");
    assert_eq!(
        replay_trailers.expect("trailers on the replay")["x-checksum"],
        "abc123"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn endless_always_ready_body_abandoned_by_its_client_is_given_up_not_released() {
    let (produced, runs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = always_ready_handler(usize::MAX, Arc::clone(&runs), Arc::clone(&produced));
    let layer = IdempotencyLayer::default().with_max_hold(Duration::from_millis(300));
    let svc = tower::Layer::layer(&layer, handler);
    let response = svc
        .clone()
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    // The client hangs up: the drop returns, the rest is read elsewhere.
    drop(response);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, _, problem) = json(
        svc.oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("response-not-replayable"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Given up on: nothing reads the body any more.
    let stopped_at = produced.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(produced.load(Ordering::SeqCst), stopped_at);
}

#[tokio::test]
async fn a_panic_elsewhere_while_the_body_streams_does_not_release_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = common::scripted_handler(Arc::clone(&runs), |_| {
        Scripted::new(Duration::from_millis(50))
            .data("one,")
            .data("two")
    });
    let svc = tower::Layer::layer(&IdempotencyLayer::default(), handler);
    let response = svc
        .clone()
        .oneshot(post("/payments", Some(KEY), "{}"))
        .await
        .unwrap();
    let body = response.into_body();
    // An outer layer panics while it holds the body.
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _held = body;
        panic!("an outer layer fails");
    }));
    assert!(unwound.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (head, replay) = read(
        svc.oneshot(post("/payments", Some(KEY), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(head.headers["idempotent-replayed"], "true");
    assert_eq!(replay, "one,two");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// On a store that cannot tell its own record from another's (the memory
/// store answers `LockLost` to any second completion), a retried
/// completion that finds the key settled is logged as such; the key
/// replays what the first attempt stored.
#[tokio::test]
async fn a_retried_completion_that_finds_the_key_settled_warns() {
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(Faulty {
            landing_completions: AtomicUsize::new(1),
            ..Faulty::default()
        }),
        counter.handler(Duration::ZERO),
    );
    let (logs, _guard) = common::capture_logs();
    let first = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(
        logs.text().contains("found the key no longer held"),
        "{}",
        logs.text()
    );
    let retry = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

/// A release the store failed is asked again: the key is free for the
/// client's retry at once, rather than answering 409 until its lease runs
/// out.
#[tokio::test]
async fn a_release_the_store_failed_is_tried_again() {
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(Faulty {
            failing_releases: AtomicUsize::new(2),
            ..Faulty::default()
        }),
        counter.respond_with(Duration::ZERO, |_, _| {
            http::Response::builder().status(StatusCode::SERVICE_UNAVAILABLE)
        }),
    );
    let first = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(retry.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counter.runs(), 2, "the retry found the key still held");
}

#[tokio::test]
async fn a_completion_the_store_failed_is_tried_again() {
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(Faulty {
            failing_completions: AtomicUsize::new(1),
            ..Faulty::default()
        }),
        counter.handler(Duration::ZERO),
    );
    let first = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let retry = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}
