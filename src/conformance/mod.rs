//! The behaviour every [`Store`] must have, as checks a store author runs.
//!
//! [`store_conformance_tests!`](crate::store_conformance_tests) turns each
//! check into a `#[tokio::test]` for your store; the crate runs the same
//! checks against [`MemoryStore`](crate::store::MemoryStore), `RedisStore`
//! and `PostgresStore`. Each check uses fresh random keys, so one store may
//! serve them all, concurrently.
//!
//! ```no_run
//! // In tests/conformance.rs of a crate with its own store (here the memory
//! // store stands in for it); needs tokio with the `macros` and
//! // `rt-multi-thread` features as a dev-dependency.
//! tower_idempotency::store_conformance_tests!(async { tower_idempotency::MemoryStore::new() });
//! ```

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

mod fence;

pub use fence::*;

use crate::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, LockToken, Store, StoreError, StoredResponse},
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);
/// Short enough to wait out in a test, long enough for a remote round trip.
const SHORT: Duration = Duration::from_millis(400);

fn fresh_key() -> RecordKey {
    RecordKey::new(b"conformance", &LockToken::random().to_string())
}

fn fingerprint(tag: u8) -> Fingerprint {
    Fingerprint::from_bytes([tag; 32])
}

/// A response with everything a record can hold: repeated headers, a binary
/// body and trailers.
pub fn sample_response() -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    StoredResponse::new(
        StatusCode::CREATED,
        headers,
        Bytes::from(body),
        Some(trailers),
    )
}

async fn acquire(store: &impl Store, key: &RecordKey, fp: u8, lease: Duration) -> LockToken {
    match store.begin(key, &fingerprint(fp), lease).await {
        Ok(BeginOutcome::Acquired(token)) => token,
        other => panic!("expected Acquired on a free key, got {other:?}"),
    }
}

/// Completes `key` with the sample response, as the holder of `token`.
async fn complete_sample(store: &impl Store, key: &RecordKey, token: LockToken, ttl: Duration) {
    store
        .complete(
            key,
            &fingerprint(1),
            token,
            Completion::Response(sample_response().encode()),
            ttl,
        )
        .await
        .expect("complete by the holder");
}

async fn begin(store: &impl Store, key: &RecordKey, fp: u8) -> BeginOutcome {
    store
        .begin(key, &fingerprint(fp), LEASE)
        .await
        .expect("begin must succeed on a healthy store")
}

/// `token` does not hold `key`: completing, releasing and renewing with it
/// all fail with [`StoreError::LockLost`].
async fn assert_fenced(store: &impl Store, key: &RecordKey, token: LockToken) {
    let outcome = Completion::Response(sample_response().encode());
    assert!(matches!(
        store
            .complete(key, &fingerprint(1), token, outcome, TTL)
            .await,
        Err(StoreError::LockLost)
    ));
    assert!(matches!(
        store.release(key, token).await,
        Err(StoreError::LockLost)
    ));
    assert!(matches!(
        store.renew(key, token, LEASE).await,
        Err(StoreError::LockLost)
    ));
}

/// A free key is acquired.
pub async fn first_begin_acquires(store: &impl Store) {
    acquire(store, &fresh_key(), 1, LEASE).await;
}

/// A held key answers `InFlight` to the same fingerprint.
pub async fn held_key_is_in_flight(store: &impl Store) {
    let key = fresh_key();
    acquire(store, &key, 1, LEASE).await;
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::InFlight
    ));
}

/// A held key answers `Mismatch` to another fingerprint.
pub async fn held_key_with_other_fingerprint_is_mismatch(store: &impl Store) {
    let key = fresh_key();
    acquire(store, &key, 1, LEASE).await;
    assert!(matches!(
        begin(store, &key, 2).await,
        BeginOutcome::Mismatch
    ));
}

