#!/usr/bin/env bash
# scripts/cluster.sh — manage pgshift's two local PostgreSQL test clusters.
#
# Usage: scripts/cluster.sh {start|stop|status|env|reset}
#
#   start   create the clusters on first run (initdb, TLS certs, roles, pg_hba, pgpass,
#           database pgshift_demo), then start both and wait until they accept
#           connections. A no-op when both already run.
#   stop    stop both clusters (pg_ctl -m fast). Data is kept.
#   status  print the state of both clusters; exit 0 if both run, 3 otherwise.
#   env     print `export` lines for the test environment (eval "$(scripts/cluster.sh env)"):
#             PGSHIFT_HOST=127.0.0.1  PGSHIFT_SOURCE_PORT=54321  PGSHIFT_TARGET_PORT=54322
#             PGSHIFT_CLUSTER_DIR=<abs dir>  PGSHIFT_PG_BIN=<pg bin dir>
#             PGSHIFT_SOCKET_DIR  PGSHIFT_TLS_DIR  PGSHIFT_CA_CERT
#             PGSHIFT_TARGET_PGPASS  PGSHIFT_SOURCE_PGPASS
#   reset   stop both clusters and delete everything (the next start recreates them).
#
# Layout of the cluster dir ("${PGSHIFT_CLUSTER_DIR:-$ROOT/.clusters}"):
#   source/ target/            data directories (owned by postgres when run as root)
#   logs/source.log target.log server logs (pg_ctl -l; logging_collector is off)
#   sockets/                   unix_socket_directories of both clusters
#   tls/ca.crt ca.key          test CA (10 years)
#   tls/server.crt server.key  server cert CN=localhost, SAN DNS:localhost, IP:127.0.0.1,
#                              used by both clusters (server.key: 0600, owned by postgres)
#   tls/proxy.crt proxy.key    copies of the server cert/key owned by the invoking user
#                              (0600 key), e.g. for the proxy's own client-facing TLS
#   target.pgpass              127.0.0.1|localhost:54322:*:<role>:<password> (0600)
#   source.pgpass              the same for port 54321
#
# The source listens on 127.0.0.1:54321 and the target on 127.0.0.1:54322. Superuser is
# `postgres` (trust over the unix socket and, for postgres, over TCP too). Test roles on
# both clusters (LOGIN, CREATEDB, not superuser):
#   pgshift_trust   no password (trust)
#   pgshift_md5     'md5-secret', stored as MD5, pg_hba method md5
#   pgshift_scram   'scram-secret', SCRAM-SHA-256
#   pgshift_tls     'tls-secret', SCRAM-SHA-256; on the SOURCE only over TLS
#                   (hostssl ... scram-sha-256, hostnossl ... reject)
#   pgshift_src_only  (source only, trust) — does not exist on the target
#
# THROWAWAY CLUSTERS: fsync, synchronous_commit and full_page_writes are off for speed.
# A crash of the machine can corrupt them; `reset` and start again if that happens.
#
# If the postgres OS user cannot traverse the path to the cluster dir (e.g. the repo is
# under /root), the clusters live in /tmp/pgshift-clusters-$UID instead; that choice is
# recorded in <requested dir>/REDIRECT so start/stop/env/reset agree, and `env` reports
# the real dir. The requested dir then also gets symlinks tls, sockets, logs,
# target.pgpass and source.pgpass to the real ones, so ".clusters/tls/ca.crt" style
# paths keep working for the invoking user.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SOURCE_PORT=54321
TARGET_PORT=54322
HOST=127.0.0.1
# Bump when the setup below changes: clusters made by an older version are recreated.
SETUP_VERSION=2

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- cluster dir choice

# Can the cluster owner reach (traverse) this directory path?
_owner_can_traverse() {
    local d="$1" probe
    is_root || return 0
    # Find the deepest existing ancestor and ask as postgres whether it is searchable.
    probe="$d"
    while [[ ! -e "$probe" ]]; do probe="$(dirname "$probe")"; done
    runuser -u postgres -- test -x "$probe" 2>/dev/null </dev/null
}

