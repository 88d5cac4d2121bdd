#!/usr/bin/env bash
# scripts/bench.sh — pgbench comparison of direct Postgres vs PgBouncer vs pgshift.
# A benchmark, not a test: it prints numbers, it does not judge them.
#
# Usage: [ROUNDS=3] [DURATION=15] [CLIENTS=8] [THREADS=2] [SCALE=10] [OUT=file.md] \
#        scripts/bench.sh
#
#   ROUNDS    rounds; each round runs every workload against every target (default 3)
#   DURATION  seconds per pgbench run (default 15)
#   CLIENTS   pgbench -c (default 8)          THREADS  pgbench -j (default 2)
#   SCALE     pgbench -i -s (default 10)
#   OUT       also write the result table (markdown) to this file (default: stdout only)
#   BENCH_PGSHIFT_CONFIG  use this pgshift config file as is (must listen on 127.0.0.1:6433)
#   PGSHIFT_BIN  the proxy binary (default target/release/pgshift, built first)
#   PGSHIFT_KEEP_CLUSTERS=1  leave the test clusters running at the end
#   Quick check: DURATION=3 ROUNDS=1 SCALE=1 scripts/bench.sh
#
# Targets (all 127.0.0.1, database pgshift_bench, user postgres):
#   direct     the source cluster itself, port 54321
#   pgbouncer  Debian's PgBouncer, port 6434: session pooling, auth_type trust,
#              default_pool_size CLIENTS+2, max_client_conn 200,
#              ignore_startup_parameters = extra_float_digits (run as postgres when root)
#   pgshift    target/release/pgshift, port 6433, admin 127.0.0.1:9931, source
#              127.0.0.1:54321 and target 127.0.0.1:54322 with sslmode disable. Its config
#              is proxy.toml with 6432->6433, 9930->9931, every sslmode set to disable and
#              relative paths made absolute (".clusters/" -> the real cluster dir, others
#              -> the repo root, where proxy.toml lives), written to a temp file; if
#              proxy.toml is missing, a guessed minimal config.
#              If pgshift does not build or start, it is skipped with a message.
# Workloads: select-only -M simple, -M extended, -M prepared; TPC-B -M simple.
# Within each round and workload the targets run one after another, in an order that
# rotates from one round/workload to the next.
#
# Reported per workload and target: median TPS (pgbench "tps = N (without initial
# connection time)"), median "latency average", TPS relative to direct, and the proxy's
# median CPU time per transaction (utime+stime from /proc/<pid>/stat before and after the
# run, in clock ticks of `getconf CLK_TCK`, divided by "number of transactions actually
# processed"). Raw pgbench outputs stay in target/bench/<timestamp>/.
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

H=127.0.0.1
DB=pgshift_bench
DIRECT_PORT=54321
TARGET_PORT=54322
PGSHIFT_PORT=6433
PGSHIFT_ADMIN_PORT=9931
PGBOUNCER_PORT=6434
POOL_SIZE=$((CLIENTS + 2))
MAX_CLIENT_CONN=200
((CLIENTS <= MAX_CLIENT_CONN)) || die "CLIENTS ($CLIENTS) exceeds PgBouncer's max_client_conn ($MAX_CLIENT_CONN)"

RUN_DIR="$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
RESULTS="$RUN_DIR/results.tsv"
: >"$RESULTS"
CLK_TCK="$(getconf CLK_TCK)"

PGSHIFT_PID=""
PGBOUNCER_PID=""
BOUNCER_DIR=""
PGSHIFT_CONFIG=""

