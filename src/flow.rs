//! The request path of a request that carries a key.

use std::{
    panic,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tower_service::Service;

use crate::{
    body::{Chunk, RequestBody, ResponseBody},
    key::{Fingerprint, RecordKey, IDEMPOTENT_REPLAYED},
    layer::Config,
    metrics::{Decision, Metrics},
    policy::{ClientDisconnect, InFlightPolicy, StoreFailure},
    problem::{problem, ProblemKind},
    store::{Begin, BoxError, LockToken, Outcome, StoreError, StoredResponse},
};

/// What every clone of one service shares: its settings, counters and the
/// task that renews the leases of its running requests.
pub(crate) struct Shared {
    pub(crate) config: Config,
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
        Arc::new(Self {
            config,
            metrics,
            held: DashMap::new(),
            next_id: AtomicU64::new(0),
            keeper_started: AtomicBool::new(false),
        })
    }

    pub(crate) fn problem<B>(&self, kind: ProblemKind, detail: &str) -> Response<ResponseBody<B>> {
        let retry_after = matches!(kind, ProblemKind::InFlight | ProblemKind::StoreUnavailable)
            .then_some(self.config.retry_after);
        problem(&self.config.problem_base, kind, detail, retry_after)
            .map(|body| ResponseBody::full(body, None))
    }

    /// Registers a held lock with the lease keeper, which one task per
    /// service renews every third of a lease: a request pays for renewal only
    /// when it outlives that.
    fn hold(self: &Arc<Self>, key: RecordKey, token: LockToken) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.held.insert(
            id,
            Held {
                key,
                token,
                since: Instant::now(),
            },
        );
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
        let due = Instant::now() - period;
        let renewals: Vec<(RecordKey, LockToken)> = shared
            .held
            .iter()
            .filter(|held| held.since <= due)
            .map(|held| (held.key, held.token))
            .collect();
        for (key, token) in renewals {
            if let Err(err) = shared
                .config
                .store
                .renew(&key, token, shared.config.lease)
                .await
            {
                tracing::warn!(error = %err, ?key, "could not renew an idempotency lease");
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
    id: u64,
    settled: bool,
}

impl LockGuard {
    fn new(shared: Arc<Shared>, key: RecordKey, token: LockToken) -> Self {
        let id = shared.hold(key, token);
        Self {
            shared,
            key,
            token,
            id,
            settled: false,
        }
    }

    async fn release(mut self) {
        self.settled = true;
        self.shared.held.remove(&self.id);
        release(&self.shared, self.key, self.token).await;
    }

    async fn complete(mut self, outcome: Outcome) {
        self.settled = true;
        self.shared.held.remove(&self.id);
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
        if self.settled {
            return;
        }
        self.shared.held.remove(&self.id);
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

/// Buffers and fingerprints the request, then asks the store what to do.
pub(crate) async fn run<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqBody>,
    key: String,
) -> Answer<ResBody, S::Error>
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
    let config = &shared.config;
    let (parts, body) = req.into_parts();
    let collected = tokio::time::timeout(
        config.body_timeout,
        Limited::new(body, config.body_limit).collect(),
    )
    .await;
    let body = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<LengthLimitError>() => {
            shared.metrics.record(Decision::Rejected);
            let detail = format!(
                "The request body is larger than {} bytes, the most this endpoint accepts.",
                config.body_limit
            );
            return Ok(shared.problem(ProblemKind::BodyTooLarge, &detail));
        }
        Ok(Err(err)) => {
            shared.metrics.record(Decision::Rejected);
            let detail = format!("The request body could not be read: {err}.");
            return Ok(shared.problem(ProblemKind::BodyUnreadable, &detail));
        }
        Err(_) => {
            shared.metrics.record(Decision::Rejected);
            let detail = format!(
                "The request body did not arrive within {} s; nothing was processed.",
                config.body_timeout.as_secs_f32()
            );
            return Ok(shared.problem(ProblemKind::BodyTimeout, &detail));
        }
    };
    let record = RecordKey::new(&config.scope_of(&parts), &key);
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
                let lock = LockGuard::new(Arc::clone(&shared), record, token);
                return first_use(shared, inner, req, lock).await;
            }
            Ok(Begin::Completed(stored)) => {
                shared.metrics.record(Decision::Replayed);
                return Ok(replay(&stored));
            }
            Ok(Begin::InFlight) => match deadline {
                Some(deadline) if Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                    continue;
                }
                _ => (
                    Decision::Conflict,
                    ProblemKind::InFlight,
                    "A request with this Idempotency-Key is still being processed. Retry later to receive its response.",
                ),
            },
            Ok(Begin::NotReplayable) => (
                Decision::NotReplayable,
                ProblemKind::NotReplayable,
                "The request with this Idempotency-Key was already processed, but its response was not kept. It will not be processed again.",
            ),
            Ok(Begin::Mismatch) => (
                Decision::Mismatch,
                ProblemKind::KeyReused,
                "This Idempotency-Key was already used with a different request. Send a new key for a new request.",
            ),
            Err(err) => {
                shared.metrics.record(Decision::StoreError);
                tracing::error!(error = %err, "idempotency store failed");
                if config.store_failure == StoreFailure::FailOpen {
                    let response = inner.call(req).await?;
                    return Ok(response.map(ResponseBody::inner));
                }
                let detail = match err {
                    StoreError::Full => "The idempotency store is full. The request was not processed; retry later.",
                    _ => "The idempotency store could not be reached. The request was not processed; retry later.",
                };
                return Ok(shared.problem(ProblemKind::StoreUnavailable, detail));
            }
        };
        let (decision, kind, detail) = decision;
        shared.metrics.record(decision);
        return Ok(shared.problem(kind, detail));
    }
}

