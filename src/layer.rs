use std::{fmt, sync::Arc, time::Duration};

use http::{header, request, HeaderName, Method};
use tower_layer::Layer;

use crate::{
    config::{Config, DEFAULT_METHODS},
    fingerprint::BodyFingerprint,
    key::ScopeSecret,
    keyed::shared::Shared,
    metrics::Metrics,
    policy::{ClientDisconnect, InFlightPolicy, KeepPolicy, StoreFailure},
    problem::DEFAULT_PROBLEM_BASE,
    service::Idempotency,
    store::{MemoryStore, Store},
};

/// Applies [`Idempotency`] to a service: requests with an `Idempotency-Key`
/// header run once, and their retries get the stored response.
///
/// Every `with_*` method returns the changed layer. See the
/// [crate docs](crate) for the behaviour and an example.
#[derive(Clone)]
pub struct IdempotencyLayer {
    pub(crate) config: Config,
    metrics: Metrics,
}

impl Default for IdempotencyLayer {
    /// A layer on a fresh [`MemoryStore`].
    fn default() -> Self {
        Self::new(MemoryStore::new())
    }
}

/// Durations the layer accepts. A setting outside its range is clamped to
/// it, with a warning naming the setting, so that no duration can overflow
/// a clock or a store's expiry.
impl IdempotencyLayer {
    /// The longest TTL: 365 days.
    pub const MAX_TTL: Duration = Duration::from_secs(365 * DAY);
    /// The shortest lease: 30 ms.
    pub const MIN_LEASE: Duration = Duration::from_millis(30);
    /// The longest lease: one day.
    pub const MAX_LEASE: Duration = Duration::from_secs(DAY);
    /// The longest holding time: 365 days.
    pub const MAX_HOLD: Duration = Duration::from_secs(365 * DAY);
    /// The longest wait of [`InFlightPolicy::Wait`]: one hour.
    pub const MAX_WAIT: Duration = Duration::from_secs(60 * 60);
    /// The longest body timeout and `Retry-After`: one day.
    pub const MAX_DELAY: Duration = Duration::from_secs(DAY);
}

const DAY: u64 = 24 * 60 * 60;

fn clamped(setting: &str, value: Duration, min: Duration, max: Duration) -> Duration {
    let clamped = value.clamp(min, max);
    if clamped != value {
        tracing::warn!(
            setting,
            ?value,
            ?clamped,
            "idempotency setting out of range ({min:?} to {max:?}); clamped"
        );
    }
    clamped
}

impl IdempotencyLayer {
    /// A layer on `store` with the default settings: POST and PATCH, key
    /// optional, 1 MiB request and response limits, 30 s to read the body,
    /// fingerprint over `content-type`, scope by `Authorization`, 24 h TTL,
    /// 60 s lease, 10 min longest holding time, [`KeepPolicy::default`],
    /// 409 for duplicates in flight, 503 when the store fails, and
    /// [`ClientDisconnect::Detach`].
    pub fn new(store: impl Store) -> Self {
        Self::with_shared_store(Arc::new(store))
    }

    /// A layer on a store already behind an `Arc`.
    pub fn with_shared_store(store: Arc<dyn Store>) -> Self {
        Self {
            config: Config {
                store,
                methods: DEFAULT_METHODS.to_vec(),
                key_required: false,
                body_limit: 1024 * 1024,
                body_timeout: Duration::from_secs(30),
                response_limit: 1024 * 1024,
                fingerprint_headers: vec![header::CONTENT_TYPE],
                body_fingerprint: BodyFingerprint::Raw,
                expiry_header: None,
                scope: None,
                scope_secret: None,
                ttl: Duration::from_secs(24 * 60 * 60),
                lease: Duration::from_secs(60),
                max_hold: Duration::from_secs(10 * 60),
                keep: KeepPolicy::default(),
                problem_base: Arc::from(DEFAULT_PROBLEM_BASE),
                on_disconnect: ClientDisconnect::default(),
                in_flight: InFlightPolicy::default(),
                store_failure: StoreFailure::default(),
                retry_after: Duration::from_secs(1),
            },
            metrics: Metrics::default(),
        }
    }

