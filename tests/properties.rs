//! Property tests: key parsing, fingerprints, the store's state machine
//! against a model, and hostile requests through the whole layer.

mod common;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use common::{app, key_header, quoted_key, Counter};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use proptest::prelude::*;
use tower::ServiceExt;
use tower_idempotency::{
    key::{parse_key, Fingerprint, KeyError, RecordKey},
    store::{BeginOutcome, Completion, LockToken, MemoryStore, StoreError, StoredResponse},
    IdempotencyLayer, Store,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn any_header_value_parses_or_is_refused_without_panic(value in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Some(headers) = key_header(&value) {
            match parse_key(&headers) {
                Ok(Some(key)) => {
                    prop_assert!(!key.is_empty() && key.len() <= 255);
                    prop_assert!(key.bytes().all(|b| (0x21..=0x7e).contains(&b)));
                }
                Ok(None) => prop_assert!(false, "a present header is never absent"),
                Err(_) => {}
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5_000))]

    #[test]
    fn visible_ascii_keys_parse_bare_and_quoted_to_themselves(key in "[!-~]{1,255}") {
        // A leading DQUOTE announces the quoted form, so only other keys
        // can also be sent bare.
        if !key.starts_with('"') {
            let bare = key_header(key.as_bytes()).unwrap();
            prop_assert_eq!(parse_key(&bare), Ok(Some(key.clone())));
        }
        let quoted = key_header(quoted_key(&key).as_bytes()).unwrap();
        prop_assert_eq!(parse_key(&quoted), Ok(Some(key)));
    }

    #[test]
    fn keys_over_255_characters_are_refused(key in "[!#-~][!-~]{255,400}") {
        prop_assert_eq!(parse_key(&key_header(key.as_bytes()).unwrap()), Err(KeyError::TooLong));
    }

    #[test]
    fn keys_with_inner_whitespace_are_refused(a in "[!-~]{1,20}", b in "[!-~]{1,20}") {
        let value = format!("{a} {b}");
        prop_assert!(parse_key(&key_header(value.as_bytes()).unwrap()).is_err());
    }

    #[test]
    fn fingerprint_is_deterministic(method in "[A-Z]{3,7}", path in "/[a-z0-9/]{0,30}", body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let parts = || Request::builder().method(method.as_str()).uri(path.as_str()).body(()).unwrap().into_parts().0;
        prop_assert_eq!(
            Fingerprint::compute(&parts(), &[], &body),
            Fingerprint::compute(&parts(), &[], &body)
        );
    }

    #[test]
    fn fingerprints_of_different_requests_differ(
        a in ("(GET|POST|PATCH)", "/[a-z]{0,6}(\\?[a-z=]{0,6})?", proptest::collection::vec(any::<u8>(), 0..16), proptest::option::of("[a-z/]{1,8}")),
        b in ("(GET|POST|PATCH)", "/[a-z]{0,6}(\\?[a-z=]{0,6})?", proptest::collection::vec(any::<u8>(), 0..16), proptest::option::of("[a-z/]{1,8}")),
    ) {
        let fingerprint = |(method, path, body, content_type): &(String, String, Vec<u8>, Option<String>)| {
            let mut builder = Request::builder().method(method.as_str()).uri(path.as_str());
            if let Some(ct) = content_type {
                builder = builder.header("content-type", ct.as_str());
            }
            let parts = builder.body(()).unwrap().into_parts().0;
            Fingerprint::compute(&parts, &[http::header::CONTENT_TYPE], body)
        };
        prop_assert_eq!(a == b, fingerprint(&a) == fingerprint(&b));
    }

    #[test]
    fn record_keys_separate_scopes(scope_a in proptest::collection::vec(any::<u8>(), 0..8), scope_b in proptest::collection::vec(any::<u8>(), 0..8), key_a in "[a-z]{1,8}", key_b in "[a-z]{1,8}") {
        prop_assert_eq!(
            scope_a == scope_b && key_a == key_b,
            RecordKey::new(&scope_a, &key_a) == RecordKey::new(&scope_b, &key_b)
        );
    }

    #[test]
    fn stored_responses_round_trip_through_the_codec(status in 200u16..600, body in proptest::collection::vec(any::<u8>(), 0..1024), values in proptest::collection::vec("[ -~]{0,20}", 0..6)) {
        let mut headers = HeaderMap::new();
        for value in &values {
            headers.append("x-value", HeaderValue::from_str(value).unwrap());
        }
        let record = StoredResponse::new(StatusCode::from_u16(status).unwrap(), headers, Bytes::from(body), None);
        prop_assert_eq!(StoredResponse::decode(record.encode()), Ok(record));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Begin {
        key: u8,
        fingerprint: u8,
    },
    Complete {
        key: u8,
        holder: u8,
        replayable: bool,
    },
    Release {
        key: u8,
        holder: u8,
    },
    Renew {
        key: u8,
        holder: u8,
    },
    Advance {
        millis: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3u8, 0..2u8).prop_map(|(key, fingerprint)| Op::Begin { key, fingerprint }),
        2 => (0..3u8, 0..3u8, any::<bool>()).prop_map(|(key, holder, replayable)| Op::Complete { key, holder, replayable }),
        1 => (0..3u8, 0..3u8).prop_map(|(key, holder)| Op::Release { key, holder }),
        1 => (0..3u8, 0..3u8).prop_map(|(key, holder)| Op::Renew { key, holder }),
        1 => (1..300u64).prop_map(|millis| Op::Advance { millis }),
    ]
}

