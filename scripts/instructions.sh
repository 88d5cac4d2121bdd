#!/usr/bin/env bash
# scripts/instructions.sh — user-space instructions a proxy executes per
# transaction, counted by valgrind's callgrind: a figure that does not move with
# the machine's load (CPU time on a shared 2-core box varies by several µs from
# run to run; this count repeats within a fraction of a percent), for comparing
# builds and configurations of pgshift with each other and with PgBouncer. It
# counts no kernel work (the sends and receives, the same for every proxy) and
# says nothing about time spent waiting; scripts/bench.sh measures those.
#
# Usage:
#   scripts/instructions.sh pgshift BIN CONFIG PORT [PGBENCH_ARGS] [TXNS]
#   scripts/instructions.sh pgbouncer INI PORT [PGBENCH_ARGS] [TXNS]
#
#   BIN           the pgshift binary (a release build: target/release/pgshift)
#   CONFIG / INI  its config; the proxy must listen on 127.0.0.1:PORT
#   PGBENCH_ARGS  e.g. "-S -M prepared" (default: TPC-B, simple protocol)
#   TXNS          transactions per client, 8 clients (default 300)
#
# The proxy starts under callgrind with instrumentation off; 8 pgbench clients
# run 50 transactions each to warm it, then instrumentation is on for TXNS per
# client, off again, and the counts are dumped. Database pgshift_bench, user
# postgres (scripts/bench.sh creates it). pgbouncer runs as the postgres user
# when this runs as root. Prints one line: what ran, transactions, instructions,
# instructions per transaction.
set -euo pipefail

command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
kind=${1:-}
case "$kind" in
    pgshift)
        [[ $# -ge 4 ]] || { sed -n '2,25p' "$0" >&2; exit 2; }
        BIN=$2 CFG=$3 PORT=$4 ARGS=${5:-} TXNS=${6:-300}
        CMD=("$BIN" run --config "$CFG") ;;
    pgbouncer)
        [[ $# -ge 3 ]] || { sed -n '2,25p' "$0" >&2; exit 2; }
        CFG=$2 PORT=$3 ARGS=${4:-} TXNS=${5:-300}
        CMD=("$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" -q "$CFG") ;;
    *) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac

OUT=$(mktemp -d /tmp/pgshift-instr.XXXXXX)
chmod 0777 "$OUT"
as_user=()
[[ "$kind" == pgbouncer && $(id -u) == 0 ]] && as_user=(runuser -u postgres --)
"${as_user[@]}" valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$OUT/callgrind.%p" "${CMD[@]}" >"$OUT/proxy.log" 2>&1 </dev/null &
VG=$!
cleanup() {
    pkill -TERM -f "callgrind-out-file=$OUT" 2>/dev/null || true
    wait "$VG" 2>/dev/null || true
    rm -rf "$OUT"
}
trap cleanup EXIT

for _ in $(seq 1 120); do
    pg_isready -q -h 127.0.0.1 -p "$PORT" && break
    kill -0 "$VG" 2>/dev/null || { cat "$OUT/proxy.log" >&2; exit 1; }
    sleep 1
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || { echo "nothing listens on $PORT" >&2; exit 1; }

bench() {
    # shellcheck disable=SC2086  # ARGS is a list of pgbench options
    pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 8 -j 2 -t "$1" -n $ARGS pgshift_bench 2>&1
}
# valgrind's own pid (VG may be runuser's).
VPID=$VG
[[ ${#as_user[@]} -eq 0 ]] || VPID=$(pgrep -P "$VG" | head -1)
[[ -n "$VPID" ]] || { echo "valgrind is not running" >&2; exit 1; }
control() { "${as_user[@]}" callgrind_control "$@" "$VPID" >/dev/null 2>&1; }

bench 50 >/dev/null
control -i on
out=$(bench "$TXNS")
control -i off
control -d
# The dump is written by the proxy's process when it next runs: wait for it.
for _ in $(seq 1 60); do
    compgen -G "$OUT/callgrind.*.1" >/dev/null && break
    sleep 1
done
sleep 1
tx=$(awk '/number of transactions actually processed/ {print $NF}' <<<"$out" | cut -d/ -f1)
[[ -n "$tx" && "$tx" -gt 0 ]] || { echo "pgbench failed: $out" >&2; exit 1; }
# The dump with the most data is the one taken after the run (the others
# hold the uninstrumented start).
f=$(ls -S "$OUT"/callgrind.* | head -1)
ir=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
[[ -n "$ir" ]] || { echo "no instruction count in $f" >&2; exit 1; }
echo "$kind port $PORT ${ARGS:-tpcb}: txns $tx, instructions $ir, per txn $((ir / tx))"
