//! The layer's behaviour through its public API, one behaviour per test.

mod common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use common::{app, json, post, read, send, spawn_send, Chunks, Counter};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::ServiceExt;
use tower_idempotency::{
    problem::ProblemKind,
    store::{MemoryLimits, MemoryStore},
    IdempotencyLayer, InFlightPolicy, KeepPolicy, NotExecuted,
};

const KEY: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::default()
}

/// A keyed POST from the client holding `token`.
fn as_user(token: &str) -> Request<Full<Bytes>> {
    let mut request = post("/payments", Some(KEY), "{}");
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test]
async fn request_without_key_passes_through_every_time() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    for _ in 0..2 {
        let response = send(&svc, post("/payments", None, "{}")).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(response.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(counter.runs(), 2);
}

#[tokio::test]
async fn methods_not_covered_pass_through_with_a_key() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    for _ in 0..2 {
        let request = Request::put("/payments/1")
            .header("idempotency-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&svc, request).await.status(), StatusCode::CREATED);
    }
    assert_eq!(counter.runs(), 2);
}

#[tokio::test]
async fn configured_methods_are_covered() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_methods([http::Method::PUT]),
        counter.handler(Duration::ZERO),
    );
    let request = || {
        Request::put("/payments/1")
            .header("idempotency-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    send(&svc, request()).await;
    let retry = send(&svc, request()).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn missing_key_is_refused_with_400_when_required() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_key_required(true),
        counter.handler(Duration::ZERO),
    );
    let (status, headers, problem) = json(send(&svc, post("/payments", None, "{}")).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(problem["type"].as_str().unwrap().ends_with("missing-key"));
    assert_eq!(counter.runs(), 0);
}

async fn assert_invalid_key(request: Request<Full<Bytes>>) {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    let (status, headers, problem) = json(send(&svc, request).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(problem["type"].as_str().unwrap().ends_with("invalid-key"));
    assert_eq!(problem["status"], 400);
    assert!(!problem["detail"].as_str().unwrap().is_empty());
    assert_eq!(counter.runs(), 0, "the handler must not run");
}

#[tokio::test]
async fn empty_key_is_refused() {
    assert_invalid_key(post("/payments", Some(""), "{}")).await;
}

#[tokio::test]
async fn empty_quoted_key_is_refused() {
    assert_invalid_key(post("/payments", Some("\"\""), "{}")).await;
}

#[tokio::test]
async fn key_over_255_characters_is_refused() {
    assert_invalid_key(post("/payments", Some(&"k".repeat(256)), "{}")).await;
}

#[tokio::test]
async fn key_of_255_characters_is_accepted() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    let response = send(&svc, post("/payments", Some(&"k".repeat(255)), "{}")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn key_with_a_space_or_non_ascii_byte_is_refused() {
    assert_invalid_key(post("/payments", Some("two words"), "{}")).await;
    let request = Request::post("/payments")
        .header(
            "idempotency-key",
            http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_invalid_key(request).await;
}

#[tokio::test]
async fn key_sent_twice_is_refused() {
    let request = Request::post("/payments")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_invalid_key(request).await;
}

#[tokio::test]
async fn unterminated_quoted_key_is_refused() {
    assert_invalid_key(post("/payments", Some("\"abc"), "{}")).await;
}

#[tokio::test]
async fn quoted_and_bare_forms_name_the_same_key() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    send(&svc, post("/payments", Some(&format!("\"{KEY}\"")), "{}")).await;
    let retry = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn body_declared_over_the_limit_gets_413_without_running() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_body_limit(16),
        counter.handler(Duration::ZERO),
    );
    let (status, _, problem) =
        json(send(&svc, post("/payments", Some(KEY), &"x".repeat(17))).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("body-too-large"));
    assert_eq!(counter.runs(), 0);
}

#[tokio::test]
async fn streamed_body_over_the_limit_gets_413_without_running() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_body_limit(16),
        counter.handler(Duration::ZERO),
    );
    let request = Request::post("/payments")
        .header("idempotency-key", KEY)
        .body(Chunks::new(["xxxxxx"; 4], false))
        .unwrap();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(counter.runs(), 0);
}

#[tokio::test(start_paused = true)]
async fn body_that_never_ends_gets_408_without_running() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_body_timeout(Duration::from_secs(5)),
        counter.handler(Duration::ZERO),
    );
    let request = Request::post("/payments")
        .header("idempotency-key", KEY)
        .body(Chunks::new(["{"], true))
        .unwrap();
    let (status, _, problem) = json(svc.oneshot(request).await.unwrap()).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert!(problem["type"].as_str().unwrap().ends_with("body-timeout"));
    assert_eq!(counter.runs(), 0);
}