stop_pid() { # stop_pid PID NAME: SIGTERM, bounded wait, then SIGKILL
    local pid="$1" name="$2" i
    [[ -n "$pid" ]] && pid_alive "$pid" || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    warn "$name did not exit within 10 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    stop_pid "$PGSHIFT_PID" pgshift
    [[ -n "$PGSHIFT_PID" ]] && wait "$PGSHIFT_PID" 2>/dev/null
    stop_pid "$PGBOUNCER_PID" pgbouncer
    [[ -n "$PGSHIFT_CONFIG" ]] && rm -f "$PGSHIFT_CONFIG"
    if [[ "${PGSHIFT_KEEP_CLUSTERS:-0}" == 1 ]]; then
        log "PGSHIFT_KEEP_CLUSTERS=1: leaving the clusters running"
    else
        "$ROOT/scripts/cluster.sh" stop || warn "could not stop the clusters"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "dependencies and test clusters"
ensure_deps
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
export PGUSER=postgres PGCONNECT_TIMEOUT=10
unset PGHOST PGPORT PGDATABASE PGPASSWORD PGSSLMODE

for p in "$PGBOUNCER_PORT" "$PGSHIFT_PORT" "$PGSHIFT_ADMIN_PORT"; do
    port_open "$H" "$p" && die "$H:$p is already in use; stop whatever listens there first"
done

step "database $DB at scale $SCALE on source and target"
for port in "$DIRECT_PORT" "$TARGET_PORT"; do
    exists="$(psql -X -At -h "$H" -p "$port" -d postgres -c "select 1 from pg_database where datname = '$DB'")"
    [[ "$exists" == 1 ]] || psql -X -q -h "$H" -p "$port" -d postgres -c "create database $DB" >/dev/null
    log "pgbench -i -s $SCALE on port $port"
    timeout 1800 pgbench -i -q -s "$SCALE" -h "$H" -p "$port" "$DB" >"$RUN_DIR/init-$port.log" 2>&1 \
        || { cat "$RUN_DIR/init-$port.log" >&2; die "pgbench -i failed on port $port"; }
done

# ---------------------------------------------------------------- PgBouncer
step "starting PgBouncer on $H:$PGBOUNCER_PORT"
PGBOUNCER_BIN="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
[[ -x "$PGBOUNCER_BIN" ]] || die "pgbouncer binary not found"
BOUNCER_DIR="$PGSHIFT_CLUSTER_DIR/bench"   # traversable by the postgres user
rm -rf "$BOUNCER_DIR"
mkdir -p "$BOUNCER_DIR"
printf '"postgres" ""\n' >"$BOUNCER_DIR/userlist.txt"
cat >"$BOUNCER_DIR/pgbouncer.ini" <<EOF
; Written by scripts/bench.sh
[databases]
* = host=$H port=$DIRECT_PORT

[pgbouncer]
listen_addr = $H
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $BOUNCER_DIR/userlist.txt
pool_mode = session
default_pool_size = $POOL_SIZE
max_client_conn = $MAX_CLIENT_CONN
ignore_startup_parameters = extra_float_digits
logfile = $BOUNCER_DIR/pgbouncer.log
pidfile = $BOUNCER_DIR/pgbouncer.pid
admin_users = postgres
EOF
chown -R "$(pg_owner)" "$BOUNCER_DIR"
as_pg_user "$PGBOUNCER_BIN" -d -q "$BOUNCER_DIR/pgbouncer.ini" </dev/null >/dev/null 2>&1 \
    || { cat "$BOUNCER_DIR/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer failed to start"; }
for ((i = 0; i < 100; i++)); do
    [[ -s "$BOUNCER_DIR/pgbouncer.pid" ]] && break
    sleep 0.1
done
PGBOUNCER_PID="$(cat "$BOUNCER_DIR/pgbouncer.pid" 2>/dev/null || true)"
[[ -n "$PGBOUNCER_PID" ]] || die "pgbouncer wrote no pid file"
wait_port "$H" "$PGBOUNCER_PORT" 10 "$PGBOUNCER_PID" || die "pgbouncer is not listening on $PGBOUNCER_PORT"
psql -X -At -h "$H" -p "$PGBOUNCER_PORT" -d "$DB" -c 'select 1' >/dev/null \
    || die "cannot query through pgbouncer"
log "pgbouncer $("$PGBOUNCER_BIN" --version | head -1 | awk '{print $NF}') running (pid $PGBOUNCER_PID)"

# ---------------------------------------------------------------- pgshift
PGSHIFT_OK=0
start_pgshift() {
    step "building and starting pgshift on $H:$PGSHIFT_PORT"
    if ! timeout 1800 cargo build --release --bins >"$RUN_DIR/cargo-build.log" 2>&1; then
        tail -n 20 "$RUN_DIR/cargo-build.log" >&2
        warn "pgshift does not build (log: $RUN_DIR/cargo-build.log); benchmarking without it"
        return 1
    fi
    if [[ -n "${BENCH_PGSHIFT_CONFIG:-}" ]]; then
        PGSHIFT_CONFIG="$(mktemp /tmp/pgshift-bench-XXXXXX.toml)"
        cp "$BENCH_PGSHIFT_CONFIG" "$PGSHIFT_CONFIG"
    elif [[ -f "$ROOT/proxy.toml" ]]; then
        PGSHIFT_CONFIG="$(mktemp /tmp/pgshift-bench-XXXXXX.toml)"
        python3 - "$ROOT/proxy.toml" "$PGSHIFT_CLUSTER_DIR" "$ROOT" \
            "$PGSHIFT_PORT" "$PGSHIFT_ADMIN_PORT" >"$PGSHIFT_CONFIG" <<'PY'
import re, sys
src, cluster_dir, root, port, admin_port = sys.argv[1:]
for line in open(src):
    line = re.sub(r"(?<![0-9])6432(?![0-9])", port, line)
    line = re.sub(r"(?<![0-9])9930(?![0-9])", admin_port, line)
    line = re.sub(r"""(sslmode\s*=\s*)(["'])[a-z-]*\2""", r"\1\2disable\2", line)
    line = re.sub(r"sslmode=[a-z-]+", "sslmode=disable", line)
    # Relative paths: resolved against proxy.toml's dir by pgshift; make them absolute.
    m = re.match(r"""^(\s*#?\s*\w+\s*=\s*")([^"/][^"]*)(".*)$""", line, re.S)
    if m and re.search(r"(cert|key|file|path|dir)$", m.group(1).split("=")[0].strip().lstrip("#").strip()):
        val = m.group(2)
        val = cluster_dir + val[len(".clusters"):] if val.startswith(".clusters/") else root + "/" + val
        line = m.group(1) + val + m.group(3)
    sys.stdout.write(line)
PY
    else
        warn "proxy.toml not found; using a guessed minimal config"
        PGSHIFT_CONFIG="$(mktemp /tmp/pgshift-bench-XXXXXX.toml)"
        cat >"$PGSHIFT_CONFIG" <<EOF
listen = "$H:$PGSHIFT_PORT"
admin_listen = "$H:$PGSHIFT_ADMIN_PORT"

[source]
host = "$H"
port = $DIRECT_PORT
sslmode = "disable"

[target]
host = "$H"
port = $TARGET_PORT
sslmode = "disable"
EOF
    fi
    cp "$PGSHIFT_CONFIG" "$RUN_DIR/pgshift.toml"
    local bin="${PGSHIFT_BIN:-$ROOT/target/release/pgshift}"
    if [[ ! -x "$bin" ]]; then
        warn "$bin not found; benchmarking without pgshift"
        return 1
    fi
    "$bin" --config "$PGSHIFT_CONFIG" >"$RUN_DIR/pgshift.log" 2>&1 &
    PGSHIFT_PID=$!
    if ! wait_port "$H" "$PGSHIFT_PORT" 30 "$PGSHIFT_PID"; then
        tail -n 20 "$RUN_DIR/pgshift.log" >&2
        warn "pgshift did not start listening on $H:$PGSHIFT_PORT (config: $RUN_DIR/pgshift.toml, log: $RUN_DIR/pgshift.log); benchmarking without it"
        stop_pid "$PGSHIFT_PID" pgshift
        PGSHIFT_PID=""
        return 1
    fi
    if ! psql -X -At -h "$H" -p "$PGSHIFT_PORT" -d "$DB" -c 'select 1' >"$RUN_DIR/pgshift-check.log" 2>&1; then
        cat "$RUN_DIR/pgshift-check.log" >&2
        warn "pgshift is listening but a query through it failed; benchmarking without it"
        stop_pid "$PGSHIFT_PID" pgshift
        PGSHIFT_PID=""
        return 1
    fi
    log "pgshift running (pid $PGSHIFT_PID)"
}
if start_pgshift; then PGSHIFT_OK=1; fi

# ---------------------------------------------------------------- runs
TARGETS=(direct pgbouncer)
((PGSHIFT_OK)) && TARGETS+=(pgshift)
WORKLOADS=(select-simple select-extended select-prepared tpcb-simple)

port_of() {
    case "$1" in
        direct) echo "$DIRECT_PORT" ;;
        pgbouncer) echo "$PGBOUNCER_PORT" ;;
        pgshift) echo "$PGSHIFT_PORT" ;;
    esac
}
pid_of() {
    case "$1" in
        pgbouncer) echo "$PGBOUNCER_PID" ;;
        pgshift) echo "$PGSHIFT_PID" ;;
        *) echo "" ;;
    esac
}
workload_args() {
    case "$1" in
        select-simple) echo "-S -n -M simple" ;;
        select-extended) echo "-S -n -M extended" ;;
        select-prepared) echo "-S -n -M prepared" ;;
        tpcb-simple) echo "-M simple" ;;
    esac
}

