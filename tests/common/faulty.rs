//! A memory store with faults a test switches on: slow or failing
//! completions, and a renewal that never returns.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use tower_idempotency::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, LockToken, MemoryStore, StoreError},
    Store,
};

#[derive(Debug, Default)]
pub struct Faulty {
    pub store: MemoryStore,
    /// How long each `complete` takes before it reaches the store.
    pub complete_delay: Duration,
    /// How many `complete` calls fail, as a timed-out backend would,
    /// before the next ones go through.
    pub failing_completions: AtomicUsize,
    /// How many `complete` calls reach the store and then fail, as one
    /// whose answer was lost would, after those that fail outright.
    pub landing_completions: AtomicUsize,
    /// How many `release` calls fail, as a timed-out backend would,
    /// before the next ones go through.
    pub failing_releases: AtomicUsize,
    /// Whether `renew` of the first key asked for never returns.
    pub hang_first_renewal: bool,
    /// How long each `renew` takes before it reaches the store.
    pub renew_delay: Duration,
    /// Whether the first `renew` of each key fails, as a timed-out backend
    /// would.
    pub fail_first_renewals: bool,
    /// The keys renewed so far.
    pub renewed: Mutex<std::collections::HashSet<RecordKey>>,
    /// The key whose renewal hangs, once one was asked for.
    pub hung: Mutex<Option<RecordKey>>,
    /// Told when a `complete` starts, and when it has finished.
    pub completing: tokio::sync::Notify,
    pub completed: tokio::sync::Notify,
}

#[async_trait]
impl Store for Faulty {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.store.begin(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        token: LockToken,
        completion: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.completing.notify_one();
        // Only a delay needs a runtime's timer.
        if !self.complete_delay.is_zero() {
            tokio::time::sleep(self.complete_delay).await;
        }
        let failing = self
            .failing_completions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let completed = if failing {
            Err(StoreError::backend("response timed out"))
        } else {
            let completed = self
                .store
                .complete(key, fingerprint, token, completion, ttl)
                .await;
            let landing = self
                .landing_completions
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if landing {
                Err(StoreError::backend("connection closed before the answer"))
            } else {
                completed
            }
        };
        self.completed.notify_one();
        completed
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let failing = self
            .failing_releases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(StoreError::backend("response timed out"));
        }
        self.store.release(key, token).await
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.fence(key, token, ttl).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let hangs = self.hang_first_renewal && {
            let mut hung = self.hung.lock().unwrap();
            *hung.get_or_insert(*key) == *key
        };
        if hangs {
            std::future::pending::<()>().await;
        }
        if !self.renew_delay.is_zero() {
            tokio::time::sleep(self.renew_delay).await;
        }
        let first = self.renewed.lock().unwrap().insert(*key);
        if first && self.fail_first_renewals {
            return Err(StoreError::backend("response timed out"));
        }
        self.store.renew(key, token, lease).await
    }
}
