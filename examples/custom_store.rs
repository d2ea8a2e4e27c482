//! A store of your own: the `Store` trait over a `Mutex<HashMap>`, as the
//! README's guide writes it. `tests/conformance.rs` runs the conformance
//! suite against this very store, so the guide cannot drift from the trait.
//!
//! ```sh
//! cargo run --example custom_store
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;
use tower_idempotency::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, LockToken, Store, StoreError},
};

/// One record: the fingerprint it was taken with, what it holds, and when
/// it stops counting (the lease while in flight and unfenced, the TTL once
/// fenced or completed).
#[derive(Debug)]
struct Record {
    fingerprint: Fingerprint,
    state: State,
    expires_at: Instant,
}

#[derive(Debug)]
enum State {
    InFlight {
        token: LockToken,
        /// Set by `fence`: the effect is committed, so the record must
        /// outlive the lease and be recovered, never run afresh.
        fenced: bool,
        lease_until: Instant,
    },
    Completed(Bytes),
    NotReplayable,
}

/// Every method takes the one lock, so each is a single atomic step.
#[derive(Debug, Clone, Default)]
pub(crate) struct HashMapStore {
    records: Arc<Mutex<HashMap<RecordKey, Record>>>,
}

impl HashMapStore {
    /// Runs `step` on the record `token` holds, or fails with `LockLost`.
    fn with_held<T>(
        &self,
        key: &RecordKey,
        token: LockToken,
        step: impl FnOnce(&mut HashMap<RecordKey, Record>) -> T,
    ) -> Result<T, StoreError> {
        let mut records = self.records.lock().expect("not poisoned");
        match records.get(key).map(|r| &r.state) {
            Some(State::InFlight { token: held, .. }) if *held == token => Ok(step(&mut records)),
            _ => Err(StoreError::LockLost),
        }
    }
}

#[async_trait]
impl Store for HashMapStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let now = Instant::now();
        let mut records = self.records.lock().expect("not poisoned");
        if let Some(record) = records.get_mut(key).filter(|r| r.expires_at > now) {
            if record.fingerprint != *fingerprint {
                return Ok(BeginOutcome::Mismatch);
            }
            return Ok(match &mut record.state {
                State::InFlight {
                    token,
                    fenced: true,
                    lease_until,
                } if *lease_until <= now => {
                    // Its holder committed the effect and went away.
                    *token = LockToken::random();
                    *lease_until = now + lease;
                    record.expires_at = record.expires_at.max(*lease_until);
                    BeginOutcome::Recover(*token)
                }
                State::InFlight { .. } => BeginOutcome::InFlight,
                State::Completed(response) => BeginOutcome::Completed(response.clone()),
                State::NotReplayable => BeginOutcome::NotReplayable,
            });
        }
        // Free, or its lease or TTL ran out: take it. Now and then, forget
        // every record past its expiry, so the map does not grow for ever.
        if records.len() % 1024 == 1023 {
            records.retain(|_, record| record.expires_at > now);
        }
        let token = LockToken::random();
        records.insert(
            *key,
            Record {
                fingerprint: *fingerprint,
                state: State::InFlight {
                    token,
                    fenced: false,
                    lease_until: now + lease,
                },
                expires_at: now + lease,
            },
        );
        Ok(BeginOutcome::Acquired(token))
    }

    async fn complete(
        &self,
        key: &RecordKey,
        _: &Fingerprint,
        token: LockToken,
        completion: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.with_held(key, token, |records| {
            let record = records.get_mut(key).expect("held");
            record.state = match completion {
                Completion::Response(response) => State::Completed(response),
                Completion::NotReplayable => State::NotReplayable,
            };
            record.expires_at = Instant::now() + ttl;
        })
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.with_held(key, token, |records| {
            let record = records.get_mut(key).expect("held");
            match &mut record.state {
                // A fenced record stays; its lease ends now.
                State::InFlight {
                    fenced: true,
                    lease_until,
                    ..
                } => *lease_until = Instant::now(),
                _ => {
                    records.remove(key);
                }
            }
        })
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.with_held(key, token, |records| {
            let record = records.get_mut(key).expect("held");
            let State::InFlight {
                fenced,
                lease_until,
                ..
            } = &mut record.state
            else {
                unreachable!("held records are in flight");
            };
            if *fenced {
                return Err(StoreError::EffectCommitted);
            }
            // Its lease ran out: another request may take the key over now.
            if *lease_until <= Instant::now() {
                return Err(StoreError::LockLost);
            }
            *fenced = true;
            record.expires_at = record.expires_at.max(Instant::now() + ttl);
            Ok(())
        })?
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.with_held(key, token, |records| {
            let record = records.get_mut(key).expect("held");
            let until = Instant::now() + lease;
            if let State::InFlight {
                fenced,
                lease_until,
                ..
            } = &mut record.state
            {
                *lease_until = until;
                if !*fenced {
                    record.expires_at = until;
                }
            }
            record.expires_at = record.expires_at.max(until);
        })
    }
}

#[tokio::main]
async fn main() {
    use axum::{body::Body, routing::post, Router};
    use http::{Request, StatusCode};
    use tower::ServiceExt;
    use tower_idempotency::IdempotencyLayer;

    let app = Router::new()
        .route(
            "/orders",
            post(|| async { (StatusCode::CREATED, "order 1") }),
        )
        .layer(IdempotencyLayer::new(HashMapStore::default()));
    let order = || {
        Request::post("/orders")
            .header("idempotency-key", "order-1")
            .body(Body::empty())
            .expect("a valid request")
    };
    let first = app.clone().oneshot(order()).await.expect("infallible");
    let retry = app.oneshot(order()).await.expect("infallible");
    println!(
        "first: {}, retry: {} (replayed: {:?})",
        first.status(),
        retry.status(),
        retry.headers().get("idempotent-replayed")
    );
}
