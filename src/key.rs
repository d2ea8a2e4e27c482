//! The `Idempotency-Key` header, the record key and the request fingerprint.

use std::{borrow::Cow, fmt};

use hmac::{Hmac, Mac};
use http::{request, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

/// The name of the request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The name of the response header set on every replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A name for the header that tells clients when a key expires
/// ([`with_expiry_header`](crate::IdempotencyLayer::with_expiry_header)).
pub const IDEMPOTENCY_EXPIRES: HeaderName = HeaderName::from_static("idempotency-expires");

/// The longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 255;

// Each digest starts with its own tag, so a record key and a fingerprint
// never hash the same input. Kept short because each 64 bytes of input is
// another SHA-256 block: a UUID key without a scope fits its record key in
// one.
const RECORD_DOMAIN: &[u8; 8] = b"tidem:r2";
const FINGERPRINT_DOMAIN: &[u8; 8] = b"tidem:f2";

/// Why an `Idempotency-Key` header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The header was sent more than once.
    #[error("the Idempotency-Key header was sent more than once")]
    Repeated,
    /// The key is empty.
    #[error("the Idempotency-Key header is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] characters.
    #[error("the Idempotency-Key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    /// The key holds a character outside visible ASCII.
    #[error("the Idempotency-Key may only hold visible ASCII characters")]
    InvalidCharacter,
    /// A quoted key is not a valid RFC 9651 string.
    #[error("the quoted Idempotency-Key is not a valid structured-field string")]
    MalformedString,
}

/// Reads the key from request headers.
///
/// Returns `Ok(None)` when there is no key. Both forms are accepted: a bare
/// token (`Idempotency-Key: 8e03978e`) and the RFC 9651 string of the IETF
/// draft (`Idempotency-Key: "8e03978e"`); both name the same key. A value
/// that begins with a double quote is read as the quoted form (by the
/// `sfv` crate with the `sfv` feature, and by the same rules without it).
///
/// ```
/// use http::HeaderMap;
/// use tower_idempotency::key::{parse_key, KeyError};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("idempotency-key", "\"abc-123\"".parse().unwrap());
/// assert_eq!(parse_key(&headers), Ok(Some("abc-123".to_owned())));
///
/// headers.insert("idempotency-key", "".parse().unwrap());
/// assert_eq!(parse_key(&headers), Err(KeyError::Empty));
/// ```
pub fn parse_key(headers: &HeaderMap) -> Result<Option<String>, KeyError> {
    key_in(headers).map(|key| key.map(Cow::into_owned))
}

/// [`parse_key`] without a copy of a bare key.
pub(crate) fn key_in(headers: &HeaderMap) -> Result<Option<Cow<'_, str>>, KeyError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_value(value).map(Some)
}

fn parse_value(value: &HeaderValue) -> Result<Cow<'_, str>, KeyError> {
    let raw = trim_ows(value.as_bytes());
    let key = match raw {
        [b'"', ..] => {
            // Checked before the string is read, so that both readers of
            // the quoted form refuse a stray character the same way.
            if !raw.iter().all(|b| (0x20..=0x7e).contains(b)) {
                return Err(KeyError::InvalidCharacter);
            }
            Cow::Owned(unquote(raw)?)
        }
        _ => {
            if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(KeyError::InvalidCharacter);
            }
            Cow::Borrowed(std::str::from_utf8(raw).map_err(|_| KeyError::InvalidCharacter)?)
        }
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(KeyError::InvalidCharacter);
    }
    Ok(key)
}

fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// RFC 9651 section 4.2.5: a string is DQUOTE, printable ASCII with `\"` and
/// `\\` as the only escapes, DQUOTE, and nothing after it. `raw` holds
/// printable ASCII only.
#[cfg(not(feature = "sfv"))]
fn unquote(raw: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(raw.len());
    let mut bytes = raw[1..].iter();
    loop {
        match bytes.next() {
            None => return Err(KeyError::MalformedString),
            Some(b'"') => break,
            Some(b'\\') => match bytes.next() {
                Some(&c @ (b'"' | b'\\')) => out.push(char::from(c)),
                _ => return Err(KeyError::MalformedString),
            },
            Some(&c) => out.push(char::from(c)),
        }
    }
    if bytes.next().is_some() {
        return Err(KeyError::MalformedString);
    }
    Ok(out)
}

