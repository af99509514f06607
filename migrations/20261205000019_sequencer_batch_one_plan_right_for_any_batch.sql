-- The sequencer's batch keeps one plan per session again, one that is right whatever the
-- batch size and whatever the planner's statistics say.
--
-- Migration 18 had the batch planned for each call, against a plan PostgreSQL kept for
-- the session that took the load benchmark's batches 1.1-2.5 s each. Planning each call
-- cost the source more than the batch itself: on a throwaway cluster, two renames and a
-- batch, alternating three rounds, the batch took 1,090-1,390 us of server CPU planned
-- for each call and 420-600 us with the plan below (benches/scripts/sequencer_plan.sh).
-- And a custom plan is only as good as the statistics: right after an import they say
-- that most rows are flagged, and each batch then read whole tables to find the few
-- flagged rows left (a 200,000-user import: 17-18 ms for a batch that found nothing,
-- until the tables were analyzed again).
--
-- Every statement of the batch finds its rows through an index: flagged rows through
-- the partial indexes on "shouldUpdateSequenceId", the rows to update and the tenancies
-- by their keys, one look-up per row. That is the right plan for one row and for the
-- 10,000 of the largest batch (the import above was numbered in 115-130 ms per 10,000
-- rows this way, 175-190 ms with custom plans), so the planner is left no other: no
-- sequential scan, hash join or merge join, and the one generic plan, made once per
-- session. A disabled scan still has a huge cost where it is the only way (a table of
-- one row), which would make PostgreSQL compile the statement (JIT, 8-10 ms a call):
-- JIT is off for the batch too. The settings hold while the function runs, and for the
-- triggers its statements fire.
alter function external_db_sync_sequence_batch(bigint, text, text, bigint, boolean)
    set plan_cache_mode = force_generic_plan;
alter function external_db_sync_sequence_batch(bigint, text, text, bigint, boolean)
    set enable_seqscan = off;
alter function external_db_sync_sequence_batch(bigint, text, text, bigint, boolean)
    set enable_hashjoin = off;
alter function external_db_sync_sequence_batch(bigint, text, text, bigint, boolean)
    set enable_mergejoin = off;
alter function external_db_sync_sequence_batch(bigint, text, text, bigint, boolean)
    set jit = off;
