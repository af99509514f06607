-- The sequencer's batch keeps one plan per session again, one that is right whatever the
-- batch size and whatever the planner's statistics say.
--
-- Migration 18 had the batch planned for each call, against a plan PostgreSQL kept for
-- the session that took the load benchmark's batches 1.1-2.5 s each. Planning each call
-- cost the source more than the batch itself: on a throwaway cluster, two renames and a
-- batch, alternating three rounds, the batch took 957-1,184 us of server CPU planned
-- for each call and 378-495 us as below (benches/scripts/sequencer_plan.sh). And
-- a custom plan is only as good as the statistics: right after an import they say that
-- most rows are flagged, and each batch then read whole tables to find the few flagged
-- rows left.
--
-- A plan kept for the session keeps the estimates of the moment it was made. Under load,
-- one such plan (a first try at this migration, which also turned hash and merge joins
-- off) joined the picked tombstones with "DeletedRow" the wrong way round, made while
-- that table was nearly empty: a walk of its whole key for each picked row, 7,436 x
-- 1,079 rows, two seconds a batch (auto_explain, nested statements). So the batch no
-- longer joins: each table's flagged rows are picked through its partial index, with
-- their row versions (ctid), locked; the update finds exactly those versions by ctid (no
-- other transaction can change a version this one locked); the tenancies are looked up
-- by their keys. No estimate changes any of it. Sequential scans are off for the
-- function (the partial indexes are the way to flagged rows even when the statistics say
-- every row is flagged), and so is JIT (a disabled scan still has a huge cost where it
-- is the only path, a one-row table, and PostgreSQL then compiled those reads, 8-10 ms a
-- call). The deferred owner marks' statement joins marks with their owners, so it is
-- planned whenever it runs (dynamic SQL), which is only when marks are waiting.
--
-- Same arguments and result columns as migration 16's: processes of the previous release
-- keep working with it. The settings hold while the function runs, and for the triggers
-- its statements fire.
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
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set jit = off
as $$
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
        -- Planned for each run (dynamic SQL): it joins marks with their owners, and one
        -- plan kept for the session, made while there were few marks, could walk every
        -- user for each of many.
        execute $marks$
        with due as (
            select distinct "tenancyId", "projectUserId" from "ExternalDbSyncOwnerMark"
        ), lockable as (
            -- Limited after the skip: owners held by long transactions do not keep
            -- the marks of free ones waiting.
            select owner."tenancyId", owner."projectUserId"
            from "ProjectUser" as owner
            join due using ("tenancyId", "projectUserId")
            limit $1
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
                                and owner."projectUserId" = due."projectUserId"))
        $marks$ using batch_size;
    end if;

    -- Number up to batch_size flagged rows of each source table, clear their flags, and
    -- queue one "OutgoingRequest" per tenancy concerned that has a tenant database, in
    -- one statement (one snapshot). Rows locked by an open application transaction are
    -- skipped and picked up by a later batch, after that transaction ended.
    with picked_users as (
        select ctid as locked_version from "ProjectUser"
        where "shouldUpdateSequenceId" = true
        limit batch_size
        for update skip locked
    ), sequenced_users as (
        update "ProjectUser" as target
        set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
        where target.ctid = any (array(select locked_version from picked_users))
        returning target."tenancyId"
    ), picked_channels as (
        select ctid as locked_version from "ContactChannel"
        where "shouldUpdateSequenceId" = true
        limit batch_size
        for update skip locked
    ), sequenced_channels as (
        update "ContactChannel" as target
        set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
        where target.ctid = any (array(select locked_version from picked_channels))
        returning target."tenancyId"
    ), picked_tombstones as (
        select ctid as locked_version from "DeletedRow"
        where "shouldUpdateSequenceId" = true
        limit batch_size
        for update skip locked
    ), sequenced_tombstones as (
        update "DeletedRow" as target
        set "sequenceId" = nextval('global_seq_id'), "shouldUpdateSequenceId" = false
        where target.ctid = any (array(select locked_version from picked_tombstones))
        returning target."tenancyId"
    ), dirty_tenancies as (
        select "tenancyId" from sequenced_users
        union
        select "tenancyId" from sequenced_channels
        union
        select "tenancyId" from sequenced_tombstones
    ), synced_tenancies as (
        -- A tenancy that no longer exists has no databases either.
        select tenancy."id" as "tenancyId"
        from "Tenancy" as tenancy
        where tenancy."id" = any (array(select "tenancyId" from dirty_tenancies))
          and external_db_sync_has_databases(tenancy."config")
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

