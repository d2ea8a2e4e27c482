//! The decision for a request with a key: buffer and fingerprint it, ask
//! the store, and answer a replay or a conflict without calling the inner
//! service.

use std::{future::Future, sync::Arc, task::Poll, time::Duration};

use bytes::Bytes;
use http::{request, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{LengthLimitError, Limited};
use tokio::time::Instant;
use tower_service::Service;

use super::{first_use::FirstUse, lock::LockGuard, shared::Shared};
use crate::{
    body::{whole, Buffer, RequestBody, ResponseBody},
    key::{Fingerprint, RecordKey, IDEMPOTENT_REPLAYED},
    metrics::Decision,
    policy::{InFlightPolicy, StoreFailure},
    problem::ProblemKind,
    store::{BeginOutcome, LockToken, StoreError, StoredResponse},
    BoxError, Execution,
};

/// What a keyed request is answered with.
type KeyedResult<B, E> = Result<Response<ResponseBody<B>>, E>;

/// Buffers and fingerprints the request, then asks the store what to do.
///
/// Written as a block rather than an `async fn`, whose state would hold
/// each argument twice; the first use runs in a box of its own, a failed
/// store's answer in another, and the request is only rebuilt where it is
/// handed on. The state, boxed once per request, then stays under the
/// 1 KiB up to which glibc's allocator serves it from a per-thread cache.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep each argument twice in its state"
)]
pub(crate) fn run<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    parts: request::Parts,
    body: ReqBody,
    record: RecordKey,
) -> impl Future<Output = KeyedResult<ResBody, S::Error>> + Send
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    async move {
        let config = &shared.config;
        let collected = {
            let mut buffer = std::pin::pin!(Buffer::new(Limited::new(body, config.body_limit)));
            // Most bodies have fully arrived by now: only a body still in
            // transit pays for a timer. Outside a Tokio runtime there is
            // none, and the body is waited for as long as it takes.
            match std::future::poll_fn(|cx| Poll::Ready(buffer.as_mut().poll(cx))).await {
                Poll::Ready(collected) => Ok(collected),
                Poll::Pending if tokio::runtime::Handle::try_current().is_err() => Ok(buffer.await),
                Poll::Pending => Box::pin(tokio::time::timeout(config.body_timeout, buffer)).await,
            }
        };
        let body = match collected {
            Ok(Ok(body)) => body,
            Ok(Err(err)) if err.is::<LengthLimitError>() => {
                return Ok(rejected(&shared, ProblemKind::BodyTooLarge));
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "request body could not be read");
                return Ok(rejected(&shared, ProblemKind::BodyUnreadable));
            }
            Err(_) => return Ok(rejected(&shared, ProblemKind::BodyTimeout)),
        };
        let fingerprint = Fingerprint::compute(
            &parts,
            &config.fingerprint_headers,
            &config.body_fingerprint.bytes(&body),
        );

        let deadline = match config.in_flight {
            InFlightPolicy::Wait(limit) => Some(Instant::now() + limit),
            InFlightPolicy::Reject => None,
        };
        let mut backoff = Duration::from_millis(5);
        loop {
            let begun = config
                .store
                .begin(&record, &fingerprint, config.lease)
                .await;
            let (token, recovery) = match begun {
                Ok(BeginOutcome::Acquired(token)) => {
                    shared.metrics.record(Decision::Executed);
                    (token, false)
                }
                Ok(BeginOutcome::Recover(token)) => {
                    shared.metrics.record(Decision::Recovered);
                    tracing::warn!(key = ?record, "recovering a key whose earlier holder fenced it and stored no response");
                    (token, true)
                }
                Ok(BeginOutcome::Completed(record)) => match StoredResponse::decode(record) {
                    Ok(stored) => {
                        shared.metrics.record(Decision::Replayed);
                        return Ok(replay(stored));
                    }
                    Err(err) => {
                        return Box::pin(store_failed(&shared, inner, parts, body, err.into()))
                            .await
                    }
                },
                Ok(BeginOutcome::InFlight) => match deadline {
                    // Outside a Tokio runtime there is no timer to wait on.
                    Some(deadline)
                        if Instant::now() + backoff < deadline
                            && tokio::runtime::Handle::try_current().is_ok() =>
                    {
                        Box::pin(tokio::time::sleep(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_millis(250));
                        continue;
                    }
                    _ => return Ok(answered(&shared, Decision::Conflict, ProblemKind::InFlight)),
                },
                Ok(BeginOutcome::NotReplayable) => {
                    return Ok(answered(
                        &shared,
                        Decision::NotReplayable,
                        ProblemKind::NotReplayable,
                    ))
                }
                Ok(BeginOutcome::Mismatch) => {
                    return Ok(answered(
                        &shared,
                        Decision::Mismatch,
                        ProblemKind::KeyReused,
                    ))
                }
                Err(StoreError::ScopeFull) => {
                    return Ok(answered(
                        &shared,
                        Decision::Rejected,
                        ProblemKind::TooManyKeys,
                    ))
                }
                Err(err) => return Box::pin(store_failed(&shared, inner, parts, body, err)).await,
            };
            let req = rebuilt(parts, body);
            return run_first_use(shared, inner, req, record, fingerprint, token, recovery).await;
        }
    }
}

