#!/usr/bin/env bash
# scripts/bench_row_images.sh — what equal generated values cost: pgshift mirroring
# with [mirror.row_images] on (units with non-deterministic writes applied from the
# source's row images, read by logical decoding) against mirroring that replays
# statements (such units flagged, their values possibly different), and against a
# direct connection. A benchmark, not a test: it prints numbers.
#
# Usage: [ROUNDS=3] [DURATION=15] [CLIENTS=8] [THREADS=2] [SCALE=10] [OUT=file.md] \
#        [PGSHIFT_BIN=target/ci/pgshift] scripts/bench_row_images.sh
#
# Workloads (pgbench, -n, -M simple):
#   tpcb     pgbench's TPC-B. Its INSERT into pgbench_history writes CURRENT_TIMESTAMP,
#            so every unit has a non-deterministic write: with row images on, every
#            unit is applied from rows.
#   inserts  one INSERT per transaction into rows_bench(id bigserial, v int,
#            at timestamptz DEFAULT clock_timestamp(), u uuid DEFAULT gen_random_uuid()):
#            serial ids taken by concurrent sessions, clock and random defaults.
# Targets, interleaved in each round (order rotating): direct (the source, port 54321);
# pgshift-statements (mirroring, fsync = "commit", row images off) and pgshift-rows
# (the same with mirror.row_images.databases = [the bench database]). Both clusters run
# durable for the benchmark (fsync = on, synchronous_commit = on through ALTER SYSTEM,
# reset at exit). Before each pgshift run the workload's table is brought to the same
# state on both clusters; after it the script waits for the mirror to drain (GET
# /status: mirror.lag_transactions 0) and compares the table on both clusters (md5 of every
# row in key order).
# Reported per workload and target: median TPS, ratio to direct (median of per-round
# ratios), the proxy's CPU µs per transaction during the run (utime+stime of the
# process from /proc), the drain time after the run, and in how many runs the tables
# were equal after the drain.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
exec </dev/null

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-15}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
SCALE="${SCALE:-10}"
OUT="${OUT:-}"
for v in ROUNDS DURATION CLIENTS THREADS SCALE; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
BIN="${PGSHIFT_BIN:-$ROOT/target/release/pgshift}"
[[ -x "$BIN" ]] || BIN="$ROOT/target/ci/pgshift"
[[ -x "$BIN" ]] || die "no pgshift binary: cargo build --release --bins (or set PGSHIFT_BIN)"

H=127.0.0.1
DB=pgshift_bench_rows
SRC=54321
TGT=54322
declare -A PORT=([pgshift-statements]=6460 [pgshift-rows]=6461)
declare -A ADMIN=([pgshift-statements]=9960 [pgshift-rows]=9961)
declare -A PID=()
RUN_DIR="$ROOT/target/bench/rows-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
RESULTS="$RUN_DIR/results.tsv"
: >"$RESULTS"
CLK_TCK="$(getconf CLK_TCK)"
DURABLE_SET=()

q() { timeout 300 psql -X -q -At -v ON_ERROR_STOP=1 -U postgres -h "$H" -p "$1" -d "$2" -c "$3"; }

