#!/usr/bin/env bash
# Local throwaway PostgreSQL cluster on loopback, for tests, demos and CI on machines
# without a docker engine or systemd. Uses Debian's server binaries but never the
# system cluster: it initdb's a private cluster and runs it with pg_ctl.
#
# Usage: docker/local/postgres.sh start|stop|restart|status
#
#   start    install PostgreSQL from apt if missing, create the cluster (once), start it,
#            ensure role + database exist. The LAST line of stdout is a SQLAlchemy URL,
#            everything else goes to stderr:
#              DB_URL=$(docker/local/postgres.sh start | tail -1)
#              -> postgresql+asyncpg://rcworker:rcworker@127.0.0.1:5432/rcworker
#   stop     pg_ctl stop (mode PG_STOP_MODE, default fast). PG_WIPE=1 deletes the cluster.
#   restart  stop (never wipes) + start: simulates a database restart, data kept.
#            PG_STOP_MODE=immediate turns it into a crash + recovery.
#   status   prints "running <url> (pid N)" / "stopped"; exit 0 / 1.
#
# Environment:
#   PGPORT            TCP port (5432).
#   RC_PG_USER / RC_PG_PASSWORD / RC_PG_DB   app credentials (rcworker/rcworker/rcworker).
#   RC_WORKER_CACHE   cache root (~/.cache/rc-apps-worker); the cluster lives in
#                     $RC_WORKER_CACHE/pg-$PGPORT (see data_dir() for the root exception).
#   RC_PG_DATA        explicit cluster directory (overrides the above).
#   PG_BIN            directory with initdb/pg_ctl/psql (newest /usr/lib/postgresql/*/bin).
set -euo pipefail

PG_HOST=127.0.0.1 # loopback only: the cluster uses weak, well-known credentials
PGPORT="${PGPORT:-5432}"
PG_USER="${RC_PG_USER:-rcworker}"
PG_PASSWORD="${RC_PG_PASSWORD:-rcworker}"
PG_DB="${RC_PG_DB:-rcworker}"
PG_STOP_MODE="${PG_STOP_MODE:-fast}"
CACHE="${RC_WORKER_CACHE:-$HOME/.cache/rc-apps-worker}"

# libpq honours these; a developer's or CI's own settings (PGHOST, PGSSLMODE=require,
# PGSERVICE, ...) must not redirect or break the admin connections made below.
unset PGHOST PGHOSTADDR PGUSER PGDATABASE PGPASSWORD PGPASSFILE PGSERVICE PGSERVICEFILE \
  PGSSLMODE PGOPTIONS PGDATA PGTARGETSESSIONATTRS

log() { printf '[postgres.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Bash's /dev/tcp avoids depending on nc/ss being installed on CI images.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

urlencode() {
  local s="$1" out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    case "$c" in
      [A-Za-z0-9._~-]) out+="$c" ;;
      *) out+="$(printf '%%%02X' "'$c")" ;;
    esac
  done
  printf '%s' "$out"
}

db_url() {
  printf 'postgresql+asyncpg://%s:%s@%s:%s/%s\n' "$(urlencode "$PG_USER")" \
    "$(urlencode "$PG_PASSWORD")" "$PG_HOST" "$PGPORT" "$(urlencode "$PG_DB")"
}

# PostgreSQL refuses to run as root, so as root the server runs as the `postgres` OS
# user (created by the Debian package); as anyone else it simply runs as that user.
if [[ $EUID -eq 0 ]]; then
  as_pg() { (cd / && runuser -u postgres -- "$@"); } # cd /: postgres cannot read /root
else
  as_pg() { "$@"; }
fi

PG_BIN_ENV="${PG_BIN:-}"
PG_BIN=""

find_pg_bin() {
  if [[ -n "$PG_BIN_ENV" ]]; then
    [[ -x "$PG_BIN_ENV/pg_ctl" ]] && { echo "$PG_BIN_ENV"; return 0; }
    return 1
  fi
  local d
  d="$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/psql" ]] || return 1
  echo "$d"
}

