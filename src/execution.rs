//! What a handler knows of the lock its request runs under.

use std::{fmt, sync::Arc, time::Duration};

use crate::{
    key::RecordKey,
    store::{LockToken, Store, StoreError},
};

/// The lock a keyed request runs under, in the request's extensions for
/// the inner service (`Extension<Execution>` in axum).
///
/// A handler whose effect lives outside the idempotency store (a payment
/// row, a call to a provider) fences it: it checks, in one step with the
/// store, that it still holds the key, and marks the effect committed. On
/// PostgreSQL the fence runs inside the handler's own transaction
/// (`PostgresStore::fence_in`), so the mark and the effect commit together;
/// on any store, [`fence`](Self::fence) runs just before the effect.
///
/// If the holder dies, stalls past its lease or cannot store its response
/// after fencing, the next request with the key is a *recovery*
/// ([`is_recovery`](Self::is_recovery)): the handler must render what was
/// committed (or re-issue a foreign call with the same downstream
/// idempotency key) instead of repeating the effect. A recovery that
/// fences again gets [`StoreError::EffectCommitted`], so a handler that
/// ignores recovery fails safe.
///
/// ```
/// use axum::{http::StatusCode, Extension};
/// use tower_idempotency::Execution;
///
/// async fn charge(Extension(execution): Extension<Execution>) -> StatusCode {
///     if execution.is_recovery() {
///         // Look the charge up by `execution.record_key()` and answer with it.
///         return StatusCode::OK;
///     }
///     match execution.fence().await {
///         Ok(()) => StatusCode::CREATED, // now perform the effect
///         Err(_) => StatusCode::CONFLICT, // lost the key, or already done
///     }
/// }
/// ```
#[derive(Clone)]
pub struct Execution {
    key: RecordKey,
    token: LockToken,
    recovery: bool,
    ttl: Duration,
    store: Arc<dyn Store>,
}

impl Execution {
    pub(crate) fn new(
        key: RecordKey,
        token: LockToken,
        recovery: bool,
        ttl: Duration,
        store: Arc<dyn Store>,
    ) -> Self {
        Self {
            key,
            token,
            recovery,
            ttl,
            store,
        }
    }

    /// Where the request's record lives: a stable name for its effect, to
    /// store next to it and find it again on recovery.
    pub fn record_key(&self) -> RecordKey {
        self.key
    }

    /// The fencing token of this run's lock.
    pub fn token(&self) -> LockToken {
        self.token
    }

    /// Whether an earlier holder of the key fenced it (committed, or was
    /// about to commit, its effect) and never stored a response.
    pub fn is_recovery(&self) -> bool {
        self.recovery
    }

    /// How long the record is kept once fenced: the layer's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Marks the effect committed if this run still holds the key and no
    /// effect was committed before: [`Store::fence`] on the layer's store.
    ///
    /// Call it just before an effect outside the store. It does not make
    /// that effect atomic with the mark, but a holder that lost its lease
    /// is stopped ([`StoreError::LockLost`]), and the next holder learns
    /// that an effect may have happened.
    pub async fn fence(&self) -> Result<(), StoreError> {
        self.store.fence(&self.key, self.token, self.ttl).await
    }
}

impl fmt::Debug for Execution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Execution")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("recovery", &self.recovery)
            .finish_non_exhaustive()
    }
}
