//! Counters of the layer's decisions, for export to any metrics system.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

/// What the layer decided for one request. Each decision is also a
/// `tracing` event with this value in its `outcome` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Decision {
    /// No key, or a method the layer does not cover: passed through.
    PassThrough,
    /// The key, its header or the body was refused with a 4xx.
    Rejected,
    /// First use of a key: the inner service ran.
    Executed,
    /// The key's earlier holder fenced it and stored no response: the
    /// inner service ran as a recovery.
    Recovered,
    /// A stored response was replayed.
    Replayed,
    /// The key is in flight: 409.
    Conflict,
    /// The key was used with another request: 422.
    Mismatch,
    /// The response for the key was not kept: 409.
    NotReplayable,
    /// The store failed: 503, or the request ran unprotected if fail-open.
    StoreError,
}

impl Decision {
    /// The name used in `tracing` events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PassThrough => "pass_through",
            Self::Rejected => "rejected",
            Self::Executed => "executed",
            Self::Recovered => "recovered",
            Self::Replayed => "replayed",
            Self::Conflict => "conflict",
            Self::Mismatch => "mismatch",
            Self::NotReplayable => "not_replayable",
            Self::StoreError => "store_error",
        }
    }

    const ALL: [Self; 9] = [
        Self::PassThrough,
        Self::Rejected,
        Self::Executed,
        Self::Recovered,
        Self::Replayed,
        Self::Conflict,
        Self::Mismatch,
        Self::NotReplayable,
        Self::StoreError,
    ];
}

/// A handle on the counters of one layer; cheap to clone.
///
/// ```
/// use tower_idempotency::{metrics::Decision, IdempotencyLayer};
///
/// let layer = IdempotencyLayer::default();
/// let metrics = layer.metrics();
/// assert_eq!(metrics.count(Decision::Replayed), 0);
/// for (decision, count) in metrics.snapshot() {
///     println!("idempotency_requests_total{{outcome=\"{}\"}} {count}", decision.as_str());
/// }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    counts: Arc<[AtomicU64; 9]>,
}

impl Metrics {
    pub(crate) fn record(&self, decision: Decision) {
        self.counts[decision as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(outcome = decision.as_str(), "idempotency decision");
    }

    /// Requests that ended in `decision` so far.
    pub fn count(&self, decision: Decision) -> u64 {
        self.counts[decision as usize].load(Ordering::Relaxed)
    }

    /// Every counter with its decision.
    pub fn snapshot(&self) -> Vec<(Decision, u64)> {
        Decision::ALL.iter().map(|d| (*d, self.count(*d))).collect()
    }
}