install_postgres() {
  local sudo=()
  if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "PostgreSQL is not installed; run: sudo apt-get install -y postgresql"
    sudo=(sudo -n)
  fi
  command -v apt-get >/dev/null 2>&1 || die "PostgreSQL server binaries not found and apt-get is unavailable; install PostgreSQL or set PG_BIN"
  log "PostgreSQL not found; installing it with apt-get (one-off)"
  # The Debian package would otherwise create *and start* a system cluster on 5432
  # (it does so wherever invoke-rc.d is allowed, e.g. in containers), which would then
  # occupy the port this script wants. createcluster.d is a supported drop-in dir.
  "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false # written by rc-apps-worker docker/local/postgres.sh" |
    "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/rc-apps-worker.conf >/dev/null
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >&2
}

# The cluster must be reachable by the OS user that runs it. As root the default cache
# is under /root (mode 0700), which the postgres user cannot traverse; rather than
# loosening /root we then fall back to /var/tmp.
data_dir() {
  if [[ -n "${RC_PG_DATA:-}" ]]; then echo "$RC_PG_DATA"; return 0; fi
  if [[ $EUID -eq 0 ]]; then
    mkdir -p "$CACHE"
    if ! as_pg test -x "$CACHE"; then
      mkdir -p /var/tmp/rc-apps-worker
      chmod 755 /var/tmp/rc-apps-worker # the postgres user must traverse it
      echo "/var/tmp/rc-apps-worker/pg-$PGPORT"
      return 0
    fi
  fi
  echo "$CACHE/pg-$PGPORT"
}

PG_DATA="$(data_dir)"
LOCK_FILE="$(dirname "$PG_DATA")/pg-$PGPORT.lock"

