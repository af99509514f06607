-- Two gaps closed: a claim that read stale "latest change" values, and writes that the
-- change capture did not see (a changed key, TRUNCATE).

-- Step 1. Each mapping's latest change, read from a snapshot of its own.
--
-- The poller's claim returns, with each request, the tenancy's latest change per
-- mapping, so that a direct sync can leave a mapping with nothing new alone. Read in
-- the claim statement itself, those values came from the statement's snapshot, taken
-- when the claim began. A sequencer batch that relied on the pending request (it holds
-- it locked until it commits) could commit after that snapshot and before the claim
-- reached the request: the claim then took the request with values that did not
-- include the batch, the sync skipped the batch's mapping, and the change was left
-- with no request at all.
--
-- This function is VOLATILE, so in READ COMMITTED each statement in it takes a new
-- snapshot. Called from the claim's RETURNING list, it runs after the claim locked the
-- request, and every batch that relied on that request had committed by then (the
-- lock is released after the commit became visible). A batch that comes later finds
-- the request claimed (no longer pending) and queues a request of its own.
create or replace function external_db_sync_latest_change(tenancy_id uuid, source_table text)
returns bigint
language plpgsql volatile as $$
declare
    latest bigint;
begin
    if source_table = 'ProjectUser' then
        select max("sequenceId") into latest from "ProjectUser"
        where "tenancyId" = tenancy_id;
    else
        select max("sequenceId") into latest from "ContactChannel"
        where "tenancyId" = tenancy_id;
    end if;
    return greatest(latest, (
        select max("sequenceId") from "DeletedRow"
        where "tenancyId" = tenancy_id and "tableName" = source_table));
end;
$$;

-- Step 2. A changed key is a deletion of the old key. The tenant's tables are keyed by
-- the user's or the channel's id alone, so an update that changes the id (or moves the
-- row to another tenancy) must delete the old row there, or it stays forever. The
-- tombstone is written as a delete's would be (the function of the first migration,
-- which reads OLD); the row under its new key is flagged by the update as usual. A
-- channel that only moves to another user of the same tenancy keeps its id: that is an
-- update of its "user_id", not a deletion. The sequencer never changes a key, so its
-- own updates never fire these.
drop trigger if exists external_db_sync_record_key_change on "ProjectUser";
create trigger external_db_sync_record_key_change
    after update on "ProjectUser"
    for each row
    when ((old."tenancyId", old."projectUserId") is distinct from
          (new."tenancyId", new."projectUserId"))
    execute function external_db_sync_record_deletion();

drop trigger if exists external_db_sync_record_key_change on "ContactChannel";
create trigger external_db_sync_record_key_change
    after update on "ContactChannel"
    for each row
    when ((old."tenancyId", old."id") is distinct from (new."tenancyId", new."id"))
    execute function external_db_sync_record_deletion();

-- Step 3. TRUNCATE deletes without firing delete triggers. Before a source table is
-- truncated, every row in it gets a tombstone, set-based, in the truncating
-- transaction (a rolled-back TRUNCATE leaves none). Truncated channels also mark their
-- owners, whose primary e-mail may be gone; if the owners are truncated by the same
-- statement, the mark is truncated with them and their own tombstones say the rest.
-- The tombstones hold the key only.
create or replace function external_db_sync_record_truncation() returns trigger
language plpgsql as $$
begin
    if tg_table_name = 'ProjectUser' then
        insert into "DeletedRow" ("tenancyId", "tableName", "primaryKey")
        select "tenancyId", 'ProjectUser',
               jsonb_build_object('tenancyId', "tenancyId", 'projectUserId', "projectUserId")
        from "ProjectUser";
    else
        insert into "DeletedRow" ("tenancyId", "tableName", "primaryKey")
        select "tenancyId", 'ContactChannel',
               jsonb_build_object('tenancyId', "tenancyId", 'projectUserId', "projectUserId",
                                  'id', "id")
        from "ContactChannel";
        update "ProjectUser" as owner set "shouldUpdateSequenceId" = true
        where exists (
            select from "ContactChannel" as channel
            where channel."tenancyId" = owner."tenancyId"
              and channel."projectUserId" = owner."projectUserId");
    end if;
    return null;
end;
$$;

drop trigger if exists external_db_sync_record_truncation on "ProjectUser";
create trigger external_db_sync_record_truncation
    before truncate on "ProjectUser"
    for each statement execute function external_db_sync_record_truncation();

drop trigger if exists external_db_sync_record_truncation on "ContactChannel";
create trigger external_db_sync_record_truncation
    before truncate on "ContactChannel"
    for each statement execute function external_db_sync_record_truncation();

-- Step 4. A truncation wakes the sequencer like any other write (migration 8's rules:
-- only when no sequencer loop holds a lease).
drop trigger if exists external_db_sync_notify_truncation on "ProjectUser";
create trigger external_db_sync_notify_truncation
    after truncate on "ProjectUser"
    for each statement execute function external_db_sync_notify_changes();

drop trigger if exists external_db_sync_notify_truncation on "ContactChannel";
create trigger external_db_sync_notify_truncation
    after truncate on "ContactChannel"
    for each statement execute function external_db_sync_notify_changes();
