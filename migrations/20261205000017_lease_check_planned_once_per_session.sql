-- The change triggers' check of the sequencer's lease is planned once per session, not
-- once per write.
--
-- Migration 8's lease check is a SQL function. PostgreSQL never inlines a SECURITY
-- DEFINER function, and keeps the plan of a SQL function's body only as long as the
-- expression that calls it, which a trigger's PL/pgSQL function builds anew in every
-- transaction. The change triggers call it once per statement that writes
-- "ProjectUser" or "ContactChannel", so each of the application's writes parsed,
-- analysed and planned it. A PL/pgSQL function keeps its plans for the session.
-- Measured (benches/scripts/lease_check.sh, three rounds): a rename of a user cost the
-- server 210-214 µs with the SQL function, 186-197 µs with this one, and 140-166 µs
-- with the service's triggers off.
--
-- Same name, arguments and result: the triggers of migration 8, and running processes
-- of the previous release, keep working with it.
create or replace function external_db_sync_sequencer_awake() returns boolean
language plpgsql volatile security definer as $$
begin
    return (select last_value > external_db_sync_clock_ms()
            from external_db_sync_sequencer_awake_until);
end;
$$;
grant execute on function external_db_sync_sequencer_awake() to public;

-- The search path of migration 16: the service's schema, then the caller's temporary
-- schema last (CREATE OR REPLACE dropped the setting with the rest of the definition).
do $$
begin
    execute format('alter function external_db_sync_sequencer_awake() '
                   'set search_path = %I, pg_temp', current_schema());
end;
$$;
