//! Driving the poller in `direct` mode from tests, one step at a time.

use std::sync::Arc;

use external_db_sync::poller::{InFlight, PolledBatch, Poller, PollerRun, PollerSettings};
use external_db_sync::publish::direct::DirectPublisher;
use sqlx::PgPool;

use external_db_sync::sync::SyncSettings;

use super::sync::{engine_with, test_settings, PrivateTargets};

/// A poller that syncs in-process on an engine of its own, `sync_concurrency` at once.
pub fn direct_poller(pool: &PgPool, sync_concurrency: usize) -> Poller {
    direct_poller_with(pool, sync_concurrency, test_settings())
}

/// [`direct_poller`] on an engine with `settings`.
pub fn direct_poller_with(
    pool: &PgPool,
    sync_concurrency: usize,
    settings: SyncSettings,
) -> Poller {
    let engine = engine_with(pool, settings, PrivateTargets::Allowed);
    let publisher = DirectPublisher::new(Arc::new(engine));
    let settings = PollerSettings {
        sync_concurrency,
        ..PollerSettings::default()
    };
    Poller::new(pool.clone(), Arc::new(publisher), settings)
}

/// One step, as the loop runs it; its syncs are not waited for.
pub async fn step(poller: &Poller, in_flight: &InFlight) -> PolledBatch {
    match poller.run_once(in_flight).await.unwrap() {
        PollerRun::Batch(batch) => batch,
        PollerRun::Disabled => panic!("the poller is switched off"),
    }
}

/// One step, and the syncs it started run to the end.
pub async fn poll_once(poller: &Poller) -> PolledBatch {
    let in_flight = InFlight::default();
    let mut batch = step(poller, &in_flight).await;
    batch.add(&poller.finish(&in_flight).await.unwrap());
    batch
}
