//! The storage abstraction behind the layer, and the stores that ship with it.
//!
//! A record moves through these states, addressed by its [`RecordKey`]:
//!
//! ```text
//! (absent) --begin--> InFlight { fingerprint, token, lease }
//! InFlight --fence(token, ttl)--> InFlight { effect committed, kept for ttl }
//! InFlight --complete(token, Response)------> Completed { response, ttl }
//! InFlight --complete(token, NotReplayable)-> NotReplayable { ttl }
//! InFlight --release(token)--> (absent)
//! InFlight { effect committed } --release(token)--> its lease ends now
//! InFlight --lease runs out, begin--> InFlight { new token }
//! InFlight { effect committed } --lease runs out, begin, same fingerprint-->
//!     Recover { new token, effect still committed }
//! Completed / NotReplayable --ttl runs out--> (absent)
//! Completed / NotReplayable --complete(same token)--> unchanged
//! ```
//!
//! A fenced record (its effect committed) is never forgotten before its
//! TTL: neither its lease running out nor a release deletes it, so the next
//! request recovers what was committed instead of repeating it.
//!
//! Each method is one atomic step, so that a remote store can do it in one
//! round trip. `complete`, `release` and `renew` carry the [`LockToken`] that
//! `begin` handed out and must fail with [`StoreError::LockLost`] once that
//! token is no longer the current one: a holder whose lease ran out and was
//! taken over can never overwrite the new holder's work.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    key::{Fingerprint, RecordKey},
    BoxError,
};

mod memory;
mod record;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

pub use memory::{MemoryLimits, MemoryStore, MemoryStoreBuilder};
pub(crate) use record::encode_chunks;
pub use record::{encode_parts, DecodeError, StoredResponse};

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisStore;

/// The longest a shipped store keeps a lease or a record: ten years. A
/// longer duration (the layer never asks for one) is shortened to it, so
/// that no expiry overflows a clock, Redis's `PEXPIRE` or a PostgreSQL
/// interval.
pub const MAX_EXPIRY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// `duration` in whole milliseconds, at least 1 and at most [`MAX_EXPIRY`].
pub(crate) fn expiry_millis(duration: Duration) -> u64 {
    duration.min(MAX_EXPIRY).as_millis().max(1) as u64
}

/// What [`Store::begin`] found for a key.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BeginOutcome {
    /// The key was free (or its lease had run out): the caller now holds the
    /// lock and must `complete` or `release` it with this token.
    Acquired(LockToken),
    /// The key's lease ran out after its holder fenced it (committed, or
    /// was about to commit, its effect): the caller now holds the lock with
    /// this token, and must render what was committed rather than repeat
    /// it. The record stays fenced.
    Recover(LockToken),
    /// Another request with the same fingerprint holds the lock.
    InFlight,
    /// The request completed before; here is its response, exactly the
    /// bytes [`Completion::Response`] handed to [`Store::complete`]. The
    /// layer decodes them, so a store never has to.
    Completed(Bytes),
    /// The request completed before, but its response was not kept (it was
    /// larger than the capture limit or the store's room).
    NotReplayable,
    /// The key is held or completed with a different fingerprint.
    Mismatch,
}

/// What [`Store::complete`] records for a key.
///
/// Every store matches on it, so it is exhaustive: a new variant would be a
/// breaking change, never a silent gap in a store's `match`.
#[derive(Debug, Clone)]
pub enum Completion {
    /// The response to replay, encoded as [`StoredResponse::encode`] and
    /// [`encode_parts`] write it: keep the bytes as they are and hand them
    /// back in [`BeginOutcome::Completed`]. Both directions carry the same
    /// opaque bytes, so a store keeps a response without decoding it.
    Response(Bytes),
    /// The request ran, but its response cannot be replayed.
    NotReplayable,
}

/// A fencing token: proof of holding the lock on one record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken(u128);