/// Starts the inner service for a key just taken, with its `Execution` in
/// the request's extensions.
fn run_first_use<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    mut req: Request<RequestBody<ReqBody>>,
    key: RecordKey,
    fingerprint: Fingerprint,
    token: LockToken,
    recovery: bool,
) -> FirstUse<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let config = &shared.config;
    let execution = Execution::new(key, token, recovery, config.ttl, Arc::clone(&config.store));
    req.extensions_mut().insert(execution);
    let lock = LockGuard::new(shared, key, fingerprint, token);
    FirstUse::new(inner.call(req), lock)
}

/// The request as the inner service gets it: its body is the bytes
/// buffered for the fingerprint. Rebuilt only where it is handed on, so
/// that the keyed future does not carry it beside its parts.
fn rebuilt<B>(parts: request::Parts, body: Bytes) -> Request<RequestBody<B>> {
    Request::from_parts(parts, RequestBody::buffered(body))
}

fn rejected<B>(shared: &Shared, kind: ProblemKind) -> Response<ResponseBody<B>> {
    answered(shared, Decision::Rejected, kind)
}

/// The problem response for `kind`, counted as `decision`.
fn answered<B>(
    shared: &Shared,
    decision: Decision,
    kind: ProblemKind,
) -> Response<ResponseBody<B>> {
    shared.metrics.record(decision);
    whole(shared.problems.response(kind))
}

/// Answers a request whose store failed: 503, or the inner service
/// unprotected if the layer fails open and the store could not be reached.
/// A store that answered (full, or with a record it cannot read) has seen
/// the key, so running the request could run it twice: that is never
/// failed open.
async fn store_failed<S, ReqBody, ResBody>(
    shared: &Shared,
    mut inner: S,
    parts: request::Parts,
    body: Bytes,
    err: StoreError,
) -> KeyedResult<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
{
    shared.metrics.record(Decision::StoreError);
    tracing::error!(error = %err, "idempotency store failed");
    if shared.config.store_failure == StoreFailure::FailOpen
        && matches!(err, StoreError::Backend(_))
    {
        let response = Box::pin(inner.call(rebuilt(parts, body))).await?;
        return Ok(response.map(ResponseBody::inner));
    }
    Ok(whole(match err {
        StoreError::Full => shared.problems.store_full(),
        _ => shared.problems.response(ProblemKind::StoreUnavailable),
    }))
}

/// The stored response, as the client first got it, marked as a replay.
fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::full(stored.body, stored.trailers));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers;
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}
