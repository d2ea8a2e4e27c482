//! The choices the layer leaves to its user.

use std::{fmt, sync::Arc, time::Duration};

use http::{response, StatusCode};

/// A response extension by which a handler says "this request was not
/// executed": the key is released and a retry runs the request again.
///
/// ```
/// use http::Response;
/// use tower_idempotency::NotExecuted;
///
/// let mut response = Response::new("upstream busy, nothing was charged");
/// response.extensions_mut().insert(NotExecuted);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotExecuted;

/// Decides from the response head whether a response is kept for replay or
/// the key is released so that a retry runs the request again.
#[derive(Clone)]
pub struct KeepPolicy(Arc<dyn Fn(&response::Parts) -> bool + Send + Sync>);

impl KeepPolicy {
    /// A policy from a function that answers `true` to keep.
    pub fn from_fn<F>(keep: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        Self(Arc::new(keep))
    }

    /// Keeps only 2xx responses.
    pub fn successes_only() -> Self {
        Self::from_fn(|head| head.status.is_success() && !marked_not_executed(head))
    }

    pub(crate) fn keeps(&self, head: &response::Parts) -> bool {
        (self.0)(head)
    }
}

impl Default for KeepPolicy {
    /// Keeps every completed response, errors and 500 included, as Stripe
    /// does, except those that say the request was not processed: 408, 429,
    /// 503, or a [`NotExecuted`] extension.
    ///
    /// `Cache-Control: no-store` is a caching directive for the client and
    /// caches between, not a statement that nothing was done: a response
    /// carrying it is kept and replayed like any other.
    fn default() -> Self {
        Self::from_fn(|head| {
            !matches!(
                head.status,
                StatusCode::REQUEST_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::SERVICE_UNAVAILABLE
            ) && !marked_not_executed(head)
        })
    }
}

impl fmt::Debug for KeepPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeepPolicy(..)")
    }
}

/// Whether the handler marked the response as not executed, by the
/// [`NotExecuted`] extension.
pub fn marked_not_executed(head: &response::Parts) -> bool {
    head.extensions.get::<NotExecuted>().is_some()
}

/// What happens when the client goes away before its response is complete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientDisconnect {
    /// The handler runs to the end in the background and its response is
    /// stored, so the client's retry gets the replay. The default.
    #[default]
    Detach,
    /// The handler is dropped and the key released, so a retry runs the
    /// request again. Only safe when dropping the handler undoes its work.
    Cancel,
}

/// What a duplicate gets while the first request with its key is in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlightPolicy {
    /// Answer 409 Conflict with `Retry-After` at once. The default.
    #[default]
    Reject,
    /// Wait up to this long for the first request to finish, then answer
    /// with its replay (or 409 if it is still running).
    Wait(Duration),
}

/// What the layer does when the store fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreFailure {
    /// Answer 503 and do not run the request. The default: nothing runs
    /// without protection against a second execution.
    #[default]
    Reject,
    /// Run the request without idempotency protection when the store
    /// cannot be reached ([`StoreError::Backend`](crate::store::StoreError::Backend)).
    /// A store that answers, but is full or holds a record that cannot be
    /// decoded (corrupt, or written by a newer build), still gets 503: it
    /// has seen the key.
    FailOpen,
}
