#!/bin/bash
# What the sequencer's batch costs the source as migration 18 left it (migration 16's
# statement, planned for each call) and as migration 19 made it (rows found by their
# versions, one plan kept per session), beside the same writes with no batch,
# alternating three times on one throwaway cluster. Each write is two renames (each
# commits on its own, flagged by the capture triggers) and then, except in the last
# mode, one batch that numbers them and queues their tenancies. Prints the server's CPU
# per write (every process of the cluster, reaped backends included, from /proc); a
# batch's cost is the difference from the last mode.
#
#   bash benches/scripts/sequencer_plan.sh      # after `cargo build --release`
#
# Needs initdb, pg_ctl (PG_BIN, default /usr/lib/postgresql/15/bin), psql and pgbench.
# Run as root it starts the cluster as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
NAME=sequencer_plan
. benches/scripts/cluster.sh

# 50 tenancies with a database each (so that batches queue requests), 200 users each.
psql -q <<'SQL'
insert into "Tenancy" ("id", "projectId", "config")
select ('00000000-0000-0000-0000-0000000000' || lpad(t::text, 2, '0'))::uuid, 'p',
  '{"dbSync":{"externalDatabases":{"main":{"type":"postgres","connectionString":"postgres://x@localhost/y"}}}}'
from generate_series(1, 50) t;
insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
select ('00000000-0000-0000-0000-0000000000' || lpad((1 + n % 50)::text, 2, '0'))::uuid,
       md5('u' || n)::uuid, 'u' || n
from generate_series(1, 10000) n;
select count(*) from external_db_sync_sequence_batch(100000, '/x', 'k', null, false);
delete from "OutgoingRequest";
vacuum analyze;
-- An awake sequencer's lease: writers do not notify.
select setval('external_db_sync_sequencer_awake_until', 9000000000000000);
SQL
renames='\set n random(1, 10000)
\set m random(1, 10000)
update "ProjectUser" set "displayName" = '"'"'renamed '"'"' || :n
where "tenancyId" = ('"'"'00000000-0000-0000-0000-0000000000'"'"' || lpad((1 + :n % 50)::text, 2, '"'"'0'"'"'))::uuid
  and "projectUserId" = md5('"'"'u'"'"' || :n)::uuid;
update "ProjectUser" set "displayName" = '"'"'renamed '"'"' || :m
where "tenancyId" = ('"'"'00000000-0000-0000-0000-0000000000'"'"' || lpad((1 + :m % 50)::text, 2, '"'"'0'"'"'))::uuid
  and "projectUserId" = md5('"'"'u'"'"' || :m)::uuid;
delete from "OutgoingRequest";'
echo "$renames" > "$WORK/renames.sql"
{ echo "$renames"; echo "select * from external_db_sync_sequence_batch(1000, '/x', 'k', 2000, false);"; } > "$WORK/batch.sql"

# Each way as its migration defines it (`create or replace` sets the settings too).
awk '/^create or replace function external_db_sync_sequence_batch\(/ {on=1} on {print}' \
  migrations/20261205000016_channel_writes_never_wait_for_their_owner.sql > "$WORK/planned_each_call.sql"
echo "alter function external_db_sync_sequence_batch(bigint, text, text, bigint, boolean)
      set plan_cache_mode = force_custom_plan;" >> "$WORK/planned_each_call.sql"
cp migrations/20261205000019_sequencer_batch_one_plan_right_for_any_batch.sql "$WORK/one_plan.sql"

for round in 1 2 3; do
  psql -q -f "$WORK/planned_each_call.sql"
  echo "round $round, planned for each call (migration 18): $(writes_for "$WORK/batch.sql")"
  psql -q -f "$WORK/one_plan.sql"
  echo "round $round, one plan, rows found by their versions (migration 19): $(writes_for "$WORK/batch.sql")"
  echo "round $round, the renames alone: $(writes_for "$WORK/renames.sql")"
done
