//! The request path of a request that carries a key.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Weak,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use dashmap::DashMap;
use http::{request, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    body::{Buffer, RequestBody, ResponseBody},
    key::{Fingerprint, RecordKey, IDEMPOTENT_REPLAYED},
    layer::Config,
    metrics::{Decision, Metrics},
    policy::{ClientDisconnect, InFlightPolicy, StoreFailure},
    problem::{self, ProblemKind},
    store::{
        encode_chunks, encode_parts, Begin, BoxError, LockToken, Outcome, StoreError,
        StoredResponse,
    },
};

/// What every clone of one service shares: its settings, counters and the
/// task that renews the leases of its running requests.
pub(crate) struct Shared {
    pub(crate) config: Config,
    problems: Vec<Bytes>,
    pub(crate) metrics: Metrics,
    held: DashMap<u64, Held>,
    next_id: AtomicU64,
    keeper_started: AtomicBool,
}

struct Held {
    key: RecordKey,
    token: LockToken,
    since: Instant,
}

impl Shared {
    pub(crate) fn new(config: Config, metrics: Metrics) -> Arc<Self> {
        let problems = ProblemKind::ALL
            .iter()
            .map(|kind| {
                let detail = problem::default_detail(*kind, config.body_limit, config.body_timeout);
                problem::document(&config.problem_base, *kind, &detail)
            })
            .collect();
        Arc::new(Self {
            problems,
            config,
            metrics,
            held: DashMap::new(),
            next_id: AtomicU64::new(0),
            keeper_started: AtomicBool::new(false),
        })
    }

    /// The problem response for `kind`, its document made once per service.
    pub(crate) fn problem<B>(&self, kind: ProblemKind) -> Response<ResponseBody<B>> {
        self.problem_from(kind, self.problems[kind as usize].clone())
    }

    /// A problem response whose detail says more than the default.
    pub(crate) fn problem_with<B>(
        &self,
        kind: ProblemKind,
        detail: &str,
    ) -> Response<ResponseBody<B>> {
        self.problem_from(
            kind,
            problem::document(&self.config.problem_base, kind, detail),
        )
    }

    fn problem_from<B>(&self, kind: ProblemKind, body: Bytes) -> Response<ResponseBody<B>> {
        let retry_after = matches!(kind, ProblemKind::InFlight | ProblemKind::StoreUnavailable)
            .then_some(self.config.retry_after);
        problem::response(kind, body, retry_after).map(|body| ResponseBody::full(body, None))
    }

    /// Registers a held lock with the lease keeper, the one task per
    /// service that renews, every third of a lease, the locks older than
    /// that.
    fn hold(self: &Arc<Self>, key: RecordKey, token: LockToken, since: Instant) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.held.insert(id, Held { key, token, since });
        if !self.keeper_started.load(Ordering::Relaxed)
            && !self.keeper_started.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(keep_leases(Arc::downgrade(self)));
        }
        id
    }
}

async fn keep_leases(shared: Weak<Shared>) {
    let Some(period) = shared.upgrade().map(|s| s.config.lease / 3) else {
        return;
    };
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(due) = Instant::now().checked_sub(period) else {
            continue;
        };
        let renewals: Vec<(u64, RecordKey, LockToken)> = shared
            .held
            .iter()
            .filter(|held| held.since <= due)
            .map(|held| (*held.key(), held.key, held.token))
            .collect();
        for (id, key, token) in renewals {
            let renewed = shared
                .config
                .store
                .renew(&key, token, shared.config.lease)
                .await;
            // A lock settled since the list was taken needs no renewal.
            if let Err(err) = renewed {
                if shared.held.contains_key(&id) {
                    tracing::warn!(error = %err, ?key, "could not renew an idempotency lease");
                }
            }
        }
    }
}

/// A held lock. Dropped without being settled (a cancelled request, a
/// panicking handler), it releases the key from a spawned task.
struct LockGuard {
    shared: Arc<Shared>,
    key: RecordKey,
    token: LockToken,
    acquired: Instant,
    /// Set once the lease keeper knows of this lock.
    kept: Option<u64>,
    settled: bool,
}

impl LockGuard {
    fn new(shared: Arc<Shared>, key: RecordKey, token: LockToken) -> Self {
        Self {
            shared,
            key,
            token,
            acquired: Instant::now(),
            kept: None,
            settled: false,
        }
    }

