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
use tokio::time::Instant;

use crate::{
    key::RecordKey,
    store::{LockToken, Store},
};

/// The locks to renew, and the task that renews them every third of a
/// lease, started on the first lock registered.
pub(crate) struct LeaseKeeper {
    store: Arc<dyn Store>,
    lease: Duration,
    held: DashMap<u64, LeasedLock>,
    next_id: AtomicU64,
    started: AtomicBool,
}

/// A lock registered for renewal.
struct LeasedLock {
    key: RecordKey,
    token: LockToken,
    since: Instant,
}

impl LeaseKeeper {
    pub(crate) fn new(store: Arc<dyn Store>, lease: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            lease,
            held: DashMap::new(),
            next_id: AtomicU64::new(0),
            started: AtomicBool::new(false),
        })
    }

    /// Registers a lock taken at `since`; the id unregisters it.
    pub(crate) fn hold(self: &Arc<Self>, key: RecordKey, token: LockToken, since: Instant) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.held.insert(id, LeasedLock { key, token, since });
        if !self.started.load(Ordering::Relaxed) && !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(renew_leases(Arc::downgrade(self)));
        }
        id
    }

    /// Stops renewing a lock.
    pub(crate) fn forget(&self, id: u64) {
        self.held.remove(&id);
    }
}

async fn renew_leases(keeper: Weak<LeaseKeeper>) {
    let Some(period) = keeper.upgrade().map(|k| k.lease / 3) else {
        return;
    };
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(keeper) = keeper.upgrade() else {
            return;
        };
        let Some(due) = Instant::now().checked_sub(period) else {
            continue;
        };
        let renewals: Vec<(u64, RecordKey, LockToken)> = keeper
            .held
            .iter()
            .filter(|held| held.since <= due)
            .map(|held| (*held.key(), held.key, held.token))
            .collect();
        for (id, key, token) in renewals {
            let renewed = keeper.store.renew(&key, token, keeper.lease).await;
            // A lock settled since the list was taken needs no renewal.
            if let Err(err) = renewed {
                if keeper.held.contains_key(&id) {
                    tracing::warn!(error = %err, ?key, "could not renew an idempotency lease");
                }
            }
        }
    }
}
