-- Queued requests wake the pollers once per statement that queued any.
--
-- Migration 8 made this a row trigger, so that a sequencer batch that queued nothing
-- would not notify: but a batch that queues requests for many tenancies then called
-- pg_notify once per request (PostgreSQL folds a transaction's identical
-- notifications into one, after checking each against those already queued). A
-- statement trigger with a transition table does both: it looks at the statement's
-- new rows and notifies once, only if there are any. No trigger of this service on an
-- insert into "ProjectUser", "ContactChannel" or "OutgoingRequest" runs per row now.
create or replace function external_db_sync_notify_inserted_requests() returns trigger
language plpgsql as $$
begin
    if exists (select from inserted_requests) then
        perform pg_notify('external_db_sync_requests', '');
    end if;
    return null;
end;
$$;

drop trigger if exists external_db_sync_notify_requests on "OutgoingRequest";
create trigger external_db_sync_notify_requests
    after insert on "OutgoingRequest"
    referencing new table as inserted_requests
    for each statement execute function external_db_sync_notify_inserted_requests();