# The postmaster stores its own pid; `pg_ctl status` is the authoritative liveness check.
pg_running() { [[ -f "$PG_DATA/postmaster.pid" ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

psql_admin() {
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PGPORT" -U postgres -d postgres "$@"
}

init_cluster() {
  [[ -s "$PG_DATA/PG_VERSION" ]] && return 0
  # No PG_VERSION = nothing or a half-finished initdb: start from scratch.
  rm -rf "$PG_DATA"
  mkdir -p "$PG_DATA"
  [[ $EUID -eq 0 ]] && chown postgres:postgres "$PG_DATA"
  chmod 700 "$PG_DATA"
  log "creating cluster in $PG_DATA"
  # --locale=C: needs no generated locales on minimal images and sorts bytewise
  # (deterministic in tests). --no-sync: durability of a throwaway cluster is moot.
  as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    >"$PG_DATA.initdb.log" 2>&1 || { cat "$PG_DATA.initdb.log" >&2; die "initdb failed"; }
  rm -f "$PG_DATA.initdb.log"
  # Our settings live in a separate file that is regenerated on every start.
  echo "include_if_exists = 'rc-apps-worker.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

write_config() {
  # Unix sockets are capped at ~107 bytes of path; skip the socket if the cache path
  # is too long (everything here connects over TCP anyway).
  local sock_dir="$PG_DATA"
  ((${#PG_DATA} + 20 < 100)) || sock_dir=""
  as_pg tee "$PG_DATA/rc-apps-worker.conf" >/dev/null <<EOF
# Generated by docker/local/postgres.sh on every start - edits are overwritten.
listen_addresses = '$PG_HOST'
port = $PGPORT
# Socket inside the cluster dir, not /var/run/postgresql (may not exist / be shared
# with a system cluster).
unix_socket_directories = '$sock_dir'
max_connections = 200
# Throwaway test cluster: trade crash-safety for speed, but only against an OS crash or a
# power loss. fsync=off leaves written WAL in the OS page cache, which survives a killed
# postmaster (PG_STOP_MODE=immediate). synchronous_commit must stay on: off, a commit is
# acknowledged before its WAL leaves shared memory, a crash loses it, and the worker's
# effectively-once guarantee (which trusts acknowledged commits) breaks; the chaos test
# lost 388 counts that way.
fsync = off
synchronous_commit = on
full_page_writes = off
log_line_prefix = '%m [%p] %q%u@%d '
timezone = 'UTC'
EOF
  # The app user must present its password (scram) so a URL without/with a wrong
  # password fails here as it would in production; the bootstrap `postgres` superuser
  # is trusted from loopback so this script can administer the cluster.
  as_pg tee "$PG_DATA/pg_hba.conf" >/dev/null <<EOF
# Generated by docker/local/postgres.sh on every start - edits are overwritten.
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       all                      trust
host    all       postgres  $PG_HOST/32   trust
host    all       all       $PG_HOST/32   scram-sha-256
EOF
}

ensure_role_and_db() {
  # \gexec runs each generated statement on its own (CREATE DATABASE cannot run inside
  # a DO block / transaction). SUPERUSER so tests can create throwaway databases,
  # extensions and terminate backends. ALTER keeps the password in sync with env.
  psql_admin -v u="$PG_USER" -v p="$PG_PASSWORD" -v d="$PG_DB" >&2 <<'SQL'
SELECT format('CREATE ROLE %I', :'u') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'u') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN SUPERUSER PASSWORD %L', :'u', :'p') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'d', :'u') WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'d') \gexec
SQL
}

cmd_start() {
  if ! PG_BIN="$(find_pg_bin)"; then
    [[ -z "$PG_BIN_ENV" ]] || die "PG_BIN=$PG_BIN_ENV does not contain pg_ctl"
    install_postgres
    PG_BIN="$(find_pg_bin)" || die "PostgreSQL installed but no /usr/lib/postgresql/*/bin found"
  fi
  if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    die "running as root needs the 'postgres' OS user (created by the postgresql package)"
  fi
  if pg_running; then
    log "already running ($PG_DATA)"
  else
    if port_open "$PG_HOST" "$PGPORT"; then
      die "$PG_HOST:$PGPORT is already in use by another server (a system PostgreSQL cluster?). Stop it or pick a free port, e.g. PGPORT=$((PGPORT + 1)) $0 start"
    fi
    init_cluster
    write_config
    log "starting PostgreSQL $("$PG_BIN/postgres" -V | awk '{print $3}') on $PG_HOST:$PGPORT ($PG_DATA)"
    # 9>&-: do not leak our lock fd into the postmaster, or it would hold the lock forever.
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/postgres.log" -w -t 60 start >&2 9>&- || {
      tail -n 50 "$PG_DATA/postgres.log" >&2 || true
      die "pg_ctl start failed (log: $PG_DATA/postgres.log)"
    }
  fi
  ensure_role_and_db
  db_url
}

cmd_stop() {
  if PG_BIN="$(find_pg_bin)" && pg_running; then
    log "stopping PostgreSQL ($PG_STOP_MODE, $PG_DATA)"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m "$PG_STOP_MODE" -w -t 60 stop >&2
  else
    log "not running"
  fi
  if [[ "${1:-}" == wipe && "${PG_WIPE:-0}" == 1 ]]; then
    log "PG_WIPE=1: deleting $PG_DATA"
    rm -rf "$PG_DATA"
  fi
}

cmd_restart() {
  cmd_stop keep # never wipes: a restart must keep the data
  cmd_start
}

cmd_status() {
  if PG_BIN="$(find_pg_bin)" && pg_running; then
    echo "running $(db_url) (pid $(head -n 1 "$PG_DATA/postmaster.pid"))"
    return 0
  fi
  echo "stopped"
  return 1
}

# Serialise concurrent invocations for the same port (parallel CI jobs, test fixtures).
with_lock() {
  mkdir -p "$(dirname "$LOCK_FILE")"
  exec 9>"$LOCK_FILE"
  flock -w 300 9 || die "timed out waiting for $LOCK_FILE"
  "$@"
}

case "${1:-}" in
  start) with_lock cmd_start ;;
  stop) with_lock cmd_stop wipe ;;
  restart) with_lock cmd_restart ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|restart|status" >&2
    exit 2
    ;;
esac