    /// Hands the lock to the lease keeper. Called when the work has to
    /// wait; a handler that answers at once never pays for it.
    fn keep_alive(&mut self) {
        if self.kept.is_none() {
            self.kept = Some(self.shared.hold(self.key, self.token, self.acquired));
        }
    }

    fn forget(&mut self) {
        if let Some(id) = self.kept.take() {
            self.shared.held.remove(&id);
        }
    }

    async fn release(mut self) {
        self.forget();
        release(&self.shared, self.key, self.token).await;
        // Only now: dropped while the store answers, the guard releases
        // again from a task rather than leave the key locked.
        self.settled = true;
    }

    async fn complete(mut self, outcome: Outcome) {
        self.settled = true;
        self.forget();
        let config = &self.shared.config;
        if let Err(err) = config
            .store
            .complete(&self.key, self.token, outcome, config.ttl)
            .await
        {
            tracing::error!(
                error = %err,
                key = ?self.key,
                "could not store a completed response; the key stays locked until its lease runs out"
            );
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.forget();
        if self.settled {
            return;
        }
        let (shared, key, token) = (Arc::clone(&self.shared), self.key, self.token);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { release(&shared, key, token).await });
            }
            Err(_) => tracing::warn!(
                ?key,
                "no runtime to release a dropped lock; its lease bounds it"
            ),
        }
    }
}

async fn release(shared: &Shared, key: RecordKey, token: LockToken) {
    if let Err(err) = shared.config.store.release(&key, token).await {
        tracing::warn!(error = %err, ?key, "could not release an idempotency key; its lease bounds it");
    }
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

const STORE_FULL: &str =
    "The idempotency store is full. The request was not processed; retry later.";

/// Buffers and fingerprints the request, then asks the store what to do.
///
/// Written as a block rather than an `async fn`, whose state would hold
/// each argument twice, and with the call's own future boxed apart: the
/// state stays under the size that the allocator serves from its
/// per-thread cache.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep each argument twice in its state"
)]
pub(crate) fn run<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    parts: request::Parts,
    body: ReqBody,
    record: RecordKey,
) -> impl Future<Output = Answer<ResBody, S::Error>> + Send
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
            // transit pays for a timer.
            match std::future::poll_fn(|cx| Poll::Ready(buffer.as_mut().poll(cx))).await {
                Poll::Ready(collected) => Ok(collected),
                Poll::Pending => Box::pin(tokio::time::timeout(config.body_timeout, buffer)).await,
            }
        };
        let body = match collected {
            Ok(Ok(body)) => body,
            Ok(Err(err)) if err.is::<LengthLimitError>() => {
                shared.metrics.record(Decision::Rejected);
                return Ok(shared.problem(ProblemKind::BodyTooLarge));
            }
            Ok(Err(err)) => {
                shared.metrics.record(Decision::Rejected);
                tracing::debug!(error = %err, "request body could not be read");
                return Ok(shared.problem(ProblemKind::BodyUnreadable));
            }
            Err(_) => {
                shared.metrics.record(Decision::Rejected);
                return Ok(shared.problem(ProblemKind::BodyTimeout));
            }
        };
        let fingerprint = Fingerprint::compute(&parts, &config.fingerprint_headers, &body);
        let req = Request::from_parts(parts, RequestBody::buffered(body));

        let deadline = match config.in_flight {
            InFlightPolicy::Wait(limit) => Some(Instant::now() + limit),
            InFlightPolicy::Reject => None,
        };
        let mut backoff = Duration::from_millis(5);
        loop {
            let begin = config
                .store
                .begin(&record, &fingerprint, config.lease)
                .await;
            let decision = match begin {
                Ok(Begin::Acquired(token)) => {
                    shared.metrics.record(Decision::Executed);
                    let lock = LockGuard::new(shared, record, token);
                    return Box::pin(first_use(Box::pin(inner.call(req)), lock)).await;
                }
                Ok(Begin::Completed(stored)) => {
                    shared.metrics.record(Decision::Replayed);
                    return Ok(replay(stored));
                }
                Ok(Begin::InFlight) => match deadline {
                    Some(deadline) if Instant::now() + backoff < deadline => {
                        Box::pin(tokio::time::sleep(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_millis(250));
                        continue;
                    }
                    _ => (Decision::Conflict, ProblemKind::InFlight),
                },
                Ok(Begin::NotReplayable) => (Decision::NotReplayable, ProblemKind::NotReplayable),
                Ok(Begin::Mismatch) => (Decision::Mismatch, ProblemKind::KeyReused),
                Err(err) => {
                    shared.metrics.record(Decision::StoreError);
                    tracing::error!(error = %err, "idempotency store failed");
                    if config.store_failure == StoreFailure::FailOpen {
                        let response = Box::pin(inner.call(req)).await?;
                        return Ok(response.map(ResponseBody::inner));
                    }
                    return Ok(match err {
                        StoreError::Full => {
                            shared.problem_with(ProblemKind::StoreUnavailable, STORE_FULL)
                        }
                        _ => shared.problem(ProblemKind::StoreUnavailable),
                    });
                }
            };
            let (decision, kind) = decision;
            shared.metrics.record(decision);
            return Ok(shared.problem(kind));
        }
    }
}

