//! How a Redis store lays out a record in its key's one string value. The
//! store reads it and its scripts rewrite it, at the same offsets:
//!
//! | bytes | what |
//! |---|---|
//! | 0 | state: `i` in flight, `c` completed, `n` not replayable |
//! | 1 | `1` once the effect is fenced, else `0` |
//! | 2..34 | the request's fingerprint |
//! | 34..50 | the holder's lock token (kept on completion: a retried `complete` finds its own) |
//! | 50.. | completed: the encoded response; fenced and in flight: the lease's end, server time in ms, in decimal |
//!
//! A string rather than a hash lets `begin` be Redis's own `SET … NX GET`,
//! which costs Redis what a `GET` does, instead of a script.
//!
//! `complete` writes the record whole, with a native `SET … IFEQ <lock>`
//! where the server has it (Valkey 8.1, Redis 8.4). Elsewhere, on one
//! server, it stages the record under a key of its own with a native
//! `SET`, and its script renames that key onto the record's: the response
//! never becomes a Lua string, which Redis would hash byte by byte.

use std::io::Write;

use bytes::Bytes;
use redis::{RedisWrite, ToRedisArgs};

use crate::{
    key::Fingerprint,
    store::{DecodeError, LockToken, StoreError},
};

/// Where the tail (the response, or a fenced lease's end) starts.
const HEADER: usize = 50;

/// The value that takes a free key: in flight, not fenced.
pub(super) fn lock(fingerprint: &Fingerprint, token: LockToken) -> [u8; HEADER] {
    let mut value = [0; HEADER];
    value[0] = b'i';
    value[1] = b'0';
    value[2..34].copy_from_slice(fingerprint.as_bytes());
    value[34..].copy_from_slice(&token.as_u128().to_be_bytes());
    value
}

/// A record as `complete` writes it, whole: its head (state, not fenced,
/// the fingerprint, the holder's token), then the response.
pub(super) struct Record<'a> {
    pub(super) head: [u8; HEADER],
    pub(super) response: &'a [u8],
}

impl<'a> Record<'a> {
    pub(super) fn new(
        state: u8,
        fingerprint: &Fingerprint,
        token: LockToken,
        response: &'a [u8],
    ) -> Self {
        let mut head = lock(fingerprint, token);
        head[0] = state;
        Self { head, response }
    }

    /// The lock this record replaces: its head, in flight and not fenced.
    pub(super) fn lock(&self) -> [u8; HEADER] {
        let mut lock = self.head;
        lock[0] = b'i';
        lock[1] = b'0';
        lock
    }

    /// Whether `value` is this record's token's lock, fenced or not.
    pub(super) fn held_in(&self, value: &[u8]) -> bool {
        value.len() >= HEADER && value[0] == b'i' && value[34..HEADER] == self.head[34..]
    }

    /// Whether `value`, a record's old value, is this record already: a
    /// retry of the very `complete` that wrote it.
    pub(super) fn written_in(&self, value: &[u8]) -> bool {
        value.len() >= HEADER && value[0] == self.head[0] && value[34..HEADER] == self.head[34..]
    }
}

impl ToRedisArgs for Record<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        // Into the command's own buffer, which cannot fail.
        let _ = arg
            .write_all(&self.head)
            .and_then(|()| arg.write_all(self.response));
    }
}

/// Whether `name` has a hash tag: a part between its first `{` and the
/// next `}` that is not empty, which alone then decides its cluster slot.
fn has_hash_tag(name: &str) -> bool {
    name.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .is_some_and(|(tag, _)| !tag.is_empty())
}

/// The key `complete` stages `token`'s record under, for the record's key
/// `name` under `prefix`: it opens with the prefix and shares the record's
/// hash slot (the record's key is the staged key's hash tag unless the
/// prefix has a tag of its own, or braces without one).
pub(super) fn staged_name(prefix: &str, name: &str, token: LockToken) -> String {
    let token = token.as_u128();
    if has_hash_tag(prefix) {
        format!("{name}:staged:{token:032x}")
    } else {
        format!("{prefix}{{{name}}}:staged:{token:032x}")
    }
}

/// A token as the scripts compare it.
pub(super) fn token_bytes(token: LockToken) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

/// What a `begin` found under its key.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// Another request's fingerprint.
    Mismatch,
    /// In flight under `token` itself: a retry of the very call that took it.
    Ours {
        fenced: bool,
    },
    /// In flight under another holder, whose lease is the key's expiry.
    InFlight,
    /// In flight and fenced: only a script that reads the server's clock
    /// can tell whether its lease has run out.
    Fenced,
    NotReplayable,
    Completed(Bytes),
}

/// Reads a value `begin` found, for a request with `fingerprint` that
/// tried to take the key with `token`.
pub(super) fn found(
    value: Vec<u8>,
    fingerprint: &Fingerprint,
    token: LockToken,
) -> Result<Found, StoreError> {
    if value.len() < HEADER {
        return Err(malformed());
    }
    if value[2..34] != fingerprint.as_bytes()[..] {
        return Ok(Found::Mismatch);
    }
    Ok(match value[0] {
        b'i' if value[34..HEADER] == token_bytes(token) => Found::Ours {
            fenced: value[1] == b'1',
        },
        b'i' if value[1] == b'1' => Found::Fenced,
        b'i' => Found::InFlight,
        b'n' => Found::NotReplayable,
        b'c' => Found::Completed(Bytes::from(value).slice(HEADER..)),
        _ => return Err(malformed()),
    })
}

/// Whether `value` is in flight under `token`.
pub(super) fn held_by(value: &[u8], token: LockToken) -> bool {
    value.len() >= HEADER && value[0] == b'i' && value[34..HEADER] == token_bytes(token)
}

