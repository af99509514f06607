-- Bookkeeping of the sync engine, read by operators and by the status API.

-- Step 1. One row per (tenancy, external database): how far the database is synced,
-- when it last succeeded, and the last error with whether a retry could fix it.
-- "lastError" never contains a password: the engine writes host, port, database and
-- user at most. Rows go away with their tenancy.
create table if not exists "ExternalDbSyncStatus" (
    "tenancyId" uuid not null references "Tenancy" ("id") on delete cascade,
    "databaseId" text not null,
    "lastSyncedSequenceId" bigint,
    "lastSuccessAt" timestamp(3),
    "lastError" text,
    "lastErrorAt" timestamp(3),
    "lastErrorRetryable" boolean,
    "consecutiveFailures" integer not null default 0,
    "updatedAt" timestamp(3) not null default current_timestamp,
    primary key ("tenancyId", "databaseId")
);
