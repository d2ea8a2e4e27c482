use std::{
    fmt,
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::{mapref::entry::Entry as MapEntry, DashMap};
use tokio::time::Instant;

use super::{Begin, LockToken, Outcome, Store, StoreError, StoredResponse};
use crate::key::{Fingerprint, RecordKey};

/// Bounds on what a [`MemoryStore`] holds.
///
/// When the store is full, a new key is refused with [`StoreError::Full`]
/// (the layer answers 503) and nothing already stored is evicted early: an
/// evicted record would let a retry run the request a second time. A
/// response that does not fit in the byte budget is recorded as not
/// replayable, so its retry is refused rather than executed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryLimits {
    /// Records held at once, in flight or completed. Default 1,000,000.
    pub max_entries: usize,
    /// Bytes of stored responses (body, headers, trailers). Default 512 MiB.
    pub max_bytes: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_bytes: 512 * 1024 * 1024,
        }
    }
}

impl MemoryLimits {
    /// Limits with the given entry and byte bounds.
    pub const fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
        }
    }
}

/// The default store: a sharded concurrent map in this process's memory.
///
/// Locks and responses live only as long as the process: use a shared store
/// (Redis, PostgreSQL) when several replicas serve the same clients. Expired
/// records are freed by a background sweep that visits one shard at a time,
/// started on first use inside a Tokio runtime and stopped when the last
/// clone of the store is dropped.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{MemoryLimits, MemoryStore};
///
/// let store = MemoryStore::new()
///     .with_limits(MemoryLimits::new(10_000, 64 * 1024 * 1024))
///     .with_sweep_interval(Duration::from_secs(30));
/// assert_eq!(store.len(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<RecordKey, Entry, Seeded>,
    epoch: Instant,
    limits: MemoryLimits,
    sweep_interval: Duration,
    usage: Usage,
    sweeper_started: AtomicBool,
}

/// The two counters every new record updates, on cache lines of their own:
/// next to the fields every request only reads, each update by one core
/// would evict those fields from the others.
#[repr(align(128))]
struct Usage {
    entries: AtomicUsize,
    bytes: AtomicUsize,
}

/// Kept small, since a million of these is a normal load: the first half
/// of the fingerprint (128 bits is ample to tell two requests apart),
/// milliseconds since the store's epoch, and a completed response as one
/// encoded allocation of exactly its size.
struct Entry {
    fingerprint: [u8; 16],
    expires_at: u64,
    state: State,
}

enum State {
    InFlight([u64; 2]),
    Completed(Bytes),
    NotReplayable,
}

fn short(fingerprint: &Fingerprint) -> [u8; 16] {
    let mut half = [0; 16];
    half.copy_from_slice(&fingerprint.as_bytes()[..16]);
    half
}

fn token_words(token: LockToken) -> [u64; 2] {
    let value = token.as_u128();
    [(value >> 64) as u64, value as u64]
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.len())
            .field("bytes", &self.bytes())
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl MemoryStore {
    /// An empty store with [`MemoryLimits::default`] and a 60 s sweep.
    pub fn new() -> Self {
        Self::build(MemoryLimits::default(), Duration::from_secs(60))
    }

    fn build(limits: MemoryLimits, sweep_interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher(Seeded::new()),
                epoch: Instant::now(),
                limits,
                sweep_interval,
                usage: Usage {
                    entries: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                },
                sweeper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sets the capacity bounds.
    #[must_use]
    pub fn with_limits(self, limits: MemoryLimits) -> Self {
        Self::build(limits, self.inner.sweep_interval)
    }

    /// Sets how often expired records are freed.
    #[must_use]
    pub fn with_sweep_interval(self, interval: Duration) -> Self {
        Self::build(self.inner.limits, interval.max(Duration::from_millis(1)))
    }

    /// Records held now, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.inner.usage.entries.load(Ordering::Relaxed)
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of stored responses held now.
    pub fn bytes(&self) -> usize {
        self.inner.usage.bytes.load(Ordering::Relaxed)
    }

    /// Frees every expired record now, one shard at a time.
    pub fn sweep(&self) {
        self.inner.sweep();
    }

    fn ensure_sweeper(&self) {
        if self.inner.sweeper_started.load(Ordering::Relaxed)
            || self.inner.sweeper_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.inner.sweeper_started.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = self.inner.sweep_interval;
        handle.spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.sweep(),
                    None => return,
                }
            }
        });
    }
}

impl Inner {
    fn now(&self) -> u64 {
        millis(Instant::now() - self.epoch)
    }

    fn sweep(&self) {
        let now = self.now();
        self.map.retain(|_, entry| {
            if entry.expires_at > now {
                return true;
            }
            self.forget(entry);
            false
        });
    }

    /// Accounts for an entry leaving the map.
    fn forget(&self, entry: &Entry) {
        self.usage.entries.fetch_sub(1, Ordering::Relaxed);
        if let State::Completed(record) = &entry.state {
            self.usage.bytes.fetch_sub(record.len(), Ordering::Relaxed);
        }
    }

