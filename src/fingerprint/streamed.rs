//! Canonical JSON written as the parser reads the document, without a
//! `serde_json::Value` in between: the same text as `super::write` of the
//! parsed document, with an allocation or two where the tree takes one for
//! every member and string.

use std::{borrow::Cow, cell::Cell, fmt, ops::Range};

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};

use super::{write_number, write_string};

/// What became of a body written as it was parsed.
pub(super) enum Streamed {
    /// Its canonical form.
    Written(Vec<u8>),
    /// It is not one JSON document.
    NotJson,
    /// The tree writes it: it holds what `serde_json` may read as more
    /// than a map, or objects nested deeper than this writer goes.
    ForTheTree,
}

/// Objects inside objects this writer follows. Each one's members are
/// moved once they are sorted, so a document nested deeper would be moved
/// once a level; the tree, which is not, writes those.
const OBJECT_DEPTH: usize = 8;

/// The names that `serde_json`, with features any crate in a build may
/// turn on (`raw_value`, `arbitrary_precision`), reads as something else
/// than an object when they come first in one.
const PRIVATE_NAMES: &str = "$serde_json::private::";

pub(super) fn canonical(body: &[u8]) -> Streamed {
    let handed_over = Cell::new(false);
    let mut out = Vec::with_capacity(body.len());
    let mut parser = serde_json::Deserializer::from_slice(body);
    let seed = Canonical {
        out: &mut out,
        objects: 0,
        handed_over: &handed_over,
    };
    match seed.deserialize(&mut parser).and_then(|()| parser.end()) {
        Ok(()) => Streamed::Written(out),
        Err(_) if handed_over.get() => Streamed::ForTheTree,
        Err(_) => Streamed::NotJson,
    }
}

/// Writes the value it is handed, in canonical form, at the end of `out`.
struct Canonical<'s> {
    out: &'s mut Vec<u8>,
    /// The objects it is inside.
    objects: usize,
    handed_over: &'s Cell<bool>,
}

impl<'s> Canonical<'s> {
    fn inner(&mut self, objects: usize) -> Canonical<'_> {
        Canonical {
            out: self.out,
            objects,
            handed_over: self.handed_over,
        }
    }

    fn hand_over<E: Error>(&self) -> E {
        self.handed_over.set(true);
        E::custom("left to the tree")
    }
}

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
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.out
            .extend_from_slice(if b { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        write_number(&n.into(), self.out);
        Ok(())
    }

    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        write_number(&n.into(), self.out);
        Ok(())
    }

    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        // As the tree takes a double that is no JSON number: as null.
        match serde_json::Number::from_f64(f) {
            Some(n) => write_number(&n, self.out),
            None => self.out.extend_from_slice(b"null"),
        }
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        write_string(s, self.out);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut items: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            let comma = self.out.len();
            if !first {
                self.out.push(b',');
            }
            let objects = self.objects;
            if items.next_element_seed(self.inner(objects))?.is_none() {
                self.out.truncate(comma);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut members: A) -> Result<(), A::Error> {
        if self.objects == OBJECT_DEPTH {
            return Err(self.hand_over());
        }
        // Each member's value is written where the object's text will go,
        // then the members after them in name order, moved back over them.
        let start = self.out.len();
        let mut written: Vec<(Cow<'de, str>, Range<usize>)> = Vec::new();
        while let Some(name) = members.next_key_seed(Name)? {
            if written.is_empty() && name.starts_with(PRIVATE_NAMES) {
                return Err(self.hand_over());
            }
            let value = self.out.len();
            let objects = self.objects + 1;
            members.next_value_seed(self.inner(objects))?;
            written.push((name, value..self.out.len()));
        }
        // Stable: of a name that repeats, the last value is the one kept,
        // as the tree keeps it.
        written.sort_by(|a, b| a.0.cmp(&b.0));
        let out = self.out;
        let object = out.len();
        out.push(b'{');
        let mut members = written.iter().peekable();
        let mut first = true;
        while let Some((name, value)) = members.next() {
            if members.peek().is_some_and(|(next, _)| next == name) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_string(name, out);
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
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, parser: D) -> Result<Self::Value, D::Error> {
        parser.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
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
