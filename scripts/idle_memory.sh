#!/usr/bin/env bash
# scripts/idle_memory.sh — memory pgshift holds for N idle client sessions.
# A measurement, not a test.
#
# Usage: [SESSIONS=1000] scripts/idle_memory.sh
#
# Starts the clusters (scripts/cluster.sh) and a release pgshift on
# 127.0.0.1:6436 (admin 9936) with proxy.toml's settings, opens SESSIONS
# sessions through it with pgbench (each client runs `\sleep`, so the
# sessions sit idle after login), and reports the proxy's resident memory
# before, while all sessions are open (each with its target link), and the
# peak, with the per-session difference. Every session is a real source
# backend and a real target backend, so SESSIONS is bounded by the
# clusters' max_connections (2200 here).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
exec </dev/null

SESSIONS="${SESSIONS:-1000}"
[[ "$SESSIONS" =~ ^[1-9][0-9]*$ ]] || die "SESSIONS must be a positive integer"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

ensure_deps
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
cargo build --release --bin pgshift

work="$(mktemp -d)"
PROXY_PID=""
cleanup() {
    [[ -n "$PROXY_PID" ]] && kill "$PROXY_PID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

sed -e 's/127.0.0.1:6432/127.0.0.1:6436/' -e 's/127.0.0.1:9930/127.0.0.1:9936/' \
    -e "s|\"\.clusters/|\"$PGSHIFT_CLUSTER_DIR/|" proxy.toml >"$work/proxy.toml"
"$ROOT/target/release/pgshift" --config "$work/proxy.toml" >"$work/pgshift.log" 2>&1 &
PROXY_PID=$!
wait_port 127.0.0.1 6436 30 "$PROXY_PID" || die "pgshift did not start"

kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
base="$(kb "$PROXY_PID" VmRSS)"
printf '\\sleep 20 s\n' >"$work/idle.sql"
log "opening $SESSIONS idle sessions through pgshift"
pgbench -h 127.0.0.1 -p 6436 -U postgres -n -c "$SESSIONS" -j 2 -T 25 -f "$work/idle.sql" postgres \
    >"$work/pgbench.log" 2>&1 &
bench=$!
# Wait until every session and its target link are up, then sample.
for _ in $(seq 1 120); do
    up="$(curl -s http://127.0.0.1:9936/status | python3 -c 'import json,sys; m=json.load(sys.stdin)["metrics"]; print(m["clients"]["sessions_active"], m["target"]["links_up"])' 2>/dev/null || echo "0 0")"
    read -r sessions links <<<"$up"
    [[ "$sessions" -ge "$SESSIONS" && "$links" -ge "$SESSIONS" ]] && break
    sleep 0.5
done
[[ "$sessions" -ge "$SESSIONS" ]] || die "only $sessions sessions came up"
sleep 2
held="$(kb "$PROXY_PID" VmRSS)"
wait "$bench" || true
peak="$(kb "$PROXY_PID" VmHWM)"
python3 - "$SESSIONS" "$base" "$held" "$peak" <<'PY'
import sys
n, base, held, peak = (int(x) for x in sys.argv[1:])
print()
print("| sessions (each with a target link) | RSS before | RSS with all open | peak RSS | per session |")
print("|---:|---:|---:|---:|---:|")
print(f"| {n} | {base/1024:.1f} MiB | {held/1024:.1f} MiB | {peak/1024:.1f} MiB | {(held-base)/n:.1f} KiB |")
PY
