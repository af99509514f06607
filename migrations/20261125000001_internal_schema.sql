-- The internal schema that external-db-sync reads from and keeps its queue in.
--
-- This migration must also apply to a database where the application already created
-- "Tenancy", "ProjectUser" and "ContactChannel" (and filled them): every statement is
-- written so that it adds what is missing and leaves existing objects and rows alone.
-- It is safe to run twice.

-- Step 1. The global sequence that orders every change. Only the sequencer calls
-- nextval() on it, and only while it holds the sequencer's advisory lock: that is what
-- keeps the set of committed sequence ids a prefix of the assignment order.
create sequence if not exists global_seq_id as bigint start with 1 increment by 1;

-- Step 2. Tenancies. "config" carries dbSync.externalDatabases, the tenant's targets.
create table if not exists "Tenancy" (
    "id" uuid primary key,
    "projectId" text not null,
    "branchId" text not null default 'main',
    "config" jsonb not null default '{}',
    "createdAt" timestamp(3) not null default current_timestamp,
    "updatedAt" timestamp(3) not null default current_timestamp
);
alter table "Tenancy" add column if not exists "config" jsonb not null default '{}';

-- Step 3. Users. A table that already exists keeps its rows; the two bookkeeping columns
-- are added, and "shouldUpdateSequenceId" defaults to true so that every existing row is
-- picked up by the first sequencer run.
create table if not exists "ProjectUser" (
    "tenancyId" uuid not null references "Tenancy" ("id") on delete cascade,
    "projectUserId" uuid not null,
    "displayName" text,
    "profileImageUrl" text,
    "clientMetadata" jsonb,
    "clientReadOnlyMetadata" jsonb,
    "serverMetadata" jsonb,
    "isAnonymous" boolean not null default false,
    "signedUpAt" timestamp(3),
    "createdAt" timestamp(3) not null default current_timestamp,
    "updatedAt" timestamp(3) not null default current_timestamp,
    primary key ("tenancyId", "projectUserId")
);
alter table "ProjectUser" add column if not exists "displayName" text;
alter table "ProjectUser" add column if not exists "profileImageUrl" text;
alter table "ProjectUser" add column if not exists "clientMetadata" jsonb;
alter table "ProjectUser" add column if not exists "clientReadOnlyMetadata" jsonb;
alter table "ProjectUser" add column if not exists "serverMetadata" jsonb;
alter table "ProjectUser" add column if not exists "isAnonymous" boolean not null default false;
alter table "ProjectUser" add column if not exists "signedUpAt" timestamp(3);
alter table "ProjectUser" add column if not exists "sequenceId" bigint;
alter table "ProjectUser" add column if not exists "shouldUpdateSequenceId" boolean not null default true;

-- Step 4. Contact channels. At most one primary channel per user and type: "isPrimary"
-- is TRUE or NULL, and NULLs do not collide in a unique index.
create table if not exists "ContactChannel" (
    "tenancyId" uuid not null,
    "projectUserId" uuid not null,
    "id" uuid not null,
    "type" text not null,
    "isPrimary" boolean check ("isPrimary"),
    "usedForAuth" boolean,
    "isVerified" boolean not null default false,
    "value" text not null,
    "createdAt" timestamp(3) not null default current_timestamp,
    "updatedAt" timestamp(3) not null default current_timestamp,
    primary key ("tenancyId", "projectUserId", "id"),
    foreign key ("tenancyId", "projectUserId")
        references "ProjectUser" ("tenancyId", "projectUserId") on delete cascade
);
alter table "ContactChannel" add column if not exists "isPrimary" boolean;
alter table "ContactChannel" add column if not exists "usedForAuth" boolean;
alter table "ContactChannel" add column if not exists "isVerified" boolean not null default false;
alter table "ContactChannel" add column if not exists "sequenceId" bigint;
alter table "ContactChannel" add column if not exists "shouldUpdateSequenceId" boolean not null default true;
create unique index if not exists "ContactChannel_primary_per_type_key"
    on "ContactChannel" ("tenancyId", "projectUserId", "type", "isPrimary");

