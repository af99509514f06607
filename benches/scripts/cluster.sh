# Sourced by the scripts beside it: a throwaway cluster with the service's migrations,
# stopped and removed on exit, and the CPU its processes used.
#
# Set NAME (the database) before sourcing. Needs initdb, pg_ctl (PG_BIN, default
# /usr/lib/postgresql/15/bin), psql, pgbench and target/release/external-db-sync. Run
# as root it starts the cluster as the postgres user. Leaves PGHOST, PGPORT, PGUSER and
# PGDATABASE set, WORK (a directory for the script's files) and D (the data directory).
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=${PORT:-55432}
WORK=$(mktemp -d "/tmp/$NAME.XXXXXX")
chmod 755 "$WORK"
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=$NAME
D=$WORK/data
as_owner "$PG_BIN/initdb" -D "$D" -A trust >/dev/null
as_owner "$PG_BIN/pg_ctl" -D "$D" -w -o "-p $PORT -c listen_addresses=127.0.0.1" -l "$WORK/pg.log" start >/dev/null
trap 'as_owner "$PG_BIN/pg_ctl" -D "$D" -m fast stop >/dev/null; rm -rf "$WORK"' EXIT
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
