-- The sequencer's batch is planned for each call.
--
-- PostgreSQL keeps the plans of a PL/pgSQL function's statements for the session, and
-- after five calls may keep one plan for any batch size. Under benches/load.rs (16
-- writers after an import of 200,000 users) some batches took 1.1-2.5 s with such a
-- plan, and on a session kept between batches (db::warm) every batch did: the probe's
-- lag went to p50 2.8-2.9 s. Planned for each call, the same run had p50 311 ms and
-- p99 695 ms. Planning costs a batch a fraction of a millisecond.
alter function external_db_sync_sequence_batch(bigint, text, text, bigint, boolean)
    set plan_cache_mode = force_custom_plan;
