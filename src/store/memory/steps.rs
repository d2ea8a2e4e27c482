//! The steps of the [`Store`] trait on the memory store's map, each one
//! atomic under the lock of the key's shard.

use std::{sync::atomic::Ordering, time::Duration};

use async_trait::async_trait;
use dashmap::mapref::entry::Entry as MapEntry;

use super::{after, short, token_words, Entry, MemoryStore, State};
use crate::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, LockToken, Store, StoreError},
};

#[async_trait]
impl Store for MemoryStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.ensure_sweeper();
        let inner = &self.inner;
        let now = inner.now();
        let fingerprint = short(fingerprint);
        // The token is drawn only when the key is actually taken.
        let fresh = |token: LockToken| Entry {
            fingerprint,
            expires_at: after(now, lease),
            state: State::InFlight(token_words(token)),
        };
        match inner.map.entry(*key) {
            MapEntry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                if entry.expires_at <= now {
                    if let State::Completed(record) = &entry.state {
                        inner.usage.bytes.fetch_sub(record.len(), Ordering::Relaxed);
                    }
                    let token = LockToken::random();
                    *entry = fresh(token);
                    return Ok(BeginOutcome::Acquired(token));
                }
                if entry.fingerprint != fingerprint {
                    return Ok(BeginOutcome::Mismatch);
                }
                if let State::Fenced { token, lease_until } = &mut entry.state {
                    if *lease_until > now {
                        return Ok(BeginOutcome::InFlight);
                    }
                    let taken = LockToken::random();
                    *token = token_words(taken);
                    *lease_until = after(now, lease);
                    entry.expires_at = entry.expires_at.max(*lease_until);
                    return Ok(BeginOutcome::Recover(taken));
                }
                // Only a clone of the record's handle is made under the
                // shard's lock: the layer decodes it once the lock is gone,
                // so replays of one hot key hold it as briefly as they can.
                Ok(match &entry.state {
                    State::InFlight(_) | State::Fenced { .. } => BeginOutcome::InFlight,
                    State::Completed(record) => BeginOutcome::Completed(record.clone()),
                    State::NotReplayable => BeginOutcome::NotReplayable,
                })
            }
            MapEntry::Vacant(vacant) => {
                inner.admit(key)?;
                let token = LockToken::random();
                vacant.insert(fresh(token));
                Ok(BeginOutcome::Acquired(token))
            }
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        _: &Fingerprint,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut entry = self.held(key, token)?;
        entry.expires_at = after(self.inner.now(), ttl);
        entry.state = match outcome {
            Completion::Response(record) => {
                let size = record.len();
                if self.inner.reserve_bytes(size) {
                    State::Completed(record)
                } else {
                    tracing::warn!(
                        size,
                        "memory store byte budget exhausted; response kept as not replayable"
                    );
                    State::NotReplayable
                }
            }
            Completion::NotReplayable => State::NotReplayable,
        };
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let words = token_words(token);
        let removed = self.inner.map.remove_if(
            key,
            |_, entry| matches!(entry.state, State::InFlight(held) if held == words),
        );
        if let Some((key, entry)) = removed {
            self.inner.forget(&key, &entry);
            return Ok(());
        }
        // A fenced key is kept; its lease ends now, for the next request
        // to recover it.
        let now = self.inner.now();
        match &mut self.held(key, token)?.state {
            State::Fenced { lease_until, .. } => {
                *lease_until = now;
                Ok(())
            }
            _ => Err(StoreError::LockLost),
        }
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = self.inner.now();
        let mut entry = self.held(key, token)?;
        let State::InFlight(held) = entry.state else {
            return Err(StoreError::EffectCommitted);
        };
        // A holder whose lease ran out may be taken over at any moment: its
        // effect must not start.
        if entry.expires_at <= now {
            return Err(StoreError::LockLost);
        }
        let lease_until = entry.expires_at;
        entry.state = State::Fenced {
            token: held,
            lease_until,
        };
        entry.expires_at = after(now, ttl).max(lease_until);
        Ok(())
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let until = after(self.inner.now(), lease);
        let mut entry = self.held(key, token)?;
        match &mut entry.state {
            State::Fenced { lease_until, .. } => *lease_until = until,
            _ => entry.expires_at = until,
        }
        entry.expires_at = entry.expires_at.max(until);
        Ok(())
    }
}

impl MemoryStore {
    /// The entry for `key` if `token` holds its lock. A lease that ran out
    /// still counts until another request takes the key over.
    fn held(
        &self,
        key: &RecordKey,
        token: LockToken,
    ) -> Result<dashmap::mapref::one::RefMut<'_, RecordKey, Entry>, StoreError> {
        let entry = self.inner.map.get_mut(key).ok_or(StoreError::LockLost)?;
        if entry.state.held_by(token) {
            Ok(entry)
        } else {
            Err(StoreError::LockLost)
        }
    }
}