FAILED_BASELINE=0
run_one() { # run_one ROUND WORKLOAD TARGET
    local round="$1" wl="$2" tgt="$3" port pid out before="" after="" rc tps lat txns ticks=""
    port="$(port_of "$tgt")"; pid="$(pid_of "$tgt")"
    out="$RUN_DIR/r$round-$wl-$tgt.log"
    if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
        log "  $tgt: process is gone; skipped"
        printf '%s\t%s\t%s\t\t\t\t\tfailed\n' "$round" "$wl" "$tgt" >>"$RESULTS"
        return 0
    fi
    [[ -n "$pid" ]] && before="$(proc_cpu_ticks "$pid" || true)"
    rc=0
    # shellcheck disable=SC2046
    timeout $((DURATION + 120)) pgbench -h "$H" -p "$port" -c "$CLIENTS" -j "$THREADS" \
        -T "$DURATION" $(workload_args "$wl") "$DB" >"$out" 2>&1 || rc=$?
    [[ -n "$pid" ]] && after="$(proc_cpu_ticks "$pid" || true)"
    tps="$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' "$out" | head -1)"
    lat="$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' "$out" | head -1)"
    txns="$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$out" | head -1)"
    if [[ -n "$before" && -n "$after" ]]; then ticks=$((after - before)); fi
    if [[ $rc -ne 0 || -z "$tps" || -z "$txns" ]]; then
        warn "  $tgt: pgbench failed (exit $rc, output $out)"
        tail -n 5 "$out" >&2
        printf '%s\t%s\t%s\t\t\t\t\tfailed\n' "$round" "$wl" "$tgt" >>"$RESULTS"
        [[ "$tgt" == pgshift ]] || FAILED_BASELINE=1
        return 0
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\tok\n' "$round" "$wl" "$tgt" "$tps" "$lat" "$txns" "$ticks" >>"$RESULTS"
    log "  $tgt: tps $tps, latency avg $lat ms, $txns txns${ticks:+, proxy cpu $ticks ticks}"
}

