use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::time::Instant;

use self::seeded::Seeded;
use super::{expiry_millis, LockToken, StoreError};
use crate::key::{Fingerprint, RecordKey};

mod limits;
mod seeded;
mod steps;

pub use limits::{MemoryLimits, MemoryStoreBuilder};

/// The default store: a sharded concurrent map in this process's memory.
///
/// Locks and responses live only as long as the process: use a shared store
/// (Redis, PostgreSQL) when several replicas serve the same clients. Expired
/// records are freed by a background sweep that visits one shard at a time,
/// started on first use inside a Tokio runtime and stopped when the last
/// clone of the store is dropped.
///
/// Its settings are made with [`MemoryStore::builder`] before the store
/// exists, so they can never be applied to a store already in use: every
/// clone of a `MemoryStore` is the same store.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::store::{MemoryLimits, MemoryStore};
///
/// let store = MemoryStore::builder()
///     .with_limits(MemoryLimits::new(10_000, 64 * 1024 * 1024))
///     .with_sweep_interval(Duration::from_secs(30))
///     .build();
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
    /// Records held per scope tag.
    scopes: DashMap<u64, AtomicUsize, Seeded>,
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
    /// Held by the token until `expires_at`, the end of its lease.
    InFlight([u64; 2]),
    /// Held by the token until `lease_until`, its effect committed: kept
    /// until `expires_at`, the end of its TTL, so that no lapsed lease
    /// lets the request run again.
    Fenced {
        token: [u64; 2],
        lease_until: u64,
    },
    Completed(Bytes),
    NotReplayable,
}

impl State {
    fn held_by(&self, token: LockToken) -> bool {
        let token = token_words(token);
        matches!(self, Self::InFlight(held) | Self::Fenced { token: held, .. } if *held == token)
    }
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
        Self::builder().build()
    }

    /// Settings for a new store, applied by [`MemoryStoreBuilder::build`].
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::new()
    }

    fn build(limits: MemoryLimits, sweep_interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher_and_shard_amount(Seeded::new(), shards_for(&limits)),
                epoch: Instant::now(),
                limits,
                sweep_interval,
                usage: Usage {
                    entries: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                },
                scopes: DashMap::with_hasher(Seeded::new()),
                sweeper_started: AtomicBool::new(false),
            }),
        }
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
        let sweeping = Sweeping(Arc::downgrade(&self.inner));
        let interval = self.inner.sweep_interval;
        handle.spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match sweeping.0.upgrade() {
                    Some(inner) => inner.sweep(),
                    None => return,
                }
            }
        });
    }
}

/// Enough shards that one holds about a thousand records when the store is
/// full: a shard's table doubles, and the sweep walks it, under that
/// shard's lock, so its size bounds how long any request can wait on it
/// (a few hundred microseconds at most where the doubling faults in fresh
/// memory, rather than tens of milliseconds for eight shards of a million
/// records).
fn shards_for(limits: &MemoryLimits) -> usize {
    (limits.max_entries / 1024)
        .next_power_of_two()
        .clamp(16, 1 << 16)
}

/// Held by the sweep task: when the task ends, whether the store is gone
/// or the runtime it ran on shut down, the next `begin` starts another.
struct Sweeping(Weak<Inner>);

impl Drop for Sweeping {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.sweeper_started.store(false, Ordering::Release);
        }
    }
}

impl Inner {
    fn now(&self) -> u64 {
        millis(Instant::now() - self.epoch)
    }

    fn sweep(&self) {
        let now = self.now();
        self.map.retain(|key, entry| {
            if entry.expires_at > now {
                return true;
            }
            self.forget(key, entry);
            false
        });
        // Scopes that hold nothing any more are dropped; a begin that
        // counts into one holds its shard's read lock, so it cannot be
        // dropped under it.
        self.scopes
            .retain(|_, held| held.load(Ordering::Relaxed) > 0);
    }

    /// Accounts for an entry leaving the map.
    fn forget(&self, key: &RecordKey, entry: &Entry) {
        self.usage.entries.fetch_sub(1, Ordering::Relaxed);
        if let Some(held) = self.scopes.get(&key.scope_tag()) {
            held.fetch_sub(1, Ordering::Relaxed);
        }
        if let State::Completed(record) = &entry.state {
            self.usage.bytes.fetch_sub(record.len(), Ordering::Relaxed);
        }
    }

    /// Counts a new record in, if both the store and its scope have room.
    fn admit(&self, key: &RecordKey) -> Result<(), StoreError> {
        let admitted = |held: &AtomicUsize, limit: usize| {
            held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
        };
        if !admitted(&self.usage.entries, self.limits.max_entries) {
            return Err(StoreError::Full);
        }
        let tag = key.scope_tag();
        let in_scope = match self.scopes.get(&tag) {
            Some(held) => admitted(&held, self.limits.max_entries_per_scope),
            None => admitted(
                &self
                    .scopes
                    .entry(tag)
                    .or_insert_with(|| AtomicUsize::new(0)),
                self.limits.max_entries_per_scope,
            ),
        };
        if !in_scope {
            self.usage.entries.fetch_sub(1, Ordering::Relaxed);
            return Err(StoreError::ScopeFull);
        }
        Ok(())
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

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The time `duration` after `now`, in the store's milliseconds.
fn after(now: u64, duration: Duration) -> u64 {
    now.saturating_add(expiry_millis(duration))
}
