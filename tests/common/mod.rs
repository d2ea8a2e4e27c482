//! Helpers shared by the integration tests: a handler that counts its runs,
//! request builders and body readers.
#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        atomic::{AtomicU16, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, util::BoxCloneSyncService, Layer, ServiceExt};
use tower_idempotency::{body::RequestBody, IdempotencyLayer};

pub mod faulty;

pub type Handler<B = Full<Bytes>> =
    BoxCloneSyncService<Request<RequestBody<B>>, Response<Full<Bytes>>, Infallible>;

/// A handler that counts its runs and answers 201 with
/// `{"run":N,"method":..,"path":..,"body":..}`, after `delay`.
#[derive(Clone, Default)]
pub struct Counter {
    runs: Arc<AtomicUsize>,
}

impl Counter {
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    pub fn handler<B: RequestBodyBound>(&self, delay: Duration) -> Handler<B> {
        self.respond_with(delay, |_, _| {
            Response::builder().status(StatusCode::CREATED)
        })
    }

    /// A handler whose response head comes from `head(run, request)`.
    pub fn respond_with<B, F>(&self, delay: Duration, head: F) -> Handler<B>
    where
        B: RequestBodyBound,
        F: Fn(usize, &Request<RequestBody<B>>) -> http::response::Builder
            + Clone
            + Send
            + Sync
            + 'static,
    {
        let runs = Arc::clone(&self.runs);
        BoxCloneSyncService::new(service_fn(move |req: Request<RequestBody<B>>| {
            let runs = Arc::clone(&runs);
            let head = head.clone();
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let builder = head(run, &req);
                let (parts, body) = req.into_parts();
                let body = body.collect().await.expect("buffered body").to_bytes();
                let text = serde_json::json!({
                    "run": run,
                    "method": parts.method.as_str(),
                    "path": parts.uri.to_string(),
                    "body": String::from_utf8_lossy(&body),
                });
                Ok::<_, Infallible>(
                    builder
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(text.to_string())))
                        .unwrap(),
                )
            }
        }))
    }
}

/// What a request body must be for the test handler.
pub trait RequestBodyBound:
    http_body::Body<Data = Bytes, Error = Self::E> + Send + Unpin + 'static
{
    type E: Into<tower_idempotency::BoxError> + Send;
}

impl<B> RequestBodyBound for B
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tower_idempotency::BoxError> + Send,
{
    type E = B::Error;
}

/// A service made of `layer` over `handler`, ready for `oneshot`.
pub fn app<B>(
    layer: &IdempotencyLayer,
    handler: Handler<B>,
) -> tower_idempotency::Idempotency<Handler<B>> {
    layer.layer(handler)
}

/// A request body that yields `chunks` one frame at a time, then, if
/// `hang` is set, never ends.
pub struct Chunks {
    pub chunks: std::collections::VecDeque<Bytes>,
    pub hang: bool,
}

impl Chunks {
    pub fn new(chunks: impl IntoIterator<Item = &'static str>, hang: bool) -> Self {
        Self {
            chunks: chunks
                .into_iter()
                .map(|c: &'static str| Bytes::from_static(c.as_bytes()))
                .collect(),
            hang,
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            Some(chunk) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk)))),
            None if self.hang => std::task::Poll::Pending,
            None => std::task::Poll::Ready(None),
        }
    }
}

/// Headers holding `value` as the `Idempotency-Key`, if it is a valid
/// header value.
pub fn key_header(value: &[u8]) -> Option<http::HeaderMap> {
    let value = http::HeaderValue::from_bytes(value).ok()?;
    let mut headers = http::HeaderMap::new();
    headers.insert("idempotency-key", value);
    Some(headers)
}

/// The quoted (RFC 9651 string) form of `key`, as a client would write it.
pub fn quoted_key(key: &str) -> String {
    format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A key no other test run uses: `name`, this process and the time, with
/// the characters the Debug form of a time adds and a key may not hold
/// removed.
pub fn unique_key(name: &str) -> String {
    format!(
        "{name}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    )
    .replace([' ', '{', '}', ':', ','], "")
}

pub fn post(path: &str, key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// Status, headers and whole body of a response.
pub async fn read<B>(response: Response<B>) -> (http::response::Parts, Bytes)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    (parts, body.collect().await.expect("body").to_bytes())
}

/// The response as JSON, for problem documents and handler answers.
pub async fn json<B>(response: Response<B>) -> (StatusCode, http::HeaderMap, serde_json::Value)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = read(response).await;
    let value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        panic!("not JSON: {}", String::from_utf8_lossy(&body));
    });
    (parts.status, parts.headers, value)
}

/// Sends one request through a clone of `service`, as a user would.
pub async fn send(
    service: &tower_idempotency::Idempotency<Handler>,
    request: Request<Full<Bytes>>,
) -> Response<tower_idempotency::body::ResponseBody<Full<Bytes>>> {
    service.clone().oneshot(request).await.unwrap()
}

/// A response body that yields scripted frames, `gap` apart: data, then
/// trailers or an error.
pub struct Scripted {
    frames: std::collections::VecDeque<Result<http_body::Frame<Bytes>, std::io::Error>>,
    gap: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Scripted {
    pub fn new(gap: Duration) -> Self {
        Self {
            frames: Default::default(),
            gap,
            sleep: None,
        }
    }

    pub fn data(mut self, data: impl Into<Bytes>) -> Self {
        self.frames
            .push_back(Ok(http_body::Frame::data(data.into())));
        self
    }

    pub fn trailers(mut self, trailers: http::HeaderMap) -> Self {
        self.frames
            .push_back(Ok(http_body::Frame::trailers(trailers)));
        self
    }

    pub fn error(mut self, message: &str) -> Self {
        self.frames
            .push_back(Err(std::io::Error::other(message.to_owned())));
        self
    }
}

impl http_body::Body for Scripted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if !self.gap.is_zero() {
            let gap = self.gap;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            std::task::ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        std::task::Poll::Ready(self.frames.pop_front())
    }
}

/// A handler that counts its runs and answers 200 with `body(run)`.
pub fn scripted_handler<F>(
    runs: Arc<AtomicUsize>,
    body: F,
) -> BoxCloneSyncService<Request<RequestBody<Full<Bytes>>>, Response<Scripted>, Infallible>
where
    F: Fn(usize) -> Scripted + Clone + Send + Sync + 'static,
{
    BoxCloneSyncService::new(service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let body = body(run);
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }))
}

/// Serves `svc` on 127.0.0.1 with hyper, one task per connection.
pub async fn serve<S, B>(svc: S) -> std::net::SocketAddr
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends `request` from a task of its own, so that a test can act while it
/// is in flight; the handle yields the response's head and whole body.
pub fn spawn_send(
    service: &tower_idempotency::Idempotency<Handler>,
    request: Request<Full<Bytes>>,
) -> tokio::task::JoinHandle<(http::response::Parts, Bytes)> {
    let service = service.clone();
    tokio::spawn(async move { read(send(&service, request).await).await })
}

/// Log lines written through `tracing` on this thread while the guard
/// lives, as text.
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every `tracing` event at `debug` and above on this thread.
pub fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// A loopback port for a test's own server, with its cluster bus (port +
/// 10000) free too, both below the kernel's range for outgoing connections
/// (from 32768), so that no client's socket can take either between this
/// check and the server's start; and none handed out twice in one process,
/// so that two servers starting at once never get the same one.
pub fn free_port() -> u16 {
    const FIRST: u16 = 10_000;
    const COUNT: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(COUNT)) as u16;
    loop {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) % COUNT;
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}
