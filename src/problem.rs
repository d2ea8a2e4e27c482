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
            Self::StoreUnavailable => "Idempotency store unavailable",
        }
    }
}

impl ProblemKind {
    pub(crate) const ALL: [Self; 9] = [
        Self::MissingKey,
        Self::InvalidKey,
        Self::BodyTooLarge,
        Self::BodyUnreadable,
        Self::BodyTimeout,
        Self::InFlight,
        Self::KeyReused,
        Self::NotReplayable,
        Self::StoreUnavailable,
    ];
}

/// What the client should know and do, for the limits in force.
pub(crate) fn default_detail(
    kind: ProblemKind,
    body_limit: usize,
    body_timeout: Duration,
) -> String {
    match kind {
        ProblemKind::MissingKey => "This endpoint requires an Idempotency-Key header: send a unique value, such as a UUID, and reuse it for retries of the same request.".to_owned(),
        ProblemKind::InvalidKey => KEY_RULES.to_owned(),
        ProblemKind::BodyTooLarge => format!("The request body is larger than {body_limit} bytes, the most this endpoint accepts."),
        ProblemKind::BodyUnreadable => "The request body could not be read; nothing was processed.".to_owned(),
        ProblemKind::BodyTimeout => format!("The request body did not arrive within {} s; nothing was processed.", body_timeout.as_secs_f32()),
        ProblemKind::InFlight => "A request with this Idempotency-Key is still being processed. Retry later to receive its response.".to_owned(),
        ProblemKind::KeyReused => "This Idempotency-Key was already used with a different request. Send a new key for a new request.".to_owned(),
        ProblemKind::NotReplayable => "The request with this Idempotency-Key was already processed, but its response was not kept. It will not be processed again.".to_owned(),
        ProblemKind::StoreUnavailable => "The idempotency store could not be reached. The request was not processed; retry later.".to_owned(),
    }
}

/// How a valid key looks, for the detail of an invalid one.
pub(crate) const KEY_RULES: &str =
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
pub(crate) fn document(base: &str, kind: ProblemKind, detail: &str) -> Bytes {
    let doc = Document {
        kind: format!("{base}{}", kind.slug()),
        title: kind.title(),
        status: kind.status().as_u16(),
        detail,
    };
    Bytes::from(serde_json::to_vec(&doc).expect("a problem document always serializes"))
}

/// A problem response with `body`, a document made by [`document`].
pub(crate) fn response(
    kind: ProblemKind,
    body: Bytes,
    retry_after: Option<Duration>,
) -> Response<Bytes> {
    let mut response = Response::new(body);
    *response.status_mut() = kind.status();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, PROBLEM_JSON);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(after) = retry_after {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(after.as_secs().max(1)),
        );
    }
    response
}