    /// The methods the layer covers; others pass through untouched.
    #[must_use]
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Whether a covered request without a key is refused with 400.
    #[must_use]
    pub fn with_key_required(mut self, required: bool) -> Self {
        self.config.key_required = required;
        self
    }

    /// The largest request body buffered; a larger one gets 413.
    #[must_use]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// How long the request body may take to arrive; a slower one gets 408.
    /// At most [`MAX_DELAY`](Self::MAX_DELAY).
    #[must_use]
    pub fn with_body_timeout(mut self, timeout: Duration) -> Self {
        self.config.body_timeout =
            clamped("body_timeout", timeout, Duration::ZERO, Self::MAX_DELAY);
        self
    }

    /// The largest response body kept for replay. A larger one is still
    /// delivered, and its key is then marked as not replayable.
    #[must_use]
    pub fn with_response_limit(mut self, bytes: usize) -> Self {
        self.config.response_limit = bytes;
        self
    }

    /// The request headers that are part of the fingerprint, besides the
    /// method, path, query and body.
    #[must_use]
    pub fn with_fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.fingerprint_headers = names.into_iter().collect();
        self
    }

    /// What of the body the fingerprint covers: its raw bytes (the
    /// default), or a canonical form of its JSON, with or without some of
    /// its members, or what a function makes of it. Changing it changes
    /// every fingerprint: a retry that spans the change gets 422.
    #[must_use]
    pub fn with_body_fingerprint(mut self, fingerprint: BodyFingerprint) -> Self {
        self.config.body_fingerprint = fingerprint;
        self
    }

    /// Tells clients how long they may retry: every kept response, the
    /// first and its replays, carries this header with the HTTP-date at
    /// which its key expires (now plus the TTL, when the response is
    /// stored). [`IDEMPOTENCY_EXPIRES`](crate::key::IDEMPOTENCY_EXPIRES)
    /// is a name for it; the IETF draft leaves the choice open. Off by
    /// default.
    #[must_use]
    pub fn with_expiry_header(mut self, name: HeaderName) -> Self {
        self.config.expiry_header = Some(name);
        self
    }

    /// Derives the scope of a request, so that the same key from two
    /// clients names two records. `None` is the anonymous scope.
    ///
    /// The default scope is the raw `Authorization` header, which is right
    /// for static API keys. Two consequences to know: a client that
    /// refreshes its bearer token between two attempts lands in another
    /// scope, so its retry runs the request again; and clients that
    /// authenticate by cookie or by another header all share the anonymous
    /// scope. Behind an authentication layer, scope by the principal it
    /// finds instead ([`with_principal_scope`](Self::with_principal_scope)).
    ///
    /// ```
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// let layer = IdempotencyLayer::default().with_scope(|parts| {
    ///     parts.headers.get("x-tenant-id").map(|v| v.as_bytes().to_vec())
    /// });
    /// ```
    #[must_use]
    pub fn with_scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        self.config.scope = Some(Arc::new(scope));
        self
    }

    /// Scopes each request by the principal an authentication layer put
    /// into its extensions: a `T`, written with its `Display`. The
    /// authentication layer must run before this one (in axum, be added
    /// after it); a request without a `T` is in the anonymous scope.
    ///
    /// ```
    /// use std::fmt;
    /// use tower_idempotency::IdempotencyLayer;
    ///
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// impl fmt::Display for UserId {
    ///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    ///         write!(f, "user:{}", self.0)
    ///     }
    /// }
    ///
    /// let layer = IdempotencyLayer::default().with_principal_scope::<UserId>();
    /// ```
    #[must_use]
    pub fn with_principal_scope<T>(self) -> Self
    where
        T: fmt::Display + Send + Sync + 'static,
    {
        self.with_scope(|parts| {
            parts
                .extensions
                .get::<T>()
                .map(|principal| principal.to_string().into_bytes())
        })
    }

    /// Hashes the scope with `secret` (HMAC-SHA256) before it becomes part
    /// of a record key. Without it, anyone who can read a shared store and
    /// knows a key could test guesses of weak credentials offline against
    /// its record keys. Replicas that share a store must share the secret;
    /// changing it starts every key afresh.
    #[must_use]
    pub fn with_scope_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.config.scope_secret = Some(ScopeSecret::new(secret.as_ref()));
        self
    }

    /// How long a completed response is kept. At most
    /// [`MAX_TTL`](Self::MAX_TTL).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = clamped("ttl", ttl, Duration::from_millis(1), Self::MAX_TTL);
        self
    }

    /// How long an in-flight lock lasts unless renewed. The holder renews
    /// it every third of this while its handler runs; if the holder dies,
    /// another request may take the key over once it runs out. Between
    /// [`MIN_LEASE`](Self::MIN_LEASE) and [`MAX_LEASE`](Self::MAX_LEASE).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.config.lease = clamped("lease", lease, Self::MIN_LEASE, Self::MAX_LEASE);
        self
    }

    /// The longest a request may hold its key. A handler or a detached
    /// response body still running after this is no longer renewed (and a
    /// warning is logged), so its key frees itself one lease later instead
    /// of answering 409 for ever; a retry may then run the request again.
    /// Set it above the longest time a handler can honestly take. At most
    /// [`MAX_HOLD`](Self::MAX_HOLD).
    #[must_use]
    pub fn with_max_hold(mut self, max_hold: Duration) -> Self {
        self.config.max_hold = clamped("max_hold", max_hold, Duration::ZERO, Self::MAX_HOLD);
        self
    }

    /// Which responses are kept for replay.
    #[must_use]
    pub fn with_keep_policy(mut self, policy: KeepPolicy) -> Self {
        self.config.keep = policy;
        self
    }

    /// The base of the `type` URI of problem responses; the problem's slug
    /// (see [`problem`](crate::problem)) is appended.
    #[must_use]
    pub fn with_problem_base(mut self, base: impl Into<String>) -> Self {
        self.config.problem_base = Arc::from(base.into());
        self
    }

    /// What happens when the client goes away mid-request.
    #[must_use]
    pub fn with_client_disconnect(mut self, policy: ClientDisconnect) -> Self {
        self.config.on_disconnect = policy;
        self
    }

    /// What a duplicate gets while its key is in flight. A wait is at most
    /// [`MAX_WAIT`](Self::MAX_WAIT).
    #[must_use]
    pub fn with_in_flight(mut self, policy: InFlightPolicy) -> Self {
        self.config.in_flight = match policy {
            InFlightPolicy::Wait(wait) => InFlightPolicy::Wait(clamped(
                "in_flight wait",
                wait,
                Duration::ZERO,
                Self::MAX_WAIT,
            )),
            InFlightPolicy::Reject => InFlightPolicy::Reject,
        };
        self
    }

    /// What happens when the store fails.
    #[must_use]
    pub fn with_store_failure(mut self, policy: StoreFailure) -> Self {
        self.config.store_failure = policy;
        self
    }

    /// The `Retry-After` sent with 409 and 503 answers. At most
    /// [`MAX_DELAY`](Self::MAX_DELAY).
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.config.retry_after = clamped("retry_after", after, Duration::ZERO, Self::MAX_DELAY);
        self
    }

    /// The counters of every service this layer makes.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// OpenAPI docs for the operations this layer covers: its methods,
    /// whether it requires a key, and its expiry header.
    #[cfg(feature = "utoipa")]
    #[cfg_attr(docsrs, doc(cfg(feature = "utoipa")))]
    pub fn openapi_docs(&self) -> crate::openapi::IdempotencyDocs {
        let docs = crate::openapi::IdempotencyDocs::new()
            .with_methods(self.config.methods.iter().cloned())
            .with_key_required(self.config.key_required);
        match &self.config.expiry_header {
            Some(name) => docs.with_expiry_header(name.clone()),
            None => docs,
        }
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.config)
            .finish()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(
            inner,
            Shared::new(self.config.clone(), self.metrics.clone()),
        )
    }
}
