//! The OpenAPI docs of the layer (feature `utoipa`), read back as the JSON
//! a client generator would see.

#[path = "common/process.rs"]
mod process;

use serde_json::Value;
use tower_idempotency::{key::IDEMPOTENCY_EXPIRES, openapi::IdempotencyDocs, IdempotencyLayer};
use utoipa::{
    openapi::{
        path::{HttpMethod, OperationBuilder, PathItem},
        response::ResponseBuilder,
        OpenApi, OpenApiBuilder, PathsBuilder,
    },
    Modify,
};

const PROBLEMS: [&str; 7] = ["400", "408", "409", "413", "422", "429", "503"];

/// A document with `POST /payments` (201, and 422 for a bad amount) and
/// `GET /payments` (200), as the application describes them.
fn payments_document() -> OpenApi {
    let create = OperationBuilder::new()
        .response("201", ResponseBuilder::new().description("The payment"))
        .response(
            "422",
            ResponseBuilder::new().description("The amount is not valid"),
        );
    let list = OperationBuilder::new().response("200", ResponseBuilder::new().description("All"));
    let mut item = PathItem::new(HttpMethod::Post, create);
    item.get = Some(list.build());
    OpenApiBuilder::new()
        .paths(PathsBuilder::new().path("/payments", item))
        .build()
}

fn documented(docs: &IdempotencyDocs) -> Value {
    let mut document = payments_document();
    docs.modify(&mut document);
    serde_json::to_value(&document).unwrap()
}

fn key_parameter(operation: &Value) -> &Value {
    operation["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .expect("Idempotency-Key parameter")
}

#[test]
fn the_key_header_is_documented_with_its_rules() {
    let json = documented(
        &IdempotencyLayer::default()
            .with_key_required(true)
            .openapi_docs(),
    );
    let key = key_parameter(&json["paths"]["/payments"]["post"]);
    assert_eq!(key["in"], "header");
    assert_eq!(key["required"], true);
    assert_eq!(key["schema"]["type"], "string");
    let rules = key["description"].as_str().unwrap();
    assert!(rules.contains("255 visible ASCII"), "{rules}");
    assert!(rules.contains("422"), "{rules}");
}

#[test]
fn an_optional_key_is_documented_as_optional() {
    let json = documented(&IdempotencyLayer::default().openapi_docs());
    assert_eq!(
        key_parameter(&json["paths"]["/payments"]["post"])["required"],
        false
    );
}

#[test]
fn every_response_the_application_documents_may_be_a_replay() {
    let json = documented(&IdempotencyDocs::new());
    let responses = &json["paths"]["/payments"]["post"]["responses"];
    for status in ["201", "422"] {
        let replayed = &responses[status]["headers"]["Idempotent-Replayed"];
        assert_eq!(
            replayed["schema"]["enum"],
            serde_json::json!(["true"]),
            "{status}"
        );
    }
}

#[test]
fn the_layers_answers_are_documented_as_problem_documents() {
    let json = documented(&IdempotencyDocs::new());
    let responses = &json["paths"]["/payments"]["post"]["responses"];
    for status in PROBLEMS {
        let schema = &responses[status]["content"]["application/problem+json"]["schema"];
        assert_eq!(
            schema["required"],
            serde_json::json!(["type", "title", "status", "detail"]),
            "{status}"
        );
        assert_eq!(
            schema["properties"]["status"]["type"], "integer",
            "{status}"
        );
    }
}

#[test]
fn answers_that_ask_for_a_retry_document_retry_after() {
    let json = documented(&IdempotencyDocs::new());
    let responses = &json["paths"]["/payments"]["post"]["responses"];
    for status in ["409", "429", "503"] {
        assert!(
            responses[status]["headers"]["Retry-After"].is_object(),
            "{status}"
        );
    }
    assert!(responses["400"]["headers"]["Retry-After"].is_null());
}

#[test]
fn a_status_the_application_documents_gains_the_layers_meaning() {
    let json = documented(&IdempotencyDocs::new());
    let unprocessable = &json["paths"]["/payments"]["post"]["responses"]["422"];
    let description = unprocessable["description"].as_str().unwrap();
    assert!(
        description.starts_with("The amount is not valid"),
        "{description}"
    );
    assert!(description.contains("key-reused"), "{description}");
    assert!(unprocessable["content"]["application/problem+json"].is_object());
    assert!(unprocessable["headers"]["Idempotent-Replayed"].is_object());
}

#[test]
fn operations_of_methods_the_layer_does_not_cover_are_left_alone() {
    let json = documented(&IdempotencyDocs::new());
    let list = &json["paths"]["/payments"]["get"];
    assert!(list["parameters"].is_null());
    assert_eq!(list["responses"].as_object().unwrap().len(), 1);
}

#[test]
fn the_expiry_header_is_documented_when_the_layer_sends_it() {
    let layer = IdempotencyLayer::default().with_expiry_header(IDEMPOTENCY_EXPIRES);
    let json = documented(&layer.openapi_docs());
    let created = &json["paths"]["/payments"]["post"]["responses"]["201"];
    assert!(created["headers"]["Idempotency-Expires"]["description"]
        .as_str()
        .unwrap()
        .contains("HTTP-date"));
    let plain = documented(&IdempotencyDocs::new());
    assert!(
        plain["paths"]["/payments"]["post"]["responses"]["201"]["headers"]["Idempotency-Expires"]
            .is_null()
    );
}

#[test]
fn documenting_twice_gives_the_same_document() {
    let docs = IdempotencyDocs::new();
    let mut document = payments_document();
    docs.modify(&mut document);
    let once = serde_json::to_value(&document).unwrap();
    docs.modify(&mut document);
    assert_eq!(serde_json::to_value(&document).unwrap(), once);
}

#[tokio::test]
async fn the_payments_example_serves_its_document() {
    let server = process::start("payments", &[]);
    let document: Value = reqwest::get(format!("{}/openapi.json", server.base))
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("JSON");
    let create = &document["paths"]["/payments"]["post"];
    assert_eq!(key_parameter(create)["required"], true);
    for status in PROBLEMS {
        assert!(
            create["responses"][status]["content"]["application/problem+json"].is_object(),
            "{status}"
        );
    }
    assert!(create["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
    assert!(create["responses"]["201"]["headers"]["Idempotency-Expires"].is_object());
    assert!(document["paths"]["/payments"]["get"]["parameters"].is_null());
    assert!(document["paths"]["/payments/{id}"]["get"].is_object());
}

#[test]
fn the_layers_own_answers_are_never_documented_as_replays() {
    let json = documented(&IdempotencyDocs::new());
    let responses = &json["paths"]["/payments"]["post"]["responses"];
    for status in ["400", "408", "409", "413", "429", "503"] {
        assert!(
            responses[status]["headers"]["Idempotent-Replayed"].is_null(),
            "{status}"
        );
    }
}

#[test]
fn a_missing_key_is_documented_only_where_a_key_is_required() {
    let optional = documented(&IdempotencyDocs::new());
    let required = documented(&IdempotencyDocs::new().with_key_required(true));
    let bad_request = |json: &Value| {
        json["paths"]["/payments"]["post"]["responses"]["400"]["description"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(!bad_request(&optional).contains("missing-key"));
    assert!(bad_request(&required).contains("missing-key"));
}
