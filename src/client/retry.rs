//! When to send a keyed request again.

use std::time::Duration;

use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use tokio::time::Sleep;
use tower::retry::Policy;

use crate::{key::IDEMPOTENCY_KEY, problem::PROBLEM_JSON};

/// A [`tower::retry::Policy`] for requests protected by an idempotency key.
///
/// It sends a request again when doing so cannot run it twice: the request
/// carries an `Idempotency-Key` (or its method is idempotent, such as GET
/// or PUT), and
///
/// - the transport failed (a refused or reset connection, a response cut
///   off): the request may or may not have run, and the key makes the retry
///   safe either way. A backoff with full jitter comes first.
/// - the server answered 409 with `Retry-After` (`request-in-flight`: the
///   first attempt is still running), or 503 with `Retry-After` and a
///   problem document (`store-unavailable`: the request did not run):
///   after the time it asks for, at least the backoff and at most
///   [`with_max_delay`](Self::with_max_delay).
///
/// It never retries anything else: not 422 (`key-reused`, a new request
/// needs a new key), not 409 without `Retry-After`
/// (`response-not-replayable`, the request ran), not 429 (`too-many-keys`,
/// which lasts until the client's earlier keys expire), not a handler's
/// own 503 (which the layer does not keep, so a retry would run the
/// handler again), and not a non-idempotent request without a key.
///
/// A key makes a retry safe only where the server runs the idempotency
/// layer on that route and method: stamp keys on those requests only.
///
/// The request body must be `Clone` (`Full<Bytes>`, `String`), as for any
/// retry.
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryPolicy {
    retries_left: usize,
    backoff: Duration,
    max_delay: Duration,
    attempt: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retries_left: 3,
            backoff: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            attempt: 0,
        }
    }
}

impl RetryPolicy {
    /// Three retries; backoff from 100 ms; waits of at most 30 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times one request may be sent again.
    pub fn with_max_retries(mut self, retries: usize) -> Self {
        self.retries_left = retries;
        self
    }

    /// The first backoff after a transport error; each next one doubles,
    /// and each is drawn uniformly below its bound.
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest wait, whatever `Retry-After` asks for; at most a day.
    pub fn with_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay.min(crate::IdempotencyLayer::MAX_DELAY);
        self
    }

    fn backoff_delay(&self) -> Duration {
        let bound = self
            .backoff
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.max_delay);
        // 53 random bits (a v4 UUID fixes a few of the others) make a
        // fraction in [0, 1) that a double holds exactly.
        let bits = uuid::Uuid::new_v4().as_u128() as u64 & ((1 << 53) - 1);
        bound.mul_f64(bits as f64 / (1u64 << 53) as f64)
    }
}

impl<B, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for RetryPolicy
where
    B: Clone,
{
    type Future = Sleep;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        if self.retries_left == 0 || !safe_to_repeat(request) {
            return None;
        }
        let delay = match result {
            Err(_) => self.backoff_delay(),
            Ok(response) => {
                let headers = response.headers();
                let asked = match response.status() {
                    StatusCode::CONFLICT => retry_after(headers)?,
                    StatusCode::SERVICE_UNAVAILABLE if is_problem(headers) => retry_after(headers)?,
                    _ => return None,
                };
                asked.max(self.backoff).min(self.max_delay)
            }
        };
        self.retries_left -= 1;
        self.attempt = self.attempt.saturating_add(1);
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        if !safe_to_repeat(request) {
            return None;
        }
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

/// RFC 9110 section 9.2.2: these may be repeated as they are; any other
/// needs a key.
fn safe_to_repeat<B>(request: &Request<B>) -> bool {
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || request.headers().contains_key(&IDEMPOTENCY_KEY)
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(PROBLEM_JSON.as_bytes()))
}

/// `Retry-After` in seconds; an HTTP-date is not what the layer sends, and
/// is not waited for.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    seconds.trim().parse().ok().map(Duration::from_secs)
}
