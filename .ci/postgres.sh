#!/usr/bin/env bash
# A throwaway PostgreSQL server for the test suite (the sweep's postgresql:// storage).
#
#   .ci/postgres.sh start [DIR]   install PostgreSQL (apt-get) when missing, initdb DIR/data, start the
#                                 server on 127.0.0.1:<free port> (trust auth, no Unix socket outside
#                                 DIR), create database stage1_test; prints its URL
#                                 postgresql://stage1@127.0.0.1:PORT/stage1_test (and nothing else) on stdout
#   .ci/postgres.sh stop [DIR]    stop that server and delete DIR
#
# DIR defaults to $STAGE1_PG_DIR, else /tmp/stage1-postgres. PostgreSQL refuses to run as root: as root
# the server runs as the `postgres` user (created by the Debian package). Trust auth on 127.0.0.1 only:
# for tests, never for a shared machine.
set -euo pipefail

cmd=${1:-}
dir=${2:-${STAGE1_PG_DIR:-/tmp/stage1-postgres}}
db_user=stage1
db_name=stage1_test

log() { echo "postgres.sh: $*" >&2; }

pg_bindir() {
    # the newest installed server's bin dir (Debian puts them under /usr/lib/postgresql/N/bin)
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $d && -x $d/initdb ]]; then echo "$d"; return; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
    return 1
}

as_owner() {
    # run a server command as the data dir's owner: `postgres` when we are root, else ourselves
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_postgres() {
    log "PostgreSQL not found: installing it with apt-get"
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends postgresql >&2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local bin port
    bin=$(pg_bindir) || { install_postgres; bin=$(pg_bindir); } || { log "no initdb after installing postgresql"; exit 1; }
    [[ -f $dir/data/postmaster.pid ]] && stop
    rm -rf "$dir"
    mkdir -p "$dir"
    [[ $(id -u) == 0 ]] && chown postgres: "$dir"
    chmod 700 "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -U "$db_user" -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    port=$(free_port)
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir" start >&2 || { cat "$dir/server.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$db_user" "$db_name"
    echo "postgresql://$db_user@127.0.0.1:$port/$db_name"
}

stop() {
    local bin
    if [[ -f $dir/data/postmaster.pid ]] && bin=$(pg_bindir); then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || log "pg_ctl stop failed (see $dir/server.log)"
    fi
    rm -rf "$dir"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
