//! A first use and a replay of a store, as the layer makes them, for the
//! benches that compare stores with their raw clients.

use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion},
    Store,
};

pub const FP: Fingerprint = Fingerprint::from_bytes([1; 32]);
pub const LEASE: Duration = Duration::from_secs(60);
pub const TTL: Duration = Duration::from_secs(600);

/// `begin` on a fresh key, then `complete` with the encoded response.
pub async fn first_use(store: &(impl Store + ?Sized), key: &RecordKey, record: Bytes) {
    let Ok(BeginOutcome::Acquired(token)) = store.begin(key, &FP, LEASE).await else {
        panic!("a fresh key must be acquired")
    };
    store
        .complete(key, &FP, token, Completion::Response(record), TTL)
        .await
        .expect("complete");
}

/// One `begin` on a completed key.
pub async fn replay(store: &(impl Store + ?Sized), key: &RecordKey) {
    assert!(matches!(
        store.begin(key, &FP, LEASE).await,
        Ok(BeginOutcome::Completed(_))
    ));
}

/// Completes the key that replays read, unless an earlier run left it
/// completed.
pub async fn store_hot(store: &(impl Store + ?Sized), hot: &RecordKey, record: &Bytes) {
    if let Ok(BeginOutcome::Acquired(token)) = store.begin(hot, &FP, LEASE).await {
        store
            .complete(hot, &FP, token, Completion::Response(record.clone()), TTL)
            .await
            .expect("complete");
    }
}
