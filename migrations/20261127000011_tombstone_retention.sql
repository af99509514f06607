-- Tombstones keep only what a sync needs, and go once every database has them.

-- Step 1. A tombstone holds the deleted row's key, never its data: the e-mails and
-- metadata of deleted users are not kept. What older versions stored is erased.
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
    insert into "DeletedRow" ("tenancyId", "tableName", "primaryKey")
    values (old."tenancyId", tg_table_name, primary_key);
    return null;
end;
$$;

update "DeletedRow" set "data" = null where "data" is not null;

-- Step 2. How far each tenancy's tombstones of each table have been pruned. A tenant
-- database whose watermark is older than this missed deletions that no tombstone
-- records any more: the sync engine brings it back to the source exactly.
create table if not exists "ExternalDbSyncPrunedTombstones" (
    "tenancyId" uuid not null,
    "tableName" text not null,
    "prunedThrough" bigint not null,
    primary key ("tenancyId", "tableName")
);

-- How far each database has applied each source table's changes (its mappings'
-- watermarks), recorded with its successes: a tombstone is pruned once every database
-- of its tenancy is past it for its table.
alter table "ExternalDbSyncStatus" add column if not exists "usersSyncedThrough" bigint;
alter table "ExternalDbSyncStatus"
    add column if not exists "contactChannelsSyncedThrough" bigint;

-- Where the last pruning pass stopped, so that the next one goes on from there.
alter table "ExternalDbSyncMetadata" add column if not exists "pruneCursor" uuid;

-- Step 3. Prunes, in one bounded pass, the tombstones that every database of their
-- tenancy has synced past: at most batch_size tombstones over at most max_tenancies
-- tenancies, taken in tenancy order from where the last pass stopped. A tenancy with no
-- database (or one that no longer exists) keeps none: a database added later starts
-- from the beginning. A database that never synced keeps all of its tenancy's.
-- Returns the number pruned. Concurrent passes do not wait for each other: one of
-- them runs, the others return 0.
create or replace function external_db_sync_prune_tombstones(
    batch_size integer, max_tenancies integer
) returns integer
language plpgsql as $$
declare
    position uuid;
    previous uuid;
    tenancy uuid;
    databases jsonb;
    users_horizon bigint;
    channels_horizon bigint;
    visited integer := 0;
    pruned integer := 0;
    pruned_now integer;
begin
    if not pg_try_advisory_xact_lock(7308612243112473198) then -- "external tombstone"
        return 0;
    end if;
    select "pruneCursor" into position from "ExternalDbSyncMetadata";
    while visited < max_tenancies and pruned < batch_size loop
        select "tenancyId" into tenancy from "DeletedRow"
        where position is null or "tenancyId" > position
        order by "tenancyId"
        limit 1;
        if tenancy is null then
            -- The end: the next pass starts over.
            position := null;
            exit;
        end if;
        visited := visited + 1;
        previous := position;
        position := tenancy;

        select "config" -> 'dbSync' -> 'externalDatabases' into databases
        from "Tenancy" where "id" = tenancy;
        if databases is null or jsonb_typeof(databases) <> 'object' or databases = '{}' then
            users_horizon := 9223372036854775807;
            channels_horizon := 9223372036854775807;
        else
            select min(coalesce(status."usersSyncedThrough", -1)),
                   min(coalesce(status."contactChannelsSyncedThrough", -1))
            into users_horizon, channels_horizon
            from jsonb_object_keys(databases) as configured("databaseId")
            left join "ExternalDbSyncStatus" as status
                on status."tenancyId" = tenancy
               and status."databaseId" = configured."databaseId";
        end if;

        with doomed as (
            select "id" from "DeletedRow"
            where "tenancyId" = tenancy
              and "sequenceId" <= case "tableName" when 'ProjectUser' then users_horizon
                                                   else channels_horizon end
            order by "tenancyId", "tableName", "sequenceId"
            limit batch_size - pruned
        ), gone as (
            delete from "DeletedRow" as tombstone
            using doomed
            where tombstone."id" = doomed."id"
            returning tombstone."tableName", tombstone."sequenceId"
        ), recorded as (
            insert into "ExternalDbSyncPrunedTombstones" as done
                ("tenancyId", "tableName", "prunedThrough")
            select tenancy, "tableName", max("sequenceId") from gone group by "tableName"
            on conflict ("tenancyId", "tableName") do update
                set "prunedThrough" = greatest(done."prunedThrough", excluded."prunedThrough")
        )
        select count(*) into pruned_now from gone;
        pruned := pruned + pruned_now;
        if pruned >= batch_size then
            -- The budget ran out inside this tenancy: the next pass starts with it.
            position := previous;
        end if;
    end loop;
    update "ExternalDbSyncMetadata" set "pruneCursor" = position;
    return pruned;
end;
$$;

-- Step 4. A database brought back to the source exactly after it missed pruned
-- tombstones (its rows not in the source removed): every deletion up to
-- "deletionsCompleteThrough" is applied there, so pruning up to it concerns it no more.
-- When and how often that happened (once per table brought back) is kept for
-- operators.
alter table "ExternalDbSyncStatus" add column if not exists "deletionsCompleteThrough" bigint;
alter table "ExternalDbSyncStatus" add column if not exists "lastResyncAt" timestamp(3);
alter table "ExternalDbSyncStatus"
    add column if not exists "resyncCount" integer not null default 0;
