//! OpenAPI documentation of the `Idempotency-Key` header and the layer's
//! answers, for [`utoipa`](https://docs.rs/utoipa) documents.
//!
//! [`IdempotencyDocs`] adds to an operation what a client of a protected
//! route needs to know: the `Idempotency-Key` request header with its
//! rules, the `Idempotent-Replayed` header on every response the
//! application documents (any kept response may come back as a replay),
//! and the layer's own
//! `application/problem+json` answers (400, 408, 409, 413, 422, 429, 503)
//! with the schema of their documents. A status the operation already
//! documents keeps its description, followed by the layer's meaning of it.
//!
//! Build it from the layer ([`IdempotencyLayer::openapi_docs`]) so that it
//! describes the same methods, key rule and expiry header, and apply it to
//! a whole document as a [`Modify`] (every operation of those methods) or,
//! for a layer on some routes only, to each of their [`Operation`]s with
//! [`add_to`](IdempotencyDocs::add_to):
//!
//! ```
//! use tower_idempotency::IdempotencyLayer;
//! use utoipa::openapi::{
//!     path::{HttpMethod, OperationBuilder, PathItem, PathsBuilder},
//!     response::ResponseBuilder,
//!     OpenApiBuilder,
//! };
//! use utoipa::Modify;
//!
//! let layer = IdempotencyLayer::default().with_key_required(true);
//! let create = OperationBuilder::new()
//!     .response("201", ResponseBuilder::new().description("The payment"));
//! let mut document = OpenApiBuilder::new()
//!     .paths(PathsBuilder::new().path("/payments", PathItem::new(HttpMethod::Post, create)))
//!     .build();
//! layer.openapi_docs().modify(&mut document);
//!
//! let json = serde_json::to_value(&document).unwrap();
//! let post = &json["paths"]["/payments"]["post"];
//! assert_eq!(post["parameters"][0]["name"], "Idempotency-Key");
//! assert!(post["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
//! assert!(post["responses"]["422"]["content"]["application/problem+json"].is_object());
//! ```
//!
//! [`IdempotencyLayer::openapi_docs`]: crate::IdempotencyLayer::openapi_docs

use std::collections::btree_map::Entry;

use http::{header, HeaderName, Method};
use serde_json::json;
use utoipa::{
    openapi::{
        header::Header,
        path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem},
        response::{Response, ResponseBuilder},
        schema::{ObjectBuilder, SchemaFormat, Type},
        ContentBuilder, OpenApi, RefOr, Required, Schema,
    },
    Modify,
};

use crate::{
    config::DEFAULT_METHODS,
    key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED},
    problem::PROBLEM_JSON,
};

const KEY_RULES: &str = "A key of the client's choosing, unique per operation (a UUID, say), \
    1 to 255 visible ASCII characters, sent bare or as a structured-field string (\"...\"). \
    A retry with the same key and the same request gets the stored response instead of running \
    again; the same key with another request is refused with 422.";

/// What the layer answers itself, with the slugs of its problem documents.
const PROBLEMS: [(&str, &str, bool); 7] = [
    (
        "400",
        "The Idempotency-Key header is empty, too long, not visible ASCII, malformed or \
         repeated (`invalid-key`), or the body could not be read (`body-unreadable`).",
        false,
    ),
    (
        "408",
        "The request body did not arrive in time (`body-timeout`).",
        false,
    ),
    (
        "409",
        "A request with this key is still being processed; retry after `Retry-After` \
         (`request-in-flight`). Or it was processed and its response was not kept, so it cannot \
         be replayed (`response-not-replayable`).",
        true,
    ),
    (
        "413",
        "The request body is larger than the layer reads to fingerprint it (`body-too-large`).",
        false,
    ),
    (
        "422",
        "This key was already used for a different request; use a new key (`key-reused`).",
        false,
    ),
    (
        "429",
        "This client holds as many keys as one client may; retry after `Retry-After` \
         (`too-many-keys`).",
        true,
    ),
    (
        "503",
        "The idempotency store is unavailable, or answered with a record it cannot read, so \
         this request was not run; retry after `Retry-After` (`store-unavailable`).",
        true,
    ),
];

/// Documents the `Idempotency-Key` header and the layer's answers on the
/// operations the layer covers; see the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct IdempotencyDocs {
    methods: Vec<Method>,
    key_required: bool,
    expiry_header: Option<HeaderName>,
}

impl Default for IdempotencyDocs {
    fn default() -> Self {
        Self {
            methods: DEFAULT_METHODS.to_vec(),
            key_required: false,
            expiry_header: None,
        }
    }
}

impl IdempotencyDocs {
    /// Docs for the layer's defaults: POST and PATCH, key optional.
    pub fn new() -> Self {
        Self::default()
    }

    /// The methods whose operations [`Modify`] documents.
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Whether the key header is documented as required.
    pub fn with_key_required(mut self, required: bool) -> Self {
        self.key_required = required;
        self
    }

    /// Documents the header that tells when a key expires
    /// ([`with_expiry_header`](crate::IdempotencyLayer::with_expiry_header)).
    pub fn with_expiry_header(mut self, name: HeaderName) -> Self {
        self.expiry_header = Some(name);
        self
    }