/// The stored response, as the client first got it, marked as a replay. A
/// store that decodes a fresh record per lookup hands it over whole, so
/// nothing is copied; a shared one is cloned.
fn replay<B>(stored: Arc<StoredResponse>) -> Response<ResponseBody<B>> {
    let stored = Arc::try_unwrap(stored).unwrap_or_else(|shared| (*shared).clone());
    let mut response = Response::new(ResponseBody::full(stored.body, stored.trailers));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers;
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// Drives the inner service's call for a held key, boxed by the caller so
/// that neither it nor the request is carried in this future's state. The
/// work runs inside the caller's own future and response body; only if the client goes away
/// before the response is stored does the rest move to a task of its own
/// (or, with [`ClientDisconnect::Cancel`], get dropped and the key released).
async fn first_use<F, ResBody, E>(call: Pin<Box<F>>, lock: LockGuard) -> Answer<ResBody, E>
where
    F: Future<Output = Result<Response<ResBody>, E>> + Send + 'static,
    E: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let detach = lock.shared.config.on_disconnect == ClientDisconnect::Detach;
    let mut pending = PendingCall {
        call: Some(call),
        lock: Some(lock),
        detach,
        finish: finish_call::<F, ResBody, E>,
    };
    let result = std::future::poll_fn(|cx| match pending.call.as_mut() {
        Some(call) => {
            let poll = call.as_mut().poll(cx);
            if poll.is_pending() {
                if let Some(lock) = pending.lock.as_mut() {
                    lock.keep_alive();
                }
            }
            poll
        }
        None => unreachable!("the call is only taken once it is done"),
    })
    .await;
    pending.call = None;
    let lock = pending
        .lock
        .take()
        .expect("the lock stays until the call is done");
    match result {
        Ok(response) => {
            let (response, settling) = respond(response, lock, detach);
            settling.await;
            Ok(response)
        }
        Err(err) => {
            Settling::new(lock.release()).await;
            Err(err)
        }
    }
}

/// Releases the key for a response the keep policy refuses; otherwise
/// stores the response: at once if its body is already whole, or as it
/// streams. The release or completion under way comes back with the
/// response, to be awaited before the response is returned, so that no
/// retry can overtake it.
fn respond<B>(
    response: Response<B>,
    lock: LockGuard,
    detach: bool,
) -> (Response<ResponseBody<B>>, Settling)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (head, body) = response.into_parts();
    let config = &lock.shared.config;
    if !config.keep.keeps(&head) {
        return (
            Response::from_parts(head, ResponseBody::inner(body)),
            Settling::new(lock.release()),
        );
    }
    let mut body = Box::pin(body);
    // What the body has ready now. A body not ready is polled again by the
    // client, which registers its own waker then.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut first = None;
    let early = loop {
        if first.is_some() && body.is_end_stream() {
            break Early::Whole;
        }
        break match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(None) => Early::Whole,
            Poll::Ready(Some(Ok(frame))) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                match frame.into_data() {
                    Ok(data) if first.is_none() => {
                        first = Some(data);
                        continue;
                    }
                    Ok(data) => Early::More(Frame::data(data)),
                    Err(trailers) => Early::More(trailers),
                }
            }
            Poll::Ready(Some(Err(err))) => Early::Failed(err.into()),
            Poll::Pending => Early::Pending,
        };
    };
    // Most handlers answer with a body that is already whole: it is stored
    // as it is and goes out as it was stored.
    if let Early::Whole = early {
        let data = first.unwrap_or_default();
        let outcome = if data.len() > config.response_limit {
            Outcome::NotReplayable
        } else {
            Outcome::Response(encode_parts(head.status, &head.headers, &data, None))
        };
        return (
            Response::from_parts(head, ResponseBody::full(data, None)),
            Settling::new(lock.complete(outcome)),
        );
    }
    // A body still being produced is captured as it streams.
    let capture = Capture::new(head.status, head.headers.clone(), config.response_limit);
    let mut state = Box::new(CaptureState::new(body, capture, lock, detach));
    state.accept(first.map(Frame::data));
    match early {
        Early::More(frame) => state.accept(Some(frame)),
        Early::Failed(err) => state.fail(err),
        Early::Whole | Early::Pending => {}
    }
    while let Poll::Ready(Some(frame)) = state.poll_body(&mut cx) {
        state.ready.push_back(frame);
    }
    // A body that ended here settles before the response is returned.
    let settling = std::mem::take(&mut state.settling);
    (
        Response::from_parts(head, ResponseBody::capturing(state)),
        settling,
    )
}