fn replay<B>(stored: &StoredResponse) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::full(
        stored.body.clone(),
        stored.trailers.clone(),
    ));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    headers.reserve(stored.headers.len() + 1);
    headers.extend(stored.headers.iter().map(|(n, v)| (n.clone(), v.clone())));
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// Runs the inner service in a task of its own, so that the client going
/// away cannot leave the handler half-done with its key locked.
async fn first_use<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<RequestBody<ReqBody>>,
    lock: LockGuard,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let (head_tx, head_rx) = oneshot::channel();
    let call = inner.call(req);
    let task = tokio::spawn(drive(call, lock, head_tx));
    match head_rx.await {
        Ok(answer) => answer,
        Err(_) => match task.await {
            Err(err) if err.is_panic() => panic::resume_unwind(err.into_panic()),
            _ => Ok(shared.problem(
                ProblemKind::StoreUnavailable,
                "The request was interrupted before it produced a response; retry later.",
            )),
        },
    }
}

async fn drive<F, ResBody, E>(
    call: F,
    lock: LockGuard,
    head_tx: oneshot::Sender<Answer<ResBody, E>>,
) where
    F: std::future::Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let mut head_tx = head_tx;
    let shared = Arc::clone(&lock.shared);
    let config = &shared.config;
    let cancel = config.on_disconnect == ClientDisconnect::Cancel;
    let result = tokio::select! {
        biased;
        result = call => result,
        () = head_tx.closed(), if cancel => return lock.release().await,
    };
    let response = match result {
        Ok(response) => response,
        Err(err) => {
            lock.release().await;
            let _ = head_tx.send(Err(err));
            return;
        }
    };
    let (head, body) = response.into_parts();
    if !config.keep.keeps(&head) {
        lock.release().await;
        let _ = head_tx.send(Ok(Response::from_parts(head, ResponseBody::inner(body))));
        return;
    }
    let mut capture = Capture::new(head.status, head.headers.clone(), config.response_limit);
    let (tx, rx) = mpsc::channel(4);
    let hint = body.size_hint();
    let mut connected = head_tx
        .send(Ok(Response::from_parts(
            head,
            ResponseBody::channel(rx, hint),
        )))
        .is_ok();
    if !connected && cancel {
        return lock.release().await;
    }
    tokio::pin!(body);
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => Some(frame.map(|result| result.map_err(Into::<BoxError>::into))),
            () = tx.closed(), if cancel => None,
        };
        let Some(frame) = frame else {
            return lock.release().await;
        };
        match frame {
            None => break,
            Some(Err(err)) => {
                lock.release().await;
                let _ = tx.send(Chunk::Error(err)).await;
                return;
            }
            Some(Ok(frame)) => {
                let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
                capture.record(&frame);
                if connected && tx.send(Chunk::Frame(frame)).await.is_err() {
                    if cancel {
                        return lock.release().await;
                    }
                    connected = false;
                }
            }
        }
    }
    lock.complete(capture.finish()).await;
    let _ = tx.send(Chunk::End).await;
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
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.into_iter().next().unwrap_or_default(),
            _ => {
                let mut joined = BytesMut::with_capacity(self.len);
                for chunk in &self.chunks {
                    joined.extend_from_slice(chunk);
                }
                joined.freeze()
            }
        };
        Outcome::Response(StoredResponse::new(
            self.status,
            self.headers,
            body,
            self.trailers,
        ))
    }
}