    /// Adds the key header, the response headers and the layer's problem
    /// responses to one operation, whatever its method.
    pub fn add_to(&self, operation: &mut Operation) {
        let parameters = operation.parameters.get_or_insert_with(Vec::new);
        parameters.retain(|p| !p.name.eq_ignore_ascii_case(IDEMPOTENCY_KEY.as_str()));
        parameters.push(self.key_parameter());
        let responses = &mut operation.responses.responses;
        // The application's own answers may be replays; the layer's never
        // are (and may be here from an earlier call).
        for (status, response) in responses.iter_mut() {
            if let RefOr::T(response) = response {
                let ours = PROBLEMS
                    .iter()
                    .find(|(s, ..)| s == status)
                    .map(|(s, text, _)| self.description(s, text));
                if ours.is_none_or(|ours| response.description != ours) {
                    self.add_response_headers(response);
                }
            }
        }
        for (status, text, retry_after) in PROBLEMS {
            let ours = problem_response(&self.description(status, text), retry_after);
            match responses.entry(status.to_owned()) {
                Entry::Vacant(entry) => {
                    entry.insert(RefOr::T(ours));
                }
                Entry::Occupied(mut entry) => {
                    if let RefOr::T(theirs) = entry.get_mut() {
                        merge(theirs, ours);
                    }
                }
            }
        }
    }

    /// What the layer means by `status` (one of [`PROBLEMS`], whose text
    /// is `text`) under these settings.
    fn description(&self, status: &str, text: &str) -> String {
        match status {
            "400" if self.key_required => {
                format!("{text} A request without the header is refused too (`missing-key`).")
            }
            _ => text.to_owned(),
        }
    }

    fn key_parameter(&self) -> Parameter {
        let schema = ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1));
        ParameterBuilder::new()
            .name(header_title(&IDEMPOTENCY_KEY))
            .parameter_in(ParameterIn::Header)
            .required(if self.key_required {
                Required::True
            } else {
                Required::False
            })
            .description(Some(KEY_RULES))
            .schema(Some(schema))
            .example(Some(json!("8e03978e-40d5-43e8-bc93-6894a57f9324")))
            .build()
    }

    fn add_response_headers(&self, response: &mut Response) {
        let replayed = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["true"]));
        response.headers.insert(
            header_title(&IDEMPOTENT_REPLAYED),
            described(
                Header::new(replayed),
                "`true` when this is the stored response to an earlier request with the key.",
            ),
        );
        if let Some(name) = &self.expiry_header {
            let date = ObjectBuilder::new().schema_type(Type::String);
            response.headers.insert(
                header_title(name),
                described(
                    Header::new(date),
                    "When the key expires, as an HTTP-date: until then a retry is answered \
                     from the stored response.",
                ),
            );
        }
    }
}

impl Modify for IdempotencyDocs {
    fn modify(&self, openapi: &mut OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for (method, operation) in operations(item) {
                if let Some(operation) = operation.filter(|_| self.methods.contains(&method)) {
                    self.add_to(operation);
                }
            }
        }
    }
}

fn operations(item: &mut PathItem) -> [(Method, Option<&mut Operation>); 8] {
    [
        (Method::GET, item.get.as_mut()),
        (Method::PUT, item.put.as_mut()),
        (Method::POST, item.post.as_mut()),
        (Method::DELETE, item.delete.as_mut()),
        (Method::OPTIONS, item.options.as_mut()),
        (Method::HEAD, item.head.as_mut()),
        (Method::PATCH, item.patch.as_mut()),
        (Method::TRACE, item.trace.as_mut()),
    ]
}

/// Keeps what the application says of a status and adds the layer's
/// meaning of it, once.
fn merge(theirs: &mut Response, ours: Response) {
    if !theirs.description.contains(&ours.description) {
        theirs.description = format!("{} Or: {}", theirs.description, ours.description);
    }
    for (media_type, content) in ours.content {
        theirs.content.entry(media_type).or_insert(content);
    }
    for (name, header) in ours.headers {
        theirs.headers.entry(name).or_insert(header);
    }
}

fn problem_response(description: &str, retry_after: bool) -> Response {
    let mut response = ResponseBuilder::new().description(description).content(
        PROBLEM_JSON.to_str().expect("an ASCII media type"),
        ContentBuilder::new().schema(Some(problem_schema())).build(),
    );
    if retry_after {
        let seconds = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0));
        response = response.header(
            header_title(&header::RETRY_AFTER),
            described(Header::new(seconds), "Seconds to wait before retrying."),
        );
    }
    response.build()
}

/// An RFC 9457 problem document as the layer writes it.
fn problem_schema() -> Schema {
    let text = || ObjectBuilder::new().schema_type(Type::String);
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("A problem document (RFC 9457)."))
        .property(
            "type",
            text().format(Some(SchemaFormat::Custom("uri-reference".to_owned()))),
        )
        .property("title", text())
        .property("status", ObjectBuilder::new().schema_type(Type::Integer))
        .property("detail", text())
        .required("type")
        .required("title")
        .required("status")
        .required("detail")
        .into()
}

fn described(mut header: Header, description: &str) -> Header {
    header.description = Some(description.to_owned());
    header
}

/// `idempotent-replayed` as documents spell header names:
/// `Idempotent-Replayed`.
fn header_title(name: &HeaderName) -> String {
    name.as_str()
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}