/// What a response body had ready when the handler answered.
enum Early {
    /// At most one data frame, and the end.
    Whole,
    /// A frame beyond the first data frame, or trailers.
    More(Frame<Bytes>),
    /// The body failed.
    Failed(BoxError),
    /// The rest is still being produced.
    Pending,
}

/// A completion or release under way, or (the default) none. Dropped
/// before it finishes, it finishes in a task: once started, it must land
/// even if nobody waits.
#[derive(Default)]
struct Settling {
    future: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Settling {
    fn new(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            future: Some(Box::pin(future)),
        }
    }

    fn is_under_way(&self) -> bool {
        self.future.is_some()
    }
}

impl Future for Settling {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(future) = self.future.as_mut() {
            ready!(future.as_mut().poll(cx));
            self.future = None;
        }
        Poll::Ready(())
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(future);
            }
        }
    }
}

/// The inner service's future for a held key, until it yields the response
/// head. Dropped early (the client hung up), it finishes in a task of its
/// own so the response is still stored, unless the policy is to cancel or
/// the drop comes from a panic.
struct PendingCall<F> {
    call: Option<Pin<Box<F>>>,
    lock: Option<LockGuard>,
    detach: bool,
    /// Made where the bounds are known, since `Drop` cannot ask for them.
    finish: fn(Pin<Box<F>>, LockGuard) -> Detached,
}

type Detached = Pin<Box<dyn Future<Output = ()> + Send>>;

fn finish_call<F, B, E>(call: Pin<Box<F>>, lock: LockGuard) -> Detached
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    E: Send,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut lock = lock;
    lock.keep_alive();
    Box::pin(async move {
        match call.await {
            Ok(response) => {
                let (response, settling) = respond(response, lock, false);
                settling.await;
                drain(response.into_body()).await;
            }
            Err(_) => lock.release().await,
        }
    })
}

impl<F> Drop for PendingCall<F> {
    fn drop(&mut self) {
        let (Some(call), Some(lock)) = (self.call.take(), self.lock.take()) else {
            return;
        };
        if !self.detach || std::thread::panicking() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn((self.finish)(call, lock).in_current_span());
    }
}

/// Reads a body to its end, discarding what it yields.
async fn drain<B: Body>(body: B) {
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

/// A response body being streamed to the client while it is captured for
/// the store. Its end completes the key, its failure releases it; dropped
/// before either, it hands the rest of the stream to a task (or, to cancel,
/// releases the key).
pub(crate) struct CaptureState<B> {
    body: Option<Pin<Box<B>>>,
    /// Frames read and captured, not yet handed to the client.
    ready: VecDeque<Frame<Bytes>>,
    capture: Option<Capture>,
    lock: Option<LockGuard>,
    settling: Settling,
    error: Option<BoxError>,
    detach: bool,
    /// Made where the bounds are known, since `Drop` cannot ask for them.
    finish: fn(CaptureState<B>) -> Option<Detached>,
}

/// Reads the rest of an abandoned body into the store. Most bodies are
/// already whole and the memory store answers at once, so this first tries
/// to finish on the spot, which lets a retry right after see the replay;
/// what is still pending is returned to run in a task.
fn finish_body<B>(mut rest: CaptureState<B>) -> Option<Detached>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        match rest.poll_frame(&mut cx) {
            Poll::Ready(Some(_)) => {}
            Poll::Ready(None) => return None,
            Poll::Pending => return Some(Box::pin(drain(ResponseBody::capturing(Box::new(rest))))),
        }
    }
}

