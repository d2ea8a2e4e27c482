//! The settings of one layer, shared by every service it makes.

use std::{borrow::Cow, fmt, sync::Arc, time::Duration};

use http::{header, request, HeaderName, Method};

use crate::{
    fingerprint::BodyFingerprint,
    key::{RecordKey, ScopeSecret},
    policy::{ClientDisconnect, InFlightPolicy, KeepPolicy, StoreFailure},
    store::Store,
};

/// The methods a layer covers unless told otherwise, and so the ones its
/// docs and the client layer cover by default: those that are not
/// idempotent by definition and that APIs protect with a key.
pub(crate) const DEFAULT_METHODS: [Method; 2] = [Method::POST, Method::PATCH];

type ScopeFn = Arc<dyn Fn(&request::Parts) -> Option<Vec<u8>> + Send + Sync>;

/// What an [`IdempotencyLayer`](crate::IdempotencyLayer) was built with.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) methods: Vec<Method>,
    pub(crate) key_required: bool,
    pub(crate) body_limit: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) response_limit: usize,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) body_fingerprint: BodyFingerprint,
    pub(crate) expiry_header: Option<HeaderName>,
    pub(crate) scope: Option<ScopeFn>,
    pub(crate) scope_secret: Option<ScopeSecret>,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) max_hold: Duration,
    pub(crate) keep: KeepPolicy,
    pub(crate) problem_base: Arc<str>,
    pub(crate) on_disconnect: ClientDisconnect,
    pub(crate) in_flight: InFlightPolicy,
    pub(crate) store_failure: StoreFailure,
    pub(crate) retry_after: Duration,
}

impl Config {
    /// Where the record of `key` sent with this request lives.
    pub(crate) fn record_key(&self, parts: &request::Parts, key: &str) -> RecordKey {
        let scope = self.scope_of(parts);
        match &self.scope_secret {
            Some(secret) => RecordKey::with_secret(secret, &scope, key),
            None => RecordKey::new(&scope, key),
        }
    }

    /// The scope of a request: by default its `Authorization` header, which
    /// is hashed into the record key and never stored.
    fn scope_of<'a>(&self, parts: &'a request::Parts) -> Cow<'a, [u8]> {
        match &self.scope {
            Some(scope) => Cow::Owned(scope(parts).unwrap_or_default()),
            None => Cow::Borrowed(
                parts
                    .headers
                    .get(header::AUTHORIZATION)
                    .map_or(&[][..], |v| v.as_bytes()),
            ),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("store", &self.store)
            .field("methods", &self.methods)
            .field("key_required", &self.key_required)
            .field("body_limit", &self.body_limit)
            .field("response_limit", &self.response_limit)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("max_hold", &self.max_hold)
            .finish_non_exhaustive()
    }
}
