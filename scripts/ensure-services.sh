#!/usr/bin/env bash
# Make sure the local services the test suite talks to are up:
#
#   Redis       127.0.0.1:6379
#   RabbitMQ    127.0.0.1:5672
#   PostgreSQL  127.0.0.1:5432
#
# For each one: if it already answers, say so; if it is down and its server is
# installed, start it and wait (bounded) until it answers; if it is not
# installed at all, say so and go on (the tests that need it skip with a
# reason). Only loopback addresses are ever probed.
#
# Exit status is 0 unless ENSURE_SERVICES_STRICT=1 and an installed service
# could not be brought up.

set -u

HOST=127.0.0.1
FAILED=()

log() { printf '[services] %s\n' "$*"; }

# tcp_open PORT: true if something accepts a TCP connection on HOST:PORT.
tcp_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# wait_for NAME SECONDS CHECK...: run CHECK once a second until it succeeds
# or SECONDS have passed; print progress every 5 s.
wait_for() {
    local name=$1 limit=$2
    shift 2
    local waited=0
    while ! "$@"; do
        if (( waited >= limit )); then
            log "$name: still not reachable after ${limit}s"
            return 1
        fi
        if (( waited > 0 && waited % 5 == 0 )); then
            log "$name: waiting... ${waited}s"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "$name: up (after ${waited}s)"
}

# show_log FILE_OR_GLOB: last lines of a server log, to explain a failure.
show_log() {
    local f
    for f in $1; do
        [ -r "$f" ] || continue
        log "last lines of $f:"
        tail -n 15 "$f" | sed 's/^/    /'
    done
}

# ------------------------------------------------------------------ Redis
redis_up() {
    if command -v redis-cli >/dev/null 2>&1; then
        [ "$(timeout 3 redis-cli -h "$HOST" -p 6379 ping 2>/dev/null)" = PONG ]
    else
        tcp_open 6379
    fi
}

ensure_redis() {
    if redis_up; then log "Redis: up on $HOST:6379"; return 0; fi
    if tcp_open 6379; then
        # Something listens but does not answer PING with PONG (auth? another
        # program?): do not start a second server on a taken port.
        log "Redis: port 6379 is taken but PING got no PONG; not starting another server"
        FAILED+=(Redis); return 1
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        log "Redis: NOT INSTALLED (no redis-server); tests that need it will skip"
        return 0
    fi
    log "Redis: down, starting redis-server"
    mkdir -p /var/lib/redis /var/log/redis
    # Loopback only, nothing kept on disk.
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    if ! wait_for Redis 20 redis_up; then
        show_log /var/log/redis/ci.log
        FAILED+=(Redis); return 1
    fi
}

# --------------------------------------------------------------- RabbitMQ
# A plain TCP probe on the AMQP port: quick, and needs no Erlang cookie
# (rabbitmq-diagnostics ping takes seconds and does).
rabbitmq_up() { tcp_open 5672; }

ensure_rabbitmq() {
    if rabbitmq_up; then log "RabbitMQ: up on $HOST:5672"; return 0; fi
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        log "RabbitMQ: NOT INSTALLED (no rabbitmq-server); tests that need it will skip"
        return 0
    fi
    log "RabbitMQ: down, starting rabbitmq-server -detached"
    rabbitmq-server -detached
    # The Erlang VM takes a while to boot and open the AMQP listener.
    if ! wait_for RabbitMQ 60 rabbitmq_up; then
        show_log '/var/log/rabbitmq/*.log'
        FAILED+=(RabbitMQ); return 1
    fi
}

# ------------------------------------------------------------- PostgreSQL
postgres_up() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$HOST" -p 5432 -t 3
    else
        tcp_open 5432
    fi
}

ensure_postgres() {
    if postgres_up; then log "PostgreSQL: up on $HOST:5432"; return 0; fi
    local version
    # Debian layout: one folder per major version under /etc/postgresql; the
    # newest one holding a "main" cluster is started.
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$version" ] \
        || [ ! -d "/etc/postgresql/$version/main" ]; then
        log "PostgreSQL: NOT INSTALLED (no pg_ctlcluster / cluster under /etc/postgresql); tests that need it will skip"
        return 0
    fi
    log "PostgreSQL: down, starting cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    if ! wait_for PostgreSQL 20 postgres_up; then
        show_log "/var/log/postgresql/postgresql-$version-main.log"
        FAILED+=(PostgreSQL); return 1
    fi
}

# ------------------------------------------------------------------- main
ensure_redis
ensure_rabbitmq
ensure_postgres

if (( ${#FAILED[@]} > 0 )); then
    log "could NOT bring up: ${FAILED[*]} (tests that need them will skip)"
    if [ "${ENSURE_SERVICES_STRICT:-0}" = 1 ]; then
        exit 1
    fi
fi
exit 0
