//! The `application/problem+json` (RFC 9457) responses the layer produces.
//!
//! Every response the layer writes itself carries a problem document with a
//! `type`, `title`, `status` and `detail`. The `type` is a URI made of a base
//! (see [`IdempotencyLayer::with_problem_base`](crate::IdempotencyLayer::with_problem_base))
//! and one of the slugs below, so each can point at your own documentation.
//!
//! # missing-key
//! 400: the route requires an `Idempotency-Key` header and none was sent.
//!
//! # invalid-key
//! 400: the key is empty, longer than 255 characters, holds characters
//! outside visible ASCII, is a malformed quoted string, or was sent twice.
//!
//! # body-too-large
//! 413: the request body is larger than the layer buffers to fingerprint it.
//!
//! # body-unreadable
//! 400: the request body failed while it was being read.
//!
//! # body-timeout
//! 408: the request body did not arrive in time.
//!
//! # request-in-flight
//! 409: a request with this key is still being processed; retry after
//! `Retry-After` seconds.
//!
//! # key-reused
//! 422: this key was already used for a different request (method, path,
//! query, chosen headers or body); use a new key for a new request.
//!
//! # response-not-replayable
//! 409: the request with this key was processed, but its response was too
//! large to keep, so it cannot be replayed; the request is not run again.
//!
//! # too-many-keys
//! 429: this client holds as many idempotency keys as one client may at
//! once; the request was not processed. Retry after `Retry-After` seconds,
//! once earlier keys have expired; other clients are not affected.
//!
//! # store-unavailable
//! 503: the idempotency store cannot be reached or is full, so the request
//! was not processed; retry after `Retry-After` seconds.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// The default base of problem `type` URIs: the headings of this page.
pub const DEFAULT_PROBLEM_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#";

/// The media type of problem documents.
pub const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// A kind of problem the layer answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400, see [missing-key](self#missing-key).
    MissingKey,
    /// 400, see [invalid-key](self#invalid-key).
    InvalidKey,
    /// 413, see [body-too-large](self#body-too-large).
    BodyTooLarge,
    /// 400, see [body-unreadable](self#body-unreadable).
    BodyUnreadable,
    /// 408, see [body-timeout](self#body-timeout).
    BodyTimeout,
    /// 409, see [request-in-flight](self#request-in-flight).
    InFlight,
    /// 422, see [key-reused](self#key-reused).
    KeyReused,
    /// 409, see [response-not-replayable](self#response-not-replayable).
    NotReplayable,
    /// 429, see [too-many-keys](self#too-many-keys).
    TooManyKeys,
    /// 503, see [store-unavailable](self#store-unavailable).
    StoreUnavailable,
}

impl ProblemKind {
    /// The slug appended to the base URI to form the `type`.
    pub const fn slug(self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::InvalidKey => "invalid-key",
            Self::BodyTooLarge => "body-too-large",
            Self::BodyUnreadable => "body-unreadable",
            Self::BodyTimeout => "body-timeout",
            Self::InFlight => "request-in-flight",
            Self::KeyReused => "key-reused",
            Self::NotReplayable => "response-not-replayable",
            Self::TooManyKeys => "too-many-keys",
            Self::StoreUnavailable => "store-unavailable",
        }
    }

    /// The HTTP status of this problem.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::InFlight | Self::NotReplayable => StatusCode::CONFLICT,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyKeys => StatusCode::TOO_MANY_REQUESTS,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A short, fixed summary.
    pub const fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency-Key header required",
            Self::InvalidKey => "Invalid Idempotency-Key header",
            Self::BodyTooLarge => "Request body too large",
            Self::BodyUnreadable => "Request body could not be read",
            Self::BodyTimeout => "Request body timed out",
            Self::InFlight => "Request with this Idempotency-Key in progress",
            Self::KeyReused => "Idempotency-Key reused for a different request",
            Self::NotReplayable => "Response for this Idempotency-Key cannot be replayed",
            Self::TooManyKeys => "Too many Idempotency-Keys held for this client",
            Self::StoreUnavailable => "Idempotency store unavailable",
        }
    }

    /// Whether the answer carries `Retry-After`: only the problems that
    /// tell the client to come back with the same request.
    pub const fn carries_retry_after(self) -> bool {
        matches!(
            self,
            Self::InFlight | Self::TooManyKeys | Self::StoreUnavailable
        )
    }
}

impl ProblemKind {
    pub(crate) const ALL: [Self; 10] = [
        Self::MissingKey,
        Self::InvalidKey,
        Self::BodyTooLarge,
        Self::BodyUnreadable,
        Self::BodyTimeout,
        Self::InFlight,
        Self::KeyReused,
        Self::NotReplayable,
        Self::TooManyKeys,
        Self::StoreUnavailable,
    ];
}

/// The detail of a 503 for a store that refuses new keys, as distinct from
/// one that cannot be reached.
const STORE_FULL: &str =
    "The idempotency store is full. The request was not processed; retry later.";

