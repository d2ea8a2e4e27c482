//! How a request body enters its fingerprint.

use std::{borrow::Cow, fmt, sync::Arc};

use serde_json::Value;

mod streamed;
use streamed::Streamed;

/// A function from a request body to the bytes its fingerprint covers.
pub type BodyFn = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// What of the body the fingerprint covers, so that a retry of the same
/// request matches its first attempt and a different request does not.
///
/// ```
/// use tower_idempotency::{fingerprint::BodyFingerprint, IdempotencyLayer};
///
/// // The same JSON document however it is spaced or ordered, except for
/// // the client's own timestamp and trace id.
/// let layer = IdempotencyLayer::default().with_body_fingerprint(
///     BodyFingerprint::canonical_json_except(["/sent_at", "/meta/trace_id"]),
/// );
/// ```
#[derive(Clone, Default)]
pub enum BodyFingerprint {
    /// The body's bytes, as they are. The default.
    #[default]
    Raw,
    /// The body as a JSON document in canonical form: object members sorted
    /// by key, no insignificant whitespace, numbers written one way for one
    /// value (`1`, `1.0` and `1e0` are one number; numbers are compared as
    /// IEEE-754 doubles, as RFC 8785 does), strings escaped one way. Two
    /// serialisations of one document fingerprint the same. A body that is
    /// not valid JSON is fingerprinted as its raw bytes; a member name that
    /// repeats counts once, with its last value, as `serde_json` reads it.
    CanonicalJson,
    /// [`CanonicalJson`](Self::CanonicalJson) without the members that the
    /// listed JSON Pointers (RFC 6901) name: fields that may differ between
    /// two attempts of one request, such as a client timestamp. Pointers
    /// are applied in order, each to what the ones before it left; one that
    /// names nothing is ignored.
    CanonicalJsonExcept(Arc<[String]>),
    /// What the function makes of the body.
    Custom(BodyFn),
}

impl BodyFingerprint {
    /// [`BodyFingerprint::CanonicalJson`].
    pub fn canonical_json() -> Self {
        Self::CanonicalJson
    }

    /// [`BodyFingerprint::CanonicalJsonExcept`] the members at `pointers`.
    pub fn canonical_json_except<I, S>(pointers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::CanonicalJsonExcept(pointers.into_iter().map(Into::into).collect())
    }

    /// [`BodyFingerprint::Custom`] with `fingerprint`.
    pub fn from_fn<F>(fingerprint: F) -> Self
    where
        F: Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    {
        Self::Custom(Arc::new(fingerprint))
    }

    /// The bytes of `body` that are hashed into the fingerprint.
    pub fn bytes<'a>(&self, body: &'a [u8]) -> Cow<'a, [u8]> {
        match self {
            Self::Raw => Cow::Borrowed(body),
            Self::CanonicalJson => canonical(body, &[]),
            Self::CanonicalJsonExcept(pointers) => canonical(body, pointers),
            Self::Custom(fingerprint) => Cow::Owned(fingerprint(body)),
        }
    }
}

impl fmt::Debug for BodyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Raw => f.write_str("Raw"),
            Self::CanonicalJson => f.write_str("CanonicalJson"),
            Self::CanonicalJsonExcept(pointers) => f
                .debug_tuple("CanonicalJsonExcept")
                .field(pointers)
                .finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

fn canonical<'a>(body: &'a [u8], excluded: &[String]) -> Cow<'a, [u8]> {
    if excluded.is_empty() {
        match streamed::canonical(body) {
            Streamed::Written(out) => return Cow::Owned(out),
            Streamed::NotJson => return Cow::Borrowed(body),
            Streamed::ForTheTree => {}
        }
    }
    let Ok(mut document) = serde_json::from_slice::<Value>(body) else {
        return Cow::Borrowed(body);
    };
    for pointer in excluded {
        remove(&mut document, pointer);
    }
    let mut out = Vec::with_capacity(body.len());
    write(&document, &mut out);
    Cow::Owned(out)
}

/// Removes what `pointer` names, if anything.
fn remove(document: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let token = last.replace("~1", "/").replace("~0", "~");
    match document.pointer_mut(parent) {
        Some(Value::Object(members)) => {
            members.remove(&token);
        }
        Some(Value::Array(items)) => {
            if let Some(index) = token.parse::<usize>().ok().filter(|i| *i < items.len()) {
                items.remove(index);
            }
        }
        _ => {}
    }
}

/// Writes `value` in canonical form. Members are sorted here, whatever
/// order the map keeps them in (`serde_json`'s `preserve_order` may be on
/// in the build).
fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<_> = members.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, member)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write(member, out);
            }
            out.push(b'}');
        }
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // `serde_json` escapes one way: the same string always writes the same.
    serde_json::to_writer(&mut *out, s).expect("a string always serializes");
}

