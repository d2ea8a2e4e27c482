//! The lock on a key this request holds.

use std::{future::Future, sync::Arc, task::Poll, time::Duration};

use tokio::time::Instant;

use super::{background::finish_in_background, shared::Shared};
use crate::{
    key::{Fingerprint, RecordKey},
    store::{Completion, LockToken, StoreError},
};

/// A held lock. Dropped without being settled (a cancelled request, a
/// panicking handler), it releases the key from a task.
pub(crate) struct LockGuard {
    pub(crate) shared: Arc<Shared>,
    key: RecordKey,
    /// What `begin` took the key with, which `complete` hands the store.
    fingerprint: Fingerprint,
    token: LockToken,
    acquired: Instant,
    /// Set once the lease keeper renews this lock.
    kept: Option<u64>,
    settled: bool,
}

impl LockGuard {
    pub(crate) fn new(
        shared: Arc<Shared>,
        key: RecordKey,
        fingerprint: Fingerprint,
        token: LockToken,
    ) -> Self {
        Self {
            shared,
            key,
            fingerprint,
            token,
            acquired: Instant::now(),
            kept: None,
            settled: false,
        }
    }

    /// Hands the lock to the lease keeper. Called when the work has to
    /// wait; a handler that answers at once never pays for it.
    pub(crate) fn keep_alive(&mut self) {
        if self.kept.is_none() {
            self.kept = Some(self.shared.leases.hold(self.key, self.token, self.acquired));
        }
    }

    /// Whether the key has been held for the longest holding time.
    pub(crate) fn held_too_long(&self) -> bool {
        self.acquired.elapsed() >= self.shared.config.max_hold
    }

    fn forget(&mut self) {
        if let Some(id) = self.kept.take() {
            self.shared.leases.forget(id);
        }
    }

    /// Frees the key, so that a retry runs the request again.
    pub(crate) async fn release(mut self) {
        self.forget();
        release(&self.shared, self.key, self.token).await;
        // Only now: dropped while the store answers, the guard releases
        // again from a task rather than leave the key locked.
        self.settled = true;
    }

    /// Stores what the request came to. The lease is renewed until the
    /// store has acknowledged: a slow completion must not be overtaken by
    /// a takeover of its own key.
    pub(crate) async fn complete(mut self, completion: Completion) {
        // Settled from the start: dropped halfway, a completion must never
        // turn into a release, since the handler has run.
        self.settled = true;
        let (shared, key, fingerprint) = (Arc::clone(&self.shared), self.key, self.fingerprint);
        let config = &shared.config;
        let mut write = std::pin::pin!(config.store.complete(
            &key,
            &fingerprint,
            self.token,
            completion.clone(),
            config.ttl
        ));
        // Most stores answer at once; only a completion that has to wait
        // pays for the lease keeper.
        let mut done = match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(done) => done,
            Poll::Pending => {
                self.keep_alive();
                write.await
            }
        };
        // A store that failed (a timeout, a dropped connection) is asked
        // again, the lease kept renewed meanwhile: a completion that never
        // lands leaves the key to be run again once its lease runs out.
        let mut retried = false;
        for backoff in STORE_RETRIES {
            match done {
                Err(StoreError::Backend(_)) => retried = true,
                _ => break,
            }
            self.keep_alive();
            // Outside a Tokio runtime there is no timer: the store is
            // asked again at once rather than not at all.
            if tokio::runtime::Handle::try_current().is_ok() {
                tokio::time::sleep(backoff).await;
            }
            done = config
                .store
                .complete(
                    &key,
                    &fingerprint,
                    self.token,
                    completion.clone(),
                    config.ttl,
                )
                .await;
        }
        self.forget();
        match done {
            Ok(()) => {}
            // An attempt that timed out may still have landed, on a store
            // that does not tell its own record from another's.
            Err(StoreError::LockLost) if retried => tracing::warn!(
                key = ?self.key,
                "a completion retried after a store error found the key no longer held: an earlier attempt landed, or the lease ran out meanwhile"
            ),
            Err(err) => tracing::error!(
                error = %err,
                key = ?self.key,
                "could not store a completed response; the key stays locked until its lease runs out"
            ),
        }
    }
}

/// The waits before each new attempt at a completion or a release the
/// store failed.
const STORE_RETRIES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(500),
];

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.forget();
        if self.settled {
            return;
        }
        let (shared, key, token) = (Arc::clone(&self.shared), self.key, self.token);
        if finish_in_background(async move { release(&shared, key, token).await }).is_err() {
            tracing::warn!(
                ?key,
                "no runtime to release a dropped lock; its lease bounds it"
            );
        }
    }
}

/// Asks the store again after a failure, as a completion does: a release
/// that never lands leaves the key answering 409 to the client's retry
/// until its lease runs out.
async fn release(shared: &Shared, key: RecordKey, token: LockToken) {
    let store = &shared.config.store;
    let mut done = store.release(&key, token).await;
    let mut retried = false;
    for backoff in STORE_RETRIES {
        if !matches!(done, Err(StoreError::Backend(_))) {
            break;
        }
        retried = true;
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::time::sleep(backoff).await;
        }
        done = store.release(&key, token).await;
    }
    match done {
        Ok(()) => {}
        // An attempt that failed may still have landed.
        Err(StoreError::LockLost) if retried => {
            tracing::debug!(
                ?key,
                "a release retried after a store error found the key gone"
            );
        }
        Err(err) => tracing::warn!(
            error = %err,
            ?key,
            "could not release an idempotency key; its lease bounds it"
        ),
    }
}
