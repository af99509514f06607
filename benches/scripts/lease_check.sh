#!/bin/bash
# What the change trigger's check of the sequencer's lease costs the application's
# writes: migration 8's SQL function (planned again in every writing transaction)
# against migration 17's PL/pgSQL function (planned once per session), and the same
# writes with the service's triggers off (`session_replication_role = replica`, what
# the write costs without any capture), alternating three times on one throwaway
# cluster, same rows. The lease is held (an awake sequencer), so writers do not notify,
# as under a steady stream of changes. Prints the server's CPU per write (every process
# of the cluster, reaped backends included, from /proc).
#
#   bash benches/scripts/lease_check.sh      # after `cargo build --release`
#
# Needs initdb, pg_ctl (PG_BIN, default /usr/lib/postgresql/15/bin), psql and pgbench.
# Run as root it starts the cluster as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
NAME=lease_check
. benches/scripts/cluster.sh

# The two functions, as the migrations define them (migration 16 gave the first its
# search path).
awk '/^create or replace function external_db_sync_sequencer_awake\(\)/ {on=1}
     on {print} on && /^\$\$;/ {exit}' migrations/20261125000008_quiet_writers.sql > "$WORK/sql.sql"
echo "alter function external_db_sync_sequencer_awake() set search_path = public, pg_temp;" >> "$WORK/sql.sql"
cp migrations/20261205000017_lease_check_planned_once_per_session.sql "$WORK/plpgsql.sql"
: > "$WORK/off.sql"

psql -q <<'SQL'
insert into "Tenancy" ("id", "projectId") values ('00000000-0000-0000-0000-000000000001', 'p');
insert into "ProjectUser" ("tenancyId", "projectUserId", "displayName")
select '00000000-0000-0000-0000-000000000001', md5('u' || n)::uuid, 'u' || n
from generate_series(1, 10000) n;
vacuum analyze;
select setval('external_db_sync_sequencer_awake_until', 9000000000000000);
SQL
cat > "$WORK/rename.sql" <<'SQL'
\set n random(1, 10000)
update "ProjectUser" set "displayName" = 'renamed ' || :n
where "tenancyId" = '00000000-0000-0000-0000-000000000001' and "projectUserId" = md5('u' || :n)::uuid;
SQL

for round in 1 2 3; do
  for function in sql plpgsql off; do
    psql -q -f "$WORK/$function.sql"
    settings=''
    [ "$function" = off ] && settings='-c session_replication_role=replica'
    echo "rename, round $round, lease check $function: $(writes_for "$WORK/rename.sql" "$settings")"
  done
done
