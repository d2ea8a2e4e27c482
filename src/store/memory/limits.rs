//! The bounds and settings of a memory store, fixed before it is built.

use std::time::Duration;

use super::MemoryStore;

/// Bounds on what a [`MemoryStore`] holds.
///
/// When the store is full, a new key is refused with
/// [`StoreError::Full`](crate::store::StoreError::Full) (the layer answers
/// 503) and nothing already stored is evicted early: an evicted record
/// would let a retry run the request a second time. A response that does
/// not fit in the byte budget is recorded as not replayable, so its retry
/// is refused rather than executed again.
///
/// One scope (one client, by default one `Authorization` value; all
/// anonymous clients together are one scope) may hold at most
/// `max_entries_per_scope` records: past that its new keys are refused with
/// [`StoreError::ScopeFull`](crate::store::StoreError::ScopeFull) (429),
/// while every other scope is still served. A flood of unique keys from
/// one client cannot fill the store for everyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryLimits {
    /// Records held at once, in flight or completed. Default 1,000,000.
    pub max_entries: usize,
    /// Bytes of stored responses (body, headers, trailers). Default 512 MiB.
    pub max_bytes: usize,
    /// Records one scope may hold at once. Default a tenth of
    /// `max_entries`, but at least 1,000 (or all of a smaller store).
    pub max_entries_per_scope: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self::new(1_000_000, 512 * 1024 * 1024)
    }
}

impl MemoryLimits {
    /// Limits with the given entry and byte bounds, and for each scope a
    /// tenth of the entries, but at least 1,000 (or all of a smaller store).
    pub const fn new(max_entries: usize, max_bytes: usize) -> Self {
        let share = max_entries / 10;
        let share = if share < 1_000 { 1_000 } else { share };
        Self {
            max_entries,
            max_bytes,
            max_entries_per_scope: if share < max_entries {
                share
            } else {
                max_entries
            },
        }
    }

    /// Sets the records one scope may hold at once.
    #[must_use]
    pub const fn with_max_entries_per_scope(mut self, entries: usize) -> Self {
        self.max_entries_per_scope = entries;
        self
    }
}

/// The settings of a [`MemoryStore`] not yet built.
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    limits: MemoryLimits,
    sweep_interval: Duration,
}

impl MemoryStoreBuilder {
    pub(super) fn new() -> Self {
        Self {
            limits: MemoryLimits::default(),
            sweep_interval: Duration::from_secs(60),
        }
    }

    /// Sets the capacity bounds (default [`MemoryLimits::default`]).
    pub fn with_limits(mut self, limits: MemoryLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets how often expired records are freed (default 60 s; from 1 ms
    /// to one day, clamped).
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval =
            interval.clamp(Duration::from_millis(1), Duration::from_secs(24 * 60 * 60));
        self
    }

    /// An empty store with these settings.
    pub fn build(self) -> MemoryStore {
        MemoryStore::build(self.limits, self.sweep_interval)
    }
}