    fn reserve_bytes(&self, size: usize) -> bool {
        self.usage
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(size)
                    .filter(|total| *total <= self.limits.max_bytes)
            })
            .is_ok()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.ensure_sweeper();
        let inner = &self.inner;
        let now = inner.now();
        let fingerprint = short(fingerprint);
        // The token is drawn only when the key is actually taken.
        let fresh = |token: LockToken| Entry {
            fingerprint,
            expires_at: now + millis(lease),
            state: State::InFlight(token_words(token)),
        };
        let record = match inner.map.entry(*key) {
            MapEntry::Occupied(mut occupied) => {
                let entry = occupied.get_mut();
                if entry.expires_at <= now {
                    if let State::Completed(record) = &entry.state {
                        inner.usage.bytes.fetch_sub(record.len(), Ordering::Relaxed);
                    }
                    let token = LockToken::random();
                    *entry = fresh(token);
                    return Ok(Begin::Acquired(token));
                }
                if entry.fingerprint != fingerprint {
                    return Ok(Begin::Mismatch);
                }
                match &entry.state {
                    State::InFlight(_) => return Ok(Begin::InFlight),
                    State::Completed(record) => record.clone(),
                    State::NotReplayable => return Ok(Begin::NotReplayable),
                }
            }
            MapEntry::Vacant(vacant) => {
                let admitted = inner
                    .usage
                    .entries
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n < inner.limits.max_entries).then_some(n + 1)
                    })
                    .is_ok();
                if !admitted {
                    return Err(StoreError::Full);
                }
                let token = LockToken::random();
                vacant.insert(fresh(token));
                return Ok(Begin::Acquired(token));
            }
        };
        // Decoded once the shard's lock is let go: replays of one hot key
        // then hold it only long enough to clone the record.
        Ok(Begin::Completed(Arc::new(StoredResponse::decode(record)?)))
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        outcome: Outcome,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut entry = self.held(key, token)?;
        entry.expires_at = self.inner.now() + millis(ttl);
        entry.state = match outcome {
            Outcome::Response(record) => {
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
            Outcome::NotReplayable => State::NotReplayable,
        };
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let token = token_words(token);
        let removed = self.inner.map.remove_if(
            key,
            |_, entry| matches!(entry.state, State::InFlight(held) if held == token),
        );
        match removed {
            Some((_, entry)) => {
                self.inner.forget(&entry);
                Ok(())
            }
            None => Err(StoreError::LockLost),
        }
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.held(key, token)?.expires_at = self.inner.now() + millis(lease);
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
        match entry.state {
            State::InFlight(held) if held == token_words(token) => Ok(entry),
            _ => Err(StoreError::LockLost),
        }
    }
}

/// Hashes record keys with seeds drawn per store. Record keys are digests
/// of client-chosen keys, so an unseeded hash of them would let a client
/// grind keys into one bucket; here every word of a key passes through a
/// multiply by a secret, so which keys share a bucket cannot be known
/// without the seeds. Cheaper than the default SipHash on 32 bytes.
#[derive(Clone)]
struct Seeded([u64; 4]);

impl Seeded {
    fn new() -> Self {
        let random = std::collections::hash_map::RandomState::new();
        Self(std::array::from_fn(|i| random.hash_one(i)))
    }
}

impl BuildHasher for Seeded {
    type Hasher = SeededHasher;

    fn build_hasher(&self) -> SeededHasher {
        SeededHasher {
            seeds: self.0,
            state: self.0[3],
        }
    }
}

struct SeededHasher {
    seeds: [u64; 4],
    state: u64,
}

/// The high and low halves of a full 64×64-bit product, folded.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        for pair in bytes.chunks(16) {
            let mut words = [0u8; 16];
            words[..pair.len()].copy_from_slice(pair);
            let [a, b] = [&words[..8], &words[8..]]
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()));
            self.state = fold(a ^ self.seeds[0] ^ self.state, b ^ self.seeds[1]);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.state = fold(self.state ^ n as u64 ^ self.seeds[2], self.seeds[1]);
    }

    fn finish(&self) -> u64 {
        fold(self.state ^ self.seeds[2], self.seeds[3])
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_hash_differently_under_different_seeds() {
        let key = RecordKey::from_bytes([7; 32]);
        let (one, two) = (Seeded::new(), Seeded::new());
        assert_ne!(one.hash_one(key), two.hash_one(key));
    }

    #[test]
    fn every_byte_of_a_record_key_reaches_its_hash() {
        let seeded = Seeded::new();
        let base = seeded.hash_one(RecordKey::from_bytes([0; 32]));
        for i in 0..32 {
            let mut bytes = [0; 32];
            bytes[i] = 1;
            assert_ne!(
                seeded.hash_one(RecordKey::from_bytes(bytes)),
                base,
                "byte {i}"
            );
        }
    }
}
