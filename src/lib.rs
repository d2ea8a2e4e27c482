//! Tower middleware that makes HTTP requests safe to retry.
//!
//! A client sends an `Idempotency-Key` header with a request that must not
//! run twice, such as a payment. [`IdempotencyLayer`] runs the first request
//! with that key, stores its response, and answers every retry with the
//! stored response instead of running the request again.
//!
//! ```
//! use axum::{routing::post, Router};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//! use tower_idempotency::IdempotencyLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new()
//!     .route("/payments", post(|| async { (StatusCode::CREATED, "payment 1") }))
//!     .layer(IdempotencyLayer::default());
//!
//! let request = || {
//!     Request::post("/payments")
//!         .header("idempotency-key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
//!         .body(axum::body::Body::empty())
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert!(first.headers().get("idempotent-replayed").is_none());
//!
//! let retry = app.oneshot(request()).await.unwrap();
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # }
//! ```
//!
//! # Behaviour
//!
//! | situation | answer |
//! |---|---|
//! | method not covered (default: all but POST, PATCH), or no key | passed through |
//! | no key, [`with_key_required`](IdempotencyLayer::with_key_required) | 400 `missing-key` |
//! | key empty, over 255 characters, not visible ASCII, sent twice | 400 `invalid-key` |
//! | body over the limit (default 1 MiB) | 413 `body-too-large` |
//! | first use of the key | runs once; response stored for the TTL (24 h) |
//! | same key, same request, first still running | 409 `request-in-flight`, `Retry-After` |
//! | same key, same request, completed | stored response, `Idempotent-Replayed: true` |
//! | same key, different method, path, query, body or headers | 422 `key-reused` |
//! | one client holds its share of the memory store | 429 `too-many-keys` |
//! | store unreachable or full | 503 `store-unavailable` (fail open only if unreachable) |
//!
//! Errors are `application/problem+json` documents; see [`problem`].
//!
//! # Feature flags
//!
//! | feature | what it adds |
//! |---|---|
//! | `redis` | [`RedisStore`](store::RedisStore), on `redis`'s `ConnectionManager` or its Redis Cluster client |
//! | `postgres` | [`PostgresStore`](store::PostgresStore), on a `sqlx::PgPool` |
//! | `conformance` | `store_conformance_tests!`, the suite every store passes |
//! | `utoipa` | [`openapi::IdempotencyDocs`]: the key header, `Idempotent-Replayed` and the problem answers in an OpenAPI document |
//! | `client` | [`client`]: a layer that stamps a fresh key on each request and keeps it across retries, and a retry policy that knows the layer's answers |
//! | `sfv` | the quoted key header read by the `sfv` structured-field parser instead of the crate's own reader of the same rules |
//! | `metrics` | decision counters and store call durations through the `metrics` facade ([`metrics`]) |
//!
//! The default build has only the in-memory [`MemoryStore`].
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
mod config;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
mod execution;
pub mod fingerprint;
mod future;
mod http_date;
pub mod key;
mod keyed;
mod layer;
pub mod metrics;
#[cfg(feature = "utoipa")]
#[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
pub mod openapi;
pub mod policy;
pub mod problem;
mod service;
pub mod store;

pub use crate::{
    execution::Execution,
    future::ResponseFuture,
    layer::IdempotencyLayer,
    policy::{ClientDisconnect, InFlightPolicy, KeepPolicy, NotExecuted, StoreFailure},
    service::Idempotency,
    store::{MemoryStore, Store},
};

/// A boxed error: what the layer's bodies fail with, and what a store's
/// backend error is kept as.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