# The unix socket path ($dir/sockets/.s.PGSQL.NNNNN) must fit in sun_path (108 bytes).
_socket_path_ok() { (( ${#1} + 22 < 100 )); }

# In fallback mode, symlinks in the requested dir point to the real files, so paths like
# ".clusters/tls/ca.crt" (e.g. in proxy.toml) still work for the invoking user.
FALLBACK_LINKS=(tls sockets logs target.pgpass source.pgpass)
_link_fallback() {
    local requested="$1" real="$2" n
    for n in "${FALLBACK_LINKS[@]}"; do
        if [[ "$(readlink "$requested/$n" 2>/dev/null)" != "$real/$n" ]]; then
            ln -sfn "$real/$n" "$requested/$n" 2>/dev/null || true
        fi
    done
}

resolve_dir() {
    local requested="${PGSHIFT_CLUSTER_DIR:-$ROOT/.clusters}" real fallback
    # Make it absolute without requiring it to exist.
    if [[ "$requested" != /* ]]; then requested="$PWD/$requested"; fi
    requested="${requested%/}"
    if [[ -f "$requested/REDIRECT" ]]; then
        real="$(<"$requested/REDIRECT")"
        if [[ -n "$real" ]]; then
            CLUSTER_DIR="$real"
            _link_fallback "$requested" "$real"
            return 0
        fi
    fi
    if _owner_can_traverse "$requested" && _socket_path_ok "$requested"; then
        CLUSTER_DIR="$requested"
        return 0
    fi
    fallback="/tmp/pgshift-clusters-$(id -u)"
    if [[ "$requested" != "$fallback" ]]; then
        if _socket_path_ok "$requested"; then
            log "the postgres OS user cannot traverse $requested; using $fallback instead" >&2
        else
            log "$requested is too long for a unix socket path; using $fallback instead" >&2
        fi
        if mkdir -p "$requested" 2>/dev/null && printf '%s\n' "$fallback" >"$requested/REDIRECT" 2>/dev/null; then
            _link_fallback "$requested" "$fallback"
        else
            warn "could not record the choice in $requested/REDIRECT"
        fi
    fi
    CLUSTER_DIR="$fallback"
}

set_paths() {
    resolve_dir
    SOCK_DIR="$CLUSTER_DIR/sockets"
    LOG_DIR="$CLUSTER_DIR/logs"
    TLS_DIR="$CLUSTER_DIR/tls"
    MARKER="$CLUSTER_DIR/.pgshift-setup"
}

datadir() { echo "$CLUSTER_DIR/$1"; }
portof() { if [[ "$1" == source ]]; then echo "$SOURCE_PORT"; else echo "$TARGET_PORT"; fi; }

# ---------------------------------------------------------------- helpers

# fd 9 is the lock (see lock()); the postmaster must not inherit it.
PG_CTL() { as_pg_user "$PGSHIFT_PG_BIN/pg_ctl" "$@" </dev/null 9>&-; }

is_running() {
    local d; d="$(datadir "$1")"
    [[ -f "$d/PG_VERSION" ]] || return 1
    PG_CTL -D "$d" status >/dev/null 2>&1
}

# psql as superuser over the unix socket. Extra args follow.
SQL() {
    local name="$1" db="$2"; shift 2
    "$PGSHIFT_PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK_DIR" -p "$(portof "$name")" \
        -U postgres -d "$db" "$@"
}

wait_ready() {
    local name="$1" port i
    port="$(portof "$name")"
    for ((i = 0; i < 600; i++)); do
        if "$PGSHIFT_PG_BIN/pg_isready" -q -h "$HOST" -p "$port" -t 2 </dev/null; then return 0; fi
        sleep 0.1
    done
    die "$name cluster on $HOST:$port did not become ready within 60 s (log: $LOG_DIR/$name.log)"
}

start_one() {
    local name="$1" d port
    d="$(datadir "$name")"; port="$(portof "$name")"
    if is_running "$name"; then
        return 0
    fi
    if "$PGSHIFT_PG_BIN/pg_isready" -q -h "$HOST" -p "$port" -t 2 </dev/null || port_open "$HOST" "$port"; then
        die "port $HOST:$port is already in use by another server (not the $name cluster in $CLUSTER_DIR); stop it first"
    fi
    log "starting $name cluster on $HOST:$port"
    if ! PG_CTL -D "$d" -l "$LOG_DIR/$name.log" -w -t 120 start >/dev/null; then
        tail -n 30 "$LOG_DIR/$name.log" >&2 || true
        die "could not start the $name cluster (log: $LOG_DIR/$name.log)"
    fi
}

stop_one() {
    local name="$1" d
    d="$(datadir "$name")"
    if is_running "$name"; then
        log "stopping $name cluster"
        PG_CTL -D "$d" -m fast -w -t 120 stop >/dev/null \
            || die "could not stop the $name cluster (log: $LOG_DIR/$name.log)"
    fi
}

# ---------------------------------------------------------------- first-time setup

make_tls() {
    local owner; owner="$(pg_owner)"
    mkdir -p "$TLS_DIR"
    chmod 0755 "$TLS_DIR"
    local tmp="$TLS_DIR/tmp"
    rm -rf "$tmp"; mkdir -p "$tmp"
    cat >"$tmp/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = pgshift test CA
O = pgshift
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
    cat >"$tmp/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
    openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
        -config "$tmp/ca.cnf" -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" </dev/null 2>/dev/null \
        || die "openssl: CA generation failed"
    openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost/O=pgshift" \
        -keyout "$tmp/server.key" -out "$tmp/server.csr" </dev/null 2>/dev/null \
        || die "openssl: server key generation failed"
    openssl x509 -req -sha256 -days 3650 -in "$tmp/server.csr" -CA "$TLS_DIR/ca.crt" \
        -CAkey "$TLS_DIR/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
        -extfile "$tmp/server.ext" -out "$TLS_DIR/server.crt" </dev/null 2>/dev/null \
        || die "openssl: server certificate signing failed"
    openssl verify -CAfile "$TLS_DIR/ca.crt" "$TLS_DIR/server.crt" >/dev/null \
        || die "openssl: generated server certificate does not verify"
    # Server copy for Postgres: owned by the cluster owner, 0600 (Postgres insists).
    install -m 0600 -o "$owner" "$tmp/server.key" "$TLS_DIR/server.key"
    # Copies for the invoking user (the proxy's client-facing TLS, tests).
    install -m 0600 "$tmp/server.key" "$TLS_DIR/proxy.key"
    install -m 0644 "$TLS_DIR/server.crt" "$TLS_DIR/proxy.crt"
    chmod 0644 "$TLS_DIR/ca.crt" "$TLS_DIR/server.crt"
    chmod 0600 "$TLS_DIR/ca.key"
    rm -rf "$tmp"
}

write_conf() {
    local name="$1" d port
    d="$(datadir "$name")"; port="$(portof "$name")"
    as_pg_user tee "$d/pgshift.conf" >/dev/null <<EOF
# Written by scripts/cluster.sh. THROWAWAY test cluster: durability is off.
listen_addresses = '$HOST'
port = $port
unix_socket_directories = '$SOCK_DIR'
max_connections = 2200
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '$TLS_DIR/server.crt'
ssl_key_file = '$TLS_DIR/server.key'
ssl_ca_file = '$TLS_DIR/ca.crt'
max_wal_size = 2GB
# Logical decoding for the mirror's row images (mirror.row_images).
wal_level = logical
max_replication_slots = 40
max_wal_senders = 40
max_slot_wal_keep_size = 4GB
# Two-phase commit (mirrored: PREPARE TRANSACTION / COMMIT PREPARED).
max_prepared_transactions = 20
EOF
    if ! grep -q "^include 'pgshift.conf'" "$d/postgresql.conf"; then
        printf "\ninclude 'pgshift.conf'\n" | as_pg_user tee -a "$d/postgresql.conf" >/dev/null
    fi

    {
        echo "# Written by scripts/cluster.sh ($name cluster). Order matters."
        echo "# TYPE     DATABASE USER           ADDRESS        METHOD"
        echo "local      all      all                           trust"
        local a
        for a in 127.0.0.1/32 ::1/128; do
            echo "host       all      pgshift_md5    $a  md5"
            echo "host       all      pgshift_scram  $a  scram-sha-256"
            if [[ "$name" == source ]]; then
                echo "hostssl    all      pgshift_tls    $a  scram-sha-256"
                echo "hostnossl  all      pgshift_tls    $a  reject"
            else
                echo "host       all      pgshift_tls    $a  scram-sha-256"
            fi
        done
        for a in 127.0.0.1/32 ::1/128; do
            echo "host       all      all            $a  trust"
        done
    } | as_pg_user tee "$d/pg_hba.conf" >/dev/null
}

setup_sql() {
    local name="$1"
    SQL "$name" postgres <<'EOF'
GRANT CREATE ON SCHEMA public TO PUBLIC;
SET password_encryption = 'md5';
CREATE ROLE pgshift_md5 LOGIN CREATEDB NOSUPERUSER PASSWORD 'md5-secret';
SET password_encryption = 'scram-sha-256';
CREATE ROLE pgshift_trust LOGIN CREATEDB NOSUPERUSER;
CREATE ROLE pgshift_scram LOGIN CREATEDB NOSUPERUSER PASSWORD 'scram-secret';
CREATE ROLE pgshift_tls LOGIN CREATEDB NOSUPERUSER PASSWORD 'tls-secret';
EOF
    if [[ "$name" == source ]]; then
        SQL "$name" postgres -c "CREATE ROLE pgshift_src_only LOGIN CREATEDB NOSUPERUSER"
    fi
    SQL "$name" template1 -c "GRANT CREATE ON SCHEMA public TO PUBLIC"
    if [[ "$name" == target ]]; then
        # The mirror's progress table (see docs/mirroring.md), created by the
        # owner as an operator would, in template1 so every database made
        # from it has one.
        SQL "$name" template1 <<'EOF'
CREATE SCHEMA pgshift_mirror;
CREATE TABLE pgshift_mirror.progress (spool_id text PRIMARY KEY, seq bigint NOT NULL, above bigint[] NOT NULL DEFAULT '{}', pending bigint, applied_at timestamptz NOT NULL DEFAULT now());
GRANT USAGE ON SCHEMA pgshift_mirror TO PUBLIC;
GRANT SELECT, INSERT, UPDATE ON pgshift_mirror.progress TO PUBLIC;
EOF
    fi
    SQL "$name" postgres -c "CREATE DATABASE pgshift_demo"
    # Sanity: the md5 role really has an MD5 hash, the others SCRAM.
    local got
    got="$(SQL "$name" postgres -At -c "SELECT string_agg(rolname || '=' || left(rolpassword, 3), ',' ORDER BY rolname) FROM pg_authid WHERE rolname IN ('pgshift_md5','pgshift_scram','pgshift_tls')")"
    [[ "$got" == "pgshift_md5=md5,pgshift_scram=SCR,pgshift_tls=SCR" ]] \
        || die "unexpected password hashes on $name: $got"
}

write_pgpass() {
    local port="$1" file="$2" h
    : >"$file"
    chmod 0600 "$file"
    for h in 127.0.0.1 localhost; do
        printf '%s:%s:*:pgshift_md5:md5-secret\n' "$h" "$port"
        printf '%s:%s:*:pgshift_scram:scram-secret\n' "$h" "$port"
        printf '%s:%s:*:pgshift_tls:tls-secret\n' "$h" "$port"
    done >>"$file"
}

# Delete only what this script creates (PGSHIFT_CLUSTER_DIR may point anywhere).
remove_contents() {
    rm -rf "${CLUSTER_DIR:?}"/{source,target,logs,sockets,tls,bench,target.pgpass,source.pgpass,.pgshift-setup}
}

create_all() {
    local owner name d
    owner="$(pg_owner)"
    if [[ -e "$CLUSTER_DIR/source" || -e "$CLUSTER_DIR/target" || -e "$TLS_DIR" ]]; then
        log "cluster dir $CLUSTER_DIR is incomplete or from an older setup; recreating it"
        for name in source target; do
            [[ -f "$(datadir "$name")/PG_VERSION" ]] && { stop_one "$name" || true; }
        done
        remove_contents
    fi
    log "creating test clusters in $CLUSTER_DIR (PostgreSQL bin: $PGSHIFT_PG_BIN)"
    mkdir -p "$CLUSTER_DIR"
    chmod 0755 "$CLUSTER_DIR"
    mkdir -p "$SOCK_DIR" "$LOG_DIR"
    chown "$owner" "$SOCK_DIR" "$LOG_DIR"
    chmod 0755 "$SOCK_DIR" "$LOG_DIR"
    make_tls
    for name in source target; do
        d="$(datadir "$name")"
        mkdir -p "$d"
        chown "$owner" "$d"
        chmod 0700 "$d"
        log "initdb $name"
        if ! as_pg_user "$PGSHIFT_PG_BIN/initdb" -D "$d" -U postgres --auth-local=trust \
                --auth-host=scram-sha-256 --encoding=UTF8 --locale=C --no-sync --no-instructions \
                </dev/null >"$LOG_DIR/initdb-$name.log" 2>&1; then
            cat "$LOG_DIR/initdb-$name.log" >&2
            die "initdb failed for $name"
        fi
        write_conf "$name"
        start_one "$name"
        wait_ready "$name"
        setup_sql "$name"
    done
    write_pgpass "$TARGET_PORT" "$CLUSTER_DIR/target.pgpass"
    write_pgpass "$SOURCE_PORT" "$CLUSTER_DIR/source.pgpass"
    echo "$SETUP_VERSION" >"$MARKER"
    log "test clusters created"
}

# ---------------------------------------------------------------- commands

lock() {
    exec 9>"/tmp/pgshift-cluster-$(id -u).lock"
    flock -w 300 9 || die "timed out waiting for another scripts/cluster.sh to finish"
}

cmd_start() {
    ensure_deps
    set_paths
    lock
    if [[ ! -f "$MARKER" || "$(<"$MARKER")" != "$SETUP_VERSION" ]]; then
        create_all
    fi
    local name
    for name in source target; do start_one "$name"; done
    for name in source target; do wait_ready "$name"; done
    log "clusters up: source $HOST:$SOURCE_PORT, target $HOST:$TARGET_PORT (dir $CLUSTER_DIR)"
}

cmd_stop() {
    PGSHIFT_PG_BIN="$(pg_bin_dir)" || die "PostgreSQL binaries not found"
    set_paths
    lock
    local name
    for name in source target; do stop_one "$name"; done
}

cmd_status() {
    PGSHIFT_PG_BIN="$(pg_bin_dir)" || die "PostgreSQL binaries not found"
    set_paths
    local name rc=0 port
    echo "cluster dir: $CLUSTER_DIR"
    for name in source target; do
        port="$(portof "$name")"
        if [[ ! -f "$(datadir "$name")/PG_VERSION" ]]; then
            echo "$name: not created"; rc=3
        elif is_running "$name"; then
            if "$PGSHIFT_PG_BIN/pg_isready" -q -h "$HOST" -p "$port" -t 2 </dev/null; then
                echo "$name: running, accepting connections on $HOST:$port"
            else
                echo "$name: running, NOT accepting connections on $HOST:$port"; rc=3
            fi
        else
            echo "$name: stopped"; rc=3
        fi
    done
    return "$rc"
}

cmd_env() {
    local bin
    bin="$(pg_bin_dir || true)"
    set_paths
    local kv
    for kv in \
        "PGSHIFT_HOST=$HOST" \
        "PGSHIFT_SOURCE_PORT=$SOURCE_PORT" \
        "PGSHIFT_TARGET_PORT=$TARGET_PORT" \
        "PGSHIFT_CLUSTER_DIR=$CLUSTER_DIR" \
        "PGSHIFT_PG_BIN=$bin" \
        "PGSHIFT_SOCKET_DIR=$SOCK_DIR" \
        "PGSHIFT_TLS_DIR=$TLS_DIR" \
        "PGSHIFT_CA_CERT=$TLS_DIR/ca.crt" \
        "PGSHIFT_TARGET_PGPASS=$CLUSTER_DIR/target.pgpass" \
        "PGSHIFT_SOURCE_PGPASS=$CLUSTER_DIR/source.pgpass"; do
        printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
    done
}

cmd_reset() {
    PGSHIFT_PG_BIN="$(pg_bin_dir || true)"
    set_paths
    lock
    local name requested="${PGSHIFT_CLUSTER_DIR:-$ROOT/.clusters}"
    if [[ -n "$PGSHIFT_PG_BIN" ]]; then
        for name in source target; do stop_one "$name"; done
    fi
    log "deleting the clusters in $CLUSTER_DIR"
    if [[ -d "$CLUSTER_DIR" ]]; then
        remove_contents
        rmdir "$CLUSTER_DIR" 2>/dev/null || warn "$CLUSTER_DIR is not empty; left it in place"
    fi
    if [[ -f "$requested/REDIRECT" ]]; then
        for name in "${FALLBACK_LINKS[@]}"; do
            [[ -L "$requested/$name" ]] && rm -f "$requested/$name"
        done
        rm -f "$requested/REDIRECT"
        rmdir "$requested" 2>/dev/null || true
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    reset) cmd_reset ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
