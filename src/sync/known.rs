//! What this process learned about tenant databases it synced recently: that their
//! schema is prepared, and each mapping's watermark.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sessions::SessionKey;
use crate::mapping::Mapping;

/// How long what this process learned about a tenant database is trusted before it is
/// checked again: each database its own time in this range, drawn when it is prepared.
/// With one time for all, every tenancy first synced in one moment (a process starting,
/// an initial sync of all of them) prepared again in one moment a minute later, and
/// again each minute after: at 400 changes/s over 50 tenancies that was 1.5 s in which
/// the writes of 30–40 tenancies came up to 0.5 s late (`latency` with `BENCH_TAIL`).
const RECHECK_AFTER: std::ops::Range<Duration> = Duration::from_secs(45)..Duration::from_secs(75);

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
    /// Until when it is trusted: drawn in [`RECHECK_AFTER`] from when it was prepared.
    fresh_until: Instant,
    watermarks: [Option<i64>; Mapping::ALL.len()],
}

impl Known {
    fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until
    }
}

impl KnownDatabases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Known>> {
        self.by_key
            .lock()
            .expect("the lock is never held across a panic")
    }

    pub(super) fn is_fresh(&self, key: &SessionKey) -> bool {
        self.lock().get(key).is_some_and(Known::is_fresh)
    }

    /// The schema of `key`'s database was just prepared; its watermarks are not known.
    pub(super) fn mark(&self, key: SessionKey) {
        let trusted_for = rand::random_range(RECHECK_AFTER);
        let mut known = self.lock();
        known.retain(|_, known| known.is_fresh());
        known.insert(
            key,
            Known {
                fresh_until: Instant::now() + trusted_for,
                watermarks: [None; Mapping::ALL.len()],
            },
        );
    }

    pub(super) fn watermark(&self, key: &SessionKey, mapping: Mapping) -> Option<i64> {
        self.lock()
            .get(key)
            .filter(|known| known.is_fresh())
            .and_then(|known| known.watermarks[mapping.index()])
    }

    /// Every mapping's known watermark, by [`Mapping::index`]: a snapshot, to compare
    /// with what is read from the tenant database afterwards.
    pub(super) fn watermarks(&self, key: &SessionKey) -> [Option<i64>; Mapping::ALL.len()] {
        self.lock()
            .get(key)
            .filter(|known| known.is_fresh())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SessionKey {
        SessionKey {
            tenancy_id: uuid::Uuid::from_u128(u128::from(n)),
            fingerprint: [n; 32],
        }
    }

    #[test]
    fn databases_prepared_together_are_checked_again_at_times_spread_over_the_range() {
        let known = KnownDatabases::default();
        let marked = Instant::now();
        for n in 0..200 {
            known.mark(key(n));
        }
        let until: Vec<Instant> = known.lock().values().map(|k| k.fresh_until).collect();
        assert_eq!(until.len(), 200);
        let after_mark = Instant::now();
        for at in &until {
            assert!(*at >= marked + RECHECK_AFTER.start, "not before the range");
            assert!(*at < after_mark + RECHECK_AFTER.end, "not after the range");
        }
        // 200 draws over 30 s all within 10 s of one another: a chance of about
        // 200 × 3^-199.
        let (first, last) = (until.iter().min().unwrap(), until.iter().max().unwrap());
        assert!(
            *last - *first > Duration::from_secs(10),
            "spread over {:?} only",
            *last - *first
        );
    }

    #[test]
    fn what_is_past_its_time_is_neither_fresh_nor_a_known_watermark() {
        let known = KnownDatabases::default();
        known.mark(key(1));
        known.set_watermark(&key(1), Mapping::ALL[0], 42);
        assert!(known.is_fresh(&key(1)));
        assert_eq!(known.watermark(&key(1), Mapping::ALL[0]), Some(42));

        known.lock().get_mut(&key(1)).unwrap().fresh_until = Instant::now();
        assert!(!known.is_fresh(&key(1)));
        assert_eq!(known.watermark(&key(1), Mapping::ALL[0]), None);
        assert_eq!(known.watermarks(&key(1)), [None; Mapping::ALL.len()]);
    }
}
