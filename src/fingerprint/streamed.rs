//! Canonical JSON written as the parser reads the document, without a
//! `serde_json::Value` in between: the same text as `super::write` of the
//! parsed document, with an allocation or two where the tree takes one for
//! every member and string.

use std::{borrow::Cow, fmt, ops::Range, sync::OnceLock};

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{write_number, write_string};

/// The canonical form of `body`, or `None` where it is not one JSON
/// document, or where this build's `serde_json` hands numbers on in a form
/// this writer does not read (then the caller builds the tree instead).
pub(super) fn canonical(body: &[u8]) -> Option<Vec<u8>> {
    if !numbers_arrive_as_numbers() {
        return None;
    }
    written(body)
}

fn written(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    let mut parser = serde_json::Deserializer::from_slice(body);
    Canonical(&mut out).deserialize(&mut parser).ok()?;
    parser.end().ok()?;
    Some(out)
}

/// Whether a number reaches a visitor as a number. With `serde_json`'s
/// `arbitrary_precision`, which any crate in a build may turn on, it
/// arrives as a map holding its text instead.
fn numbers_arrive_as_numbers() -> bool {
    static PROBED: OnceLock<bool> = OnceLock::new();
    *PROBED.get_or_init(|| written(b"0").as_deref() == Some(b"0"))
}

/// Writes the value it is handed, in canonical form, at the end of the
/// buffer.
struct Canonical<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, parser: D) -> Result<(), D::Error> {
        parser.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.0.extend_from_slice(if b { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        write_number(&n.into(), self.0);
        Ok(())
    }

    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        write_number(&n.into(), self.0);
        Ok(())
    }

    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        // As the tree takes a double that is no JSON number: as null.
        match serde_json::Number::from_f64(f) {
            Some(n) => write_number(&n, self.0),
            None => self.0.extend_from_slice(b"null"),
        }
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        write_string(s, self.0);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push(b'[');
        let mut first = true;
        loop {
            let comma = out.len();
            if !first {
                out.push(b',');
            }
            if items.next_element_seed(Canonical(out))?.is_none() {
                out.truncate(comma);
                break;
            }
            first = false;
        }
        out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<(), A::Error> {
        let out = self.0;
        // Each member's value is written where the object's text will go,
        // then the members are written after them in key order, and moved
        // back over them.
        let start = out.len();
        let mut written: Vec<(Cow<'de, str>, Range<usize>)> = Vec::new();
        while let Some(key) = members.next_key_seed(Key)? {
            let value = out.len();
            members.next_value_seed(Canonical(out))?;
            written.push((key, value..out.len()));
        }
        // Stable: of a name that repeats, the last value is the one kept,
        // as the tree keeps it.
        written.sort_by(|a, b| a.0.cmp(&b.0));
        let object = out.len();
        out.push(b'{');
        let mut members = written.iter().peekable();
        let mut first = true;
        while let Some((key, value)) = members.next() {
            if members.peek().is_some_and(|(next, _)| next == key) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_string(key, out);
            out.push(b':');
            out.extend_from_within(value.clone());
        }
        out.push(b'}');
        out.copy_within(object.., start);
        out.truncate(start + (out.len() - object));
        Ok(())
    }
}

/// A member's name, borrowed from the body where it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, parser: D) -> Result<Self::Value, D::Error> {
        parser.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
}
