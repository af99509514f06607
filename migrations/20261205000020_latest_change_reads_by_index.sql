-- The look-up of a tenancy's latest change reads by index, whatever the estimates of the
-- moment its plans were made.
--
-- Migration 9's external_db_sync_latest_change is PL/pgSQL, so each session keeps its
-- statements' plans, generic ones after a few calls, with the estimates of that moment.
-- The poller's claim calls it twice for every request it takes, the metrics' backlog for
-- every tenant database. Under the load benchmark a session planned it while
-- "DeletedRow" was nearly empty (a sequential scan is then the cheapest read) and kept
-- that plan while the writers' deletes grew the table to 5,000 tombstones: each look-up
-- read all of them, 30-50 ms on the saturated machine (one claim of 19 requests spent 52
-- of its 62 ms in them). The poller's loop spent its time in claims (mean 34-51 ms,
-- 19-29 a second) and requests waited to be claimed.
--
-- Sequential scans off for the function: each of its reads is then the index on
-- ("tenancyId", ["tableName",] "sequenceId"), read backwards from the tenancy's highest
-- sequence id, whatever the table's size was when the plan was made. JIT off, as for
-- migration 19's batch: no read here is worth compiling. Same name, arguments and
-- result: running processes of the previous release keep working with it.
alter function external_db_sync_latest_change(uuid, text)
    set enable_seqscan = off;
alter function external_db_sync_latest_change(uuid, text)
    set jit = off;