/// What the client should know and do, for the limits in force.
fn default_detail(kind: ProblemKind, body_limit: usize, body_timeout: Duration) -> String {
    match kind {
        ProblemKind::MissingKey => "This endpoint requires an Idempotency-Key header: send a unique value, such as a UUID, and reuse it for retries of the same request.".to_owned(),
        ProblemKind::InvalidKey => KEY_RULES.to_owned(),
        ProblemKind::BodyTooLarge => format!("The request body is larger than {body_limit} bytes, the most this endpoint accepts."),
        ProblemKind::BodyUnreadable => "The request body could not be read; nothing was processed.".to_owned(),
        ProblemKind::BodyTimeout => format!("The request body did not arrive within {} s; nothing was processed.", body_timeout.as_secs_f32()),
        ProblemKind::InFlight => "A request with this Idempotency-Key is still being processed. Retry later to receive its response.".to_owned(),
        ProblemKind::KeyReused => "This Idempotency-Key was already used with a different request. Send a new key for a new request.".to_owned(),
        ProblemKind::NotReplayable => "The request with this Idempotency-Key was already processed, but its response was not kept. It will not be processed again.".to_owned(),
        ProblemKind::TooManyKeys => "This client holds as many Idempotency-Keys as one client may at once. The request was not processed; retry once earlier keys have expired.".to_owned(),
        ProblemKind::StoreUnavailable => "The idempotency store could not be reached. The request was not processed; retry later.".to_owned(),
    }
}

/// How a valid key looks, for the detail of an invalid one.
const KEY_RULES: &str =
    "A key is 1 to 255 visible ASCII characters, sent once, bare or as a quoted string.";

#[derive(serde::Serialize)]
struct Document<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

/// The problem document for `kind`, as JSON.
fn document(base: &str, kind: ProblemKind, detail: &str) -> Bytes {
    let doc = Document {
        kind: format!("{base}{}", kind.slug()),
        title: kind.title(),
        status: kind.status().as_u16(),
        detail,
    };
    Bytes::from(serde_json::to_vec(&doc).expect("a problem document always serializes"))
}

/// Every problem response one service answers with. The documents with a
/// fixed detail are made once, when the service is built, so answering
/// with one costs a reference count.
#[derive(Debug)]
pub(crate) struct Problems {
    base: Box<str>,
    retry_after: HeaderValue,
    /// Indexed by `kind as usize`, each filled from its own kind.
    documents: Box<[Bytes]>,
    store_full: Bytes,
}

impl Problems {
    pub(crate) fn new(
        base: &str,
        body_limit: usize,
        body_timeout: Duration,
        retry_after: Duration,
    ) -> Self {
        let mut documents = vec![Bytes::new(); ProblemKind::ALL.len()];
        for kind in ProblemKind::ALL {
            let detail = default_detail(kind, body_limit, body_timeout);
            documents[kind as usize] = document(base, kind, &detail);
        }
        Self {
            base: base.into(),
            retry_after: HeaderValue::from(retry_after.as_secs().max(1)),
            documents: documents.into_boxed_slice(),
            store_full: document(base, ProblemKind::StoreUnavailable, STORE_FULL),
        }
    }

    /// The response for `kind`, with its default detail.
    pub(crate) fn response(&self, kind: ProblemKind) -> Response<Bytes> {
        self.respond(kind, self.documents[kind as usize].clone())
    }

    /// The 400 for a key header refused for `reason`.
    pub(crate) fn invalid_key(&self, reason: &dyn std::fmt::Display) -> Response<Bytes> {
        let detail = format!("{reason}. {KEY_RULES}");
        let kind = ProblemKind::InvalidKey;
        self.respond(kind, document(&self.base, kind, &detail))
    }

    /// The 503 for a store that refuses new keys.
    pub(crate) fn store_full(&self) -> Response<Bytes> {
        self.respond(ProblemKind::StoreUnavailable, self.store_full.clone())
    }

    fn respond(&self, kind: ProblemKind, body: Bytes) -> Response<Bytes> {
        let mut response = Response::new(body);
        *response.status_mut() = kind.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, PROBLEM_JSON);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if kind.carries_retry_after() {
            headers.insert(header::RETRY_AFTER, self.retry_after.clone());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems() -> Problems {
        Problems::new(
            "https://example.com/problems#",
            1024,
            Duration::from_secs(30),
            Duration::from_secs(2),
        )
    }

    fn json(response: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(response.body()).expect("a problem document is JSON")
    }

    #[test]
    fn every_kind_answers_with_its_own_document() {
        let problems = problems();
        for kind in ProblemKind::ALL {
            let response = problems.response(kind);
            let doc = json(&response);
            assert_eq!(response.status(), kind.status(), "{kind:?}");
            assert_eq!(
                doc["type"],
                format!("https://example.com/problems#{}", kind.slug())
            );
            assert_eq!(doc["title"], kind.title(), "{kind:?}");
            assert_eq!(doc["status"], kind.status().as_u16(), "{kind:?}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        }
    }

    #[test]
    fn only_problems_that_ask_for_a_retry_carry_retry_after() {
        let problems = problems();
        for kind in ProblemKind::ALL {
            let response = problems.response(kind);
            assert_eq!(
                response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .map(|v| v.to_str().unwrap()),
                kind.carries_retry_after().then_some("2"),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_full_store_says_so_in_a_503() {
        let response = problems().store_full();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&response)["detail"], STORE_FULL);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn an_invalid_key_detail_names_the_reason_and_the_rules() {
        let response = problems().invalid_key(&"the Idempotency-Key header is empty");
        let detail = json(&response)["detail"].as_str().unwrap().to_owned();
        assert!(detail.starts_with("the Idempotency-Key header is empty. "));
        assert!(detail.ends_with(KEY_RULES));
    }
}
