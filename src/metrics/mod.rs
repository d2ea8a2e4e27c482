//! Counters of the layer's decisions, and their export through the
//! `metrics` facade.
//!
//! Every layer keeps its own counters in a [`Metrics`] handle, with no
//! dependency: read them with [`Metrics::count`] or [`Metrics::snapshot`]
//! and export them however you like. With the `metrics` feature the layer
//! also reports to whatever recorder the application installed for the
//! [`metrics`](https://docs.rs/metrics) facade (a Prometheus exporter, for
//! example), under these names:
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `idempotency_requests_total` | counter | `outcome`: [`Decision::as_str`] | requests the layer decided |
//! | `idempotency_store_call_duration_seconds` | histogram | `operation`: `begin`, `complete`, `release`, `fence`, `renew`; `result`: `ok`, `error`, `cancelled` (dropped before it finished, such as a renewal past its timeout) | how long each store call took |
//!
//! The histogram times the calls the layer makes, and [`Execution::fence`](crate::Execution::fence);
//! a fence the handler runs in its own transaction (`PostgresStore::fence_in`)
//! is the handler's to time. [`describe`] registers the descriptions and units.

#[cfg(feature = "metrics")]
mod timed;

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

#[cfg(feature = "metrics")]
pub(crate) use timed::TimedStore;

#[cfg(feature = "metrics")]
const REQUESTS: &str = "idempotency_requests_total";
#[cfg(feature = "metrics")]
const STORE_CALL_DURATION: &str = "idempotency_store_call_duration_seconds";

/// Describes the layer's metrics to the installed recorder, so that an
/// exporter can print their help texts and units. Call it once, after
/// installing the recorder.
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn describe() {
    ::metrics::describe_counter!(
        REQUESTS,
        ::metrics::Unit::Count,
        "Requests the idempotency layer decided, by outcome."
    );
    ::metrics::describe_histogram!(
        STORE_CALL_DURATION,
        ::metrics::Unit::Seconds,
        "Duration of idempotency store calls, by operation and result."
    );
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
        #[cfg(feature = "metrics")]
        ::metrics::counter!(REQUESTS, "outcome" => decision.as_str()).increment(1);
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
