-- Failing tenant databases are retried on a schedule of their own (README, "Tenant
-- databases"): after a failure, a database is not attempted again before
-- "nextAttemptAt", however many changes arrive meanwhile; a success clears it. The
-- delay grows with "consecutiveFailures" (exponential, with jitter, capped; longer for
-- failures that need a person). A sync request keyed "external-db-sync-retry:<tenancy>"
-- comes due at the earliest "nextAttemptAt" of the tenancy's databases, so a database
-- heals without waiting for its tenancy to change.
alter table "ExternalDbSyncStatus" add column if not exists "nextAttemptAt" timestamp(3);

-- The digest (md5 of the JSON text) of the database's configuration entry when it last
-- failed: an entry changed since then (a fixed password, another host) is due at once.
alter table "ExternalDbSyncStatus" add column if not exists "failedConfigDigest" text;