/// A completed key replays exactly what was stored.
pub async fn completed_key_replays_the_stored_response(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    complete_sample(store, &key, token, TTL).await;
    match begin(store, &key, 1).await {
        BeginOutcome::Completed(stored) => assert_eq!(stored, sample_response().encode()),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// A completed response with an empty body and no trailers round-trips.
pub async fn empty_response_round_trips(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    let empty = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new(), None);
    store
        .complete(
            &key,
            &fingerprint(1),
            token,
            Completion::Response(empty.encode()),
            TTL,
        )
        .await
        .expect("complete by the holder");
    match begin(store, &key, 1).await {
        BeginOutcome::Completed(stored) => assert_eq!(stored, empty.encode()),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// A completed key answers `Mismatch` to another fingerprint.
pub async fn completed_key_with_other_fingerprint_is_mismatch(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    complete_sample(store, &key, token, TTL).await;
    assert!(matches!(
        begin(store, &key, 2).await,
        BeginOutcome::Mismatch
    ));
}

/// A key completed as not replayable says so.
pub async fn not_replayable_outcome_is_reported(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    store
        .complete(&key, &fingerprint(1), token, Completion::NotReplayable, TTL)
        .await
        .expect("complete by the holder");
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::NotReplayable
    ));
}

/// A released key is free again, for any fingerprint.
pub async fn released_key_is_free_again(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    store
        .release(&key, token)
        .await
        .expect("release by the holder");
    acquire(store, &key, 2, LEASE).await;
}

/// A token that never held the key can neither complete, release nor renew.
pub async fn foreign_token_is_refused(store: &impl Store) {
    let key = fresh_key();
    acquire(store, &key, 1, LEASE).await;
    assert_fenced(store, &key, LockToken::random()).await;
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::InFlight
    ));
}

/// Once completed, the lock is gone: the old token cannot release it.
pub async fn completed_key_cannot_be_released(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    complete_sample(store, &key, token, TTL).await;
    assert!(matches!(
        store.release(&key, token).await,
        Err(StoreError::LockLost)
    ));
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::Completed(_)
    ));
}

/// `token` completes `key` again, as the layer does after an attempt that
/// failed but may have landed, with another record: the store answers `Ok`
/// or `LockLost`, and the key keeps the `first` record.
async fn assert_completing_again_keeps(
    store: &impl Store,
    key: &RecordKey,
    token: LockToken,
    first: Bytes,
) {
    let again = store
        .complete(
            key,
            &fingerprint(1),
            token,
            Completion::Response(Bytes::from_static(b"another record")),
            TTL,
        )
        .await;
    assert!(
        matches!(again, Ok(()) | Err(StoreError::LockLost)),
        "completing again answered {again:?}"
    );
    match begin(store, key, 1).await {
        BeginOutcome::Completed(stored) => assert_eq!(stored, first),
        other => panic!("expected Completed, got {other:?}"),
    }
}

/// A holder that completes again, as after an answer it never got, leaves
/// the record as it first stored it.
pub async fn completing_again_keeps_the_first_record(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    complete_sample(store, &key, token, TTL).await;
    assert_completing_again_keeps(store, &key, token, sample_response().encode()).await;
}

/// When a lease runs out, another request takes the key over, and the old
/// holder can no longer complete, release or renew it.
pub async fn expired_lease_is_taken_over_and_fences_the_old_holder(store: &impl Store) {
    let key = fresh_key();
    let old = acquire(store, &key, 1, SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    let new = acquire(store, &key, 1, LEASE).await;
    assert_ne!(old, new);
    assert_fenced(store, &key, old).await;
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::InFlight
    ));
    complete_sample(store, &key, new, TTL).await;
}

/// Renewing keeps a lease alive past its first expiry.
pub async fn renewed_lease_outlives_its_first_expiry(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, SHORT).await;
    for _ in 0..3 {
        tokio::time::sleep(SHORT / 2).await;
        store
            .renew(&key, token, SHORT)
            .await
            .expect("renew by the holder");
    }
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::InFlight
    ));
}

/// After its TTL, a completed key is free again.
pub async fn completed_key_expires_after_its_ttl(store: &impl Store) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    complete_sample(store, &key, token, SHORT).await;
    assert!(matches!(
        begin(store, &key, 1).await,
        BeginOutcome::Completed(_)
    ));
    tokio::time::sleep(SHORT * 2).await;
    acquire(store, &key, 2, LEASE).await;
}

/// Two keys never affect each other.
pub async fn keys_are_independent(store: &impl Store) {
    let (a, b) = (fresh_key(), fresh_key());
    let token = acquire(store, &a, 1, LEASE).await;
    acquire(store, &b, 1, LEASE).await;
    store
        .release(&a, token)
        .await
        .expect("release by the holder");
    assert!(matches!(begin(store, &b, 1).await, BeginOutcome::InFlight));
}

