-- no-transaction
-- The contact_channels mapping looks channels up by ("tenancyId", "id") when it turns a
-- change into the channel's current state; the primary key starts with "projectUserId"
-- in between and cannot serve that lookup.
--
-- Built concurrently (hence outside a transaction) so that applying this migration to
-- a large, busy "ContactChannel" table does not block the application's writes.
create index concurrently if not exists "ContactChannel_tenancy_id_idx"
    on "ContactChannel" ("tenancyId", "id");
