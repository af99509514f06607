//! What this process learned about tenant databases it synced recently: that their
//! schema is prepared, and each mapping's watermark.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sessions::SessionKey;
use crate::mapping::Mapping;

/// How long what this process learned about a tenant database is trusted before it is
/// checked again.
const RECHECK_AFTER: Duration = Duration::from_secs(60);

/// What this process learned about tenant databases it synced recently, by tenancy and
/// configuration entry: that it prepared the tables, ownership and privileges, and the
/// watermark of each mapping as of its last transaction there.
///
/// Preparing costs a dozen statements, DDL checks included, and a busy tenancy syncs
/// many times a minute. A known watermark lets a sync read the changes after it first
/// and leave a mapping with none alone. It is never ahead of the real one: it is what
/// this process committed or read under the lock, and a watermark only moves forward
/// (another process moving it further only costs a re-read). Everything is forgotten
/// after [`RECHECK_AFTER`] and on any failure of the database, so a dropped table is
/// recreated on the next attempt.
#[derive(Default)]
pub(super) struct KnownDatabases {
    by_key: Mutex<HashMap<SessionKey, Known>>,
}

struct Known {
    prepared_at: Instant,
    watermarks: [Option<i64>; Mapping::ALL.len()],
}

impl KnownDatabases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Known>> {
        self.by_key
            .lock()
            .expect("the lock is never held across a panic")
    }

    pub(super) fn is_fresh(&self, key: &SessionKey) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|known| known.prepared_at.elapsed() < RECHECK_AFTER)
    }

    /// The schema of `key`'s database was just prepared; its watermarks are not known.
    pub(super) fn mark(&self, key: SessionKey) {
        let mut known = self.lock();
        known.retain(|_, known| known.prepared_at.elapsed() < RECHECK_AFTER);
        known.insert(
            key,
            Known {
                prepared_at: Instant::now(),
                watermarks: [None; Mapping::ALL.len()],
            },
        );
    }

    pub(super) fn watermark(&self, key: &SessionKey, mapping: Mapping) -> Option<i64> {
        self.lock()
            .get(key)
            .filter(|known| known.prepared_at.elapsed() < RECHECK_AFTER)
            .and_then(|known| known.watermarks[mapping.index()])
    }

    /// Every mapping's known watermark, by [`Mapping::index`]: a snapshot, to compare
    /// with what is read from the tenant database afterwards.
    pub(super) fn watermarks(&self, key: &SessionKey) -> [Option<i64>; Mapping::ALL.len()] {
        self.lock()
            .get(key)
            .filter(|known| known.prepared_at.elapsed() < RECHECK_AFTER)
            .map_or([None; Mapping::ALL.len()], |known| known.watermarks)
    }

    /// Records a watermark this process committed or read under the lock. The latest
    /// one wins, even if lower: it was real when it was seen.
    pub(super) fn set_watermark(&self, key: &SessionKey, mapping: Mapping, watermark: i64) {
        if let Some(known) = self.lock().get_mut(key) {
            known.watermarks[mapping.index()] = Some(watermark);
        }
    }

    pub(super) fn forget(&self, key: &SessionKey) {
        self.lock().remove(key);
    }

    /// Forgets every database of `tenancy_id`.
    pub(super) fn forget_tenancy(&self, tenancy_id: uuid::Uuid) {
        self.lock().retain(|key, _| key.tenancy_id != tenancy_id);
    }
}
