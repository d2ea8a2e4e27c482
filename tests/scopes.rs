//! Scopes: whose record a key names, how much of the store one scope may
//! take, and what a record key gives away.

mod common;

use std::{fmt, time::Duration};

use bytes::Bytes;
use common::{app, json, post, send, Counter};
use http::{Request, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    key::{RecordKey, ScopeSecret},
    store::{MemoryLimits, MemoryStore},
    IdempotencyLayer,
};

fn post_as(client: &str, key: &str) -> Request<Full<Bytes>> {
    let mut request = post("/payments", Some(key), "{}");
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {client}").parse().unwrap());
    request
}

#[tokio::test]
async fn one_scope_flooding_unique_keys_leaves_room_for_the_others() {
    let counter = Counter::default();
    let store = MemoryStore::builder()
        .with_limits(MemoryLimits::new(100, 1024 * 1024).with_max_entries_per_scope(10))
        .build();
    let svc = app(
        &IdempotencyLayer::new(store),
        counter.handler(Duration::ZERO),
    );
    for i in 0..10 {
        let response = send(&svc, post_as("flooder", &format!("flood-{i}"))).await;
        assert_eq!(response.status(), StatusCode::CREATED, "key {i}");
    }
    let (status, headers, problem) = json(send(&svc, post_as("flooder", "flood-10")).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    assert!(problem["type"].as_str().unwrap().ends_with("too-many-keys"));
    // Another client, and the flooder's retries of keys it already holds,
    // are served as before.
    assert_eq!(
        send(&svc, post_as("someone-else", "pay-1")).await.status(),
        StatusCode::CREATED
    );
    let retry = send(&svc, post_as("flooder", "flood-3")).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.runs(), 11);
}

#[tokio::test]
async fn a_scope_has_room_again_once_its_records_expire() {
    let counter = Counter::default();
    let store = MemoryStore::builder()
        .with_limits(MemoryLimits::new(100, 1024 * 1024).with_max_entries_per_scope(2))
        .build();
    let layer = IdempotencyLayer::new(store.clone()).with_ttl(Duration::from_millis(100));
    let svc = app(&layer, counter.handler(Duration::ZERO));
    for key in ["a", "b"] {
        send(&svc, post_as("client", key)).await;
    }
    assert_eq!(
        send(&svc, post_as("client", "c")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    store.sweep();
    assert_eq!(
        send(&svc, post_as("client", "c")).await.status(),
        StatusCode::CREATED
    );
}

/// What an authentication layer found out about the caller.
#[derive(Clone)]
struct UserId(u64);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user:{}", self.0)
    }
}

/// Stands in for an authentication layer: the principal comes from an
/// `x-user` header, whatever credentials the request carries.
fn authenticated<S>(
    inner: S,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = S::Response,
    Error = S::Error,
    Future = S::Future,
> + Clone
where
    S: tower::Service<Request<Full<Bytes>>> + Clone,
{
    tower::util::MapRequest::new(inner, |mut request: Request<Full<Bytes>>| {
        let user = request.headers()["x-user"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        request.extensions_mut().insert(UserId(user));
        request
    })
}

fn post_by(user: u64, token: &str, key: &str) -> Request<Full<Bytes>> {
    let mut request = post_as(token, key);
    request
        .headers_mut()
        .insert("x-user", user.to_string().parse().unwrap());
    request
}

#[tokio::test]
async fn principal_scope_survives_a_refreshed_token() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::default().with_principal_scope::<UserId>();
    let svc = authenticated(layer.layer(counter.handler(Duration::ZERO)));
    let first = svc
        .clone()
        .oneshot(post_by(7, "token-1", "k"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    // The same user retries with a fresh bearer token: still a replay.
    let retry = svc
        .clone()
        .oneshot(post_by(7, "token-2", "k"))
        .await
        .unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    // Another user with the same key is another record.
    let other = svc.oneshot(post_by(8, "token-1", "k")).await.unwrap();
    assert!(other.headers().get("idempotent-replayed").is_none());
    assert_eq!(counter.runs(), 2);
}

#[tokio::test]
async fn replicas_sharing_a_store_must_share_the_scope_secret() {
    let store = MemoryStore::new();
    let counter = Counter::default();
    let replica = |secret: &str| {
        app(
            &IdempotencyLayer::new(store.clone()).with_scope_secret(secret),
            counter.handler(Duration::ZERO),
        )
    };
    let (one, same, other) = (replica("s3cret"), replica("s3cret"), replica("another"));
    send(&one, post_as("client", "k")).await;
    let replay = send(&same, post_as("client", "k")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let unrelated = send(&other, post_as("client", "k")).await;
    assert!(unrelated.headers().get("idempotent-replayed").is_none());
    assert_eq!(counter.runs(), 2);
}

#[test]
fn a_secret_changes_every_record_key() {
    let scope = b"Bearer weak-password";
    let plain = RecordKey::new(scope, "k");
    let keyed = RecordKey::with_secret(&ScopeSecret::new(b"s3cret"), scope, "k");
    let other = RecordKey::with_secret(&ScopeSecret::new(b"another"), scope, "k");
    assert_ne!(plain.as_bytes(), keyed.as_bytes());
    assert_ne!(keyed.as_bytes(), other.as_bytes());
    assert_eq!(
        keyed,
        RecordKey::with_secret(&ScopeSecret::new(b"s3cret"), scope, "k")
    );
}
