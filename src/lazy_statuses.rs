//! Statuses of plain successes written lazily (DESIGN.md §11: "a change of state at
//! once, a plain success at most every few seconds").
//!
//! Each completion of a direct sync recorded the statuses of the databases it brought up
//! to date, an upsert of a status row per database per change. Now a success is written
//! with its completion only when it changes something a reader acts on:
//! - the claim found the tenancy with a status that a success changes (a database
//!   failing, or waiting for its next attempt, or a problem with its configuration as a
//!   whole): written at once, so that the database is due again and counted healthy;
//! - this process wrote no success of that database in the last interval
//!   (`POLLER_STATUS_INTERVAL_MS`): written at once, so a database's first sync after a
//!   quiet spell, or after this process started, shows at once.
//!
//! Otherwise the success is kept here, the furthest of each database, and written by a
//! background pass every half interval once the database's last write is an interval
//! old, and all at once when the poller finishes (a cron call's end, `serve` stopping).
//! A kept success, written later, only moves its database's watermarks forward and
//! dates its last success: it never undoes a failure or a configuration problem recorded
//! since.
//! A process that dies loses what it kept, a few seconds of progress of its databases'
//! recorded statuses: nothing of the data (the tenant databases have it), and nothing a
//! reader acts on is ever ahead of the truth. The status route's "synced through" and
//! tombstone pruning, which waits for every database's recorded watermark, lag by that
//! much at most; the next success of each database is written at once by the next
//! process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::db;
use crate::db::sync_status::{KeptSuccess, SyncSuccess, SyncedTenancy};
use crate::db::warm::WarmConnections;
use crate::error::error_chain;

/// The most database statuses one pass writes in a statement.
const MOST_WRITTEN: usize = 1000;

/// The successes kept, and when each database's last was written.
pub struct LazyStatuses {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When this process last wrote each database's success, for those written within
    /// the interval (older entries are dropped by each pass).
    written: HashMap<(Uuid, String), Instant>,
    /// Successes not written yet: the furthest of each database, with when the latest
    /// of them happened.
    kept: HashMap<(Uuid, String), (SyncSuccess, Instant)>,
    /// Every success is written at once from now on (the process is stopping).
    eager: bool,
}

impl LazyStatuses {
    /// Plain successes written at most every `interval` per database; zero writes every
    /// success at once.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How often a pass looks for kept successes that are due: every half interval,
    /// so a kept success waits at most one and a half intervals. `None` with a zero
    /// interval, which keeps nothing.
    pub fn pass_every(&self) -> Option<Duration> {
        (!self.interval.is_zero()).then(|| self.interval / 2)
    }

    /// The successes of `synced` to write with its completion; the others are kept.
    /// `statuses_failing`: the claim found the tenancy with a status a success changes.
    pub fn write_now(
        &self,
        synced: Option<&SyncedTenancy>,
        statuses_failing: bool,
    ) -> Option<SyncedTenancy> {
        let synced = synced?;
        let now = Instant::now();
        let mut state = self.state();
        let lazy = !(self.interval.is_zero() || state.eager || statuses_failing);
        let mut databases = Vec::new();
        for success in &synced.databases {
            let key = (synced.tenancy_id, success.database_id.clone());
            if lazy && self.written_lately(&state, &key, now) {
                keep(&mut state.kept, key, success, now);
                continue;
            }
            // Anything kept of this database goes with it (the write keeps the furthest).
            let mut success = success.clone();
            if let Some((kept, _)) = state.kept.remove(&key) {
                success = furthest(success, &kept);
            }
            state.written.insert(key, now);
            databases.push(success);
        }
        (!databases.is_empty()).then_some(SyncedTenancy {
            tenancy_id: synced.tenancy_id,
            databases,
        })
    }