/// What a key holds in the model.
#[derive(Debug, Clone, PartialEq)]
enum Model {
    InFlight {
        fingerprint: u8,
        token: LockToken,
        until: u64,
    },
    Completed {
        fingerprint: u8,
        replayable: bool,
        until: u64,
    },
}

const LEASE: u64 = 200;
const TTL: u64 = 500;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn memory_store_follows_the_state_machine(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let store = MemoryStore::new();
            let mut model: HashMap<u8, Model> = HashMap::new();
            // Tokens handed out per key, newest last: "holder" picks one.
            // Each token beside the fingerprint its begin took the key with.
            let mut tokens: HashMap<u8, Vec<(LockToken, u8)>> = HashMap::new();
            let mut now = 0u64;
            let record_key = |k: u8| RecordKey::new(b"model", &k.to_string());
            let response = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"), None);
            for op in ops {
                // Completed records are gone after their TTL. A lapsed lease
                // stays with its holder until a begin takes the key over.
                model.retain(|_, state| match state {
                    Model::InFlight { .. } => true,
                    Model::Completed { until, .. } => *until > now,
                });
                match op {
                    Op::Advance { millis } => {
                        tokio::time::advance(Duration::from_millis(millis)).await;
                        now += millis;
                    }
                    Op::Begin { key, fingerprint } => {
                        let got = store.begin(&record_key(key), &Fingerprint::from_bytes([fingerprint; 32]), Duration::from_millis(LEASE)).await.unwrap();
                        let lapsed = matches!(model.get(&key), Some(Model::InFlight { until, .. }) if *until <= now);
                        let free = lapsed || !model.contains_key(&key);
                        match (model.get(&key), got) {
                            (_, BeginOutcome::Acquired(token)) if free => {
                                tokens.entry(key).or_default().push((token, fingerprint));
                                model.insert(key, Model::InFlight { fingerprint, token, until: now + LEASE });
                            }
                            (Some(Model::InFlight { fingerprint: f, .. }), BeginOutcome::InFlight) if *f == fingerprint && !lapsed => {}
                            (Some(Model::InFlight { fingerprint: f, .. }), BeginOutcome::Mismatch) if *f != fingerprint && !lapsed => {}
                            (Some(Model::Completed { fingerprint: f, .. }), BeginOutcome::Mismatch) if *f != fingerprint => {}
                            (Some(Model::Completed { fingerprint: f, replayable: true, .. }), BeginOutcome::Completed(stored)) if *f == fingerprint => {
                                assert_eq!(stored, response.encode());
                            }
                            (Some(Model::Completed { fingerprint: f, replayable: false, .. }), BeginOutcome::NotReplayable) if *f == fingerprint => {}
                            (expected, got) => panic!("begin({key}, {fingerprint}) at {now}: model {expected:?}, store {got:?}"),
                        }
                    }
                    Op::Complete { key, holder, replayable } => {
                        let Some((token, fingerprint)) = pick(&tokens, key, holder) else { continue };
                        let outcome = if replayable { Completion::Response(response.encode()) } else { Completion::NotReplayable };
                        let got = store.complete(&record_key(key), &Fingerprint::from_bytes([fingerprint; 32]), token, outcome, Duration::from_millis(TTL)).await;
                        let holds = holds(&model, key, token);
                        assert_eq!(got.is_ok(), holds, "complete({key}) at {now}: {got:?}");
                        if !holds {
                            assert!(matches!(got, Err(StoreError::LockLost)));
                        } else {
                            let fingerprint = fingerprint_of(&model, key);
                            model.insert(key, Model::Completed { fingerprint, replayable, until: now + TTL });
                        }
                    }
                    Op::Release { key, holder } => {
                        let Some((token, _)) = pick(&tokens, key, holder) else { continue };
                        let got = store.release(&record_key(key), token).await;
                        let holds = holds(&model, key, token);
                        assert_eq!(got.is_ok(), holds, "release({key}) at {now}: {got:?}");
                        if holds {
                            model.remove(&key);
                        }
                    }
                    Op::Renew { key, holder } => {
                        let Some((token, _)) = pick(&tokens, key, holder) else { continue };
                        let got = store.renew(&record_key(key), token, Duration::from_millis(LEASE)).await;
                        let holds = holds(&model, key, token);
                        assert_eq!(got.is_ok(), holds, "renew({key}) at {now}: {got:?}");
                        if holds {
                            if let Some(Model::InFlight { until, .. }) = model.get_mut(&key) {
                                *until = now + LEASE;
                            }
                        }
                    }
                }
            }
        });
    }
}