impl<B> CaptureState<B> {
    fn new(body: Pin<Box<B>>, capture: Capture, lock: LockGuard, detach: bool) -> Self
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Self {
            body: Some(body),
            ready: VecDeque::new(),
            capture: Some(capture),
            lock: Some(lock),
            settling: Settling::default(),
            error: None,
            detach,
            finish: finish_body::<B>,
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.body.is_none()
            && self.ready.is_empty()
            && !self.settling.is_under_way()
            && self.error.is_none()
    }
}

impl<B> CaptureState<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    pub(crate) fn size_hint(&self) -> http_body::SizeHint {
        let ready: u64 = self
            .ready
            .iter()
            .filter_map(Frame::data_ref)
            .map(|data| data.len() as u64)
            .sum();
        let rest = self.body.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            |body| body.size_hint(),
        );
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower() + ready);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ready);
        }
        hint
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if self.body.is_none() {
                // The completion or release under way, if any, lands first.
                ready!(Pin::new(&mut self.settling).poll(cx));
                return Poll::Ready(self.error.take().map(Err));
            }
            if let Some(frame) = ready!(self.poll_body(cx)) {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
    }

    /// The next frame of the handler's body, captured. At its end (or
    /// failure) the body is gone and the completion (or release) starts.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = body.as_mut().poll_frame(cx);
        if polled.is_pending() {
            if let Some(lock) = self.lock.as_mut() {
                lock.keep_alive();
            }
        }
        match ready!(polled) {
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                if let Some(capture) = self.capture.as_mut() {
                    capture.record(&frame);
                }
                Poll::Ready(Some(frame))
            }
            Some(Err(err)) => {
                self.fail(err.into());
                Poll::Ready(None)
            }
            None => {
                self.body = None;
                if let (Some(lock), Some(capture)) = (self.lock.take(), self.capture.take()) {
                    self.settling = Settling::new(lock.complete(capture.finish()));
                }
                Poll::Ready(None)
            }
        }
    }
}

impl<B> CaptureState<B> {
    /// Captures a frame read before this state existed, to be sent next.
    fn accept(&mut self, frame: Option<Frame<Bytes>>) {
        if let Some(frame) = frame {
            if let Some(capture) = self.capture.as_mut() {
                capture.record(&frame);
            }
            self.ready.push_back(frame);
        }
    }

    /// The body failed: the key is released and the client gets the error.
    fn fail(&mut self, err: BoxError) {
        self.body = None;
        self.error = Some(err);
        if let Some(lock) = self.lock.take() {
            self.settling = Settling::new(lock.release());
        }
    }
}

impl<B> Drop for CaptureState<B> {
    fn drop(&mut self) {
        // A completion or release under way lands on its own when dropped.
        if self.settling.is_under_way() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.detach || std::thread::panicking() {
            return;
        }
        let (Some(body), Some(lock)) = (self.body.take(), self.lock.take()) else {
            return;
        };
        let rest = CaptureState {
            body: Some(body),
            ready: VecDeque::new(),
            capture: self.capture.take(),
            lock: Some(lock),
            settling: Settling::default(),
            error: None,
            detach: false,
            finish: self.finish,
        };
        if let Some(task) = (self.finish)(rest) {
            handle.spawn(task.in_current_span());
        }
    }
}
/// The copy of a response kept for the store, up to the response limit.
struct Capture {
    status: StatusCode,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    overflowed: bool,
    trailers: Option<HeaderMap>,
}

impl Capture {
    fn new(status: StatusCode, headers: HeaderMap, limit: usize) -> Self {
        Self {
            status,
            headers,
            chunks: Vec::new(),
            len: 0,
            limit,
            overflowed: false,
            trailers: None,
        }
    }

    fn record(&mut self, frame: &Frame<Bytes>) {
        if self.overflowed {
            return;
        }
        if let Some(data) = frame.data_ref() {
            self.len += data.len();
            if self.len > self.limit {
                self.overflowed = true;
                self.chunks = Vec::new();
                return;
            }
            self.chunks.push(data.clone());
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers
                .get_or_insert_with(HeaderMap::new)
                .extend(trailers.iter().map(|(n, v)| (n.clone(), v.clone())));
        }
    }

    fn finish(self) -> Outcome {
        if self.overflowed {
            return Outcome::NotReplayable;
        }
        Outcome::Response(encode_chunks(
            self.status,
            &self.headers,
            &self.chunks,
            self.trailers.as_ref(),
        ))
    }
}