-- Step 5. Tombstones: one row per deleted user or contact channel, written by a trigger
-- in the deleting transaction, so a sync can delete the row from the tenant's database.
create table if not exists "DeletedRow" (
    "id" uuid primary key default gen_random_uuid(),
    "tenancyId" uuid not null,
    "tableName" text not null,
    "primaryKey" jsonb not null,
    "data" jsonb,
    "deletedAt" timestamp(3) not null default current_timestamp,
    "sequenceId" bigint,
    "shouldUpdateSequenceId" boolean not null default true
);

-- Step 6. Sequence ids are unique per table, and the sync engine reads each tenancy's
-- rows in sequence order; the partial indexes let the sequencer find flagged rows
-- without scanning the tables.
create unique index if not exists "ProjectUser_sequenceId_key" on "ProjectUser" ("sequenceId");
create unique index if not exists "ContactChannel_sequenceId_key" on "ContactChannel" ("sequenceId");
create unique index if not exists "DeletedRow_sequenceId_key" on "DeletedRow" ("sequenceId");
create index if not exists "ProjectUser_tenancy_sequence_idx"
    on "ProjectUser" ("tenancyId", "sequenceId");
create index if not exists "ContactChannel_tenancy_sequence_idx"
    on "ContactChannel" ("tenancyId", "sequenceId");
create index if not exists "DeletedRow_tenancy_table_sequence_idx"
    on "DeletedRow" ("tenancyId", "tableName", "sequenceId");
create index if not exists "ProjectUser_shouldUpdateSequenceId_idx"
    on "ProjectUser" ("tenancyId", "projectUserId") where "shouldUpdateSequenceId" = true;
create index if not exists "ContactChannel_shouldUpdateSequenceId_idx"
    on "ContactChannel" ("tenancyId", "projectUserId", "id") where "shouldUpdateSequenceId" = true;
create index if not exists "DeletedRow_shouldUpdateSequenceId_idx"
    on "DeletedRow" ("id") where "shouldUpdateSequenceId" = true;

-- Step 7. The queue of sync requests: one row per dirty tenancy. A row is pending while
-- "startedFulfillingAt" is null; the poller claims it by setting that column (a lease)
-- and deletes it once the publish succeeded. At most one pending row per
-- "deduplicationKey", so a busy tenancy is queued once, however many rows changed.
create table if not exists "OutgoingRequest" (
    "id" uuid primary key default gen_random_uuid(),
    "createdAt" timestamp(3) not null default current_timestamp,
    "deduplicationKey" text not null,
    "qstashOptions" jsonb not null,
    "startedFulfillingAt" timestamp(3),
    "attempts" integer not null default 0,
    "nextAttemptAt" timestamp(3) not null default current_timestamp,
    "lastError" text
);
create unique index if not exists "OutgoingRequest_deduplicationKey_pending_key"
    on "OutgoingRequest" ("deduplicationKey") where "startedFulfillingAt" is null;
create index if not exists "OutgoingRequest_pending_idx"
    on "OutgoingRequest" ("nextAttemptAt") where "startedFulfillingAt" is null;

-- Step 8. The fusebox: a single row that switches the sequencer and the poller on or off
-- for every replica at once.
create table if not exists "ExternalDbSyncMetadata" (
    "singleton" boolean primary key default true check ("singleton"),
    "sequencerEnabled" boolean not null default true,
    "pollerEnabled" boolean not null default true,
    "updatedAt" timestamp(3) not null default current_timestamp
);
insert into "ExternalDbSyncMetadata" ("singleton") values (true) on conflict do nothing;

