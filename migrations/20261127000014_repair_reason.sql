-- Why a tenant database was last brought back to the source by the service: missed
-- deletions whose tombstones were pruned, its watermark gone back (its tables changed
-- outside the sync, dropped, or restored from a backup), or an operator's resync.
-- Shown by status next to "lastResyncAt" and "resyncCount".
alter table "ExternalDbSyncStatus" add column if not exists "lastRepair" text;
