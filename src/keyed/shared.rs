//! What every clone of one service shares.

use std::sync::Arc;

use super::lease::LeaseKeeper;
use crate::{config::Config, metrics::Metrics, problem::Problems};

/// The settings, counters, problem documents and lease keeper of one
/// service and all its clones.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) problems: Problems,
    pub(crate) metrics: Metrics,
    pub(crate) leases: Arc<LeaseKeeper>,
}

impl Shared {
    pub(crate) fn new(config: Config, metrics: Metrics) -> Arc<Self> {
        // Wrapped here, not in the layer, so that the layer's own settings
        // (and `Debug`) keep the store the user gave.
        #[cfg(feature = "metrics")]
        let config = Config {
            store: crate::metrics::TimedStore::wrap(config.store),
            ..config
        };
        Arc::new(Self {
            problems: Problems::new(
                &config.problem_base,
                config.body_limit,
                config.body_timeout,
                config.retry_after,
            ),
            leases: LeaseKeeper::new(Arc::clone(&config.store), config.lease, config.max_hold),
            config,
            metrics,
        })
    }
}