cleanup() {
    local rc=$? n p
    set +e
    for n in "${!PID[@]}"; do
        kill -TERM "${PID[$n]}" 2>/dev/null && wait "${PID[$n]}" 2>/dev/null
    done
    # The logical slots pgshift-rows made on the source (one per database).
    q "$SRC" postgres "select pg_drop_replication_slot(slot_name) from pg_replication_slots
        where database = '$DB' and not active" >/dev/null 2>&1
    for p in "${DURABLE_SET[@]}"; do
        q "$p" postgres "alter system reset fsync" >/dev/null 2>&1
        q "$p" postgres "alter system reset synchronous_commit" >/dev/null 2>&1
        q "$p" postgres "select pg_reload_conf()" >/dev/null 2>&1
    done
    rm -rf "$RUN_DIR"/spool-*
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "clusters and database $DB"
ensure_deps
"$ROOT/scripts/cluster.sh" start >/dev/null
eval "$("$ROOT/scripts/cluster.sh" env)"
[[ "$(q "$SRC" postgres 'show wal_level')" == logical ]] || die "the source's wal_level is not logical"
for p in "$SRC" "$TGT"; do
    DURABLE_SET+=("$p")
    q "$p" postgres "alter system set fsync = on" >/dev/null
    q "$p" postgres "alter system set synchronous_commit = on" >/dev/null
    q "$p" postgres "select pg_reload_conf()" >/dev/null
done
q "$SRC" postgres "select pg_drop_replication_slot(slot_name) from pg_replication_slots
    where database = '$DB' and not active" >/dev/null
for p in "$SRC" "$TGT"; do
    q "$p" postgres "drop database if exists $DB with (force)" >/dev/null
    q "$p" postgres "create database $DB" >/dev/null
    timeout 1800 pgbench -i -q -s "$SCALE" -U postgres -h "$H" -p "$p" "$DB" >"$RUN_DIR/init-$p.log" 2>&1 \
        || { cat "$RUN_DIR/init-$p.log" >&2; die "pgbench -i failed on port $p"; }
    q "$p" "$DB" "create table rows_bench(id bigserial primary key, v int not null,
        at timestamptz not null default clock_timestamp(), u uuid not null default gen_random_uuid())" >/dev/null
done
printf '\\set v random(1, 1000000)\nINSERT INTO rows_bench(v) VALUES (:v);\n' >"$RUN_DIR/inserts.sql"

start() { # start NAME ROWS(on|off)
    local n="$1" rows="$2" cfg="$RUN_DIR/$1.toml"
    mkdir -p "$RUN_DIR/spool-$n" && chmod 700 "$RUN_DIR/spool-$n"
    cat >"$cfg" <<EOF
[listen]
addr = "$H:${PORT[$n]}"
[source]
host = "$H"
port = $SRC
sslmode = "disable"
[target]
host = "$H"
port = $TGT
sslmode = "disable"
[admin]
addr = "$H:${ADMIN[$n]}"
[mirror]
enabled = true
spool_dir = "$RUN_DIR/spool-$n"
fsync = "commit"
EOF
    if [[ "$rows" == on ]]; then
        printf '[mirror.row_images]\ndatabases = ["%s"]\n' "$DB" >>"$cfg"
    fi
    "$BIN" --config "$cfg" >"$RUN_DIR/$n.log" 2>&1 &
    PID[$n]=$!
    wait_port "$H" "${PORT[$n]}" 30 "${PID[$n]}" || die "$n did not start: $(tail -5 "$RUN_DIR/$n.log")"
    log "$n running (pid ${PID[$n]}, row images $rows)"
}
start pgshift-statements off
start pgshift-rows on

mirror() { # mirror ADMIN_PORT: lag_transactions applied divergences_total
    python3 - "$1" <<'PY'
import json, sys, urllib.request
m = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=10))["mirror"]
print(m.get("lag_transactions", -1), m.get("applied_transactions", -1),
      m.get("report", {}).get("divergences_total", -1))
PY
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
digest() { # digest PORT WORKLOAD
    case "$2" in
        tpcb) q "$1" "$DB" "select md5(string_agg(t::text, ',' order by tid, bid, aid, delta, mtime))
                from pgbench_history t" ;;
        inserts) q "$1" "$DB" "select md5(string_agg(t::text, ',' order by id)) from rows_bench t" ;;
    esac
}
reset_table() { # the same starting state on both clusters (straight, not mirrored)
    local p
    for p in "$SRC" "$TGT"; do
        q "$p" "$DB" "truncate pgbench_history; truncate rows_bench; alter sequence rows_bench_id_seq restart" >/dev/null
        q "$p" "$DB" "checkpoint" >/dev/null
    done
}

