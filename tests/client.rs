//! The client layer and retry policy (feature `client`), driving real
//! servers on 127.0.0.1 through hyper-util's client.

#[path = "common/process.rs"]
mod process;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use tower::{retry::RetryLayer, service_fn, util::BoxCloneService, ServiceBuilder, ServiceExt};
use tower_idempotency::{
    client::{RetryPolicy, SetIdempotencyKeyLayer},
    BoxError, IdempotencyLayer,
};
type App = BoxCloneService<Request<Incoming>, Response<UnsyncBoxBody<Bytes, BoxError>>, Infallible>;

/// What a test server saw.
#[derive(Default)]
struct Seen {
    /// The `Idempotency-Key` of each request that reached the server.
    keys: Mutex<Vec<Option<String>>>,
    /// Runs of the handler behind the idempotency layer.
    payments: AtomicUsize,
}

impl Seen {
    fn keys(&self) -> Vec<Option<String>> {
        self.keys.lock().unwrap().clone()
    }
}

/// Serves `app` on 127.0.0.1, cutting the connection instead of answering
/// the first `drop_first` requests (after the app has answered them).
async fn serve(app: App, seen: Arc<Seen>, drop_first: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (app, seen, requests) = (app.clone(), Arc::clone(&seen), Arc::clone(&requests));
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (app, seen, requests) = (app.clone(), Arc::clone(&seen), Arc::clone(&requests));
                async move {
                    let key = request.headers().get("idempotency-key");
                    seen.keys
                        .lock()
                        .unwrap()
                        .push(key.map(|k| k.to_str().unwrap().to_owned()));
                    let (parts, body) = app.oneshot(request).await.unwrap().into_parts();
                    // Read to the end, so the layer has stored the response
                    // before the connection is cut.
                    let body = body.collect().await.unwrap().to_bytes();
                    if requests.fetch_add(1, Ordering::SeqCst) < drop_first {
                        return Err(std::io::Error::other("response dropped"));
                    }
                    Ok(Response::from_parts(parts, Full::new(body)))
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Holds a handler's run until the test lets it finish.
#[derive(Default)]
struct Gate {
    started: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

/// A payments endpoint behind the idempotency layer: each run answers 201
/// with the payment's number, once `gate` (if any) releases it.
fn payments(seen: &Arc<Seen>, gate: Option<Arc<Gate>>) -> App {
    let seen = Arc::clone(seen);
    let handler = service_fn(move |_: Request<_>| {
        let (seen, gate) = (Arc::clone(&seen), gate.clone());
        async move {
            let payment = seen.payments.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(gate) = gate {
                gate.started.notify_one();
                gate.release.notified().await;
            }
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Full::new(Bytes::from(format!("payment {payment}"))))
                    .unwrap(),
            )
        }
    });
    let app = ServiceBuilder::new()
        .layer(IdempotencyLayer::default())
        .service(handler)
        .map_response(|response| response.map(|body| body.map_err(Into::into).boxed_unsync()));
    BoxCloneService::new(app)
}

/// A status and its headers.
type Scripted = (StatusCode, &'static [(&'static str, &'static str)]);

/// What the layer sends when it asks for a retry.
const ASKS_FOR_RETRY: &[(&str, &str)] = &[
    ("retry-after", "0"),
    ("content-type", "application/problem+json"),
];

/// Answers each request with the next of `answers` (the last one repeats).
fn scripted(answers: Vec<Scripted>) -> App {
    let next = Arc::new(AtomicUsize::new(0));
    BoxCloneService::new(service_fn(move |_: Request<Incoming>| {
        let n = next.fetch_add(1, Ordering::SeqCst).min(answers.len() - 1);
        let (status, headers) = answers[n];
        let mut response = Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        let body = Full::new(Bytes::from_static(b"{}")).map_err(|never| match never {});
        async move { Ok(response.body(body.boxed_unsync()).unwrap()) }
    }))
}

/// hyper-util's client, as the layers under test wrap it.
fn transport() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn client(
    policy: RetryPolicy,
) -> BoxCloneService<Request<Full<Bytes>>, Response<Incoming>, BoxError> {
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(SetIdempotencyKeyLayer::new())
            .layer(RetryLayer::new(policy))
            .service(transport())
            .map_err(BoxError::from),
    )
}

fn quick() -> RetryPolicy {
    RetryPolicy::new().with_backoff(Duration::from_millis(20))
}

fn payment(addr: SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/payments"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"amount":1000}"#)))
        .unwrap()
}

async fn text(response: Response<Incoming>) -> String {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_dropped_response_is_retried_with_the_same_key_and_replayed() {
    let seen = Arc::new(Seen::default());
    let addr = serve(payments(&seen, None), Arc::clone(&seen), 1).await;

    let response = client(quick()).oneshot(payment(addr)).await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(text(response).await, "payment 1");
    assert_eq!(seen.payments.load(Ordering::SeqCst), 1);
    let keys = seen.keys();
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some());
    assert_eq!(keys[0], keys[1]);
}

#[tokio::test]
async fn a_request_in_flight_is_retried_after_its_retry_after() {
    let seen = Arc::new(Seen::default());
    let gate = Arc::new(Gate::default());
    let addr = serve(
        payments(&seen, Some(Arc::clone(&gate))),
        Arc::clone(&seen),
        0,
    )
    .await;
    let keyed = || {
        let mut request = payment(addr);
        let key = "8e03978e-40d5-43e8-bc93-6894a57f9324".parse().unwrap();
        request.headers_mut().insert("idempotency-key", key);
        request
    };
    let (first, second) = (keyed(), keyed());

    let running = tokio::spawn(client(RetryPolicy::new().with_max_retries(0)).oneshot(first));
    gate.started.notified().await;
    let retried = tokio::spawn(client(quick()).oneshot(second));
    // The second request's first attempt has been answered 409 (it never
    // reaches the handler): let the first run finish before its retry,
    // which waits for the 409's `Retry-After` of one second.
    while seen.keys().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.release.notify_one();
    let response = retried.await.unwrap().unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(
        running.await.unwrap().unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(seen.payments.load(Ordering::SeqCst), 1);
    // The first request, the 409 and the retry.
    assert_eq!(seen.keys().len(), 3);
}

/// Sends one payment through `policy` to a server answering `answers`:
/// the final status and the key of each attempt that reached the server.
async fn against(answers: Vec<Scripted>, policy: RetryPolicy) -> (StatusCode, Vec<Option<String>>) {
    let seen = Arc::new(Seen::default());
    let addr = serve(scripted(answers), Arc::clone(&seen), 0).await;
    let response = client(policy).oneshot(payment(addr)).await.unwrap();
    (response.status(), seen.keys())
}

#[tokio::test]
async fn a_key_reused_answer_is_never_retried() {
    let answers: Vec<Scripted> = vec![
        (StatusCode::UNPROCESSABLE_ENTITY, &[]),
        (StatusCode::CREATED, &[]),
    ];
    let (status, attempts) = against(answers, quick()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(attempts.len(), 1);
}

#[tokio::test]
async fn store_unavailable_is_retried_after_its_retry_after() {
    let answers: Vec<Scripted> = vec![
        (StatusCode::SERVICE_UNAVAILABLE, ASKS_FOR_RETRY),
        (StatusCode::CREATED, &[]),
    ];
    let (status, attempts) = against(answers, quick()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0], attempts[1]);
}

#[tokio::test]
async fn a_conflict_without_retry_after_is_not_retried() {
    let answers: Vec<Scripted> = vec![(StatusCode::CONFLICT, &[]), (StatusCode::CREATED, &[])];
    let (status, attempts) = against(answers, quick()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(attempts.len(), 1);
}

#[tokio::test]
async fn retries_stop_after_the_maximum() {
    let answers: Vec<Scripted> = vec![(StatusCode::SERVICE_UNAVAILABLE, ASKS_FOR_RETRY)];
    let (status, attempts) = against(answers, quick().with_max_retries(2)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempts.len(), 3);
}

#[tokio::test]
async fn a_post_without_a_key_is_never_retried() {
    let seen = Arc::new(Seen::default());
    let addr = serve(payments(&seen, None), Arc::clone(&seen), 1).await;
    let unkeyed = ServiceBuilder::new()
        .layer(RetryLayer::new(quick()))
        .service(transport());

    assert!(unkeyed.oneshot(payment(addr)).await.is_err());
    assert_eq!(seen.keys(), vec![None]);
}

#[tokio::test]
async fn a_key_the_caller_set_is_kept() {
    let seen = Arc::new(Seen::default());
    let addr = serve(payments(&seen, None), Arc::clone(&seen), 0).await;
    let mut request = payment(addr);
    request
        .headers_mut()
        .insert("idempotency-key", "order-42".parse().unwrap());
    client(quick()).oneshot(request).await.unwrap();
    assert_eq!(seen.keys(), vec![Some("order-42".to_owned())]);
}

#[tokio::test]
async fn each_new_request_gets_a_new_key_and_reads_get_none() {
    let seen = Arc::new(Seen::default());
    let addr = serve(payments(&seen, None), Arc::clone(&seen), 0).await;
    let client = client(quick());
    client.clone().oneshot(payment(addr)).await.unwrap();
    client.clone().oneshot(payment(addr)).await.unwrap();
    let read = Request::get(format!("http://{addr}/payments"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.oneshot(read).await.unwrap();

    let keys = seen.keys();
    assert_eq!(keys.len(), 3);
    assert_ne!(keys[0], keys[1]);
    assert_eq!(keys[2], None);
    // Both payments ran, and so did the read, which the layer passes through.
    assert_eq!(seen.payments.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_client_example_charges_the_payments_example_once_per_payment() {
    let server = process::start("payments", &[]);
    let output = std::process::Command::new(process::example_path("client"))
        .arg("3")
        .env("PAYMENTS_URL", &server.base)
        .output()
        .expect("run the client example");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(printed.matches("201 Created").count(), 3, "{printed}");

    let listed: Vec<serde_json::Value> = reqwest::get(format!("{}/payments", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut amounts: Vec<_> = listed
        .iter()
        .map(|p| p["amount"].as_u64().unwrap())
        .collect();
    amounts.sort_unstable();
    assert_eq!(amounts, vec![100, 200, 300]);
}

#[path = "../examples/common/payments_proto.rs"]
mod proto;

#[tokio::test]
async fn a_tonic_channel_gets_a_key_on_every_call() {
    let server = process::start("grpc", &[]);
    let channel = tonic::transport::Channel::from_shared(server.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&sent);
    let stamped = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .map_request(move |request: Request<tonic::body::Body>| {
            let key = request.headers().get("idempotency-key").cloned();
            recorded.lock().unwrap().push(key);
            request
        })
        .service(channel);
    let mut client = tonic::client::Grpc::new(stamped);

    for amount in [1500, 900] {
        client.ready().await.unwrap();
        let reply = client
            .unary(
                tonic::Request::new(proto::ChargeRequest {
                    amount,
                    currency: "EUR".to_owned(),
                }),
                http::uri::PathAndQuery::from_static(proto::CHARGE),
                tonic_prost::ProstCodec::<proto::ChargeRequest, proto::ChargeReply>::default(),
            )
            .await
            .expect("charged");
        assert_eq!(reply.into_inner().amount, amount);
    }
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(Option::is_some));
    assert_ne!(sent[0], sent[1]);
}

#[tokio::test]
async fn a_handlers_own_503_is_not_retried() {
    // A Retry-After but no problem document: the handler's answer, which
    // the layer does not keep, so a retry would run the handler again.
    let answers: Vec<Scripted> = vec![
        (StatusCode::SERVICE_UNAVAILABLE, &[("retry-after", "0")][..]),
        (StatusCode::CREATED, &[]),
    ];
    let (status, attempts) = against(answers, quick()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempts.len(), 1);
}