fn pick(
    tokens: &HashMap<u8, Vec<(LockToken, u8)>>,
    key: u8,
    holder: u8,
) -> Option<(LockToken, u8)> {
    let list = tokens.get(&key)?;
    list.iter()
        .rev()
        .nth(usize::from(holder) % list.len())
        .copied()
}

/// Whether `token` is the current lock on `key`, lapsed or not.
fn holds(model: &HashMap<u8, Model>, key: u8, token: LockToken) -> bool {
    matches!(model.get(&key), Some(Model::InFlight { token: t, .. }) if *t == token)
}

fn fingerprint_of(model: &HashMap<u8, Model>, key: u8) -> u8 {
    match model.get(&key) {
        Some(Model::InFlight { fingerprint, .. } | Model::Completed { fingerprint, .. }) => {
            *fingerprint
        }
        None => unreachable!("only called for a held key"),
    }
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::POST),
        Just(Method::PATCH),
        Just(Method::GET),
        Just(Method::DELETE),
        "[A-Z]{1,12}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn hostile_requests_get_a_clear_answer_and_never_panic(
        method in method(),
        keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..3),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        declared in proptest::option::of(0u64..1_000_000),
        path in "/[a-zA-Z0-9%._~-]{0,40}",
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let counter = Counter::default();
            let svc = app(&IdempotencyLayer::default().with_body_limit(1024), counter.handler(Duration::ZERO));
            let mut builder = Request::builder().method(method.clone()).uri(path.as_str());
            let mut sent_keys = 0;
            for key in &keys {
                if let Ok(value) = HeaderValue::from_bytes(key) {
                    builder = builder.header("idempotency-key", value);
                    sent_keys += 1;
                }
            }
            if let Some(declared) = declared {
                builder = builder.header("content-length", declared);
            }
            let request = builder.body(Full::new(Bytes::from(body.clone()))).unwrap();
            let headers = request.headers().clone();
            let response = svc.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let covered = method == Method::POST || method == Method::PATCH;
            if !covered || sent_keys == 0 {
                assert_eq!(status, StatusCode::CREATED, "passed through");
                return;
            }
            match parse_key(&headers) {
                Err(_) => {
                    assert_eq!(status, StatusCode::BAD_REQUEST);
                    assert_eq!(counter.runs(), 0);
                }
                Ok(_) if declared.is_some_and(|d| d > 1024) || body.len() > 1024 => {
                    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
                    assert_eq!(counter.runs(), 0);
                }
                Ok(_) => assert_eq!(status, StatusCode::CREATED),
            }
            if status.is_client_error() {
                assert_eq!(response.headers()["content-type"], "application/problem+json");
            }
        });
    }
}

/// Any JSON document, a few levels deep.
fn json_document() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        (-1.0e6..1.0e6f64).prop_map(Value::from),
        "[a-z \"\\\\é]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

/// The document written another way: members in reverse order, spaces and
/// newlines between every token, and integral numbers as decimals.
fn rewritten(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(members) => {
            let parts: Vec<String> = members
                .iter()
                .rev()
                .map(|(k, v)| format!("{} :\n {}", serde_json::to_string(k).unwrap(), rewritten(v)))
                .collect();
            format!("{{ {} }}", parts.join(" ,\n"))
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(rewritten).collect();
            format!("[ {} ]", parts.join(" , "))
        }
        Value::Number(n) if n.is_i64() => format!("{n}.0"),
        other => serde_json::to_string(other).unwrap(),
    }
}

proptest! {
    #[test]
    fn reordered_and_respaced_documents_fingerprint_the_same(document in json_document()) {
        let canonical = tower_idempotency::fingerprint::BodyFingerprint::canonical_json();
        let compact = serde_json::to_vec(&document).unwrap();
        let other = rewritten(&document);
        prop_assert_eq!(canonical.bytes(&compact), canonical.bytes(other.as_bytes()));
    }

    #[test]
    fn a_changed_value_fingerprints_differently(document in json_document(), extra in any::<i32>()) {
        let canonical = tower_idempotency::fingerprint::BodyFingerprint::canonical_json_except(["/skipped"]);
        let wrapped = serde_json::json!({ "payload": document, "extra": extra, "skipped": 1 });
        let changed = serde_json::json!({ "payload": document, "extra": i64::from(extra) + 1, "skipped": 1 });
        let renamed = serde_json::json!({ "payload": document, "extra": extra, "skipped": 2 });
        let bytes = |v: &serde_json::Value| canonical.bytes(&serde_json::to_vec(v).unwrap()).into_owned();
        prop_assert_ne!(bytes(&wrapped), bytes(&changed));
        // The excluded member may change freely.
        prop_assert_eq!(bytes(&wrapped), bytes(&renamed));
    }
}
