#!/usr/bin/env bash
# A throwaway PostgreSQL 15 server on loopback, for the tests and benchmarks of the PostgreSQL
# task store: a cluster in a folder of its own, run as an unprivileged user, with a password.
#
#   bash scripts/postgres.sh start DIR   # initdb (once) and start; prints the database's URL
#   bash scripts/postgres.sh restart DIR # stops it and starts it again (the tests' restart)
#   bash scripts/postgres.sh stop DIR    # stops it (by its pid file); the folder stays
#
# The URL names database `dspy_agent_test` of user `dspy`; the tests read it from
# DSPY_AGENT_TEST_POSTGRES. Autovacuum looks at each database every 5 s instead of every
# minute, as a server under a busy task queue should (docs/ACROSS_MACHINES.md).
set -euo pipefail

action=${1:?usage: postgres.sh start|restart|stop DIR}
dir=${2:?usage: postgres.sh start|restart|stop DIR}
bin=/usr/lib/postgresql/15/bin
# The port: DSPY_AGENT_PG_PORT, else the one this folder's cluster had, else a free one.
if [ -n "${DSPY_AGENT_PG_PORT:-}" ]; then
    port=$DSPY_AGENT_PG_PORT
elif [ -f "$dir/port" ]; then
    port=$(cat "$dir/port")
else
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

if [ ! -x "$bin/initdb" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "postgres.sh: PostgreSQL 15 is not installed ($bin/initdb); install Debian's postgresql-15" >&2
        exit 1
    fi
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 >&2
fi

# The server refuses to run as root: it runs as `postgres` (Debian's package makes that user).
run_as=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    run_as=(runuser -u postgres --)
fi

case "$action" in
start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        # A random password, kept beside the cluster for the next start.
        head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$dir/password"
        chmod 600 "$dir/password"
        [ "$(id -u)" = 0 ] && chown postgres "$dir/password"
        "${run_as[@]}" "$bin/initdb" -D "$dir/data" -U dspy --pwfile="$dir/password" \
            --auth=scram-sha-256 -E UTF8 >"$dir/initdb.log"
        mkdir -p "$dir/socket"
        [ "$(id -u)" = 0 ] && chown postgres "$dir/socket"
    fi
    if ! "${run_as[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        "${run_as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
            -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir/socket -c max_connections=300 -c autovacuum_naptime=5s" \
            start >&2
    fi
    echo "$port" >"$dir/port"
    password=$(cat "$dir/password")
    export PGPASSWORD=$password
    if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U dspy -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'dspy_agent_test'" | grep -q 1; then
        "$bin/createdb" -h 127.0.0.1 -p "$port" -U dspy dspy_agent_test
    fi
    echo "postgresql://dspy:$password@127.0.0.1:$port/dspy_agent_test"
    ;;
restart)
    "${run_as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 30 restart >&2
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        "${run_as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    fi
    ;;
*)
    echo "postgres.sh: unknown action $action (start, restart or stop)" >&2
    exit 2
    ;;
esac
