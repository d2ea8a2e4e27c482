//! A store that reports how long each call to the store it wraps took.

use std::{
    fmt,
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
pub(crate) struct TimedStore {
    inner: Arc<dyn Store>,
}

/// The wrapped store, as the user gave it: logs and `Debug` output name
/// the user's store, not this wrapper.
impl fmt::Debug for TimedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl TimedStore {
    pub(crate) fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(Self { inner })
    }
}

/// One call's timing. A call dropped before it finished (a renewal past
/// its timeout, a `begin` whose client went away) is recorded when it is
/// dropped, as `cancelled`: those are the slow calls worth seeing.
struct Timing {
    operation: &'static str,
    started: Instant,
    result: &'static str,
}

impl Drop for Timing {
    fn drop(&mut self) {
        ::metrics::histogram!(
            STORE_CALL_DURATION,
            "operation" => self.operation,
            "result" => self.result,
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

async fn timed<T>(
    operation: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut timing = Timing {
        operation,
        started: Instant::now(),
        result: "cancelled",
    };
    let result = call.await;
    timing.result = if result.is_ok() { "ok" } else { "error" };
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
        fingerprint: &Fingerprint,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        timed(
            "complete",
            self.inner.complete(key, fingerprint, token, outcome, ttl),
        )
        .await
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
