//! The lease keeper: one task per service that renews the leases of the
//! locks whose requests are still running.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use dashmap::DashMap;
use tokio::{task::JoinSet, time::Instant};

use super::background::finish_in_background;
use crate::{
    key::RecordKey,
    store::{LockToken, Store},
};

/// The locks to renew, and the task that renews them every third of a
/// lease. The task starts with the first lock registered and starts again
/// if the runtime it ran on has gone.
pub(crate) struct LeaseKeeper {
    store: Arc<dyn Store>,
    lease: Duration,
    max_hold: Duration,
    held: DashMap<u64, LeasedLock>,
    next_id: AtomicU64,
    running: AtomicBool,
}

/// A lock registered for renewal.
struct LeasedLock {
    key: RecordKey,
    token: LockToken,
    since: Instant,
}

impl LeaseKeeper {
    pub(crate) fn new(store: Arc<dyn Store>, lease: Duration, max_hold: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            lease,
            max_hold,
            held: DashMap::new(),
            next_id: AtomicU64::new(0),
            running: AtomicBool::new(false),
        })
    }

    /// Registers a lock taken at `since`; the id unregisters it.
    pub(crate) fn hold(self: &Arc<Self>, key: RecordKey, token: LockToken, since: Instant) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.held.insert(id, LeasedLock { key, token, since });
        self.keep_running();
        id
    }

    /// Starts the renewal task if none is running.
    pub(crate) fn keep_running(self: &Arc<Self>) {
        if self.running.load(Ordering::Acquire) || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let task = renew_leases(Running(Arc::downgrade(self)));
        if finish_in_background(task).is_err() {
            tracing::warn!("no Tokio runtime to renew idempotency leases; a lock lasts one lease");
        }
    }

    /// Stops renewing a lock.
    pub(crate) fn forget(&self, id: u64) {
        self.held.remove(&id);
    }

    /// Renews every lock held for a quarter of a `period` or more, all at
    /// once, each bounded so that none can hold up the next round; stops
    /// renewing those held past the longest holding time.
    ///
    /// Not only those held a whole period: a lock taken just after a round
    /// would then wait almost two periods for its first renewal, and if
    /// that one failed, the next would come as its lease of three periods
    /// ends. This way its first renewal comes within a period and a
    /// quarter, and one that fails leaves at least three quarters of a
    /// period before the lease ends.
    async fn renew_due(self: &Arc<Self>, period: Duration) {
        let now = Instant::now();
        let Some(due) = now.checked_sub(period / 4) else {
            return;
        };
        let mut renewals = JoinSet::new();
        let mut given_up = Vec::new();
        for held in self.held.iter().filter(|held| held.since <= due) {
            let (id, key, token) = (*held.key(), held.key, held.token);
            if now.duration_since(held.since) >= self.max_hold {
                given_up.push((id, key));
                continue;
            }
            let (store, lease) = (Arc::clone(&self.store), self.lease);
            renewals.spawn(async move {
                let renewed =
                    tokio::time::timeout(lease / 6, store.renew(&key, token, lease)).await;
                (id, key, renewed)
            });
        }
        for (id, key) in given_up {
            self.held.remove(&id);
            tracing::warn!(
                ?key,
                max_hold = ?self.max_hold,
                "an idempotency key was held longer than its longest holding time; its lease is no longer renewed"
            );
        }
        while let Some(joined) = renewals.join_next().await {
            let Ok((id, key, renewed)) = joined else {
                continue;
            };
            // A lock settled since the round began needs no renewal.
            if !self.held.contains_key(&id) {
                continue;
            }
            match renewed {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, ?key, "could not renew an idempotency lease");
                }
                Err(_) => tracing::warn!(?key, "renewing an idempotency lease timed out"),
            }
        }
    }
}

/// Held by the renewal task: when the task ends, whether it returned or
/// its runtime dropped it, the next lock registered starts another.
struct Running(Weak<LeaseKeeper>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(keeper) = self.0.upgrade() {
            keeper.running.store(false, Ordering::Release);
        }
    }
}

async fn renew_leases(running: Running) {
    let Some(period) = running.0.upgrade().map(|k| k.lease / 3) else {
        return;
    };
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(keeper) = running.0.upgrade() else {
            return;
        };
        keeper.renew_due(period).await;
    }
}
