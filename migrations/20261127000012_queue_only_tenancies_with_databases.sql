-- A tenancy with no tenant database costs no sync: the sequencer still numbers its
-- changed rows, but queues no request for it (a database added later starts from the
-- beginning anyway). A tenancy whose databases change gets a request of its own, so
-- that a new database is filled without waiting for its tenancy's next change.

-- Step 1. Whether a tenancy's configuration names tenant databases. Anything present
-- other than an empty object counts: a malformed entry must still reach the sync
-- engine, which records the error in the status for the operator to see.
create or replace function external_db_sync_has_databases(config jsonb) returns boolean
language sql immutable parallel safe as $$
    select coalesce(config #> '{dbSync,externalDatabases}', 'null'::jsonb)
           not in ('null'::jsonb, '{}'::jsonb)
$$;

-- Step 2. The sequencer batch of migration 8, queueing only tenancies with databases.
-- Its result column "tenancies" now counts those tenancies (the ones a request is
-- queued or relied on for); the caller compares it with "requests_enqueued" to learn
-- whether the batch relied on pending requests, which it locked until it commits
-- (pollers may have skipped them meanwhile). Same arguments and result columns as
-- before, so replicas of the previous release keep working with it.
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
                and not exists (select from "DeletedRow" where "shouldUpdateSequenceId");
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

-- Step 3. A tenancy whose tenant databases change (one added, one's connection string
-- changed) is queued for a sync, in the changing transaction: a new database is filled
-- from the beginning, and a fixed one retried, without waiting for the tenancy's next
-- change. The key and path are those of src/db/queue.rs (SYNC_REQUEST_KEY_PREFIX,
-- SYNC_ENGINE_PATH).
--
-- The sequencer's lock is taken first. A batch that read the configuration before this
-- change (and so queued nothing for the tenancy) has then committed before the request
-- exists, and the sync it starts sees the batch's rows; a batch that comes after waits
-- for this transaction and sees the databases. Keep such transactions short: the
-- sequencer waits for them.
create or replace function external_db_sync_queue_new_databases() returns trigger
language plpgsql as $$
begin
    perform pg_advisory_xact_lock(7311721969533281649);
    insert into "OutgoingRequest" ("deduplicationKey", "qstashOptions")
    values (
        'external-db-sync:' || new."id"::text,
        jsonb_build_object(
            'url', '/api/latest/internal/external-db-sync/sync-engine',
            'body', jsonb_build_object('tenancyId', new."id")))
    on conflict ("deduplicationKey") where "startedFulfillingAt" is null
        do update set "attempts" = "OutgoingRequest"."attempts" where false;
    return null;
end;
$$;

drop trigger if exists external_db_sync_queue_new_databases on "Tenancy";
create trigger external_db_sync_queue_new_databases
    after insert on "Tenancy"
    for each row
    when (external_db_sync_has_databases(new."config"))
    execute function external_db_sync_queue_new_databases();

drop trigger if exists external_db_sync_queue_changed_databases on "Tenancy";
create trigger external_db_sync_queue_changed_databases
    after update of "config" on "Tenancy"
    for each row
    when (external_db_sync_has_databases(new."config")
          and old."config" #> '{dbSync,externalDatabases}'
              is distinct from new."config" #> '{dbSync,externalDatabases}')
    execute function external_db_sync_queue_new_databases();
