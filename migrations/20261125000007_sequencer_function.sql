-- The sequencer's batch (DESIGN.md §4) as one function, so that a batch is one round
-- trip and one implicit transaction: the fusebox check, the sequencer lock, the
-- numbering and the queueing used to be five statements (fusebox, begin, lock, batch,
-- commit), and under load the service spent more on their round trips than on the
-- numbering itself. It also makes the sequencer callable from psql
-- (`select * from external_db_sync_sequence_batch(1000, '<path>', '<prefix>')`).
--
-- Call it in a transaction of its own (autocommit), or commit right after it: the lock
-- it takes is held until the transaction ends, and every other sequencer waits for it.

-- Step 1. The function. It is VOLATILE (the default), so in READ COMMITTED each
-- statement inside takes a new snapshot: the numbering statement runs after the lock
-- was granted, and so sees every row the previous batch committed.
create or replace function external_db_sync_sequence_batch(
    batch_size bigint,
    sync_engine_path text,
    key_prefix text,
    out sequencer_enabled boolean,
    out project_users bigint,
    out contact_channels bigint,
    out deleted_rows bigint,
    out tenancies bigint,
    out requests_enqueued bigint)
language plpgsql as $$
begin
    -- The fusebox: switched off, nothing is touched. A missing row reads as on, the
    -- state the first migration creates.
    sequencer_enabled := coalesce(
        (select "sequencerEnabled" from "ExternalDbSyncMetadata"), true);
    if not sequencer_enabled then
        project_users := 0; contact_channels := 0; deleted_rows := 0;
        tenancies := 0; requests_enqueued := 0;
        return;
    end if;

    -- The ordering invariant: sequence values are handed out outside of transactions,
    -- so two overlapping batches could otherwise commit out of order, and a reader could
    -- see id 200 committed while id 150 is still in flight. With this lock (the ASCII of
    -- "extdbseq"), a batch only starts numbering after the previous one committed
    -- (PostgreSQL releases locks after the commit became visible). The setting marks
    -- the transaction as the sequencer's, so its own updates send no change
    -- notification that would only wake the sequencer again.
    perform pg_advisory_xact_lock(7311721969533281649);
    perform set_config('external_db_sync.sequencing', 'on', true);

    -- Number up to batch_size flagged rows of each source table, clear their flags, and
    -- queue one "OutgoingRequest" per tenancy concerned, in one statement (one
    -- snapshot). Rows locked by an open application transaction are skipped and picked
    -- up by a later batch, after that transaction ended.
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
    ), enqueued as (
        insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
        select
            key_prefix || "tenancyId"::text,
            jsonb_build_object(
                'url', sync_engine_path,
                'body', jsonb_build_object('tenancyId', "tenancyId"))
        from dirty_tenancies
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
        (select count(*) from dirty_tenancies),
        (select count(*) from enqueued)
    into project_users, contact_channels, deleted_rows, tenancies, requests_enqueued;
end;
$$;