/// A value this store did not write. The key has been seen, so this is a
/// decode error, which the layer never fails open on.
fn malformed() -> StoreError {
    StoreError::Decode(DecodeError("a Redis record this store did not write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(byte: u8) -> Fingerprint {
        Fingerprint::from_bytes([byte; 32])
    }

    fn completed(fp: &Fingerprint, token: LockToken, response: &[u8]) -> Vec<u8> {
        let mut value = lock(fp, token).to_vec();
        value[0] = b'c';
        value.extend_from_slice(response);
        value
    }

    #[test]
    fn a_completed_value_yields_the_response_after_the_header() {
        let (fp, token) = (fingerprint(7), LockToken::from_u128(1));
        let value = completed(&fp, token, b"response");
        let found = found(value, &fp, LockToken::from_u128(2)).unwrap();
        assert_eq!(found, Found::Completed(Bytes::from_static(b"response")));
    }

    #[test]
    fn another_fingerprint_is_a_mismatch_in_any_state() {
        let token = LockToken::from_u128(1);
        let value = completed(&fingerprint(7), token, b"response");
        assert_eq!(
            found(value, &fingerprint(8), token).unwrap(),
            Found::Mismatch
        );
    }

    #[test]
    fn the_lock_tells_its_own_token_from_another_holder() {
        let (fp, token) = (fingerprint(7), LockToken::from_u128(1));
        let value = lock(&fp, token).to_vec();
        assert_eq!(
            found(value.clone(), &fp, token).unwrap(),
            Found::Ours { fenced: false }
        );
        assert_eq!(
            found(value, &fp, LockToken::from_u128(2)).unwrap(),
            Found::InFlight
        );
    }

    #[test]
    fn a_fenced_lock_of_another_holder_needs_the_server_clock() {
        let fp = fingerprint(7);
        let mut value = lock(&fp, LockToken::from_u128(1)).to_vec();
        value[1] = b'1';
        value.extend_from_slice(b"1700000000000");
        let found = found(value, &fp, LockToken::from_u128(2)).unwrap();
        assert_eq!(found, Found::Fenced);
    }

    #[test]
    fn a_record_is_its_lock_under_another_state_then_the_response() {
        let (fp, token) = (fingerprint(7), LockToken::from_u128(1));
        let record = Record::new(b'c', &fp, token, b"response");
        assert_eq!(record.head[..], completed(&fp, token, b"")[..]);
        assert_eq!(record.response, b"response");
    }

    #[test]
    fn a_record_knows_itself_written_by_its_token_and_state_only() {
        let (fp, token) = (fingerprint(7), LockToken::from_u128(1));
        let record = Record::new(b'c', &fp, token, b"response");
        assert!(record.written_in(&completed(&fp, token, b"response")));
        assert!(!record.written_in(&completed(&fp, LockToken::from_u128(2), b"response")));
        assert!(!record.written_in(&lock(&fp, token)));
        assert!(!Record::new(b'n', &fp, token, b"").written_in(&completed(&fp, token, b"")));
    }

    #[test]
    fn a_record_replaces_its_tokens_unfenced_lock() {
        let (fp, token) = (fingerprint(7), LockToken::from_u128(1));
        let record = Record::new(b'n', &fp, token, b"");
        assert_eq!(record.lock(), lock(&fp, token));
    }

    #[test]
    fn a_record_finds_its_tokens_lock_held_fenced_or_not() {
        let (fp, token) = (fingerprint(7), LockToken::from_u128(1));
        let record = Record::new(b'c', &fp, token, b"response");
        let mut fenced = lock(&fp, token).to_vec();
        fenced[1] = b'1';
        fenced.extend_from_slice(b"1700000000000");
        assert!(record.held_in(&lock(&fp, token)));
        assert!(record.held_in(&fenced));
        assert!(!record.held_in(&lock(&fp, LockToken::from_u128(2))));
        assert!(!record.held_in(&completed(&fp, token, b"response")));
        assert!(!record.held_in(b"i0"));
    }

    #[test]
    fn a_staged_record_opens_with_the_prefix_on_the_slot_of_its_record() {
        use redis::cluster_routing::Slot;
        let token = LockToken::from_u128(9);
        for prefix in ["idempotency:", "{tenant}:", "x{tag}y{z}:", ""] {
            let name = format!("{prefix}0f3a");
            let staged = staged_name(prefix, &name, token);
            assert!(staged.starts_with(prefix), "{staged}");
            assert_ne!(staged, name);
            assert_eq!(
                Slot::for_key(&staged),
                Slot::for_key(&name),
                "{name} staged as {staged}"
            );
        }
    }

    #[test]
    fn staged_records_of_two_holders_are_apart() {
        let (prefix, name) = ("idempotency:", "idempotency:0f3a");
        assert_ne!(
            staged_name(prefix, name, LockToken::from_u128(1)),
            staged_name(prefix, name, LockToken::from_u128(2))
        );
    }

    #[test]
    fn a_hash_tag_is_a_non_empty_part_between_braces() {
        assert!(has_hash_tag("{t}x"));
        assert!(has_hash_tag("a{t}"));
        assert!(!has_hash_tag("{}t"));
        assert!(!has_hash_tag("a{t"));
        assert!(!has_hash_tag("a}t{"));
    }

    #[test]
    fn a_value_shorter_than_the_header_is_a_decode_error() {
        let token = LockToken::from_u128(1);
        let err = found(b"c0".to_vec(), &fingerprint(7), token).unwrap_err();
        assert!(matches!(err, StoreError::Decode(_)), "{err:?}");
        assert!(!held_by(b"i0", token));
    }
}
