#!/bin/bash
# What marking a channel's owner costs the application's channel writes: migration 13's
# trigger function (which waited for a held owner) against migration 16's (which defers
# it), alternating three times on one throwaway cluster, same rows. Prints the server's
# CPU per write (every process of the cluster, reaped backends included, from /proc).
#
#   bash benches/scripts/channel_writes.sh      # after `cargo build --release`
#
# Needs initdb, pg_ctl (PG_BIN, default /usr/lib/postgresql/15/bin), psql and pgbench.
# Run as root it starts the cluster as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
NAME=channel_writes
. benches/scripts/cluster.sh

# The two functions, as the migrations define them.
function_of() {
  awk '/^create or replace function external_db_sync_mark_channel_owners\(\)/ {on=1}
       on {print} on && /^\$\$;/ {exit}' "$1"
}
function_of migrations/20261127000013_cheaper_change_capture.sql > "$WORK/before.sql"
function_of migrations/20261205000016_channel_writes_never_wait_for_their_owner.sql > "$WORK/after.sql"

psql -q <<'SQL'
insert into "Tenancy" ("id", "projectId") values ('00000000-0000-0000-0000-000000000001', 'p');
with u as (
    insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
    select '00000000-0000-0000-0000-000000000001', gen_random_uuid(), 'u' || n
    from generate_series(1, 10000) n
    returning "tenancyId", "projectUserId", "displayName")
insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "isPrimary", "value")
select "tenancyId", "projectUserId", gen_random_uuid(), 'EMAIL', true, "displayName" || '@example.com'
from u;
create index on "ContactChannel" ("value");
create index on "ProjectUser" ("displayName");
vacuum analyze;
SQL
cat > "$WORK/update.sql" <<'SQL'
\set n random(1, 10000)
update "ContactChannel" set "isVerified" = not "isVerified" where "value" = 'u' || :n || '@example.com';
SQL
cat > "$WORK/insert.sql" <<'SQL'
\set n random(1, 10000)
insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "value")
select "tenancyId", "projectUserId", gen_random_uuid(), 'EMAIL', 'x' || :n
from "ProjectUser" where "displayName" = 'u' || :n;
SQL

for write in update insert; do
  for round in 1 2 3; do
    for function in before after; do
      psql -q -f "$WORK/$function.sql"
      # Every row numbered, so that each write marks a sequenced owner.
      psql -qAt -c "select from external_db_sync_sequence_batch(1000000, '/x', 'k:', null, false)" >/dev/null
      echo "channel $write, round $round, $function: $(writes_for "$WORK/$write.sql")"
    done
  done
done

# An import (100,000 users with an e-mail each, one statement, rolled back): the time
# the owner-marking trigger took in it (track_functions).
cat > "$WORK/import.sql" <<'SQL'
begin;
with users as (
    insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
    select '00000000-0000-0000-0000-000000000001', gen_random_uuid(), 'Import ' || n
    from generate_series(1, 100000) n
    returning "projectUserId", "displayName")
insert into "ContactChannel" ("tenancyId", "projectUserId", "id", "type", "isPrimary", "value")
select '00000000-0000-0000-0000-000000000001', "projectUserId", gen_random_uuid(), 'EMAIL', true,
       replace(lower("displayName"), ' ', '.') || '@example.com'
from users;
rollback;
SQL
for round in 1 2 3; do
  for function in before after; do
    psql -q -f "$WORK/$function.sql"
    psql -q -c "vacuum \"ProjectUser\", \"ContactChannel\"" -c "select pg_stat_reset()" >/dev/null
    PGOPTIONS='-c track_functions=all' psql -q -f "$WORK/import.sql" >/dev/null
    sleep 1 # the session's function statistics are flushed as it ends
    took=$(psql -qAt -c "select round(total_time::numeric) from pg_stat_user_functions
                         where funcname = 'external_db_sync_mark_channel_owners'")
    echo "import of 100,000 users with an e-mail, round $round, $function: owner marking took $took ms"
  done
done