nt=${#TARGETS[@]}
total=$((ROUNDS * ${#WORKLOADS[@]} * nt))
step "running $total pgbench runs of ${DURATION}s (~$((total * (DURATION + 2) / 60)) min): targets ${TARGETS[*]}"
for ((r = 1; r <= ROUNDS; r++)); do
    for wi in "${!WORKLOADS[@]}"; do
        wl="${WORKLOADS[$wi]}"
        log "round $r/$ROUNDS, workload $wl"
        for ((k = 0; k < nt; k++)); do
            run_one "$r" "$wl" "${TARGETS[$(((r + wi + k) % nt))]}"
        done
    done
done

# ---------------------------------------------------------------- report
step "results"
TABLE="$RUN_DIR/results.md"
python3 - "$RESULTS" "$CLK_TCK" >"$TABLE" <<'EOF'
import sys, statistics
path, clk = sys.argv[1], int(sys.argv[2])
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
workloads, targets, data = [], [], {}
for rnd, wl, tgt, tps, lat, txns, ticks, status in rows:
    if wl not in workloads: workloads.append(wl)
    if tgt not in targets: targets.append(tgt)
    d = data.setdefault((wl, tgt), {"tps": [], "lat": [], "cpu": [], "failed": 0})
    if status != "ok":
        d["failed"] += 1
        continue
    d["tps"].append(float(tps)); d["lat"].append(float(lat))
    if ticks != "" and int(txns) > 0:
        d["cpu"].append(int(ticks) / clk * 1e6 / int(txns))
order = {"direct": 0, "pgbouncer": 1, "pgshift": 2}
targets.sort(key=lambda t: order.get(t, 9))
med = lambda xs: statistics.median(xs) if xs else None
print("| workload | target | median TPS | median latency ms | TPS vs direct | proxy CPU µs/txn |")
print("|---|---|---:|---:|---:|---:|")
for wl in workloads:
    base = med(data.get((wl, "direct"), {}).get("tps", []))
    for tgt in targets:
        d = data.get((wl, tgt))
        if d is None: continue
        tps, lat, cpu = med(d["tps"]), med(d["lat"]), med(d["cpu"])
        n = len(d["tps"])
        note = f" ({d['failed']} failed)" if d["failed"] else ""
        tps_s = f"{tps:.0f}{note}" if tps is not None else f"failed ×{d['failed']}"
        lat_s = f"{lat:.3f}" if lat is not None else "-"
        ratio = f"{tps / base:.3f}" if (tps is not None and base) else "-"
        cpu_s = "-" if tgt == "direct" else (f"{cpu:.1f}" if cpu is not None else "-")
        print(f"| {wl} | {tgt} | {tps_s} | {lat_s} | {ratio} | {cpu_s} |")
EOF
{
    echo "pgbench: ROUNDS=$ROUNDS DURATION=${DURATION}s CLIENTS=$CLIENTS THREADS=$THREADS SCALE=$SCALE; $(nproc) cores; $(psql -X -At -h "$H" -p "$DIRECT_PORT" -d postgres -c 'show server_version') ; medians over rounds"
    ((PGSHIFT_OK)) || echo "pgshift: NOT BENCHMARKED (it did not build or start; see above)"
    echo
    cat "$TABLE"
} >"$RUN_DIR/report.md"
cat "$RUN_DIR/report.md"
if [[ -n "$OUT" ]]; then
    cp "$RUN_DIR/report.md" "$OUT"
    log "table written to $OUT"
fi
log "raw pgbench outputs: $RUN_DIR"
if ((FAILED_BASELINE)); then
    die "some direct/pgbouncer runs failed"
fi
