//! The fence: a holder marks its effect committed, a lost holder is
//! stopped, and a fenced key is recovered, never run afresh.

use super::{
    acquire, assert_completing_again_keeps, assert_one_took, begin, fingerprint, fresh_key, race,
    sample_response, LEASE, SHORT, TTL,
};
use crate::store::{BeginOutcome, Completion, Store, StoreError};

/// The holder fences once; a second fence says the effect is committed.
pub async fn holder_fences_once(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    store
        .fence(&key, token, TTL)
        .await
        .expect("the holder fences");
    assert!(matches!(
        store.fence(&key, token, TTL).await,
        Err(StoreError::EffectCommitted)
    ));
}

/// A holder whose lease was taken over cannot fence: its effect must not
/// happen.
pub async fn taken_over_holder_cannot_fence(store: &impl Store) {
    let key = fresh_key();
    let old = acquire(store, &key, 1, SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    acquire(store, &key, 1, LEASE).await;
    assert!(matches!(
        store.fence(&key, old, TTL).await,
        Err(StoreError::LockLost)
    ));
}

/// A holder whose lease ran out cannot fence, even before anyone took the
/// key over: it could be taken over while its effect runs.
pub async fn holder_past_its_lease_cannot_fence(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    assert!(matches!(
        store.fence(&key, token, TTL).await,
        Err(StoreError::LockLost)
    ));
}

/// A fenced key whose lease is live is in flight to its duplicates.
pub async fn fenced_key_is_in_flight_while_its_lease_lasts(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    store.fence(&key, token, TTL).await.expect("fence");
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::InFlight
    ));
    assert!(matches!(
        begin(store, &key, 2).await,
        BeginOutcome::Mismatch
    ));
}

/// A fenced key outlives its lease, and the next request recovers it: a
/// new token, the effect still marked, and the old holder fenced out.
pub async fn fenced_key_is_recovered_after_its_lease(store: &impl Store) {
    let key = fresh_key();
    let old = acquire(store, &key, 1, SHORT).await;
    store.fence(&key, old, TTL).await.expect("fence");
    tokio::time::sleep(SHORT * 2).await;
    assert!(matches!(
        begin(store, &key, 2).await,
        BeginOutcome::Mismatch
    ));
    let token = match store.begin(&key, &fingerprint(1), LEASE).await {
        Ok(BeginOutcome::Recover(token)) => token,
        other => panic!("expected Recover after the lease, got {other:?}"),
    };
    assert_ne!(token, old);
    assert!(matches!(
        store.fence(&key, token, TTL).await,
        Err(StoreError::EffectCommitted)
    ));
    assert!(matches!(
        store.renew(&key, old, LEASE).await,
        Err(StoreError::LockLost)
    ));
    let response = sample_response().encode();
    store
        .complete(
            &key,
            &fingerprint(1),
            token,
            Completion::Response(response.clone()),
            TTL,
        )
        .await
        .expect("the recovering holder completes");
    match begin(store, &key, 1).await {
        BeginOutcome::Completed(stored) => assert_eq!(stored, response),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// Releasing a fenced key does not free it: its lease ends, and the next
/// request recovers it at once.
pub async fn released_fenced_key_is_recovered_not_run_again(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    store.fence(&key, token, TTL).await.expect("fence");
    store.release(&key, token).await.expect("release");
    assert!(matches!(
        store.begin(&key, &fingerprint(1), LEASE).await,
        Ok(BeginOutcome::Recover(_))
    ));
}

/// A recovering holder's lease is renewed like any other, and lapses like
/// any other.
pub async fn recovering_holder_renews_its_lease(store: &impl Store) {
    let key = fresh_key();
    let first = acquire(store, &key, 1, LEASE).await;
    store.fence(&key, first, TTL).await.expect("fence");
    store.release(&key, first).await.expect("release");
    let Ok(BeginOutcome::Recover(token)) = store.begin(&key, &fingerprint(1), SHORT).await else {
        panic!("expected Recover");
    };
    for _ in 0..3 {
        tokio::time::sleep(SHORT / 2).await;
        store.renew(&key, token, SHORT).await.expect("renew");
    }
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::InFlight
    ));
    tokio::time::sleep(SHORT * 2).await;
    assert!(matches!(
        store.begin(&key, &fingerprint(1), LEASE).await,
        Ok(BeginOutcome::Recover(_))
    ));
}

/// Many tasks racing to recover a fenced key whose lease ran out: exactly
/// one recovers it.
pub async fn concurrent_recoveries_of_a_fenced_key_recover_exactly_once<S: Store + Clone>(
    store: &S,
) {
    let key = fresh_key();
    let holder = acquire(store, &key, 1, SHORT).await;
    store.fence(&key, holder, TTL).await.expect("fence");
    tokio::time::sleep(SHORT * 2).await;
    assert_one_took(&race(store, key).await, true);
}

/// A fenced holder's response is stored exactly as given, whatever its
/// size: shorter or longer than anything the fence itself wrote.
pub async fn fenced_holder_stores_responses_of_any_size(store: &impl Store) {
    for size in [0, 1, 12, 13, 14, 4096] {
        let key = fresh_key();
        let token = acquire(store, &key, 1, LEASE).await;
        store.fence(&key, token, TTL).await.expect("fence");
        let record = bytes::Bytes::from(vec![b'r'; size]);
        store
            .complete(
                &key,
                &fingerprint(1),
                token,
                Completion::Response(record.clone()),
                TTL,
            )
            .await
            .expect("the fenced holder completes");
        match begin(store, &key, 1).await {
            BeginOutcome::Completed(stored) => assert_eq!(stored, record, "{size} bytes"),
            other => panic!("expected Completed for {size} bytes, got {other:?}"),
        }
    }
}

/// A fenced holder may still record its response as not replayable.
pub async fn fenced_holder_records_not_replayable(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    store.fence(&key, token, TTL).await.expect("fence");
    store
        .complete(&key, &fingerprint(1), token, Completion::NotReplayable, TTL)
        .await
        .expect("the fenced holder completes");
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::NotReplayable
    ));
}

/// A fenced holder that completes again leaves the record as it first
/// stored it.
pub async fn fenced_holder_completing_again_keeps_the_first_record(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    store.fence(&key, token, TTL).await.expect("fence");
    let first = sample_response().encode();
    store
        .complete(
            &key,
            &fingerprint(1),
            token,
            Completion::Response(first.clone()),
            TTL,
        )
        .await
        .expect("the fenced holder completes");
    assert_completing_again_keeps(store, &key, token, first).await;
}