#[tokio::test]
async fn first_use_runs_the_handler_and_returns_its_response() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    let (status, headers, body) =
        json(send(&svc, post("/payments", Some(KEY), r#"{"amount":5}"#)).await).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(body["run"], 1);
    assert_eq!(body["body"], r#"{"amount":5}"#);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn retry_after_completion_replays_byte_for_byte() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    let (first, first_body) = read(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    let (retry, retry_body) = read(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    assert_eq!(retry.status, first.status);
    assert_eq!(retry_body, first_body);
    assert_eq!(retry.headers["content-type"], first.headers["content-type"]);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.headers.len(), first.headers.len() + 1);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn duplicate_while_in_flight_gets_409_with_retry_after() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::from_millis(300)));
    let first = spawn_send(&svc, post("/payments", Some(KEY), "{}"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, headers, problem) =
        json(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["retry-after"], "1");
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("request-in-flight"));
    assert_eq!(first.await.unwrap().0.status, StatusCode::CREATED);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn waiting_duplicate_gets_the_replay_when_configured() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(5))),
        counter.handler(Duration::from_millis(200)),
    );
    let first = spawn_send(&svc, post("/payments", Some(KEY), "{}"));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (waited, waited_body) = read(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    let (_, first_body) = first.await.unwrap();
    assert_eq!(waited.status, StatusCode::CREATED);
    assert_eq!(waited.headers["idempotent-replayed"], "true");
    assert_eq!(waited_body, first_body);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn waiting_duplicate_gets_409_when_the_wait_runs_out() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_in_flight(InFlightPolicy::Wait(Duration::from_millis(100))),
        counter.handler(Duration::from_millis(600)),
    );
    let first = spawn_send(&svc, post("/payments", Some(KEY), "{}"));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let waited = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(waited.status(), StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap().0.status, StatusCode::CREATED);
}

