-- In `direct` mode the sequencer's batch claims the requests it queues for its own
-- process's poller, in the same statement (DESIGN.md §11: "the process that enqueues a
-- request may claim it in the same statement").
--
-- Each request was inserted pending, announced (NOTIFY), claimed by the poller in a
-- statement of its own (an update that moves the row to the in-flight indexes), and
-- deleted once synced. Now a batch given a claim limit inserts the request of a
-- tenancy it may sync at once already claimed: no notification, no claim, one row
-- version. The request stays the durable record of the work until its sync settles: a
-- process that dies leaves it claimed, and its lease runs out as any claim's does.
--
-- A tenancy's request is claimed at its insert only when nothing else of its queue is
-- there: no request pending (the batch relies on that one, as before) and none claimed
-- (in flight, or its lease run out: the poller takes those over), and no status that a
-- sync must reserve or leave alone (a failing database: those go through the poller's
-- claim, which reserves them). At most `claim_limit` of them (the poller's free slots),
-- and none while the fusebox has the poller switched off.
--
-- The batch also deletes the requests whose syncs were completed and left for the next
-- claim (`completed`), first, in its own statement: the tenancies' new requests then
-- see nothing in flight.
--
-- The claimed requests are read back, with what a sync needs of their tenancies, in a
-- statement after the numbering (its snapshot sees this batch's numbers): one row each,
-- the batch's counts repeated in every row; with none claimed, one row of counts.
create or replace function external_db_sync_sequence_and_claim(
    batch_size bigint,
    sync_engine_path text,
    key_prefix text,
    wake_lease_ms bigint,
    try_sleep boolean,
    claim_limit bigint,
    completed uuid[])
returns table (
    sequencer_enabled boolean,
    project_users bigint,
    contact_channels bigint,
    deleted_rows bigint,
    tenancies bigint,
    requests_enqueued bigint,
    sleeping boolean,
    requests_claimed bigint,
    "id" uuid,
    "deduplicationKey" text,
    "qstashOptions" jsonb,
    "attempts" integer,
    "startedFulfillingAt" timestamp,
    "queuedSeconds" float8,
    "externalDatabases" jsonb,
    "latestUserChange" bigint,
    "latestChannelChange" bigint,
    "notDueDatabases" text[],
    "usersPrunedThrough" bigint,
    "channelsPrunedThrough" bigint,
    "heldBack" boolean,
    "statusesFailing" boolean)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set jit = off
as $$
#variable_conflict use_column
declare
    awake_until bigint;
    claimed_ids uuid[];
begin
    sleeping := false;
    requests_claimed := 0;
    project_users := 0; contact_channels := 0; deleted_rows := 0;
    tenancies := 0; requests_enqueued := 0;

    -- Settled requests go whatever the fusebox says: their syncs are done.
    if cardinality(completed) > 0 then
        delete from "OutgoingRequest" as request
        where request."id" in (select * from unnest(completed) limit cardinality(completed));
    end if;

    -- The fusebox: switched off, nothing is touched. A missing row reads as on, the
    -- state the first migration creates.
    sequencer_enabled := coalesce(
        (select "sequencerEnabled" from "ExternalDbSyncMetadata"), true);
    if not sequencer_enabled then
        if wake_lease_ms is not null then
            sleeping := true;
            if (select last_value from external_db_sync_sequencer_awake_until) <> 0 then
                perform setval('external_db_sync_sequencer_awake_until', 0);
            end if;
        end if;
        return next;
        return;
    end if;
    if not coalesce((select "pollerEnabled" from "ExternalDbSyncMetadata"), true) then
        claim_limit := 0;
    end if;

    -- The ordering invariant (migration 7): a batch only starts numbering after the
    -- previous one committed. The setting marks the transaction as the sequencer's.
    perform pg_advisory_xact_lock(7311721969533281649);
    perform set_config('external_db_sync.sequencing', 'on', true);

    -- Owners whose mark a channel write deferred (migration 16), as there.
    if exists (select from "ExternalDbSyncOwnerMark") then
        execute $marks$
        with due as (
            select distinct "tenancyId", "projectUserId" from "ExternalDbSyncOwnerMark"
        ), lockable as (
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

    -- Migration 19's numbering and queuing, in one statement (one snapshot), with the
    -- claim at insert.
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
        select tenancy."id" as "tenancyId", key_prefix || tenancy."id"::text as key
        from "Tenancy" as tenancy
        where tenancy."id" = any (array(select "tenancyId" from dirty_tenancies))
          and external_db_sync_has_databases(tenancy."config")
    ), claimable as (
        -- Read by key through the queue's key indexes, each tenancy at a time.
        select synced."tenancyId"
        from synced_tenancies as synced
        where claim_limit > 0
          and not exists (select from "OutgoingRequest" as queued
                          where queued."deduplicationKey" = synced.key
                            and queued."startedFulfillingAt" is null)
          and not exists (select from "OutgoingRequest" as queued
                          where queued."deduplicationKey" = synced.key
                            and queued."startedFulfillingAt" is not null)
          and not exists (select from "ExternalDbSyncStatus" as status
                          where status."tenancyId" = synced."tenancyId"
                            and (status."consecutiveFailures" > 0
                                 or status."nextAttemptAt" is not null))
        limit claim_limit
    ), enqueued as (
        insert into "OutgoingRequest"
            ("deduplicationKey", "qstashOptions", "startedFulfillingAt", "attempts")
        select
            synced.key,
            jsonb_build_object(
                'url', sync_engine_path,
                'body', jsonb_build_object('tenancyId', synced."tenancyId")),
            case when claiming."tenancyId" is not null then clock_timestamp() end,
            case when claiming."tenancyId" is not null then 1 else 0 end
        from synced_tenancies as synced
        left join claimable as claiming using ("tenancyId")
        -- A pending request is relied on and locked until this batch commits, as in
        -- migration 19. A claimed insert never conflicts (the index is of pending rows).
        on conflict ("deduplicationKey") where "startedFulfillingAt" is null
            do update set "attempts" = "OutgoingRequest"."attempts" where false
        returning "OutgoingRequest"."id", "OutgoingRequest"."startedFulfillingAt"
    )
    select
        (select count(*) from sequenced_users),
        (select count(*) from sequenced_channels),
        (select count(*) from sequenced_tombstones),
        (select count(*) from synced_tenancies),
        (select count(*) from enqueued),
        (select array_agg(enqueued."id") from enqueued
         where enqueued."startedFulfillingAt" is not null)
    into project_users, contact_channels, deleted_rows, tenancies, requests_enqueued,
         claimed_ids;
    requests_claimed := coalesce(cardinality(claimed_ids), 0);

    -- A tenancy that had a pending request got no new one, so no insert notified the
    -- pollers; but the batch locked that request until it commits, and a poller that
    -- tried to claim it meanwhile skipped it: delivered at the commit, this wakes them.
    if tenancies > requests_enqueued then
        perform pg_notify('external_db_sync_requests', '');
    end if;

    -- The lease (migration 8), kept under the sequencer lock, so that two sequencers
    -- never race on it.
    if wake_lease_ms is not null then
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
    end if;

    if requests_claimed = 0 then
        return next;
        return;
    end if;
    -- What the poller's claim reads for each request it takes (db::queue::claim), from
    -- this later snapshot: the latest changes include this batch's numbers.
    return query
    select sequencer_enabled, project_users, contact_channels, deleted_rows, tenancies,
           requests_enqueued, sleeping, requests_claimed,
           request."id", request."deduplicationKey", request."qstashOptions",
           request."attempts", request."startedFulfillingAt"::timestamp, 0::float8,
           coalesce(tenancy."config" -> 'dbSync' -> 'externalDatabases', 'null'::jsonb),
           external_db_sync_latest_change(tenancy."id", 'ProjectUser'),
           external_db_sync_latest_change(tenancy."id", 'ContactChannel'),
           '{}'::text[],
           (select pruned."prunedThrough" from "ExternalDbSyncPrunedTombstones" as pruned
            where pruned."tenancyId" = tenancy."id" and pruned."tableName" = 'ProjectUser'),
           (select pruned."prunedThrough" from "ExternalDbSyncPrunedTombstones" as pruned
            where pruned."tenancyId" = tenancy."id" and pruned."tableName" = 'ContactChannel'),
           false, false
    from "OutgoingRequest" as request
    join "Tenancy" as tenancy
      on tenancy."id" = (request."qstashOptions" #>> '{body,tenancyId}')::uuid
    where request."id" = any (claimed_ids);
end;
$$;

-- Migration 19's function, for processes of the previous release during a rolling
-- deploy: the batch above, claiming nothing.
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
language sql
as $$
    select batch.sequencer_enabled, batch.project_users, batch.contact_channels,
           batch.deleted_rows, batch.tenancies, batch.requests_enqueued, batch.sleeping
    from external_db_sync_sequence_and_claim(
        batch_size, sync_engine_path, key_prefix, wake_lease_ms, try_sleep, 0, '{}')
        as batch
$$;

-- A request inserted already claimed has its claimant: only pending inserts announce.
create or replace function external_db_sync_notify_inserted_requests() returns trigger
language plpgsql as $$
begin
    if exists (select from inserted_requests where "startedFulfillingAt" is null) then
        perform pg_notify('external_db_sync_requests', '');
    end if;
    return null;
end;
$$;
