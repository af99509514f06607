-- A channel write no longer waits for its owner's row while it holds the channel's.
--
-- Writing a channel marks its owner (migration 13's statement triggers): an update of
-- the owner's row, in the writing transaction, after the channel's rows are locked. A
-- transaction that takes the two the other way round, the owner first and then its
-- channels, is what the application does when it deletes a user (the cascade deletes
-- the channels after the user), or updates a user and then its e-mail: one of each at
-- once deadlocked, and PostgreSQL aborted one of the application's transactions. Without
-- the capture, a channel write does not touch its owner's row and nothing waits in a
-- circle.
--
-- Now the mark takes the owner's row only if no other transaction holds it (SKIP
-- LOCKED). An owner that is held gets a deferred mark instead, a row in a table of its
-- own written in the same transaction, which the sequencer applies in its next batch
-- once the owner is free (and drops if the owner is gone). The guarantee is the one the
-- waiting update gave: the owner is numbered again after the channel write committed,
-- so the change cannot slip between the sequencer's read and its commit.
--
-- What is left: a free owner is still locked until the writing transaction ends (that
-- lock is what keeps the sequencer from numbering the owner before the write commits).
-- A transaction that changes two channels of one user, one after the other, beside one
-- that changes the second channel and then the user, still waits in a circle (the
-- second holds the channel, the first the user through the first channel's mark).
-- Deferring every mark would end that too, at the price of the owner's flag no longer
-- being set in the writing transaction.

-- Step 1. The deferred marks: which owners to mark.
-- The key is generated (a logical replication publication of every table needs one to
-- replicate the sequencer's deletes); generated values never collide, so a writer still
-- never waits on another's mark. The table keeps emptying out: vacuum does not truncate
-- it, which would take a lock that a deferring writer waits on.
create table if not exists "ExternalDbSyncOwnerMark" (
    "id" bigint generated always as identity primary key,
    "tenancyId" uuid not null,
    "projectUserId" uuid not null
);
do $$
begin
    alter table "ExternalDbSyncOwnerMark" set (
        autovacuum_vacuum_threshold = 100, autovacuum_vacuum_scale_factor = 0,
        autovacuum_vacuum_cost_delay = 0, vacuum_truncate = false);
exception when insufficient_privilege then
    raise notice 'external-db-sync: cannot set the autovacuum settings of "ExternalDbSyncOwnerMark": %', sqlerrm;
end;
$$;

-- Step 2. Deferring marks. SECURITY DEFINER, as migration 8's lease check: the triggers
-- run as whichever role writes the source tables, and a missing grant on this table must
-- not make the application's writes fail.
create or replace function external_db_sync_defer_owner_marks(tenancies uuid[], users uuid[])
returns void
language sql volatile security definer as $$
    insert into "ExternalDbSyncOwnerMark" ("tenancyId", "projectUserId")
    select * from unnest(tenancies, users)
$$;
grant execute on function external_db_sync_defer_owner_marks(uuid[], uuid[]) to public;

-- Both SECURITY DEFINER functions look names up in this service's schema, then in the
-- caller's temporary schema last: listed nowhere, pg_temp would come first, and any
-- role that may call them could put a temporary table with a trigger of its own in
-- place of this service's and run it with the owner's rights. (Migration 8's lease
-- check captured the search path without pg_temp, and had the same hole.)
do $$
begin
    execute format('alter function external_db_sync_defer_owner_marks(uuid[], uuid[]) '
                   'set search_path = %I, pg_temp', current_schema());
    execute format('alter function external_db_sync_sequencer_awake() '
                   'set search_path = %I, pg_temp', current_schema());
end;
$$;

-- Step 3. The channel triggers' function (the triggers of migration 13 stay as they
-- are). The owners of the statement's channels (both owners of a channel that moved)
-- are read without a lock; those no other transaction holds are then locked and marked,
-- the others deferred (step 2). The sequencer's own updates of channels are left out by
-- its transaction's setting. An owner this very transaction deleted (a user's delete
-- cascading to its channels) is not read. On inserts, an owner this transaction wrote
-- and that is marked already is left alone, as migration 13 did: no other transaction
-- can hold or number it before this one commits, so an import of users and their
-- e-mails reads its owners once and locks none of them.
--
-- Each owner is looked up by its key (a lateral subquery with a limit, which the
-- planner keeps as it is): a session plans these statements once, with the first
-- statement's transition table, and under migration 13 a plan made for an import of
-- 100,000 channels (a hash join over the whole of "ProjectUser") was then used for
-- every single channel written in that session afterwards. An insert of over 1,000
-- channels has a statement of its own, which joins them with their owners at once.
--
-- The owners read go into arrays, so that one statement locks and marks for all three
-- triggers. Its plan is the generic one: a custom plan knows the arrays' length, so the
-- generic one looks dearer, and the statement was planned again at every call (nearly
-- half of a channel write's time on the server, measured). The setting holds while the
-- function runs, so the triggers its owner update fires plan generically too.
create or replace function external_db_sync_mark_channel_owners() returns trigger
language plpgsql set plan_cache_mode = force_generic_plan as $$
declare
    tenancies uuid[];
    users uuid[];
    deferred_tenancies uuid[];
    deferred_users uuid[];
begin
    if tg_op = 'INSERT' then
        if (select count(*) > 1000 from new_channels) then
            -- An import: its owners joined at once (see above).
            select array_agg(owner."tenancyId"), array_agg(owner."projectUserId")
            into tenancies, users
            from "ProjectUser" as owner
            join (select distinct "tenancyId", "projectUserId" from new_channels) as named
                using ("tenancyId", "projectUserId")
            where not (owner."shouldUpdateSequenceId"
                       and owner.xmin = pg_catalog.pg_current_xact_id()::xid);
        else
            select array_agg(owner."tenancyId"), array_agg(owner."projectUserId")
            into tenancies, users
            from (select distinct "tenancyId", "projectUserId" from new_channels) as named
            cross join lateral (
                select owner."tenancyId", owner."projectUserId", owner."shouldUpdateSequenceId",
                       owner.xmin as written_by
                from "ProjectUser" as owner
                where owner."tenancyId" = named."tenancyId"
                  and owner."projectUserId" = named."projectUserId"
                limit 1) as owner
            where not (owner."shouldUpdateSequenceId"
                       and owner.written_by = pg_catalog.pg_current_xact_id()::xid);
        end if;
    elsif tg_op = 'DELETE' then
        select array_agg(owner."tenancyId"), array_agg(owner."projectUserId")
        into tenancies, users
        from (select distinct "tenancyId", "projectUserId" from old_channels) as named
        cross join lateral (
            select owner."tenancyId", owner."projectUserId" from "ProjectUser" as owner
            where owner."tenancyId" = named."tenancyId"
              and owner."projectUserId" = named."projectUserId"
            limit 1) as owner;
    elsif current_setting('external_db_sync.sequencing', true) is distinct from 'on' then
        select array_agg(owner."tenancyId"), array_agg(owner."projectUserId")
        into tenancies, users
        from (select "tenancyId", "projectUserId" from old_channels
              union
              select "tenancyId", "projectUserId" from new_channels) as named
        cross join lateral (
            select owner."tenancyId", owner."projectUserId" from "ProjectUser" as owner
            where owner."tenancyId" = named."tenancyId"
              and owner."projectUserId" = named."projectUserId"
            limit 1) as owner;
    end if;
    if users is null then
        return null;
    end if;
    with pending as (
        select * from unnest(tenancies, users) as pending("tenancyId", "projectUserId")
    ), lockable as (
        -- The latest version of each owner, locked, looked up by its key.
        select owner.*
        from pending
        cross join lateral (
            select owner."tenancyId", owner."projectUserId", owner."shouldUpdateSequenceId",
                   owner.ctid as locked_version
            from "ProjectUser" as owner
            where owner."tenancyId" = pending."tenancyId"
              and owner."projectUserId" = pending."projectUserId"
            limit 1
            for no key update skip locked) as owner
    ), marked as (
        -- An owner flagged already needs only the lock: the sequencer skips a row held
        -- by another transaction, so it numbers this one after this transaction ends.
        -- The versions locked are the ones updated (no other transaction can change
        -- them meanwhile).
        update "ProjectUser" as owner set "shouldUpdateSequenceId" = true
        where owner.ctid = any (array(select locked_version from lockable
                                      where not "shouldUpdateSequenceId"))
    )
    select array_agg(held."tenancyId"), array_agg(held."projectUserId")
    into deferred_tenancies, deferred_users
    from pending as held
    where not exists (select from lockable
                      where lockable."tenancyId" = held."tenancyId"
                        and lockable."projectUserId" = held."projectUserId");
    if deferred_users is not null then
        perform external_db_sync_defer_owner_marks(deferred_tenancies, deferred_users);
    end if;
    return null;
end;
$$;

-- Step 4. The sequencer batch of migration 12, which applies the deferred marks before
-- it numbers, and goes to sleep only when none is left. Same arguments and result
-- columns, so replicas of the previous release keep working with it.
create or replace function external_db_sync_sequence_batch(
    batch_size bigint,
    sync_engine_path text,
    key_prefix text,
    wake_lease_ms bigint,
    try_sleep boolean,
    out sequencer_enabled boolean,
    out project_users bigint,
    out contact_channels bigint,
    out deleted_rows bigint,
    out tenancies bigint,
    out requests_enqueued bigint,
    out sleeping boolean)
language plpgsql as $$
declare
    awake_until bigint;
begin
    sleeping := false;
    -- The fusebox: switched off, nothing is touched. A missing row reads as on, the
    -- state the first migration creates.
    sequencer_enabled := coalesce(
        (select "sequencerEnabled" from "ExternalDbSyncMetadata"), true);
    if not sequencer_enabled then
        project_users := 0; contact_channels := 0; deleted_rows := 0;
        tenancies := 0; requests_enqueued := 0;
        if wake_lease_ms is not null then
            sleeping := true;
            if (select last_value from external_db_sync_sequencer_awake_until) <> 0 then
                perform setval('external_db_sync_sequencer_awake_until', 0);
            end if;
        end if;
        return;
    end if;

    -- The ordering invariant (migration 7): a batch only starts numbering after the
    -- previous one committed. The setting marks the transaction as the sequencer's.
    perform pg_advisory_xact_lock(7311721969533281649);
    perform set_config('external_db_sync.sequencing', 'on', true);

    -- Owners whose mark a channel write deferred (step 2): marked now, before this
    -- batch picks flagged users, so that it numbers them. An owner another transaction
    -- holds is skipped, as flagged rows are, and its mark kept for a later batch; the
    -- mark of an owner that no longer exists is dropped.
    if exists (select from "ExternalDbSyncOwnerMark") then
        with due as (
            select distinct "tenancyId", "projectUserId" from "ExternalDbSyncOwnerMark"
        ), lockable as (
            -- Limited after the skip: owners held by long transactions do not keep
            -- the marks of free ones waiting.
            select owner."tenancyId", owner."projectUserId"
            from "ProjectUser" as owner
            join due using ("tenancyId", "projectUserId")
            limit batch_size
            for no key update of owner skip locked
        ), marked as (
            update "ProjectUser" as owner set "shouldUpdateSequenceId" = true
            from lockable
            where owner."tenancyId" = lockable."tenancyId"
              and owner."projectUserId" = lockable."projectUserId"
        )
        delete from "ExternalDbSyncOwnerMark" as mark
        using due
        where mark."tenancyId" = due."tenancyId"
          and mark."projectUserId" = due."projectUserId"
          and (exists (select from lockable
                       where lockable."tenancyId" = due."tenancyId"
                         and lockable."projectUserId" = due."projectUserId")
               or not exists (select from "ProjectUser" as owner
                              where owner."tenancyId" = due."tenancyId"
                                and owner."projectUserId" = due."projectUserId"));
    end if;

    -- Number up to batch_size flagged rows of each source table, clear their flags, and
    -- queue one "OutgoingRequest" per tenancy concerned that has a tenant database, in
    -- one statement (one snapshot). Rows locked by an open application transaction are
    -- skipped and picked up by a later batch, after that transaction ended.
    with picked_users as (
        select "tenancyId", "projectUserId" from "ProjectUser"
        where "shouldUpdateSequenceId" = true
        limit batch_size
        for update skip locked
    ), sequenced_users as (
        update "ProjectUser" as target
        set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
        from picked_users as picked
        where target."tenancyId" = picked."tenancyId"
          and target."projectUserId" = picked."projectUserId"
        returning target."tenancyId"
    ), picked_channels as (
        select "tenancyId", "projectUserId", "id" from "ContactChannel"
        where "shouldUpdateSequenceId" = true
        limit batch_size
        for update skip locked
    ), sequenced_channels as (
        update "ContactChannel" as target
        set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
        from picked_channels as picked
        where target."tenancyId" = picked."tenancyId"
          and target."projectUserId" = picked."projectUserId"
          and target."id" = picked."id"
        returning target."tenancyId"
    ), picked_tombstones as (
        select "id" from "DeletedRow"
        where "shouldUpdateSequenceId" = true
        limit batch_size
        for update skip locked
    ), sequenced_tombstones as (
        update "DeletedRow" as target
        set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
        from picked_tombstones as picked
        where target."id" = picked."id"
        returning target."tenancyId"
    ), dirty_tenancies as (
        select "tenancyId" from sequenced_users
        union
        select "tenancyId" from sequenced_channels
        union
        select "tenancyId" from sequenced_tombstones
    ), synced_tenancies as (
        -- A tenancy that no longer exists has no databases either.
        select dirty."tenancyId"
        from dirty_tenancies as dirty
        join "Tenancy" as tenancy on tenancy."id" = dirty."tenancyId"
        where external_db_sync_has_databases(tenancy."config")
    ), enqueued as (
        insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
        select
            key_prefix || "tenancyId"::text,
            jsonb_build_object(
                'url', sync_engine_path,
                'body', jsonb_build_object('tenancyId', "tenancyId"))
        from synced_tenancies
        -- A tenancy that has a pending request gets no second one, but that request is
        -- locked until this batch commits ("where false" writes nothing, yet locks): a
        -- poller skips it meanwhile, so the sync it starts sees this batch. Claimed and
        -- synced before the commit, it would be gone, and the batch's changes left with
        -- no request.
        on conflict ("deduplicationKey") where "startedFulfillingAt" is null
            do update set "attempts" = "OutgoingRequest"."attempts" where false
        returning 1
    )
    select
        (select count(*) from sequenced_users),
        (select count(*) from sequenced_channels),
        (select count(*) from sequenced_tombstones),
        (select count(*) from synced_tenancies),
        (select count(*) from enqueued)
    into project_users, contact_channels, deleted_rows, tenancies, requests_enqueued;

    -- The lease (migration 8), kept under the sequencer lock, so that two sequencers
    -- never race on it.
    if wake_lease_ms is null then
        return;
    end if;
    if try_sleep and project_users + contact_channels + deleted_rows = 0 then
        if pg_try_advisory_xact_lock(7311721969533542763) then
            sleeping := not exists (select from "ProjectUser" where "shouldUpdateSequenceId")
                and not exists (select from "ContactChannel" where "shouldUpdateSequenceId")
                and not exists (select from "DeletedRow" where "shouldUpdateSequenceId")
                and not exists (select from "ExternalDbSyncOwnerMark");
        end if;
    end if;
    awake_until := (select last_value from external_db_sync_sequencer_awake_until);
    if sleeping then
        if awake_until <> 0 then
            perform setval('external_db_sync_sequencer_awake_until', 0);
        end if;
    elsif awake_until < external_db_sync_clock_ms() + wake_lease_ms / 2 then
        perform setval('external_db_sync_sequencer_awake_until',
                       external_db_sync_clock_ms() + wake_lease_ms);
    end if;
end;
$$;

