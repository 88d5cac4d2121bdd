#!/usr/bin/env bash
# scripts/demo.sh — THE one command that runs pgshift's main job on its embedded default
# config (proxy.toml): a real pgbench workload through the proxy.
#
# Usage: scripts/demo.sh [--keep]
#
#   --keep   leave the test clusters running afterwards (the proxy is always stopped)
#
# Steps (every one bounded in time; exits non-zero on the first failure):
#   1. install what is missing, start the two test clusters (scripts/cluster.sh start)
#   2. cargo build --release
#   3. target/release/pgshift --config proxy.toml in the background
#      (proxy on 127.0.0.1:6432, admin HTTP on 127.0.0.1:9930), log in target/demo/pgshift.log
#   4. through the proxy, database pgshift_demo as user postgres:
#        pgbench -i -s 2;  pgbench -c 4 -j 2 -T 10 (TPC-B);  pgbench -S -M prepared -c 4 -j 2 -T 10
#        psql: select version(), inet_server_port()  (must be the source, 54321), row counts
#   5. write mirroring (on in proxy.toml): wait until the target has applied every spooled
#      unit, then compare the pgbench tables on source and target directly (history
#      without its mtime column, which replays to a different timestamp)
#   6. curl -s http://127.0.0.1:9930/status (if curl exists)
#   7. SIGTERM to the proxy, stop the clusters (unless --keep)
#
# Overrides (for testing this script itself): PGSHIFT_BIN (proxy binary, default
# target/release/pgshift), PGSHIFT_DEMO_CONFIG (config file, default proxy.toml).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
exec </dev/null

KEEP=0
for a in "$@"; do
    case "$a" in
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $a (usage: scripts/demo.sh [--keep])" ;;
    esac
done

PROXY_HOST=127.0.0.1
PROXY_PORT=6432
ADMIN_PORT=9930
DB=pgshift_demo
CONFIG="${PGSHIFT_DEMO_CONFIG:-$ROOT/proxy.toml}"
BIN="${PGSHIFT_BIN:-$ROOT/target/release/pgshift}"
LOGDIR="$ROOT/target/demo"
PROXY_LOG="$LOGDIR/pgshift.log"
PROXY_PID=""

stop_proxy() {
    [[ -n "$PROXY_PID" ]] || return 0
    if pid_alive "$PROXY_PID"; then
        log "stopping pgshift (SIGTERM to pid $PROXY_PID)"
        kill -TERM "$PROXY_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            pid_alive "$PROXY_PID" || break
            sleep 0.1
        done
        if pid_alive "$PROXY_PID"; then
            warn "pgshift did not exit within 10 s of SIGTERM; sending SIGKILL"
            kill -KILL "$PROXY_PID" 2>/dev/null || true
        fi
    fi
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=""
}

