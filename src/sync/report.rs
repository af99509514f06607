//! What a sync did: per tenancy, per database, per mapping.

use uuid::Uuid;

use super::error::SyncError;
use super::statements::Applied;
use crate::db::sync_status::{SyncSuccess, SyncedTenancy};
use crate::mapping::{Batch, Mapping};

/// The outcome of [`super::sync_tenancy`].
#[derive(Debug)]
pub enum TenancySync {
    /// No such tenancy; nothing was done.
    UnknownTenancy,
    /// `dbSync.externalDatabases` itself is unusable. Permanent.
    InvalidConfig(SyncError),
    /// Each configured database was attempted.
    Synced(TenancyReport),
}

#[derive(Debug)]
pub struct TenancyReport {
    /// One entry per configured database that was due, in id order.
    pub databases: Vec<DatabaseReport>,
    /// Configured databases left alone because their last attempt failed and their
    /// next one is not due yet (`"nextAttemptAt"`), in id order. A retry request is
    /// queued for when the first of them is due.
    pub not_due: Vec<String>,
    /// Whether a new sync request was queued because work was left over.
    pub requeued: bool,
    /// Successes whose status the caller records: [`super::sync_claimed_tenancy`] leaves them
    /// to the completion of the request. `None` when they are recorded already.
    pub unrecorded: Option<SyncedTenancy>,
}

impl TenancyReport {
    /// The databases that synced successfully, with how far.
    pub(super) fn successes(&self, tenancy_id: Uuid) -> SyncedTenancy {
        let databases = self
            .databases
            .iter()
            .filter_map(|database| {
                let synced = database.result.as_ref().ok()?;
                Some(SyncSuccess {
                    database_id: database.database_id.clone(),
                    last_synced_sequence_id: synced.synced_through(),
                    watermarks: synced.watermarks(),
                })
            })
            .collect();
        SyncedTenancy {
            tenancy_id,
            databases,
        }
    }

    /// Whether the sync queues a retry request: some database failed, or was left
    /// alone because its next attempt is not due (see [`super::sync_tenancy`]).
    pub fn queues_retry(&self) -> bool {
        !self.not_due.is_empty()
            || self
                .databases
                .iter()
                .any(|database| database.result.is_err())
    }

    /// Whether some database failed in a way that a later attempt may fix.
    pub fn has_retryable_failure(&self) -> bool {
        self.databases
            .iter()
            .any(|database| matches!(&database.result, Err(error) if error.is_retryable()))
    }
}

#[derive(Debug)]
pub struct DatabaseReport {
    pub database_id: String,
    pub result: Result<DatabaseSynced, SyncError>,
}

#[derive(Debug)]
pub struct DatabaseSynced {
    pub mappings: Vec<MappingReport>,
}

impl DatabaseSynced {
    /// The sequence id up to which every mapping of the database is synced.
    pub fn synced_through(&self) -> i64 {
        self.mappings
            .iter()
            .map(|mapping| mapping.watermark)
            .min()
            .unwrap_or(-1)
    }

    /// Each mapping's watermark, by [`Mapping::index`].
    pub fn watermarks(&self) -> [i64; Mapping::ALL.len()] {
        let mut watermarks = [-1; Mapping::ALL.len()];
        for mapping in &self.mappings {
            watermarks[mapping.mapping.index()] = mapping.watermark;
        }
        watermarks
    }

    /// Changes applied in this run, over all mappings.
    pub fn changes(&self) -> u64 {
        self.mappings.iter().map(|mapping| mapping.changes).sum()
    }

    pub fn more_remaining(&self) -> bool {
        self.mappings.iter().any(|mapping| mapping.more_remaining)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingReport {
    pub mapping: Mapping,
    pub batches: u32,
    pub changes: u64,
    pub upserted: u64,
    pub deleted: u64,
    /// The watermark after this run.
    pub watermark: i64,
    /// The batch budget ran out before the mapping was caught up.
    pub more_remaining: bool,
    /// The table was brought back to the source before its changes were applied: it
    /// had missed deletions whose tombstones were pruned, or its watermark went back.
    pub repair: Option<Repair>,
}

impl MappingReport {
    /// Counts one batch applied; the watermark moves to its last change.
    pub(super) fn add_batch(&mut self, batch: &Batch, applied: Applied) {
        self.batches += 1;
        self.changes += batch.changes;
        self.upserted += applied.upserted;
        self.deleted += applied.deleted;
        self.watermark = batch.last_sequence_id;
    }

    /// Counts a staged batch (see [`super::staged`]).
    pub(super) fn add_staged(&mut self, cutoff: crate::db::changes::Cutoff, applied: Applied) {
        self.batches += 1;
        self.changes += cutoff.changes;
        self.upserted += applied.upserted;
        self.deleted += applied.deleted;
        self.watermark = cutoff.last_sequence_id;
    }

    /// Counts the rows of an initial copy, which applied every change through
    /// `through`; its rows count as changes.
    pub(super) fn add_copy(&mut self, rows: u64, through: i64) {
        self.batches += 1;
        self.changes += rows;
        self.upserted += rows;
        self.watermark = through;
    }

    /// A mapping left as it was: nothing after `watermark`.
    pub(super) fn nothing_after(mapping: Mapping, watermark: i64) -> Self {
        Self {
            mapping,
            batches: 0,
            changes: 0,
            upserted: 0,
            deleted: 0,
            watermark,
            more_remaining: false,
            repair: None,
        }
    }
}

/// A table brought back to the source before its changes were applied: rows the source
/// does not have were removed, and the changes after its watermark are then replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// Rows the source does not have, removed.
    pub removed: u64,
    /// The sequence id through which the mapping then had every deletion, for the
    /// caller to record.
    pub complete_through: i64,
    /// Why it was needed, for status.
    pub reason: String,
}