async fn assert_mismatch(second: Request<Full<Bytes>>) {
    let counter = Counter::default();
    let svc = app(
        &layer().with_methods([http::Method::POST, http::Method::PATCH]),
        counter.handler(Duration::ZERO),
    );
    send(
        &svc,
        post("/payments?currency=eur", Some(KEY), r#"{"amount":5}"#),
    )
    .await;
    let (status, headers, problem) = json(send(&svc, second).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(problem["type"].as_str().unwrap().ends_with("key-reused"));
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn same_key_with_another_body_gets_422() {
    assert_mismatch(post("/payments?currency=eur", Some(KEY), r#"{"amount":6}"#)).await;
}

#[tokio::test]
async fn same_key_on_another_path_gets_422() {
    assert_mismatch(post("/refunds?currency=eur", Some(KEY), r#"{"amount":5}"#)).await;
}

#[tokio::test]
async fn same_key_with_another_query_gets_422() {
    assert_mismatch(post("/payments?currency=usd", Some(KEY), r#"{"amount":5}"#)).await;
}

#[tokio::test]
async fn same_key_with_another_method_gets_422() {
    let request = Request::patch("/payments?currency=eur")
        .header("content-type", "application/json")
        .header("idempotency-key", KEY)
        .body(Full::new(Bytes::from_static(br#"{"amount":5}"#)))
        .unwrap();
    assert_mismatch(request).await;
}

#[tokio::test]
async fn same_key_with_another_content_type_gets_422() {
    let mut request = post("/payments?currency=eur", Some(KEY), r#"{"amount":5}"#);
    request
        .headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    assert_mismatch(request).await;
}

#[tokio::test]
async fn same_key_while_in_flight_with_another_body_gets_422() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::from_millis(300)));
    let first = spawn_send(&svc, post("/payments", Some(KEY), "a"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = send(&svc, post("/payments", Some(KEY), "b")).await;
    assert_eq!(second.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(first.await.unwrap().0.status, StatusCode::CREATED);
}

#[tokio::test]
async fn same_key_from_another_authorization_is_another_record() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    let (_, _, alice) = json(send(&svc, as_user("alice")).await).await;
    let (_, bob_headers, bob) = json(send(&svc, as_user("bob")).await).await;
    assert!(bob_headers.get("idempotent-replayed").is_none());
    assert_ne!(alice["run"], bob["run"]);
    let (_, alice_headers, replay) = json(send(&svc, as_user("alice")).await).await;
    assert_eq!(alice_headers["idempotent-replayed"], "true");
    assert_eq!(replay["run"], alice["run"]);
    assert_eq!(counter.runs(), 2);
}

#[tokio::test]
async fn custom_scope_separates_tenants() {
    let counter = Counter::default();
    let layer =
        layer().with_scope(|parts| parts.headers.get("x-tenant").map(|v| v.as_bytes().to_vec()));
    let svc = app(&layer, counter.handler(Duration::ZERO));
    for tenant in ["a", "b", "a"] {
        let mut request = post("/payments", Some(KEY), "{}");
        request
            .headers_mut()
            .insert("x-tenant", tenant.parse().unwrap());
        send(&svc, request).await;
    }
    assert_eq!(counter.runs(), 2);
}

async fn runs_after_retry(
    status: StatusCode,
    mark: fn(http::response::Builder) -> http::response::Builder,
    policy: Option<KeepPolicy>,
) -> usize {
    let counter = Counter::default();
    let mut layer = layer();
    if let Some(policy) = policy {
        layer = layer.with_keep_policy(policy);
    }
    let svc = app(
        &layer,
        counter.respond_with(Duration::ZERO, move |_, _| {
            mark(Response::builder().status(status))
        }),
    );
    for _ in 0..2 {
        let response = send(&svc, post("/payments", Some(KEY), "{}")).await;
        assert_eq!(response.status(), status);
    }
    counter.runs()
}

#[tokio::test]
async fn server_error_is_kept_and_replayed_by_default() {
    assert_eq!(
        runs_after_retry(StatusCode::INTERNAL_SERVER_ERROR, |b| b, None).await,
        1
    );
}

#[tokio::test]
async fn client_error_is_kept_and_replayed_by_default() {
    assert_eq!(
        runs_after_retry(StatusCode::BAD_REQUEST, |b| b, None).await,
        1
    );
}

#[tokio::test]
async fn statuses_that_say_not_processed_release_the_key() {
    for status in [
        StatusCode::REQUEST_TIMEOUT,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        assert_eq!(runs_after_retry(status, |b| b, None).await, 2, "{status}");
    }
}

#[tokio::test]
async fn not_executed_extension_releases_the_key() {
    assert_eq!(
        runs_after_retry(StatusCode::OK, |b| b.extension(NotExecuted), None).await,
        2
    );
}

#[tokio::test]
async fn cache_control_no_store_is_kept_and_replayed() {
    assert_eq!(
        runs_after_retry(
            StatusCode::CREATED,
            |b| b.header("cache-control", "private, no-store"),
            None
        )
        .await,
        1
    );
}

#[tokio::test]
async fn replaced_policy_keeps_only_what_it_says() {
    let only_2xx = || Some(KeepPolicy::successes_only());
    assert_eq!(
        runs_after_retry(StatusCode::INTERNAL_SERVER_ERROR, |b| b, only_2xx()).await,
        2
    );
    assert_eq!(
        runs_after_retry(StatusCode::CREATED, |b| b, only_2xx()).await,
        1
    );
}

#[tokio::test]
async fn problem_type_uses_the_configured_base() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_problem_base("https://api.example.com/errors/"),
        counter.handler(Duration::ZERO),
    );
    let (_, _, problem) = json(send(&svc, post("/payments", Some(""), "{}")).await).await;
    assert_eq!(
        problem["type"],
        "https://api.example.com/errors/invalid-key"
    );
    assert_eq!(problem["title"], ProblemKind::InvalidKey.title());
    assert_eq!(problem["status"], 400);
}

#[tokio::test(start_paused = true)]
async fn key_is_new_again_after_the_ttl() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_ttl(Duration::from_secs(60)),
        counter.handler(Duration::ZERO),
    );
    send(&svc, post("/payments", Some(KEY), "{}")).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    let replay = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    tokio::time::advance(Duration::from_secs(2)).await;
    let fresh = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert!(fresh.headers().get("idempotent-replayed").is_none());
    assert_eq!(counter.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn memory_store_frees_expired_records_without_access() {
    let store = MemoryStore::builder()
        .with_sweep_interval(Duration::from_secs(10))
        .build();
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store.clone()).with_ttl(Duration::from_secs(30)),
        counter.handler(Duration::ZERO),
    );
    for i in 0..50 {
        send(&svc, post("/payments", Some(&format!("key-{i}")), "{}")).await;
    }
    assert_eq!(store.len(), 50);
    assert!(store.bytes() > 0);
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(store.len(), 0);
    assert_eq!(store.bytes(), 0);
}

#[tokio::test]
async fn full_memory_store_answers_503_for_new_keys_and_keeps_old_ones() {
    let store = MemoryStore::builder()
        .with_limits(MemoryLimits::new(2, 1024 * 1024))
        .build();
    let counter = Counter::default();
    let svc = app(
        &IdempotencyLayer::new(store),
        counter.handler(Duration::ZERO),
    );
    send(&svc, post("/payments", Some("a"), "{}")).await;
    send(&svc, post("/payments", Some("b"), "{}")).await;
    let (status, headers, problem) =
        json(send(&svc, post("/payments", Some("c"), "{}")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("store-unavailable"));
    let replay = send(&svc, post("/payments", Some("a"), "{}")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_on_one_key_run_the_handler_once() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_in_flight(InFlightPolicy::Wait(Duration::from_secs(10))),
        counter.handler(Duration::from_millis(50)),
    );
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(
                async move { read(send(&svc, post("/payments", Some(KEY), "{}")).await).await },
            )
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        let (head, body) = task.await.unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        bodies.push(body);
    }
    assert_eq!(counter.runs(), 1);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_without_waiting_get_409_or_the_replay() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::from_millis(20)));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                send(&svc, post("/payments", Some(KEY), "{}"))
                    .await
                    .status()
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(created >= 1);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn metrics_count_each_decision() {
    use tower_idempotency::metrics::Decision;
    let counter = Counter::default();
    let layer = layer();
    let metrics = layer.metrics();
    let svc = app(&layer, counter.handler(Duration::ZERO));
    send(&svc, post("/payments", None, "{}")).await;
    send(&svc, post("/payments", Some(KEY), "{}")).await;
    send(&svc, post("/payments", Some(KEY), "{}")).await;
    send(&svc, post("/payments", Some(KEY), "{\"other\":1}")).await;
    send(&svc, post("/payments", Some(""), "{}")).await;
    assert_eq!(metrics.count(Decision::PassThrough), 1);
    assert_eq!(metrics.count(Decision::Executed), 1);
    assert_eq!(metrics.count(Decision::Replayed), 1);
    assert_eq!(metrics.count(Decision::Mismatch), 1);
    assert_eq!(metrics.count(Decision::Rejected), 1);
}

#[tokio::test]
async fn shared_store_behind_an_arc_serves_two_layers() {
    let store: Arc<dyn tower_idempotency::Store> = Arc::new(MemoryStore::new());
    let counter = Counter::default();
    let a = app(
        &IdempotencyLayer::with_shared_store(Arc::clone(&store)),
        counter.handler(Duration::ZERO),
    );
    let b = app(
        &IdempotencyLayer::new(store),
        counter.handler(Duration::ZERO),
    );
    send(&a, post("/payments", Some(KEY), "{}")).await;
    let replay = send(&b, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn key_in_flight_for_one_client_does_not_block_another() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::from_millis(300)));
    let alice = spawn_send(&svc, as_user("alice"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let bob = send(&svc, as_user("bob")).await;
    assert_eq!(bob.status(), StatusCode::CREATED);
    assert_eq!(alice.await.unwrap().0.status, StatusCode::CREATED);
    assert_eq!(counter.runs(), 2);
}

#[tokio::test]
async fn replay_carries_no_hop_by_hop_headers() {
    let counter = Counter::default();
    let handler = counter.respond_with(Duration::ZERO, |_, _| {
        Response::builder()
            .status(StatusCode::CREATED)
            .header("connection", "x-conn-private")
            .header("x-conn-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("x-request-cost", "3")
    });
    let svc = app(&layer(), handler);
    send(&svc, post("/payments", Some(KEY), "{}")).await;
    let replay = send(&svc, post("/payments", Some(KEY), "{}")).await;
    let headers = replay.headers();
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(headers["x-request-cost"], "3");
    for hop_by_hop in ["connection", "keep-alive", "x-conn-private"] {
        assert!(
            !headers.contains_key(hop_by_hop),
            "{hop_by_hop} was replayed"
        );
    }
}

#[tokio::test]
async fn slow_handler_keeps_its_lock_past_the_lease() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_lease(Duration::from_millis(300)),
        counter.handler(Duration::from_millis(1200)),
    );
    let first = spawn_send(&svc, post("/payments", Some(KEY), "{}"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = send(&svc, post("/payments", Some(KEY), "{}")).await;
    assert_eq!(
        during.status(),
        StatusCode::CONFLICT,
        "the renewed lease still holds"
    );
    let (_, original) = first.await.unwrap();
    let (after, replay) = read(send(&svc, post("/payments", Some(KEY), "{}")).await).await;
    assert_eq!(after.headers["idempotent-replayed"], "true");
    assert_eq!(replay, original);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn each_decision_is_a_tracing_event_with_its_outcome() {
    let (captured, _guard) = common::capture_logs();

    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    send(&svc, post("/payments", Some(KEY), "{}")).await;
    send(&svc, post("/payments", Some(KEY), "{}")).await;
    send(&svc, post("/payments", Some(KEY), "other")).await;

    let log = captured.text();
    for outcome in ["executed", "replayed", "mismatch"] {
        assert!(
            log.contains(&format!("outcome=\"{outcome}\"")),
            "no {outcome} event in:\n{log}"
        );
    }
    assert!(
        log.contains("idempotency"),
        "events are inside the idempotency span:\n{log}"
    );
}

#[tokio::test]
async fn longest_ttl_keeps_the_response_instead_of_wrapping() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_ttl(Duration::MAX),
        counter.handler(Duration::ZERO),
    );
    // The store's clock must have moved on from its epoch for an
    // overflowing expiry to wrap.
    tokio::time::sleep(Duration::from_millis(5)).await;
    send(&svc, post("/payments", Some("ttl-max"), "{}")).await;
    let retry = send(&svc, post("/payments", Some("ttl-max"), "{}")).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn longest_wait_for_a_duplicate_does_not_panic() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_in_flight(InFlightPolicy::Wait(Duration::MAX)),
        counter.handler(Duration::ZERO),
    );
    let first = send(&svc, post("/payments", Some("wait-max"), "{}")).await;
    assert_eq!(first.status(), StatusCode::CREATED);
}

#[test]
fn out_of_range_durations_are_clamped_to_their_documented_bounds() {
    let layer = IdempotencyLayer::default()
        .with_ttl(Duration::MAX)
        .with_lease(Duration::ZERO)
        .with_max_hold(Duration::MAX);
    let shown = format!("{layer:?}");
    assert!(
        shown.contains(&format!("ttl: {:?}", IdempotencyLayer::MAX_TTL)),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("lease: {:?}", IdempotencyLayer::MIN_LEASE)),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("max_hold: {:?}", IdempotencyLayer::MAX_HOLD)),
        "{shown}"
    );
}

#[tokio::test]
async fn a_reserialised_json_body_replays_with_a_canonical_fingerprint() {
    let counter = Counter::default();
    let svc = app(
        &layer().with_body_fingerprint(
            tower_idempotency::fingerprint::BodyFingerprint::canonical_json(),
        ),
        counter.handler(Duration::ZERO),
    );
    send(
        &svc,
        post(
            "/payments",
            Some("json"),
            r#"{"amount":5,"currency":"EUR"}"#,
        ),
    )
    .await;
    let retry = send(
        &svc,
        post(
            "/payments",
            Some("json"),
            "{ \"currency\": \"EUR\",\n  \"amount\": 5.0 }",
        ),
    )
    .await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let other = send(
        &svc,
        post(
            "/payments",
            Some("json"),
            r#"{"amount":6,"currency":"EUR"}"#,
        ),
    )
    .await;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(counter.runs(), 1);
}

#[tokio::test]
async fn the_expiry_header_says_the_same_on_the_first_response_and_its_replays() {
    let counter = Counter::default();
    let svc = app(
        &layer()
            .with_ttl(Duration::from_secs(3600))
            .with_expiry_header(tower_idempotency::key::IDEMPOTENCY_EXPIRES),
        counter.handler(Duration::ZERO),
    );
    let first = send(&svc, post("/payments", Some("expires"), "{}")).await;
    let expires = first.headers()["idempotency-expires"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        expires.ends_with(" GMT") && expires.len() == 29,
        "{expires}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let replay = send(&svc, post("/payments", Some("expires"), "{}")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["idempotency-expires"], expires.as_str());
}

#[tokio::test]
async fn without_the_expiry_header_option_no_expiry_is_sent() {
    let counter = Counter::default();
    let svc = app(&layer(), counter.handler(Duration::ZERO));
    let first = send(&svc, post("/payments", Some("no-expires"), "{}")).await;
    assert!(first.headers().get("idempotency-expires").is_none());
}
