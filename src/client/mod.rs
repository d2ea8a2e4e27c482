//! The client side: a fresh key on every request that needs one, kept
//! across the attempts of a retry, and a retry policy that knows the
//! layer's answers.
//!
//! Put [`SetIdempotencyKeyLayer`] outside a [`tower::retry::RetryLayer`]
//! with [`RetryPolicy`]: the key is stamped once, before the retry layer
//! clones the request for each attempt, so every attempt carries the same
//! key and the server runs the request at most once.
//!
//! Both work on any Tower HTTP client: hyper-util's `Client`, or a tonic
//! `Channel` (every gRPC call is a POST, so each gets its own key). The
//! retry policy clones the request body for each attempt, so it needs a
//! body that can be cloned, such as `Full<Bytes>`; a tonic body cannot.
//! A gRPC caller that retries sets the key in the call's metadata itself
//! and sends its message again with it: a key the layer stamps inside the
//! channel is never seen by the caller.
//!
//! ```
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::Full;
//! use tower::{retry::RetryLayer, service_fn, ServiceBuilder, ServiceExt};
//! use tower_idempotency::client::{RetryPolicy, SetIdempotencyKeyLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Stands in for a hyper-util client or a tonic channel.
//! let transport = service_fn(|request: Request<Full<Bytes>>| async move {
//!     let key = request.headers()["idempotency-key"].clone();
//!     Ok::<_, std::io::Error>(http::Response::new(key))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(SetIdempotencyKeyLayer::new())
//!     .layer(RetryLayer::new(
//!         RetryPolicy::new().with_max_retries(3).with_backoff(Duration::from_millis(50)),
//!     ))
//!     .service(transport);
//!
//! let request = Request::post("/payments").body(Full::new(Bytes::from("{}"))).unwrap();
//! let key = client.oneshot(request).await.unwrap().into_body();
//! assert_eq!(key.len(), 36); // a UUID
//! # }
//! ```

mod retry;
mod set_key;

pub use self::{
    retry::RetryPolicy,
    set_key::{SetIdempotencyKey, SetIdempotencyKeyLayer},
};
