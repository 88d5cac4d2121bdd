#!/usr/bin/env bash
# scripts/cpu_split.sh — where a running proxy's CPU per transaction goes: user
# and system time (from /proc/PID/stat, in clock ticks) and voluntary and
# involuntary context switches (summed over /proc/PID/task/*/status), before
# and after one pgbench run through it. A measurement, not a test; run several
# proxies in turn (interleaved, same workload) to compare them, e.g. PgBouncer
# against pgshift with and without a policy configured.
#
# Usage: scripts/cpu_split.sh PID PORT [PGBENCH_ARGS] [SECONDS]
#
#   PID           the proxy's process id
#   PORT          where it listens (127.0.0.1)
#   PGBENCH_ARGS  extra pgbench arguments, e.g. "-S -M prepared" (default: TPC-B)
#   SECONDS       run length (default 10)
#
# Database pgshift_bench (scripts/bench.sh creates it), user postgres, 8 clients,
# 2 threads. Prints one line: port, TPS, user and system µs per transaction,
# context switches per transaction.
set -euo pipefail

[[ $# -ge 2 ]] || { sed -n '2,18p' "$0" >&2; exit 2; }
PID=$1 PORT=$2 ARGS=${3:-} SECS=${4:-10}
[[ -d /proc/$PID ]] || { echo "no process $PID" >&2; exit 1; }

switches() {
    local v=0 n=0 t
    for t in /proc/"$PID"/task/*; do
        v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "$t/status")))
        n=$((n + $(awk '/^nonvoluntary_ctxt/ {print $2}' "$t/status")))
    done
    echo "$v $n"
}

read -r v0 n0 < <(switches)
read -r u0 s0 < <(awk '{print $14, $15}' /proc/"$PID"/stat)
# shellcheck disable=SC2086  # ARGS is a list of pgbench options
out=$(pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 8 -j 2 -T "$SECS" -n $ARGS pgshift_bench 2>&1)
read -r v1 n1 < <(switches)
read -r u1 s1 < <(awk '{print $14, $15}' /proc/"$PID"/stat)
tx=$(awk '/number of transactions actually processed/ {print $NF}' <<<"$out" | cut -d/ -f1)
tps=$(awk '/^tps/ {print $3}' <<<"$out")
[[ -n "$tx" && "$tx" -gt 0 ]] || { echo "pgbench failed: $out" >&2; exit 1; }
hz=$(getconf CLK_TCK)
awk -v port="$PORT" -v tps="$tps" -v tx="$tx" -v hz="$hz" \
    -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v v=$((v1 - v0)) -v n=$((n1 - n0)) 'BEGIN {
    printf "port %s: tps %.0f, user %.1f µs/txn, system %.1f µs/txn, voluntary switches %.2f/txn, involuntary %.2f/txn\n",
        port, tps, u / hz * 1e6 / tx, s / hz * 1e6 / tx, v / tx, n / tx
}'