    /// Writes the kept successes whose database's last write is an interval old (all of
    /// them with `all`), in statements of at most [`MOST_WRITTEN`]. Nothing is taken
    /// before a connection is, so a caller may drop this while it waits for one; what a
    /// statement could not write is kept for the next pass.
    pub async fn write_kept(
        &self,
        connections: &WarmConnections,
        all: bool,
    ) -> Result<(), sqlx::Error> {
        while self.any_due(all) {
            let mut connection = connections.take().await?;
            let due = self.take_due(all);
            let written = db::sync_status::record_kept_successes(&mut *connection, &due).await;
            if let Err(error) = connection.settle(written) {
                let now = Instant::now();
                let mut state = self.state();
                for kept in due {
                    let key = (kept.tenancy_id, kept.success.database_id.clone());
                    state.written.remove(&key);
                    let at = now
                        .checked_sub(Duration::from_secs_f64(kept.seconds_ago))
                        .unwrap_or(now);
                    keep(&mut state.kept, key, &kept.success, at);
                }
                return Err(error);
            }
        }
        Ok(())
    }

    /// Whether a kept success is due (any, with `all`). Forgets the writes older than
    /// the interval of databases with nothing kept: what is remembered is bounded by the
    /// databases synced in the last interval.
    fn any_due(&self, all: bool) -> bool {
        let now = Instant::now();
        let interval = self.interval;
        let mut state = self.state();
        let State { written, kept, .. } = &mut *state;
        written.retain(|key, at| kept.contains_key(key) || now.duration_since(*at) < interval);
        (state.kept.keys()).any(|key| all || !self.written_lately(&state, key, now))
    }

    /// Whether this process wrote `key`'s database's success within the interval.
    fn written_lately(&self, state: &State, key: &(Uuid, String), now: Instant) -> bool {
        (state.written.get(key)).is_some_and(|at| now.duration_since(*at) < self.interval)
    }

    /// Takes up to [`MOST_WRITTEN`] kept successes that are due (all kept ones with
    /// `all`), marking them written now.
    fn take_due(&self, all: bool) -> Vec<KeptSuccess> {
        let now = Instant::now();
        let mut state = self.state();
        let due: Vec<(Uuid, String)> = (state.kept.keys())
            .filter(|key| all || !self.written_lately(&state, key, now))
            .take(MOST_WRITTEN)
            .cloned()
            .collect();
        let State { written, kept, .. } = &mut *state;
        let mut taken = Vec::with_capacity(due.len());
        for key in due {
            if let Some((success, at)) = kept.remove(&key) {
                written.insert(key.clone(), now);
                taken.push(KeptSuccess {
                    tenancy_id: key.0,
                    success,
                    seconds_ago: now.duration_since(at).as_secs_f64(),
                });
            }
        }
        taken
    }

    /// From now on every success is written at once; returns once what was kept is
    /// written, could not be, or `grace` passed (the internal database may be down, and
    /// stopping does not wait for it).
    pub async fn stop_keeping(&self, connections: &WarmConnections, grace: Duration) {
        self.state().eager = true;
        match tokio::time::timeout(grace, self.write_kept(connections, true)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error_chain(&error), "cannot write the statuses of recent syncs; the next sync of each database writes its own"),
            Err(_) => tracing::warn!("the internal database did not answer; the statuses of recent syncs are left to the next sync of each database"),
        }
    }

    /// How many database successes are kept, not written yet.
    pub fn kept(&self) -> usize {
        self.state().kept.len()
    }
}

/// Keeps `success` of `key`'s database, which happened `at`: the furthest of it and
/// what was kept before, dated by the later of the two.
fn keep(
    kept: &mut HashMap<(Uuid, String), (SyncSuccess, Instant)>,
    key: (Uuid, String),
    success: &SyncSuccess,
    at: Instant,
) {
    let merged = match kept.remove(&key) {
        Some((before, before_at)) => (furthest(success.clone(), &before), at.max(before_at)),
        None => (success.clone(), at),
    };
    kept.insert(key, merged);
}

/// Each figure the furthest of the two, as the statement that records them keeps it.
fn furthest(mut success: SyncSuccess, other: &SyncSuccess) -> SyncSuccess {
    success.last_synced_sequence_id = success
        .last_synced_sequence_id
        .max(other.last_synced_sequence_id);
    for (mine, theirs) in success.watermarks.iter_mut().zip(other.watermarks) {
        *mine = (*mine).max(theirs);
    }
    success
}

