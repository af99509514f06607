-- Writers notify the sequencer only when it sleeps.
--
-- A NOTIFY is not free for the transaction that sends it: PostgreSQL serializes the
-- commits of all notifying transactions (to keep the notification queue in commit
-- order), so each one waits for the previous one's commit, flush included. With the
-- change trigger of migration 5 notifying on every write, the application's own writes
-- to "ProjectUser" and "ContactChannel" queued behind one another: at 1,000 writes a
-- second the median write took 4-10 ms to commit, against 1.5-2.5 ms without.
--
-- An awake sequencer does not need the notifications: it runs another batch as soon as
-- the last one ends. So an awake sequencer says so, and writers stay quiet meanwhile.
--
-- * The say-so is a lease: "awake until" as milliseconds since the epoch, on the
--   internal database's clock, kept in a sequence. Sequences are not transactional, so
--   a writer reads the current value under any isolation level (a repeatable-read
--   snapshot taken earlier does not hide it), and setting it needs no commit. A
--   sequencer that dies awake stops silencing writers when its lease runs out.
-- * Going to sleep must not lose a writer that saw the lease, stayed quiet, and had not
--   committed yet when the sequencer's last batch looked. Writers therefore hold a
--   shared advisory lock from the moment they look until they commit, and a sequencer
--   whose batch found nothing only goes to sleep when it gets the exclusive lock at
--   once, that is, when no writer is between looking and committing. It then checks,
--   in the same transaction, that no committed row is flagged (locked ones included,
--   which the batch skips), and clears the lease. Writers that come after wait for that
--   transaction (a moment), see no lease, and notify. If a writer holds the lock, or a
--   flagged row is left, the sequencer stays awake and looks again shortly.

-- Step 1. The lease. 0 (the start value) means "asleep, or no sequencer loop at all".
create sequence if not exists external_db_sync_sequencer_awake_until
    minvalue 0 start 0 no cycle;

-- Step 2. The clock both sides read: milliseconds since the epoch.
create or replace function external_db_sync_clock_ms() returns bigint
language sql volatile as $$
    select (extract(epoch from clock_timestamp()) * 1000)::bigint
$$;

-- Step 3. Whether a sequencer holds a lease. SECURITY DEFINER because the triggers run
-- as whichever role writes the source tables, and that role may not be allowed to read
-- the sequence: a missing grant must not make the application's writes fail.
create or replace function external_db_sync_sequencer_awake() returns boolean
language sql volatile security definer set search_path from current as $$
    select last_value > external_db_sync_clock_ms()
    from external_db_sync_sequencer_awake_until
$$;
grant execute on function external_db_sync_sequencer_awake() to public;

-- Step 4. The change trigger's function (the triggers of migration 5 stay as they
-- are): notify only when no sequencer holds a lease. The shared lock (the ASCII of
-- "extdbwak") is held until the writer's transaction ends.
create or replace function external_db_sync_notify_changes() returns trigger
language plpgsql as $$
begin
    if current_setting('external_db_sync.sequencing', true) is distinct from 'on' then
        perform pg_advisory_xact_lock_shared(7311721969533542763);
        if not external_db_sync_sequencer_awake() then
            perform pg_notify('external_db_sync_changes', '');
        end if;
    end if;
    return null;
end;
$$;

-- Step 5. Queued requests wake the pollers only when a request was actually inserted.
-- As a statement trigger (migration 5) it fired for every sequencer batch, even one that
-- queued nothing, so each batch was a notifying transaction and woke every poller for
-- nothing; an awake sequencer runs many such batches. A row trigger fires per inserted
-- row, and PostgreSQL sends a transaction's identical notifications once.
drop trigger if exists external_db_sync_notify_requests on "OutgoingRequest";
create trigger external_db_sync_notify_requests
    after insert on "OutgoingRequest"
    for each row execute function external_db_sync_notify_requests();

-- Step 6. The sequencer batch of migration 7, now also keeping the lease. Its result
-- columns change, so the old function is dropped first.
--
-- wake_lease_ms: null for a caller that runs batches once (the cron route, tests),
--   which leaves the lease alone; for a worker loop, how long its lease lasts. A batch
--   renews the lease once half of it has passed.
-- try_sleep: the worker found nothing last time and would like to sleep. The result
--   column "sleeping" says whether it may: the lease is cleared, and writers notify
--   from now on. It is false when this batch found work after all, when a writer was
--   between looking and committing, or when flagged rows are left (locked by another
--   transaction). A switched-off sequencer gives its lease up too: switching it on
--   again notifies (see the fusebox), and it numbers nothing meanwhile.
-- By hand: select * from external_db_sync_sequence_batch(1000, '<path>', '<prefix>',
-- null, false).
drop function if exists external_db_sync_sequence_batch(bigint, text, text);
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

    -- The lease (see the top of this migration), kept under the sequencer lock, so that
    -- two sequencers never race on it.
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

-- Step 7. The function as migration 7 defined it, for replicas still running the
-- previous release during a rolling deploy: a one-off batch that leaves the lease alone.
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
language sql as $$
    select sequencer_enabled, project_users, contact_channels, deleted_rows, tenancies,
           requests_enqueued
    from external_db_sync_sequence_batch(batch_size, sync_engine_path, key_prefix, null, false)
$$;
