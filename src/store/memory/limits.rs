//! The bounds and settings of a memory store, fixed before it is built.

use std::time::Duration;

use super::MemoryStore;

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

    /// Sets how often expired records are freed (default 60 s, at least
    /// 1 ms).
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// An empty store with these settings.
    pub fn build(self) -> MemoryStore {
        MemoryStore::build(self.limits, self.sweep_interval)
    }
}