run() { # run ROUND WORKLOAD TARGET
    local r="$1" wl="$2" t="$3" port args out t0 t1 tps n drain="" equal="-" lag applied div
    case "$t" in direct) port=$SRC ;; *) port=${PORT[$t]} ;; esac
    case "$wl" in tpcb) args=(-n -M simple) ;; inserts) args=(-n -M simple -f "$RUN_DIR/inserts.sql") ;; esac
    reset_table
    out="$RUN_DIR/r$r-$wl-$t.txt"
    [[ "$t" != direct ]] && t0=$(ticks "${PID[$t]}")
    timeout $((DURATION + 120)) pgbench -U postgres -h "$H" -p "$port" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" \
        "${args[@]}" "$DB" >"$out" 2>&1 || { warn "$t: pgbench failed ($out)"; return 0; }
    tps=$(awk '/^tps = / {print $3; exit}' "$out")
    n=$(awk '/number of transactions actually processed/ {split($NF, a, "/"); print a[1]}' "$out")
    local cpu="-"
    if [[ "$t" != direct ]]; then
        t1=$(ticks "${PID[$t]}")
        cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" -v n="$n" 'BEGIN{printf "%.1f", (b - a) / hz * 1e6 / n}')
        local s e
        s=$(date +%s.%N)
        for ((i = 0; i < 6000; i++)); do
            read -r lag applied div <<<"$(mirror "${ADMIN[$t]}")"
            [[ "$lag" == 0 ]] && break
            sleep 0.1
        done
        e=$(date +%s.%N)
        drain=$(awk -v a="$s" -v b="$e" 'BEGIN{printf "%.2f", b - a}')
        if [[ "$(digest "$SRC" "$wl")" == "$(digest "$TGT" "$wl")" ]]; then equal=yes; else equal=no; fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$wl" "$t" "$tps" "$cpu" "$drain" "$equal" >>"$RESULTS"
    log "  round $r $wl $t: tps $tps, proxy cpu ${cpu} µs/txn, drain ${drain}s, equal after drain: $equal"
}

TARGETS=(direct pgshift-statements pgshift-rows)
step "running: ${ROUNDS} rounds x 2 workloads x ${#TARGETS[@]} targets x ${DURATION}s"
for ((r = 1; r <= ROUNDS; r++)); do
    for wl in tpcb inserts; do
        k=$(((r - 1) % ${#TARGETS[@]}))
        for ((j = 0; j < ${#TARGETS[@]}; j++)); do
            run "$r" "$wl" "${TARGETS[$(((k + j) % ${#TARGETS[@]}))]}"
        done
    done
done

step "results"
python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$CLIENTS" "$SCALE" "$BIN" <<'PY' | tee "$RUN_DIR/report.md" ${OUT:+"$OUT"}
import statistics as st, sys
path, rounds, dur, clients, scale, binary = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
print(f"# Row images: cost of equal generated values (scripts/bench_row_images.sh)\n")
print(f"{rounds} rounds, {dur} s runs, {clients} clients, scale {scale}, fsync = \"commit\", durable clusters; binary {binary}.\n")
print("| workload | target | median TPS | vs direct (median of rounds) | proxy CPU µs/txn | drain s | equal after drain |")
print("|---|---|---:|---:|---:|---:|---|")
for wl in ("tpcb", "inserts"):
    direct = {r[0]: float(r[3]) for r in rows if r[1] == wl and r[2] == "direct" and r[3]}
    for t in ("direct", "pgshift-statements", "pgshift-rows"):
        mine = [r for r in rows if r[1] == wl and r[2] == t and r[3]]
        if not mine:
            continue
        tps = st.median(float(r[3]) for r in mine)
        ratios = [float(r[3]) / direct[r[0]] for r in mine if r[0] in direct]
        cpu = [float(r[4]) for r in mine if r[4] != "-"]
        drain = [float(r[5]) for r in mine if r[5]]
        eq = [r[6] for r in mine if r[6] != "-"]
        print(f"| {wl} | {t} | {tps:.0f} | {st.median(ratios):.3f} | "
              f"{st.median(cpu) if cpu else '-'} | {st.median(drain) if drain else '-'} | "
              f"{(str(eq.count('yes')) + ' of ' + str(len(eq))) if eq else '-'} |")
PY