/// The quoted form read as an RFC 9651 item by `sfv`: a string with no
/// parameters.
#[cfg(feature = "sfv")]
fn unquote(raw: &[u8]) -> Result<String, KeyError> {
    let item: sfv::Item = sfv::Parser::new(raw)
        .parse()
        .map_err(|_| KeyError::MalformedString)?;
    match item.bare_item {
        sfv::BareItem::String(key) if item.params.is_empty() => Ok(key.into()),
        _ => Err(KeyError::MalformedString),
    }
}

/// Where a stored record lives: a SHA-256 digest of the scope and the key.
///
/// Neither the scope nor the key is kept in clear, and the same key in two
/// scopes gives two unrelated record keys. Alongside the digest it carries
/// a tag of its scope that never leaves this process (a hash seeded per
/// process), by which the memory store bounds what one scope may hold.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    digest: [u8; 32],
    scope: u64,
}

impl RecordKey {
    /// Derives the record key for `key` within `scope`.
    pub fn new(scope: &[u8], key: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(RECORD_DOMAIN);
        hasher.update((scope.len() as u64).to_be_bytes());
        hasher.update(scope);
        hasher.update(key.as_bytes());
        Self {
            digest: hasher.finalize().into(),
            scope: scope_tag(scope),
        }
    }

    /// Derives the record key for `key` within `scope`, the scope first
    /// hashed with `secret` (HMAC-SHA256): without the secret, a record key
    /// read from a shared store cannot be used to test guesses of the
    /// credentials that make up a scope.
    pub fn with_secret(secret: &ScopeSecret, scope: &[u8], key: &str) -> Self {
        Self::new(&secret.digest(scope), key)
    }

    /// Wraps a digest read back from a store (in the anonymous scope's tag).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            digest: bytes,
            scope: 0,
        }
    }

    /// The digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The digest in lowercase hexadecimal, as remote stores name records.
    pub fn to_hex(&self) -> String {
        hex(&self.digest)
    }

    /// The process-local tag of the key's scope: equal for two keys of one
    /// scope in this process, 0 for the anonymous scope.
    pub const fn scope_tag(&self) -> u64 {
        self.scope
    }
}

fn scope_tag(scope: &[u8]) -> u64 {
    static SEED: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    if scope.is_empty() {
        return 0;
    }
    std::hash::BuildHasher::hash_one(SEED.get_or_init(Default::default), scope).max(1)
}

/// The secret a scope is hashed with before it becomes part of a record
/// key (see [`IdempotencyLayer::with_scope_secret`](crate::IdempotencyLayer::with_scope_secret)).
/// Replicas that share a store must share the secret.
#[derive(Clone)]
pub struct ScopeSecret(Hmac<Sha256>);

impl ScopeSecret {
    /// A secret from its bytes (at least 32 random bytes are advised).
    pub fn new(secret: &[u8]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"))
    }

    fn digest(&self, scope: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(scope);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for ScopeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScopeSecret(..)")
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey({})", &self.to_hex()[..16])
    }
}

/// A SHA-256 digest over what makes two requests "the same request".
///
/// It covers the method, the path and query, the chosen request headers and
/// the body, each length-prefixed so no two different requests share an
/// encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Fingerprints a request whose body has been buffered.
    pub fn compute(parts: &request::Parts, headers: &[HeaderName], body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes();
        for field in [parts.method.as_str().as_bytes(), target] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        for name in headers {
            let values = parts.headers.get_all(name);
            hasher.update((values.iter().count() as u64).to_be_bytes());
            for value in values {
                hasher.update((value.len() as u64).to_be_bytes());
                hasher.update(value.as_bytes());
            }
        }
        hasher.update((body.len() as u64).to_be_bytes());
        hasher.update(body);
        Self(hasher.finalize().into())
    }

    /// Wraps a digest read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &hex(&self.0)[..16])
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends `bytes` in lowercase hexadecimal, a digest's worth at a time
/// through a buffer on the stack: pushing each digit as a `char` costs
/// several times as much.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0; 64];
    for chunk in bytes.chunks(digits.len() / 2) {
        for (pair, b) in digits.chunks_exact_mut(2).zip(chunk) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        if let Ok(text) = std::str::from_utf8(&digits[..chunk.len() * 2]) {
            out.push_str(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hex;

    #[test]
    fn hex_writes_two_lowercase_digits_a_byte_at_any_length() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        for length in [0, 1, 31, 32, 33, 64, 256] {
            assert_eq!(hex(&bytes[..length]), expected[..2 * length]);
        }
    }
}
