#!/usr/bin/env bash
# scripts/compare_builds.sh — two pgshift builds side by side, interleaved, on the
# same clusters: what a change costs end to end. A benchmark, not a test.
#
# Usage: OLD=/path/to/old/pgshift [NEW=target/release/pgshift] [ROUNDS=5] [DURATION=10] \
#        [CLIENTS=8] [MODES="prepared simple"] [READ_PERCENT=50] scripts/compare_builds.sh
#
# Both proxies get the same config: proxy.toml's shape with sslmode disable, the local
# clusters (scripts/cluster.sh), routing.read_percent = READ_PERCENT, mirror and shadow
# off; OLD on port 6451 (admin 9951), NEW on 6452 (admin 9952). Each round runs
# pgbench -S -M <mode> against OLD then NEW (the order alternates between rounds).
# Reported per mode: median TPS of each, the median of the per-round NEW/OLD ratios,
# and each proxy's CPU time per transaction (utime+stime from /proc/<pid>/stat).
# Raw outputs stay in target/compare/<timestamp>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OLD:?set OLD to the baseline pgshift binary}"
NEW="${NEW:-target/release/pgshift}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-10}"
CLIENTS="${CLIENTS:-8}"
MODES="${MODES:-prepared simple}"
READ_PERCENT="${READ_PERCENT:-50}"
run_dir="target/compare/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run_dir"

bash scripts/cluster.sh start >/dev/null
eval "$(bash scripts/cluster.sh env)"
PGBIN="${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}"
for port in 54321 54322; do
    "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -qAtc "DROP DATABASE IF EXISTS pgshift_compare" postgres
    "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -qAtc "CREATE DATABASE pgshift_compare" postgres
    "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -i -q -s 10 pgshift_compare >/dev/null 2>&1
done

config() { # port admin
    cat <<EOF
[listen]
addr = "127.0.0.1:$1"
[source]
host = "127.0.0.1"
port = 54321
sslmode = "disable"
[target]
host = "127.0.0.1"
port = 54322
sslmode = "disable"
[admin]
addr = "127.0.0.1:$2"
[audit]
path = "$PWD/$run_dir/audit-$1.jsonl"
[shadow]
mismatch_log = "$PWD/$run_dir/mismatches-$1.jsonl"
[routing]
read_percent = $READ_PERCENT
EOF
}
config 6451 9951 >"$run_dir/old.toml"
config 6452 9952 >"$run_dir/new.toml"
"$OLD" --config "$run_dir/old.toml" >"$run_dir/old.log" 2>&1 &
old_pid=$!
"$NEW" --config "$run_dir/new.toml" >"$run_dir/new.log" 2>&1 &
new_pid=$!
trap 'kill $old_pid $new_pid 2>/dev/null || true' EXIT
sleep 1

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
results="$run_dir/results.tsv"
: >"$results"
for mode in $MODES; do
    for round in $(seq 1 "$ROUNDS"); do
        order="old new"
        (( round % 2 == 0 )) && order="new old"
        for which in $order; do
            if [[ $which == old ]]; then port=6451 pid=$old_pid; else port=6452 pid=$new_pid; fi
            before=$(ticks "$pid")
            out="$run_dir/$mode-$round-$which.txt"
            "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -S -M "$mode" -c "$CLIENTS" \
                -j 2 -T "$DURATION" -n pgshift_compare >"$out" 2>&1
            after=$(ticks "$pid")
            tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out")
            txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
            printf '%s\t%s\t%s\t%s\t%s\n' "$mode" "$round" "$which" "$tps" \
                "$(awk -v t=$((after - before)) -v n="$txns" -v hz="$hz" 'BEGIN{printf "%.2f", t / hz * 1e6 / n}')" >>"$results"
        done
    done
done

python3 - "$results" <<'EOF'
import sys, statistics as st
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
print("| mode | old TPS | new TPS | new/old (median of rounds) | old µs CPU/txn | new µs CPU/txn |")
print("|---|---:|---:|---:|---:|---:|")
for mode in dict.fromkeys(r[0] for r in rows):
    get = lambda w, i: [float(r[i]) for r in rows if r[0] == mode and r[2] == w]
    by_round = {}
    for r in rows:
        if r[0] == mode:
            by_round.setdefault(r[1], {})[r[2]] = float(r[3])
    ratios = [v["new"] / v["old"] for v in by_round.values() if "new" in v and "old" in v]
    print(f"| {mode} | {st.median(get('old', 3)):.0f} | {st.median(get('new', 3)):.0f} | "
          f"{st.median(ratios):.3f} | {st.median(get('old', 4)):.1f} | {st.median(get('new', 4)):.1f} |")
EOF
echo "raw: $run_dir"