/// One text per numeric value, the value taken as an IEEE-754 double as
/// RFC 8785 takes it: an integral value below 10^21 as its digits, any
/// other as the shortest exponent form that reads back as the same double.
/// So `1`, `1.0`, `1e0` are one number; and integers past 2^53, or
/// decimals past 17 significant digits, that round to one double are one
/// number too (send such values as strings).
fn write_number(n: &serde_json::Number, out: &mut Vec<u8>) {
    use std::io::Write;
    let Some(f) = n.as_f64() else {
        return;
    };
    let _ = if f.fract() != 0.0 || f.abs() >= 1e21 {
        write!(out, "{f:e}")
    } else if f.abs() < TWO_TO_THE_63 && !is_negative_zero(f) {
        // The digits `{f:.0}` prints, without the exact float formatting
        // behind it, which costs more than the rest of a small document:
        // below 2^63 an integral double converts to an `i64` exactly.
        write!(out, "{}", f as i64)
    } else {
        write!(out, "{f:.0}")
    };
}

const TWO_TO_THE_63: f64 = 9_223_372_036_854_775_808.0;

/// `-0.0`, which `{:.0}` prints as `-0`: it keeps its text, so that a
/// document fingerprints as it did.
fn is_negative_zero(f: f64) -> bool {
    f == 0.0 && f.is_sign_negative()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical_text(body: &str, fingerprint: &BodyFingerprint) -> String {
        String::from_utf8(fingerprint.bytes(body.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn members_are_sorted_and_whitespace_dropped() {
        assert_eq!(
            canonical_text(
                "{ \"b\": 1,\n \"a\": [ true, null ] }",
                &BodyFingerprint::CanonicalJson
            ),
            r#"{"a":[true,null],"b":1}"#
        );
    }

    #[test]
    fn one_number_has_one_text() {
        let fingerprint = BodyFingerprint::CanonicalJson;
        for same in ["1", "1.0", "1e0", "10e-1"] {
            assert_eq!(canonical_text(same, &fingerprint), "1", "{same}");
        }
        assert_eq!(
            canonical_text("0.5", &fingerprint),
            canonical_text("5e-1", &fingerprint)
        );
        assert_ne!(
            canonical_text("0.5", &fingerprint),
            canonical_text("0.25", &fingerprint)
        );
    }

    fn number_text(f: f64) -> String {
        let mut out = Vec::new();
        write_number(&serde_json::Number::from_f64(f).unwrap(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn integral_numbers_at_the_edges_have_the_text_of_exact_formatting() {
        let below_two_to_the_63 = TWO_TO_THE_63 - 1024.0;
        for f in [
            0.0,
            -0.0,
            1.0,
            -1.0,
            9_007_199_254_740_993.0,
            below_two_to_the_63,
            -below_two_to_the_63,
            TWO_TO_THE_63,
            -TWO_TO_THE_63,
            9.999_999_999_999_999e20,
        ] {
            assert_eq!(number_text(f), format!("{f:.0}"), "{f:e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn an_integral_number_has_the_text_of_exact_formatting(
            mantissa in proptest::num::i64::ANY,
            scale in 0..9i32,
        ) {
            let f = mantissa as f64 * f64::powi(2.0, scale);
            proptest::prop_assume!(f.abs() < 1e21);
            proptest::prop_assert_eq!(number_text(f), format!("{f:.0}"));
        }
    }

    fn from_the_tree(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write(&serde_json::from_slice(body).unwrap(), &mut out);
        out
    }

    fn streamed_text(body: &[u8]) -> Option<Vec<u8>> {
        match streamed::canonical(body) {
            Streamed::Written(out) => Some(out),
            Streamed::NotJson | Streamed::ForTheTree => None,
        }
    }

    /// What the tree path makes of a body, through the public API: a
    /// pointer that names nothing keeps the document whole.
    fn through_the_tree(body: &[u8]) -> Vec<u8> {
        BodyFingerprint::canonical_json_except(["/none"])
            .bytes(body)
            .into_owned()
    }

    #[derive(Debug, Clone)]
    enum Document {
        Null,
        Bool(bool),
        Integer(i64),
        Float(f64),
        Text(String),
        List(Vec<Document>),
        Members(Vec<(String, Document)>),
    }

    impl Document {
        fn text(&self, out: &mut String) {
            match self {
                Self::Null => out.push_str("null"),
                Self::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Self::Integer(n) => out.push_str(&n.to_string()),
                Self::Float(f) => out.push_str(&format!("{f:?}")),
                Self::Text(s) => out.push_str(&serde_json::to_string(s).unwrap()),
                Self::List(items) => {
                    out.push_str("[ ");
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(" ,");
                        }
                        item.text(out);
                    }
                    out.push(']');
                }
                Self::Members(members) => {
                    out.push('{');
                    for (i, (key, member)) in members.iter().enumerate() {
                        if i > 0 {
                            out.push_str(",\n");
                        }
                        out.push_str(&serde_json::to_string(key).unwrap());
                        out.push_str(" : ");
                        member.text(out);
                    }
                    out.push('}');
                }
            }
        }
    }

    fn documents() -> impl proptest::strategy::Strategy<Value = Document> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Document::Null),
            any::<bool>().prop_map(Document::Bool),
            any::<i64>().prop_map(Document::Integer),
            any::<f64>()
                .prop_filter("a JSON number", |f| f.is_finite())
                .prop_map(Document::Float),
            any::<String>().prop_map(Document::Text),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            // Few names, so that some repeat within an object.
            let name = prop_oneof![
                Just("a".to_owned()),
                Just("b".to_owned()),
                Just("é\"/".to_owned()),
                any::<String>(),
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Document::List),
                proptest::collection::vec((name, inner), 0..6).prop_map(Document::Members),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_streamed_form_is_the_trees(document in documents()) {
            let mut body = String::new();
            document.text(&mut body);
            proptest::prop_assert_eq!(
                streamed_text(body.as_bytes()),
                Some(from_the_tree(body.as_bytes()))
            );
        }
    }

    #[test]
    fn a_repeated_name_keeps_its_last_value_when_streamed() {
        let body = br#"{"b": {"x": 1, "x": [2]}, "a": 0, "b": {"y": 3, "x": 4}}"#;
        assert_eq!(streamed_text(body), Some(from_the_tree(body)));
        assert_eq!(
            streamed_text(body).unwrap(),
            br#"{"a":0,"b":{"x":4,"y":3}}"#
        );
    }

    #[test]
    fn what_is_not_one_document_is_hashed_raw_without_the_tree() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for body in [
            &b"{\"a\": 1} {}"[..],
            b"[1, 2",
            b"",
            b"nul",
            deep.as_bytes(),
        ] {
            assert!(matches!(streamed::canonical(body), Streamed::NotJson));
            assert!(serde_json::from_slice::<Value>(body).is_err());
            assert_eq!(BodyFingerprint::CanonicalJson.bytes(body), body);
        }
    }

    #[test]
    fn a_name_serde_json_may_read_as_another_value_is_left_to_the_tree() {
        for body in [
            &br#"{"$serde_json::private::RawValue": "[1,2]"}"#[..],
            br#"{"a": {"$serde_json::private::RawValue": "2"}}"#,
            br#"{"$serde_json::private::RawValu\u0065": "2"}"#,
            br#"{"$serde_json::private::RawValue": "1", "b": 2}"#,
            br#"{"$serde_json::private::Number": "1.5"}"#,
        ] {
            assert!(matches!(streamed::canonical(body), Streamed::ForTheTree));
            assert_eq!(
                BodyFingerprint::CanonicalJson.bytes(body),
                through_the_tree(body)
            );
        }
    }

    #[test]
    fn objects_nested_deeper_than_the_streamed_writer_goes_are_left_to_the_tree() {
        let deep = format!("{}1{}", r#"{"a": [{"b": "#.repeat(5), "}]}".repeat(5));
        assert!(matches!(
            streamed::canonical(deep.as_bytes()),
            Streamed::ForTheTree
        ));
        assert_eq!(
            BodyFingerprint::CanonicalJson.bytes(deep.as_bytes()),
            from_the_tree(deep.as_bytes())
        );
        let shallow = format!("{}1{}", r#"{"a": [{"b": "#.repeat(4), "}]}".repeat(4));
        assert_eq!(
            streamed_text(shallow.as_bytes()),
            Some(from_the_tree(shallow.as_bytes()))
        );
    }

    #[test]
    fn excluded_pointers_are_left_out() {
        let fingerprint =
            BodyFingerprint::canonical_json_except(["/sent_at", "/meta/trace~1id", "/items/0"]);
        assert_eq!(
            canonical_text(
                r#"{"amount":5,"sent_at":"now","meta":{"trace/id":"x","k":1},"items":[1,2]}"#,
                &fingerprint
            ),
            r#"{"amount":5,"items":[2],"meta":{"k":1}}"#
        );
    }

    #[test]
    fn a_body_that_is_not_json_is_hashed_raw() {
        assert_eq!(
            canonical_text("not { json", &BodyFingerprint::CanonicalJson),
            "not { json"
        );
    }
}