/// What 32 tasks racing to begin `key` with the same fingerprint got.
async fn race<S: Store + Clone>(store: &S, key: RecordKey) -> Vec<BeginOutcome> {
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.begin(&key, &fingerprint(1), LEASE).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("begin in a race"));
    }
    outcomes
}

/// Exactly one racer took the key (`Acquired`, or `Recover` if
/// `recovering`), and every other found it in flight.
fn assert_one_took(outcomes: &[BeginOutcome], recovering: bool) {
    let mut took = 0;
    for outcome in outcomes {
        match (outcome, recovering) {
            (BeginOutcome::Acquired(_), false) | (BeginOutcome::Recover(_), true) => took += 1,
            (BeginOutcome::InFlight, _) => {}
            (other, _) => panic!("unexpected answer in a race: {other:?}"),
        }
    }
    assert_eq!(took, 1, "racers that took the key");
}

/// Many tasks racing to begin one key: exactly one acquires.
pub async fn concurrent_begins_acquire_exactly_once<S: Store + Clone>(store: &S) {
    assert_one_took(&race(store, fresh_key()).await, false);
}

/// Many tasks racing to take over a key whose lease ran out: exactly one
/// takes it.
pub async fn concurrent_takeovers_of_a_lapsed_lease_acquire_exactly_once<S: Store + Clone>(
    store: &S,
) {
    let key = fresh_key();
    acquire(store, &key, 1, SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    assert_one_took(&race(store, key).await, false);
}

/// Many tasks racing on one key whose holder completes midway: each sees
/// the lock, the replay, or (once) the acquisition, never a torn record.
pub async fn concurrent_readers_see_whole_records<S: Store + Clone>(store: &S) {
    let key = fresh_key();
    let token = acquire(store, &key, 1, LEASE).await;
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..8 {
                    match store.begin(&key, &fingerprint(1), LEASE).await {
                        Ok(BeginOutcome::InFlight) => {}
                        Ok(BeginOutcome::Completed(stored)) => {
                            assert_eq!(stored, sample_response().encode())
                        }
                        other => panic!("unexpected answer: {other:?}"),
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    complete_sample(store, &key, token, TTL).await;
    for reader in readers {
        reader.await.expect("reader");
    }
}

/// The store works behind `Arc<dyn Store>`, as the layer holds it.
pub async fn works_as_a_trait_object<S: Store + Clone>(store: &S) {
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let key = fresh_key();
    let token = match shared.begin(&key, &fingerprint(1), LEASE).await {
        Ok(BeginOutcome::Acquired(token)) => token,
        other => panic!("expected Acquired, got {other:?}"),
    };
    shared
        .release(&key, token)
        .await
        .expect("release through the trait object");
}

/// Generates one `#[tokio::test]` per conformance check for the store that
/// `$make` (a future) produces. The store must be `Clone`.
///
/// ```no_run
/// tower_idempotency::store_conformance_tests!(async { tower_idempotency::MemoryStore::new() });
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(@each $make;
            first_begin_acquires,
            held_key_is_in_flight,
            held_key_with_other_fingerprint_is_mismatch,
            completed_key_replays_the_stored_response,
            empty_response_round_trips,
            completed_key_with_other_fingerprint_is_mismatch,
            not_replayable_outcome_is_reported,
            released_key_is_free_again,
            foreign_token_is_refused,
            completed_key_cannot_be_released,
            completing_again_keeps_the_first_record,
            expired_lease_is_taken_over_and_fences_the_old_holder,
            renewed_lease_outlives_its_first_expiry,
            completed_key_expires_after_its_ttl,
            keys_are_independent,
            concurrent_begins_acquire_exactly_once,
            concurrent_takeovers_of_a_lapsed_lease_acquire_exactly_once,
            concurrent_readers_see_whole_records,
            works_as_a_trait_object,
            holder_fences_once,
            taken_over_holder_cannot_fence,
            holder_past_its_lease_cannot_fence,
            fenced_key_is_in_flight_while_its_lease_lasts,
            fenced_key_is_recovered_after_its_lease,
            released_fenced_key_is_recovered_not_run_again,
            recovering_holder_renews_its_lease,
            concurrent_recoveries_of_a_fenced_key_recover_exactly_once,
            fenced_holder_stores_responses_of_any_size,
            fenced_holder_records_not_replayable,
            fenced_holder_completing_again_keeps_the_first_record
        );
    };
    (@each $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = $make.await;
                $crate::conformance::$check(&store).await;
            }
        )+
    };
}
