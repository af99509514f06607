-- Change capture that costs less per row, for the application's writes and the
-- sequencer's, and autovacuum that keeps up with the tables this service churns.

-- Step 1. The mark trigger (migration 1) skips the sequencer's own updates in its WHEN
-- clause instead of in its body: numbering a row no longer runs a PL/pgSQL function.
drop trigger if exists external_db_sync_mark_changed on "ProjectUser";
create trigger external_db_sync_mark_changed
    before update on "ProjectUser"
    for each row
    when (new."sequenceId" is not distinct from old."sequenceId")
    execute function external_db_sync_mark_row_changed();

drop trigger if exists external_db_sync_mark_changed on "ContactChannel";
create trigger external_db_sync_mark_changed
    before update on "ContactChannel"
    for each row
    when (new."sequenceId" is not distinct from old."sequenceId")
    execute function external_db_sync_mark_row_changed();

-- Step 2. A channel write marks its owners once per statement, set-based, instead of
-- one UPDATE "ProjectUser" per channel row: an import of a million channels ran a
-- million single-row updates. The transition tables hold the statement's channels.
--
-- The update stays unconditional (migration 1, step 10): if the sequencer holds an
-- owner's row, it waits for it and marks the freshly numbered version. One exception,
-- on inserts: an owner that this very transaction wrote (its xmin) and that is marked
-- already. No other transaction can hold or number it before this one commits, so its
-- mark stands; an import that inserts users and their e-mails then updates none of them
-- again. A row written in a subtransaction has another xmin and is updated: slower,
-- never wrong.
--
-- The sequencer's own updates of channels are left out by its transaction's setting
-- (migration 8), as the WHEN clause of the row trigger did.
create or replace function external_db_sync_mark_channel_owners() returns trigger
language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        update "ProjectUser" as owner set "shouldUpdateSequenceId" = true
        from (select distinct "tenancyId", "projectUserId" from new_channels) as changed
        where owner."tenancyId" = changed."tenancyId"
          and owner."projectUserId" = changed."projectUserId"
          and not (owner."shouldUpdateSequenceId"
                   and owner.xmin = pg_catalog.pg_current_xact_id()::xid);
    elsif tg_op = 'DELETE' then
        update "ProjectUser" as owner set "shouldUpdateSequenceId" = true
        from (select distinct "tenancyId", "projectUserId" from old_channels) as changed
        where owner."tenancyId" = changed."tenancyId"
          and owner."projectUserId" = changed."projectUserId";
    elsif current_setting('external_db_sync.sequencing', true) is distinct from 'on' then
        -- Both owners of a channel that moved.
        update "ProjectUser" as owner set "shouldUpdateSequenceId" = true
        from (select "tenancyId", "projectUserId" from old_channels
              union
              select "tenancyId", "projectUserId" from new_channels) as changed
        where owner."tenancyId" = changed."tenancyId"
          and owner."projectUserId" = changed."projectUserId";
    end if;
    return null;
end;
$$;

drop trigger if exists external_db_sync_mark_owner_on_write on "ContactChannel";
drop trigger if exists external_db_sync_mark_owner_on_update on "ContactChannel";
drop trigger if exists external_db_sync_mark_owners_on_insert on "ContactChannel";
create trigger external_db_sync_mark_owners_on_insert
    after insert on "ContactChannel"
    referencing new table as new_channels
    for each statement execute function external_db_sync_mark_channel_owners();
drop trigger if exists external_db_sync_mark_owners_on_delete on "ContactChannel";
create trigger external_db_sync_mark_owners_on_delete
    after delete on "ContactChannel"
    referencing old table as old_channels
    for each statement execute function external_db_sync_mark_channel_owners();
drop trigger if exists external_db_sync_mark_owners_on_update on "ContactChannel";
create trigger external_db_sync_mark_owners_on_update
    after update on "ContactChannel"
    referencing old table as old_channels new table as new_channels
    for each statement execute function external_db_sync_mark_channel_owners();

-- Step 3. Autovacuum for the tables this service churns. Every change updates a source
-- row twice (marked, numbered), every sync request is inserted and deleted, and every
-- sync updates its status row: with the default thresholds (20 % of a table changed), a
-- large table collects millions of dead rows before it is vacuumed, and its partial
-- indexes and the queue's scans slow down with them. These vacuum (and analyze) after a
-- fixed number of changes instead, without the cost delay that would stretch a vacuum
-- over minutes. The source tables belong to the application; where this service's role
-- may not alter them, it says so and goes on (the application's owner can apply the
-- same settings).
do $$
declare
    churned text;
begin
    foreach churned in array array['OutgoingRequest', 'ExternalDbSyncStatus',
                                   'ExternalDbSyncMetadata', 'DeletedRow',
                                   'ProjectUser', 'ContactChannel'] loop
        begin
            execute format(
                'alter table %I set (autovacuum_vacuum_scale_factor = 0.01, '
                'autovacuum_vacuum_threshold = 1000, '
                'autovacuum_vacuum_insert_scale_factor = 0.05, '
                'autovacuum_analyze_scale_factor = 0.02, '
                'autovacuum_analyze_threshold = 1000, '
                'autovacuum_vacuum_cost_delay = 0)', churned);
        exception when insufficient_privilege then
            raise notice 'external-db-sync: cannot set the autovacuum settings of % (not its owner): %',
                churned, sqlerrm;
        end;
    end loop;
end;
$$;