cleanup() {
    local rc=$?
    set +e
    stop_proxy
    if [[ $rc -ne 0 && -s "$PROXY_LOG" ]]; then
        warn "last lines of $PROXY_LOG:"
        tail -n 30 "$PROXY_LOG" >&2
    fi
    if [[ $KEEP -eq 1 ]]; then
        log "--keep: leaving the clusters running"
    else
        "$ROOT/scripts/cluster.sh" stop || warn "could not stop the clusters"
    fi
    if [[ $rc -eq 0 ]]; then
        step "demo finished OK"
    else
        step "demo FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "dependencies and test clusters"
ensure_deps
[[ -f "$CONFIG" ]] || die "$CONFIG not found (the demo runs the proxy on its default config)"
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"

for p in "$PROXY_PORT" "$ADMIN_PORT"; do
    if port_open "$PROXY_HOST" "$p"; then
        die "$PROXY_HOST:$p is already in use; stop whatever listens there first"
    fi
done

step "cargo build --release"
timeout 1800 cargo build --release

step "starting $BIN --config $CONFIG"
mkdir -p "$LOGDIR"
[[ -x "$BIN" ]] || die "$BIN not found or not executable"
"$BIN" --config "$CONFIG" >"$PROXY_LOG" 2>&1 &
PROXY_PID=$!
if ! wait_port "$PROXY_HOST" "$PROXY_PORT" 30 "$PROXY_PID"; then
    die "pgshift did not start listening on $PROXY_HOST:$PROXY_PORT within 30 s"
fi
log "pgshift (pid $PROXY_PID) listening on $PROXY_HOST:$PROXY_PORT"

export PGHOST="$PROXY_HOST" PGPORT="$PROXY_PORT" PGUSER=postgres PGDATABASE="$DB"
export PGCONNECT_TIMEOUT=10

step "pgbench -i -s 2 $DB (through the proxy)"
timeout 300 pgbench -i -s 2 "$DB"

step "pgbench TPC-B: -c 4 -j 2 -T 10 (through the proxy)"
timeout 120 pgbench -c 4 -j 2 -T 10 -P 5 "$DB"

step "pgbench select-only: -S -M prepared -c 4 -j 2 -T 10 (through the proxy)"
timeout 120 pgbench -S -M prepared -c 4 -j 2 -T 10 -P 5 -n "$DB"

step "psql through the proxy"
timeout 30 psql -X -v ON_ERROR_STOP=1 -c 'select version(), inet_server_port()'
port="$(timeout 30 psql -X -At -v ON_ERROR_STOP=1 -c 'select inet_server_port()')"
if [[ "$port" != "$PGSHIFT_SOURCE_PORT" ]]; then
    die "expected to be served by the source (port $PGSHIFT_SOURCE_PORT), got server port '$port'"
fi
log "served by the source cluster (server port $port)"
accounts="$(timeout 30 psql -X -At -v ON_ERROR_STOP=1 -c 'select count(*) from pgbench_accounts')"
log "pgbench_accounts has $accounts rows"
[[ "$accounts" == 200000 ]] || die "expected 200000 rows in pgbench_accounts, got '$accounts'"
timeout 30 psql -X -v ON_ERROR_STOP=1 \
    -c 'select count(*) as history_rows, sum(delta) as total_delta from pgbench_history'

mirror="$(python3 - "$ADMIN_PORT" <<'PY'
import json, sys, time, urllib.request
def status():
    return json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=10))["mirror"]
m = status()
if not m or not m["enabled"]:
    print("off")
    sys.exit(0)
deadline = time.time() + 120
while m["lag_transactions"] > 0 and time.time() < deadline:
    time.sleep(0.2)
    m = status()
print("caught_up" if m["lag_transactions"] == 0 else "behind",
      m["applied_transactions"], m["spooled_transactions"], m["report"]["divergences_total"])
PY
)"
if [[ "$mirror" == off ]]; then
    log "write mirroring is off in $CONFIG; not comparing the target"
else
    read -r state applied spooled divergences <<<"$mirror"
    step "write mirror: $applied of $spooled units applied on the target ($state), $divergences divergences"
    [[ "$state" == caught_up ]] || die "the mirror did not catch up within 120 s"
    same=1
    for q in "select * from pgbench_accounts order by aid" \
        "select * from pgbench_branches order by bid" \
        "select * from pgbench_tellers order by tid" \
        "select tid, bid, aid, delta from pgbench_history order by tid, bid, aid, delta"; do
        src="$(psql -X -At -h "$PGSHIFT_HOST" -p "$PGSHIFT_SOURCE_PORT" -c "$q" | md5sum)"
        tgt="$(psql -X -At -h "$PGSHIFT_HOST" -p "$PGSHIFT_TARGET_PORT" -c "$q" | md5sum)"
        if [[ "$src" == "$tgt" ]]; then
            log "same on source and target: $q"
        else
            warn "DIFFERENT on source and target: $q"
            same=0
        fi
    done
    ((same)) || die "the target does not match the source"
fi

if command -v curl >/dev/null 2>&1; then
    step "admin status: curl -s http://$PROXY_HOST:$ADMIN_PORT/status"
    curl -sS --max-time 10 "http://$PROXY_HOST:$ADMIN_PORT/status"
    echo
else
    log "curl not installed; skipping the admin status"
fi

pid_alive "$PROXY_PID" || die "pgshift exited during the demo"
stop_proxy