-- Step 9. Change capture, part one: an update of an already sequenced row marks it again.
-- The sequencer is the only writer of "sequenceId", so an update that changes
-- "sequenceId" is the sequencer's own and must leave the flag as it set it; any other
-- update (from the ORM, raw SQL, psql, or the contact-channel trigger below) sets it.
create or replace function external_db_sync_mark_row_changed() returns trigger
language plpgsql as $$
begin
    if new."sequenceId" is not distinct from old."sequenceId" then
        new."shouldUpdateSequenceId" := true;
    end if;
    return new;
end;
$$;

drop trigger if exists external_db_sync_mark_changed on "ProjectUser";
create trigger external_db_sync_mark_changed
    before update on "ProjectUser"
    for each row execute function external_db_sync_mark_row_changed();

drop trigger if exists external_db_sync_mark_changed on "ContactChannel";
create trigger external_db_sync_mark_changed
    before update on "ContactChannel"
    for each row execute function external_db_sync_mark_row_changed();

-- Step 10. Change capture, part two: a user's primary e-mail lives in "ContactChannel",
-- so inserting, updating or deleting a channel marks its owning user (both owners when
-- a channel moves). The update is unconditional on purpose: if the sequencer holds the
-- user's row, this waits for it and then marks the freshly sequenced version, so the
-- change can never slip between the sequencer's read and its commit. The sequencer's
-- own update of a channel is excluded by the trigger's WHEN clause.
create or replace function external_db_sync_mark_channel_owner() returns trigger
language plpgsql as $$
begin
    if tg_op in ('UPDATE', 'DELETE') then
        update "ProjectUser" set "shouldUpdateSequenceId" = true
        where "tenancyId" = old."tenancyId" and "projectUserId" = old."projectUserId";
    end if;
    if tg_op = 'INSERT' or (tg_op = 'UPDATE' and (new."tenancyId", new."projectUserId")
            is distinct from (old."tenancyId", old."projectUserId")) then
        update "ProjectUser" set "shouldUpdateSequenceId" = true
        where "tenancyId" = new."tenancyId" and "projectUserId" = new."projectUserId";
    end if;
    return null;
end;
$$;

drop trigger if exists external_db_sync_mark_owner on "ContactChannel";
drop trigger if exists external_db_sync_mark_owner_on_write on "ContactChannel";
drop trigger if exists external_db_sync_mark_owner_on_update on "ContactChannel";
create trigger external_db_sync_mark_owner_on_write
    after insert or delete on "ContactChannel"
    for each row execute function external_db_sync_mark_channel_owner();
create trigger external_db_sync_mark_owner_on_update
    after update on "ContactChannel"
    for each row when (old."sequenceId" is not distinct from new."sequenceId")
    execute function external_db_sync_mark_channel_owner();

-- Step 11. Change capture, part three: deleting a user or a contact channel writes a
-- tombstone in the same transaction (a rolled-back delete leaves none). The primary key
-- is kept as jsonb with the source column names, and the old row as "data".
create or replace function external_db_sync_record_deletion() returns trigger
language plpgsql as $$
declare
    old_row jsonb := to_jsonb(old);
    primary_key jsonb := jsonb_build_object(
        'tenancyId', old_row -> 'tenancyId', 'projectUserId', old_row -> 'projectUserId');
begin
    if tg_table_name = 'ContactChannel' then
        primary_key := primary_key || jsonb_build_object('id', old_row -> 'id');
    end if;
    insert into "DeletedRow" ("tenancyId", "tableName", "primaryKey", "data")
    values (old."tenancyId", tg_table_name, primary_key, old_row);
    return null;
end;
$$;

drop trigger if exists external_db_sync_record_deletion on "ProjectUser";
create trigger external_db_sync_record_deletion
    after delete on "ProjectUser"
    for each row execute function external_db_sync_record_deletion();

drop trigger if exists external_db_sync_record_deletion on "ContactChannel";
create trigger external_db_sync_record_deletion
    after delete on "ContactChannel"
    for each row execute function external_db_sync_record_deletion();
