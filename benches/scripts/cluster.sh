# Sourced by the scripts beside it: a throwaway cluster with the service's migrations,
# stopped and removed on exit, and the CPU its processes used.
#
# Set NAME (the database) before sourcing. Needs initdb, pg_ctl (PG_BIN, default
# /usr/lib/postgresql/15/bin), psql, pgbench and target/release/external-db-sync. Run
# as root it starts the cluster as the postgres user. Leaves PGHOST, PGPORT, PGUSER and
# PGDATABASE set, WORK (a directory for the script's files) and D (the data directory),
# and `writes_for`.
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=${PORT:-55432}
WORK=$(mktemp -d "/tmp/$NAME.XXXXXX")
chmod 755 "$WORK"
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=$NAME
D=$WORK/data
# Set before the start, so that a cluster that does not start leaves nothing behind.
trap 'as_owner "$PG_BIN/pg_ctl" -D "$D" -m fast stop >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
as_owner "$PG_BIN/initdb" -D "$D" -A trust >/dev/null
as_owner "$PG_BIN/pg_ctl" -D "$D" -w -o "-p $PORT -c listen_addresses=127.0.0.1" -l "$WORK/pg.log" start >/dev/null \
  || { cat "$WORK/pg.log"; exit 1; }
createdb "$NAME"
DATABASE_URL=postgres://postgres@127.0.0.1:$PORT/$NAME target/release/external-db-sync migrate \
  >/dev/null 2>"$WORK/migrate.log" || { cat "$WORK/migrate.log"; exit 1; }

cpu() { # clock ticks of the cluster's processes, backends that ended included
  local pm total=0 p f
  pm=$(head -1 "$D/postmaster.pid")
  for p in $pm $(pgrep -P "$pm"); do
    [ -r "/proc/$p/stat" ] || continue
    read -r -a f < "/proc/$p/stat" || continue
    total=$((total + f[13] + f[14]))
    [ "$p" = "$pm" ] && total=$((total + f[15] + f[16]))
  done
  echo $total
}
ticks=$(getconf CLK_TCK)

# writes_for SCRIPT [SETTINGS]: runs the pgbench SCRIPT on one connection for
# SECONDS_PER_RUN seconds with synchronous_commit off and SETTINGS (more `-c name=value`),
# and prints how many writes it made and the cluster's CPU per write.
writes_for() {
  local started ended out writes
  started=$(cpu)
  out=$(PGOPTIONS="-c synchronous_commit=off ${2:-}" pgbench -n -c 1 -T "$SECONDS_PER_RUN" -f "$1" 2>&1)
  ended=$(cpu)
  writes=$(echo "$out" | awk '/number of transactions actually processed/ {print $NF}' | cut -d/ -f1)
  echo "$writes writes, server CPU $(( (ended - started) * 1000000 / ticks / writes )) µs per write"
}
