-- Wake-ups: the in-process loops sleep until there is work instead of polling. Each
-- notification is sent at commit and collapses with others of the same transaction, so
-- a busy writer costs one notification per transaction, and an idle system none.

-- Step 1. A change to a source table wakes the sequencers ('external_db_sync_changes').
-- The sequencer's own updates say so with a transaction-local setting and stay silent,
-- or every batch would wake the sequencer once more for nothing.
create or replace function external_db_sync_notify_changes() returns trigger
language plpgsql as $$
begin
    if current_setting('external_db_sync.sequencing', true) is distinct from 'on' then
        perform pg_notify('external_db_sync_changes', '');
    end if;
    return null;
end;
$$;

drop trigger if exists external_db_sync_notify_changes on "ProjectUser";
create trigger external_db_sync_notify_changes
    after insert or update or delete on "ProjectUser"
    for each statement execute function external_db_sync_notify_changes();

drop trigger if exists external_db_sync_notify_changes on "ContactChannel";
create trigger external_db_sync_notify_changes
    after insert or update or delete on "ContactChannel"
    for each statement execute function external_db_sync_notify_changes();

-- Step 2. A queued sync request wakes the pollers ('external_db_sync_requests').
create or replace function external_db_sync_notify_requests() returns trigger
language plpgsql as $$
begin
    perform pg_notify('external_db_sync_requests', '');
    return null;
end;
$$;

drop trigger if exists external_db_sync_notify_requests on "OutgoingRequest";
create trigger external_db_sync_notify_requests
    after insert on "OutgoingRequest"
    for each statement execute function external_db_sync_notify_requests();