impl LockToken {
    /// A fresh token, unique with overwhelming probability across processes:
    /// 64 random bits drawn once per process, then a 64-bit counter.
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::{
            atomic::{AtomicU64, Ordering},
            OnceLock,
        };
        static PROCESS: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // `RandomState` is seeded from the OS: enough to tell processes apart.
        let process = *PROCESS.get_or_init(|| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            hasher.finish()
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self((u128::from(process) << 64) | u128::from(n))
    }

    /// Rebuilds a token read back from a store.
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The token as a number.
    pub const fn as_u128(&self) -> u128 {
        self.0
    }
}

impl fmt::Debug for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockToken({:032x})", self.0)
    }
}

impl fmt::Display for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The token is no longer the current one for this key: the lease ran
    /// out and another request took the key over, or the record is gone.
    #[error("the lock is no longer held by this token")]
    LockLost,
    /// The store is at its capacity and refuses new keys.
    #[error("the store is full")]
    Full,
    /// The key's scope holds as many records as one scope may; other
    /// scopes are still served.
    #[error("the store holds as many records for this scope as it allows")]
    ScopeFull,
    /// The record's effect was already committed (fenced), by this token or
    /// an earlier holder: render what was committed, do not repeat it.
    #[error("the effect for this key was already committed")]
    EffectCommitted,
    /// The store took the write, but not as durably as it was asked to
    /// (fewer replicas acknowledged it in time). The store has seen the
    /// key, so this is never failed open.
    #[error("the store did not make the write durable in time: {0}")]
    NotDurable(String),
    /// A stored record could not be read back.
    #[error("a stored record could not be decoded: {0}")]
    Decode(#[from] DecodeError),
    /// The backend failed (unreachable, timed out, refused the command).
    #[error("store backend error: {0}")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// Wraps a backend's own error.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(err.into())
    }
}

/// Where the layer keeps locks and completed responses.
///
/// Implement it for your own backend; run the conformance suite (feature
/// `conformance`, [`store_conformance_tests!`](crate::store_conformance_tests))
/// against it. Every method must be a single atomic step: two requests racing
/// on one key must never both see [`BeginOutcome::Acquired`] while a lease is live.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Looks the key up and, if it is free or its lease has run out, locks
    /// it for `lease` with a new token, in one atomic step.
    ///
    /// A key held or completed with another fingerprint answers
    /// [`BeginOutcome::Mismatch`].
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError>;

    /// Records the outcome for a key this token holds, kept for `ttl`.
    ///
    /// `fingerprint` is the one [`begin`](Self::begin) took the key with,
    /// so a store can write the record whole, without reading the lock
    /// for it first. A store may trust it without checking it against the
    /// lock.
    ///
    /// The layer calls it again, with the same token and outcome, after a
    /// [`StoreError::Backend`] error, since an attempt that failed may have
    /// landed. A store that finds its token's own record then leaves it as
    /// it is, and may answer `Ok` (the Redis and PostgreSQL stores do) or
    /// [`StoreError::LockLost`], which the layer logs as a warning. (The
    /// memory store never fails, and is never asked again.)
    async fn complete(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Frees a key this token holds, so the next request runs again. A
    /// fenced key is not freed: its lease ends now, so the next request
    /// recovers it at once.
    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError>;

    /// Checks, in one atomic step, that `token` still holds `key` and that
    /// no effect was committed for it yet, and marks the effect committed;
    /// the record is then kept for at least `ttl`, whatever becomes of the
    /// lease. A handler calls it just before an effect outside the store.
    ///
    /// Fails with [`StoreError::LockLost`] if the token no longer holds the
    /// key (its lease ran out and another request took it over), and with
    /// [`StoreError::EffectCommitted`] if the record was fenced already.
    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Extends the lease of a key this token holds to `lease` from now.
    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError>;
}

#[async_trait]
impl<T: Store + ?Sized> Store for Arc<T> {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        (**self).begin(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        (**self)
            .complete(key, fingerprint, token, outcome, ttl)
            .await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        (**self).release(key, token).await
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        (**self).fence(key, token, ttl).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        (**self).renew(key, token, lease).await
    }
}
