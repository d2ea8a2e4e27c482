//! Stamps a fresh `Idempotency-Key` on requests that need one.

use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request};
use tower_layer::Layer;
use tower_service::Service;

use crate::{config::DEFAULT_METHODS, key::IDEMPOTENCY_KEY};

/// Adds [`SetIdempotencyKey`] to a client; see the [module docs](super).
#[derive(Debug, Clone)]
#[must_use]
pub struct SetIdempotencyKeyLayer {
    methods: Vec<Method>,
}

impl Default for SetIdempotencyKeyLayer {
    fn default() -> Self {
        Self {
            methods: DEFAULT_METHODS.to_vec(),
        }
    }
}

impl SetIdempotencyKeyLayer {
    /// Stamps POST and PATCH requests, the methods the server layer covers
    /// by default.
    pub fn new() -> Self {
        Self::default()
    }

    /// The methods whose requests get a key.
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }
}

impl<S> Layer<S> for SetIdempotencyKeyLayer {
    type Service = SetIdempotencyKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetIdempotencyKey {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// Gives each request of a covered method that has no `Idempotency-Key` a
/// fresh one (a random UUID), and leaves a key the caller set alone.
#[derive(Debug, Clone)]
pub struct SetIdempotencyKey<S> {
    inner: S,
    methods: Vec<Method>,
}

impl<S, B> Service<Request<B>> for SetIdempotencyKey<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if self.methods.contains(request.method())
            && !request.headers().contains_key(&IDEMPOTENCY_KEY)
        {
            request.headers_mut().insert(IDEMPOTENCY_KEY, fresh_key());
        }
        self.inner.call(request)
    }
}

fn fresh_key() -> HeaderValue {
    let mut text = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}
