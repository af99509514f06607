//! Driving the poller in `direct` mode from tests, one step at a time.

use std::sync::Arc;
use std::time::Duration;

use external_db_sync::poller::{InFlight, PolledBatch, Poller, PollerRun, PollerSettings};
use external_db_sync::publish::direct::DirectPublisher;
use sqlx::PgPool;

use external_db_sync::sync::{SyncEngine, SyncSettings};
use uuid::Uuid;

use super::sync::{engine_with, tenancy_with_database, test_settings, PrivateTargets};

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
    direct_poller_of(
        pool,
        settings,
        PollerSettings {
            sync_concurrency,
            ..PollerSettings::default()
        },
    )
}

/// [`direct_poller`] whose claims hold for `lease` unless renewed.
pub fn direct_poller_leasing(pool: &PgPool, sync_concurrency: usize, lease: Duration) -> Poller {
    direct_poller_of(
        pool,
        test_settings(),
        PollerSettings {
            sync_concurrency,
            lease,
            ..PollerSettings::default()
        },
    )
}

/// [`direct_poller`] with the poller's `settings`.
pub fn direct_poller_settled(pool: &PgPool, settings: PollerSettings) -> Poller {
    direct_poller_of(pool, test_settings(), settings)
}

fn direct_poller_of(pool: &PgPool, sync: SyncSettings, poller: PollerSettings) -> Poller {
    let engine = engine_with(pool, sync, PrivateTargets::Allowed);
    direct_poller_on_engine(pool, Arc::new(engine), poller)
}

/// [`direct_poller`] on `engine`, which the caller keeps (to read what it counts),
/// `sync_concurrency` at once.
pub fn direct_poller_on(pool: &PgPool, engine: Arc<SyncEngine>, sync_concurrency: usize) -> Poller {
    let poller = PollerSettings {
        sync_concurrency,
        ..PollerSettings::default()
    };
    direct_poller_on_engine(pool, engine, poller)
}

fn direct_poller_on_engine(
    pool: &PgPool,
    engine: Arc<SyncEngine>,
    poller: PollerSettings,
) -> Poller {
    let publisher = DirectPublisher::new(engine);
    Poller::new(pool.clone(), Arc::new(publisher), poller)
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

/// A new tenancy with a database and one user, `ada`, synced once by `poller`: the
/// tenancy, its tenant database and the user's id.
pub async fn tenancy_synced_once(pool: &PgPool, poller: &Poller) -> (Uuid, PgPool, Uuid) {
    let (tenancy, tenant) = tenancy_with_database(pool).await;
    let ada = super::fixtures::user(pool, tenancy, "ada").await;
    super::fixtures::sequence_all(pool, 1000).await;
    assert_eq!(poll_once(poller).await.published, 1);
    (tenancy, tenant, ada)
}
