use std::{
    fmt, mem,
    sync::Arc,
    task::{Context, Poll},
};

use http::{header, HeaderMap, Request, Response};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    body::{whole, RequestBody, ResponseBody},
    future::ResponseFuture,
    key::key_in,
    keyed::{decide, shared::Shared},
    metrics::Decision,
    problem::ProblemKind,
    BoxError,
};

/// Middleware that runs each request with an `Idempotency-Key` once and
/// replays its stored response to retries.
///
/// Made by [`IdempotencyLayer`](crate::IdempotencyLayer). The inner service
/// receives a [`RequestBody`] and must be `Clone`: a request with a key is
/// answered after asynchronous work (buffering, the store), so the ready
/// service is taken for it and a clone left in its place.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Idempotency<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        if !config.methods.contains(req.method()) {
            return self.pass_through(req);
        }
        let (parts, body) = req.into_parts();
        let record = match key_in(&parts.headers) {
            Ok(Some(key)) => config.record_key(&parts, &key),
            Ok(None) if !config.key_required => {
                return self.pass_through(Request::from_parts(parts, body))
            }
            Ok(None) => {
                shared.metrics.record(Decision::Rejected);
                return ResponseFuture::ready(whole(
                    shared.problems.response(ProblemKind::MissingKey),
                ));
            }
            Err(err) => {
                shared.metrics.record(Decision::Rejected);
                return ResponseFuture::ready(whole(shared.problems.invalid_key(&err)));
            }
        };
        if declared_length(&parts.headers).is_some_and(|len| len > config.body_limit as u64) {
            shared.metrics.record(Decision::Rejected);
            return ResponseFuture::ready(whole(
                shared.problems.response(ProblemKind::BodyTooLarge),
            ));
        }
        let span = tracing::debug_span!(
            "idempotency",
            method = %parts.method,
            path = parts.uri.path(),
        );
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        ResponseFuture::keyed(Box::pin(
            decide::run(Arc::clone(shared), inner, parts, body, record).instrument(span),
        ))
    }
}

impl<S> Idempotency<S> {
    fn pass_through<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    {
        self.shared.metrics.record(Decision::PassThrough);
        ResponseFuture::pass_through(self.inner.call(req.map(RequestBody::streaming)))
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