#[cfg(test)]
mod tests {
    use super::*;

    fn success(database: &str, through: i64) -> SyncSuccess {
        SyncSuccess {
            database_id: database.to_owned(),
            last_synced_sequence_id: through,
            watermarks: [through, through - 1],
        }
    }

    fn synced(tenancy: Uuid, successes: Vec<SyncSuccess>) -> SyncedTenancy {
        SyncedTenancy {
            tenancy_id: tenancy,
            databases: successes,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_success_soon_after_the_last_written_one_is_kept_until_its_interval_ends() {
        let statuses = LazyStatuses::new(Duration::from_secs(2));
        let tenancy = Uuid::new_v4();
        let first = synced(tenancy, vec![success("main", 10)]);
        assert_eq!(
            statuses.write_now(Some(&first), false),
            Some(first.clone()),
            "the first is written"
        );

        tokio::time::advance(Duration::from_millis(500)).await;
        let second = synced(tenancy, vec![success("main", 20)]);
        assert_eq!(statuses.write_now(Some(&second), false), None, "kept");
        let third = synced(tenancy, vec![success("main", 15)]);
        assert_eq!(statuses.write_now(Some(&third), false), None, "kept");
        assert_eq!(statuses.kept(), 1, "one per database");
        assert!(
            statuses.take_due(false).is_empty(),
            "not due before the interval ends"
        );

        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(
            statuses.take_due(false),
            vec![KeptSuccess {
                tenancy_id: tenancy,
                success: success("main", 20),
                seconds_ago: 1.5,
            }],
            "due once the last write is an interval old: the furthest of what was kept, \
             dated by the later of the two"
        );
        assert_eq!(statuses.kept(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_that_changes_a_status_is_written_at_once_with_what_was_kept() {
        let statuses = LazyStatuses::new(Duration::from_secs(2));
        let tenancy = Uuid::new_v4();
        statuses.write_now(Some(&synced(tenancy, vec![success("main", 10)])), false);
        statuses.write_now(Some(&synced(tenancy, vec![success("main", 30)])), false);
        let after_a_failure = synced(tenancy, vec![success("main", 25), success("backup", 25)]);
        assert_eq!(
            statuses.write_now(Some(&after_a_failure), true),
            Some(synced(
                tenancy,
                vec![success("main", 30), success("backup", 25)]
            )),
            "written at once, the furthest of it and what was kept"
        );
        assert_eq!(statuses.kept(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn each_database_is_timed_on_its_own_and_a_zero_interval_writes_everything() {
        let statuses = LazyStatuses::new(Duration::from_secs(2));
        let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
        statuses.write_now(Some(&synced(one, vec![success("main", 1)])), false);
        let other = synced(two, vec![success("main", 2)]);
        assert_eq!(
            statuses.write_now(Some(&other), false),
            Some(other.clone()),
            "another tenancy's database"
        );
        assert_eq!(statuses.write_now(None, false), None);

        let eager = LazyStatuses::new(Duration::ZERO);
        for through in [1, 2, 3] {
            let plain = synced(one, vec![success("main", through)]);
            assert_eq!(eager.write_now(Some(&plain), false), Some(plain.clone()));
        }
        assert_eq!(eager.pass_every(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn once_stopping_every_success_is_written_at_once_and_all_kept_ones_are_due() {
        let statuses = LazyStatuses::new(Duration::from_secs(2));
        let tenancy = Uuid::new_v4();
        statuses.write_now(Some(&synced(tenancy, vec![success("main", 1)])), false);
        statuses.write_now(Some(&synced(tenancy, vec![success("main", 2)])), false);
        let due = statuses.take_due(true);
        assert_eq!(due.len(), 1, "due before its interval ends");
        assert_eq!(due[0].success, success("main", 2));
        statuses.state().eager = true;
        let plain = synced(tenancy, vec![success("main", 3)]);
        assert_eq!(statuses.write_now(Some(&plain), false), Some(plain.clone()));
    }
}
