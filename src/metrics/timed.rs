//! A store that reports how long each call to the store it wraps took.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;

use super::STORE_CALL_DURATION;
use crate::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, LockToken, Store, StoreError},
};

/// Wraps the layer's store when the `metrics` feature is on, so that every
/// call the layer makes is timed in one place.
#[derive(Debug)]
pub(crate) struct TimedStore {
    inner: Arc<dyn Store>,
}

impl TimedStore {
    pub(crate) fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(Self { inner })
    }
}

async fn timed<T>(
    operation: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = call.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ::metrics::histogram!(STORE_CALL_DURATION, "operation" => operation, "result" => outcome)
        .record(started.elapsed().as_secs_f64());
    result
}

#[async_trait]
impl Store for TimedStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        timed("begin", self.inner.begin(key, fingerprint, lease)).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        timed("complete", self.inner.complete(key, token, outcome, ttl)).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        timed("release", self.inner.release(key, token)).await
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        timed("fence", self.inner.fence(key, token, ttl)).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        timed("renew", self.inner.renew(key, token, lease)).await
    }
}
