#!/usr/bin/env bash
# scripts/bench.sh — the benchmark behind docs/benchmarks.md: direct Postgres vs
# PgBouncer vs pgshift (passthrough, mirroring, read routing, shadow reads, session
# recording) under pgbench, then the proxies' memory with idle client connections.
# A benchmark, not a test: it prints numbers, it does not judge them.
#
# Usage: [ROUNDS=3] [DURATION=15] [CLIENTS=8] [THREADS=2] [SCALE=10] [OUT=file.md] \
#        [MEMORY_SESSIONS="1000 10000"] scripts/bench.sh
#
#   ROUNDS    rounds; each round runs every workload against every target (default 3)
#   DURATION  seconds per pgbench run (default 15)
#   CLIENTS   pgbench -c (default 8)          THREADS  pgbench -j (default 2)
#   SCALE     pgbench -i -s (default 10)
#   OUT       also write the whole report (markdown) to this file (default: stdout only)
#   BENCH_PGSHIFT_CONFIG  use this pgshift config file as is (must listen on 127.0.0.1:6433;
#             no other pgshift instance then)
#   BENCH_WORKERS  runtime.worker_threads of every pgshift instance but pgshift-mt
#             (default 1: one session thread, as PgBouncer's one)
#   BENCH_MT=0  leave out pgshift-mt (passthrough with worker_threads 0: one per core)
#   BENCH_BASE_BIN=path  also run pgshift-base: the pgshift binary at path (another
#             build, e.g. of an earlier commit) in passthrough, for a before/after
#             comparison in one run
#   BENCH_MIRROR=0  leave out the pgshift-mirror and pgshift-spool instances
#   BENCH_ROUTING=0 / BENCH_SHADOW=0 / BENCH_RECORD=0  leave out pgshift-r50 and -r100 /
#             pgshift-s10 and -s100 / pgshift-rec
#   BENCH_MEMORY=0  skip the idle-connection memory stage
#   MEMORY_SESSIONS  idle client counts of that stage (default "1000 10000")
#   BENCH_ONLY=pgbench | memory  run only the pgbench stage / only the memory stage
#   PGSHIFT_BIN  the proxy binary, used as is (default: target/release/pgshift, built
#             first with cargo build --release --bins)
#   PGSHIFT_KEEP_CLUSTERS=1  leave the test clusters running at the end
#   Quick check: DURATION=3 ROUNDS=1 SCALE=1 MEMORY_SESSIONS=1000 scripts/bench.sh
#
# Stage 1, pgbench. The test clusters (scripts/cluster.sh: source 127.0.0.1:54321, target
# 127.0.0.1:54322) both get database pgshift_bench with pgbench -i -s SCALE.
# Targets (all 127.0.0.1, database pgshift_bench, user postgres):
#   direct     the source cluster itself, port 54321
#   pgbouncer  Debian's PgBouncer, port 6434: session pooling, auth_type trust,
#              default_pool_size CLIENTS+2, max_client_conn 200,
#              ignore_startup_parameters = extra_float_digits (run as postgres when root)
#   pgshift    target/release/pgshift in passthrough, port 6433, admin 127.0.0.1:9931.
#              Every instance's config is proxy.toml, written to a temp file (and copied to
#              the run directory) by pgshift_config (scripts/lib.sh) with: listen and admin
#              addresses set, every sslmode set to disable, relative paths made absolute
#              (".clusters/" -> the real cluster dir, others -> the repo root, where
#              proxy.toml lives), the mirror's spool, shadow.mismatch_log and audit.path
#              in the run directory, and, unless said otherwise below, mirror.enabled
#              false, routing.read_percent 0, shadow.sample_percent 0 and record.path
#              unset (no recording). Without proxy.toml there is no pgshift instance.
#              If pgshift does not build or start, it is skipped with a message.
#   pgshift-mt like pgshift, but runtime.worker_threads 0 (one session thread per core);
#              every other instance has BENCH_WORKERS threads (1). Port 6442, admin 9939.
#   pgshift-base  only with BENCH_BASE_BIN: like pgshift, run by that binary. Port 6443,
#              admin 9940.
#   pgshift-mirror  mirror.enabled true, port 6435, admin 9932. The target database gets
#              the same pgbench -i, so the mirror replays TPC-B onto matching rows. After
#              each of its runs the script records the mirror's counters and waits for it
#              to drain before the next run (so the applier does not steal CPU from it).
#   pgshift-spool  mirroring on but target.port 9 (nothing listens): sessions capture
#              and spool every committed write, nothing is applied. Port 6436, admin
#              9933. Its spool (run directory) grows by every write.
#   pgshift-r50, pgshift-r100  routing.read_percent 50 and 100: select-only reads go to
#              the target cluster (which holds the same pgbench data) for that share of
#              sessions. Ports 6437 and 6438, admin 9934 and 9935; select-only workloads
#              only.
#   pgshift-s10, pgshift-s100  shadow.sample_percent 10 and 100: that share of
#              select-only reads also runs on the target and the answers are compared.
#              Ports 6439 and 6440, admin 9936 and 9937; select-only workloads only.
#   pgshift-rec  session recording on: record.path in the run directory (a fresh
#              capture), record.max_file_bytes 64 MiB and record.max_files 2, so the proxy
#              itself keeps at most 128 MiB of capture on disk; the capture is deleted
#              when the instance stops. Port 6441, admin 9938; all four workloads.
#              Started only if GET /status reports record.recording true.
# Workloads: select-only -M simple, -M extended, -M prepared; TPC-B -M simple.
# Within each round and workload the targets run one after another, in an order that
# rotates from one round/workload to the next (the order of the list is kept:
# pgshift-rec, pgshift and pgshift-mirror are neighbours, so they mostly run back to
# back).
#
# Reported, first, the full comparison table: one row per workload, the direct TPS,
# then for PgBouncer, pgshift, pgshift-mirror, pgshift-r50, pgshift-s100 and
# pgshift-rec "median TPS (ratio to direct) / proxy CPU µs per transaction" ("-" where
# the variant does not run that workload). Then per workload and target: median TPS
# (pgbench "tps = N (without initial connection time)"), median "latency average", TPS
# relative to direct, and the proxy's median CPU time per transaction (utime+stime
# from /proc/<pid>/stat before and after the run, in clock ticks of `getconf CLK_TCK`,
# divided by "number of transactions actually processed"), and for pgshift the part of
# it spent in the session worker threads (/proc/<pid>/task/*, threads named
# pgshift-worker-*; the rest is the mirror's applier, the recording's writer, ...).
# Raw pgbench outputs stay in target/bench/<timestamp>/.
# For pgshift-r50/-r100 also: TPS vs pgshift at read_percent 0 (median of the per-round
# ratios), and from each instance's /status the reads each backend served and their
# p50/p99 latency (the proxy's hdr histograms: request to ReadyForQuery, all of that
# instance's select-only runs together), and fallbacks.
# Select-only runs log every transaction's latency (pgbench -l): the table's p99 column
# is the client-side 99th percentile over all of a target's runs of that workload.
# For pgshift-s10/-s100 also: TPS and client p99 vs pgshift (shadowing off), same round,
# and the CPU the source and target clusters used during those runs (the target's is
# the shadow reads' extra work), with each instance's shadow counters from /status.
# For pgshift-mirror also: TPS with mirroring on vs off (median of the per-round
# ratios, pgshift-mirror / pgshift, same round), units applied during the run per
# second, lag at the end of the run, and how fast the backlog drained.
# For pgshift-spool: TPS vs pgshift (median of the per-round ratios).
# For pgshift-rec also: TPS with recording on vs off (median of the per-round ratios,
# pgshift-rec / pgshift, same round), both CPU µs/txn, and per transaction the
# messages recorded and bytes written to the capture, with the dropped runs and
# incomplete sessions: the deltas of GET /status record.current over each run (read
# once the writer has caught up, at most 5 s after the run, before the CPU sample).
#
# Stage 2, idle-connection memory (unless BENCH_MEMORY=0 or BENCH_ONLY=pgbench): the
# stage-1 proxies are stopped, then scripts/idle_memory.sh runs as a child process with
# MEMORY_SESSIONS (its header describes the method: pgshift and PgBouncer, RSS before,
# with all N idle clients and peak, per client; pgshift with target.session_links off
# where the target cluster has too few backends; the source cluster restarted with a
# higher max_connections for counts above its 2200, and restored after, also by this
# script's cleanup). Its table (with the reason for any row it could not measure) is
# printed and appended to the report; if it ends without one, the report says so, and
# the pgbench tables stand.
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
PGSHIFT_MIRROR_PORT=6435
PGSHIFT_MIRROR_ADMIN_PORT=9932
PGSHIFT_SPOOL_PORT=6436
PGSHIFT_SPOOL_ADMIN_PORT=9933
UNREACHABLE_PORT=9   # nothing listens there: connections are refused at once
BENCH_MIRROR="${BENCH_MIRROR:-1}"
BENCH_WORKERS="${BENCH_WORKERS:-1}"
BENCH_MT="${BENCH_MT:-1}"
BENCH_ROUTING="${BENCH_ROUTING:-1}"
BENCH_SHADOW="${BENCH_SHADOW:-1}"
PGSHIFT_S10_PORT=6439
PGSHIFT_S10_ADMIN_PORT=9936
PGSHIFT_S100_PORT=6440
PGSHIFT_S100_ADMIN_PORT=9937
PGSHIFT_R50_PORT=6437
PGSHIFT_R50_ADMIN_PORT=9934
PGSHIFT_R100_PORT=6438
PGSHIFT_R100_ADMIN_PORT=9935
BENCH_RECORD="${BENCH_RECORD:-1}"
PGSHIFT_REC_PORT=6441
PGSHIFT_REC_ADMIN_PORT=9938
PGSHIFT_MT_PORT=6442
PGSHIFT_MT_ADMIN_PORT=9939
BENCH_BASE_BIN="${BENCH_BASE_BIN:-}"
[[ -z "$BENCH_BASE_BIN" || -x "$BENCH_BASE_BIN" ]] || die "BENCH_BASE_BIN=$BENCH_BASE_BIN is not an executable"
PGSHIFT_BASE_PORT=6443
PGSHIFT_BASE_ADMIN_PORT=9940
REC_FILE_BYTES=$((64 << 20))   # record.max_file_bytes of pgshift-rec
REC_MAX_FILES=2                # record.max_files: at most 128 MiB of capture on disk
BENCH_MEMORY="${BENCH_MEMORY:-1}"
MEMORY_SESSIONS="${MEMORY_SESSIONS:-1000 10000}"
BENCH_ONLY="${BENCH_ONLY:-}"
case "$BENCH_ONLY" in
    "" | pgbench | memory) ;;
    *) die "BENCH_ONLY must be pgbench or memory (got '$BENCH_ONLY')" ;;
esac
# The idle-memory stage's own instances (scripts/idle_memory.sh).
MEMORY_PGSHIFT_PORT=6443
MEMORY_PGSHIFT_ADMIN_PORT=9939
MEMORY_PGBOUNCER_PORT=6442
declare -A PX_PID=()
PGBOUNCER_PORT=6434
POOL_SIZE=$((CLIENTS + 2))
MAX_CLIENT_CONN=200
((CLIENTS <= MAX_CLIENT_CONN)) || die "CLIENTS ($CLIENTS) exceeds PgBouncer's max_client_conn ($MAX_CLIENT_CONN)"

RUN_DIR="$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
RESULTS="$RUN_DIR/results.tsv"
: >"$RESULTS"
MIRROR_TSV="$RUN_DIR/mirror.tsv"
: >"$MIRROR_TSV"
CLUSTER_TSV="$RUN_DIR/clusters.tsv"
: >"$CLUSTER_TSV"
REC_TSV="$RUN_DIR/record.tsv"
: >"$REC_TSV"
CLK_TCK="$(getconf CLK_TCK)"

PGBOUNCER_PID=""
BOUNCER_DIR=""
MEM_PID=""
PGSHIFT_CONFIGS=()

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
    local name
    for name in "${!PX_PID[@]}"; do
        stop_pid "${PX_PID[$name]}" "$name"
        wait "${PX_PID[$name]}" 2>/dev/null
    done
    stop_pid "$PGBOUNCER_PID" pgbouncer
    [[ ${#PGSHIFT_CONFIGS[@]} -gt 0 ]] && rm -f "${PGSHIFT_CONFIGS[@]}"
    rm -rf "$RUN_DIR"/capture-*
    if [[ -n "$MEM_PID" ]]; then
        # The memory stage restores the source cluster itself when it ends.
        kill -TERM "$MEM_PID" 2>/dev/null
        wait "$MEM_PID" 2>/dev/null
    fi
    [[ -n "${PGSHIFT_CLUSTER_DIR:-}" ]] && source_max_connections_restore
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

for p in "$PGBOUNCER_PORT" "$PGSHIFT_PORT" "$PGSHIFT_ADMIN_PORT" "$PGSHIFT_MIRROR_PORT" "$PGSHIFT_MIRROR_ADMIN_PORT" \
    "$PGSHIFT_SPOOL_PORT" "$PGSHIFT_SPOOL_ADMIN_PORT" "$PGSHIFT_R50_PORT" "$PGSHIFT_R50_ADMIN_PORT" \
    "$PGSHIFT_R100_PORT" "$PGSHIFT_R100_ADMIN_PORT" "$PGSHIFT_S10_PORT" "$PGSHIFT_S10_ADMIN_PORT" \
    "$PGSHIFT_S100_PORT" "$PGSHIFT_S100_ADMIN_PORT" "$PGSHIFT_REC_PORT" "$PGSHIFT_REC_ADMIN_PORT" \
    "$MEMORY_PGSHIFT_PORT" "$MEMORY_PGSHIFT_ADMIN_PORT" "$MEMORY_PGBOUNCER_PORT"; do
    port_open "$H" "$p" && die "$H:$p is already in use; stop whatever listens there first"
done

# ---------------------------------------------------------------- idle-memory stage
# scripts/idle_memory.sh as a child process (so that nothing it runs into can end this
# script); its markdown table goes to $RUN_DIR/memory.md, with the reason for any row
# it could not measure, or a line saying why there is no table at all.
memory_stage() {
    local rc=0 binenv=()
    step "idle client connections: $MEMORY_SESSIONS (scripts/idle_memory.sh)"
    if [[ -n "${PGSHIFT_BIN:-}" ]]; then
        binenv=("PGSHIFT_BIN=$PGSHIFT_BIN")
    elif ((BUILT)); then
        binenv=("PGSHIFT_BIN=$ROOT/target/release/pgshift")
    fi
    rm -f "$RUN_DIR/memory.md"
    env "${binenv[@]}" MEMORY_SESSIONS="$MEMORY_SESSIONS" MEMORY_DIR="$RUN_DIR/memory" OUT="$RUN_DIR/memory.md" \
        MEMORY_PGSHIFT_PORT="$MEMORY_PGSHIFT_PORT" MEMORY_PGSHIFT_ADMIN_PORT="$MEMORY_PGSHIFT_ADMIN_PORT" \
        MEMORY_PGBOUNCER_PORT="$MEMORY_PGBOUNCER_PORT" "$ROOT/scripts/idle_memory.sh" >"$RUN_DIR/memory-stage.out" &
    MEM_PID=$!
    wait "$MEM_PID" || rc=$?
    MEM_PID=""
    if [[ ! -s "$RUN_DIR/memory.md" ]]; then
        echo "Idle client connections: NOT MEASURED: scripts/idle_memory.sh exited with status $rc before writing its table (its log is above; files in $RUN_DIR/memory)." \
            >"$RUN_DIR/memory.md"
    elif ((rc)); then
        printf '\n(scripts/idle_memory.sh exited with status %s: rows after the last one above were not measured.)\n' "$rc" \
            >>"$RUN_DIR/memory.md"
    fi
}
BUILT=0
if [[ "$BENCH_ONLY" == memory ]]; then
    memory_stage
    cp "$RUN_DIR/memory.md" "$RUN_DIR/report.md"
    echo
    cat "$RUN_DIR/report.md"
    if [[ -n "$OUT" ]]; then
        cp "$RUN_DIR/report.md" "$OUT"
        log "table written to $OUT"
    fi
    exit 0
fi

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
write_pgbouncer_ini "$BOUNCER_DIR" "$PGBOUNCER_PORT" "$DIRECT_PORT" "$POOL_SIZE" "$MAX_CLIENT_CONN" scripts/bench.sh
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
# Instances of the same binary and config, run interleaved: "pgshift" in passthrough,
# "pgshift-mirror" with mirroring on, "pgshift-spool" with it on but the target
# unreachable (only the hot-path capture and the spool appends cost anything: nothing
# is applied, no target Postgres competes for CPU), "pgshift-r50/-r100" routing reads,
# "pgshift-s10/-s100" shadowing reads, and "pgshift-rec" recording sessions.
declare -A PX_PORT=([pgshift]=$PGSHIFT_PORT [pgshift-mirror]=$PGSHIFT_MIRROR_PORT
    [pgshift-spool]=$PGSHIFT_SPOOL_PORT [pgshift-r50]=$PGSHIFT_R50_PORT [pgshift-r100]=$PGSHIFT_R100_PORT
    [pgshift-s10]=$PGSHIFT_S10_PORT [pgshift-s100]=$PGSHIFT_S100_PORT [pgshift-rec]=$PGSHIFT_REC_PORT
    [pgshift-mt]=$PGSHIFT_MT_PORT [pgshift-base]=$PGSHIFT_BASE_PORT)
declare -A PX_ADMIN=([pgshift]=$PGSHIFT_ADMIN_PORT [pgshift-mirror]=$PGSHIFT_MIRROR_ADMIN_PORT
    [pgshift-spool]=$PGSHIFT_SPOOL_ADMIN_PORT [pgshift-r50]=$PGSHIFT_R50_ADMIN_PORT
    [pgshift-r100]=$PGSHIFT_R100_ADMIN_PORT [pgshift-s10]=$PGSHIFT_S10_ADMIN_PORT
    [pgshift-s100]=$PGSHIFT_S100_ADMIN_PORT [pgshift-rec]=$PGSHIFT_REC_ADMIN_PORT
    [pgshift-mt]=$PGSHIFT_MT_ADMIN_PORT [pgshift-base]=$PGSHIFT_BASE_ADMIN_PORT)
# The recording's counters from the admin API (.record): recording(1|0) messages
# bytes_written dropped_runs sessions sessions_incomplete segment start_error|error|-
record_status() {
    python3 - "$1" <<'PY'
import json, sys, urllib.request
r = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=10))["record"]
c = r.get("current") or {}
err = (r.get("start_error") or c.get("error") or "-").replace("\n", " ")
print(int(bool(r.get("recording"))), c.get("messages", 0), c.get("bytes_written", 0), c.get("dropped_runs", 0),
      c.get("sessions", 0), c.get("sessions_incomplete", 0), c.get("segment", 0), err)
PY
}
start_pgshift() { # start_pgshift NAME MIRROR(on|off) [TARGET_PORT] [READ_PERCENT] [SAMPLE_PERCENT] [RECORD(on|off)]
    local name="$1" mirror="$2" port="${PX_PORT[$1]}" admin="${PX_ADMIN[$1]}" cfg
    local target_port="${3:-$TARGET_PORT}" read_percent="${4:-0}" sample_percent="${5:-0}" record="${6:-off}"
    step "starting $name on $H:$port (mirroring $mirror, recording $record)"
    if ((!BUILT)); then
        if [[ -n "${PGSHIFT_BIN:-}" ]]; then
            log "PGSHIFT_BIN=$PGSHIFT_BIN: using it as is (no cargo build)"
        elif ! timeout 1800 cargo build --release --bins >"$RUN_DIR/cargo-build.log" 2>&1; then
            tail -n 20 "$RUN_DIR/cargo-build.log" >&2
            warn "pgshift does not build (log: $RUN_DIR/cargo-build.log); benchmarking without it"
            return 1
        fi
        BUILT=1
    fi
    cfg="$(mktemp /tmp/pgshift-bench-XXXXXX.toml)"
    PGSHIFT_CONFIGS+=("$cfg")
    if [[ -n "${BENCH_PGSHIFT_CONFIG:-}" ]]; then
        [[ "$name" == pgshift ]] || { warn "BENCH_PGSHIFT_CONFIG is set: no $name instance"; return 1; }
        cp "$BENCH_PGSHIFT_CONFIG" "$cfg"
    elif [[ -f "$ROOT/proxy.toml" ]]; then
        rm -rf "$RUN_DIR/spool-$name"
        local rec=('record.path=')
        if [[ "$record" == on ]]; then
            # A fresh capture path (a recording never overwrites its first segment);
            # the proxy itself keeps at most REC_MAX_FILES segments of REC_FILE_BYTES.
            rm -rf "$RUN_DIR/capture-$name"
            mkdir -p "$RUN_DIR/capture-$name"
            rec=("record.path=\"$RUN_DIR/capture-$name/capture\"" "record.max_file_bytes=$REC_FILE_BYTES"
                "record.max_files=$REC_MAX_FILES")
        fi
        pgshift_config "$ROOT/proxy.toml" "listen.addr=\"$H:$port\"" "admin.addr=\"$H:$admin\"" \
            "target.port=$target_port" "mirror.enabled=$([[ "$mirror" == on ]] && echo true || echo false)" \
            "mirror.spool_dir=\"$RUN_DIR/spool-$name\"" "routing.read_percent=$read_percent" \
            "shadow.sample_percent=$sample_percent" "shadow.mismatch_log=\"$RUN_DIR/mismatches-$name.jsonl\"" \
            "audit.path=\"$RUN_DIR/audit-$name.jsonl\"" "${rec[@]}" \
            "runtime.worker_threads=${PX_WORKERS:-$BENCH_WORKERS}" >"$cfg" \
            || { warn "could not derive a config from proxy.toml; no $name instance"; return 1; }
    else
        warn "proxy.toml not found; benchmarking without pgshift"
        return 1
    fi
    cp "$cfg" "$RUN_DIR/$name.toml"
    local bin="${PX_BIN:-${PGSHIFT_BIN:-$ROOT/target/release/pgshift}}" pid
    if [[ ! -x "$bin" ]]; then
        warn "$bin not found; benchmarking without pgshift"
        return 1
    fi
    "$bin" --config "$cfg" >"$RUN_DIR/$name.log" 2>&1 &
    pid=$!
    PX_PID[$name]=$pid
    if ! wait_port "$H" "$port" 30 "$pid"; then
        tail -n 20 "$RUN_DIR/$name.log" >&2
        warn "$name did not start listening on $H:$port (config: $RUN_DIR/$name.toml, log: $RUN_DIR/$name.log); benchmarking without it"
        stop_pid "$pid" "$name"
        unset "PX_PID[$name]"
        return 1
    fi
    if ! psql -X -At -h "$H" -p "$port" -d "$DB" -c 'select 1' >"$RUN_DIR/$name-check.log" 2>&1; then
        cat "$RUN_DIR/$name-check.log" >&2
        warn "$name is listening but a query through it failed; benchmarking without it"
        stop_pid "$pid" "$name"
        unset "PX_PID[$name]"
        return 1
    fi
    if [[ "$record" == on ]]; then
        local rs
        rs="$(record_status "$admin" 2>&1)" || rs="no status: $rs"
        if [[ "$rs" != 1\ * ]]; then
            warn "$name runs but is not recording ($rs); benchmarking without it"
            stop_pid "$pid" "$name"
            unset "PX_PID[$name]"
            return 1
        fi
    fi
    log "$name running (pid $pid)"
}
TARGETS=(direct pgbouncer)
if start_pgshift pgshift off; then TARGETS+=(pgshift); fi
if [[ -n "$BENCH_BASE_BIN" ]] && PX_BIN="$BENCH_BASE_BIN" start_pgshift pgshift-base off; then
    TARGETS+=(pgshift-base)
fi
if [[ "$BENCH_MT" == 1 ]] && PX_WORKERS=0 start_pgshift pgshift-mt off; then TARGETS+=(pgshift-mt); fi
if [[ "$BENCH_MIRROR" == 1 ]]; then
    if start_pgshift pgshift-mirror on; then TARGETS+=(pgshift-mirror); fi
    if start_pgshift pgshift-spool on "$UNREACHABLE_PORT"; then TARGETS+=(pgshift-spool); fi
fi
if [[ "$BENCH_ROUTING" == 1 ]]; then
    if start_pgshift pgshift-r50 off "$TARGET_PORT" 50; then TARGETS+=(pgshift-r50); fi
    if start_pgshift pgshift-r100 off "$TARGET_PORT" 100; then TARGETS+=(pgshift-r100); fi
fi
if [[ "$BENCH_SHADOW" == 1 ]]; then
    if start_pgshift pgshift-s10 off "$TARGET_PORT" 0 10; then TARGETS+=(pgshift-s10); fi
    if start_pgshift pgshift-s100 off "$TARGET_PORT" 0 100; then TARGETS+=(pgshift-s100); fi
fi
if [[ "$BENCH_RECORD" == 1 ]] && start_pgshift pgshift-rec off "$TARGET_PORT" 0 0 on; then
    # Right before pgshift in the rotation (pgshift-mirror is right after it).
    order=()
    for t in "${TARGETS[@]}"; do
        [[ "$t" == pgshift ]] && order+=(pgshift-rec)
        order+=("$t")
    done
    [[ " ${order[*]} " == *" pgshift-rec "* ]] || order+=(pgshift-rec)
    TARGETS=("${order[@]}")
fi

# ---------------------------------------------------------------- runs
WORKLOADS=(select-simple select-extended select-prepared tpcb-simple)
# The routing and shadow instances measure reads only (select-only workloads).
select_only_target() { [[ "$1" =~ ^pgshift-[rs][0-9]+$ ]]; }

port_of() {
    case "$1" in
        direct) echo "$DIRECT_PORT" ;;
        pgbouncer) echo "$PGBOUNCER_PORT" ;;
        *) echo "${PX_PORT[$1]}" ;;
    esac
}
pid_of() {
    case "$1" in
        direct) echo "" ;;
        pgbouncer) echo "$PGBOUNCER_PID" ;;
        *) echo "${PX_PID[$1]:-}" ;;
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

# CPU ticks of a whole cluster: the postmaster with its reaped children, plus the
# live children (backends, walwriter, ...).
cluster_cpu_ticks() {
    python3 - "$1" <<'PY'
import os, sys
pm = int(open(os.path.join(sys.argv[1], "postmaster.pid")).readline())
def fields(pid):
    s = open(f"/proc/{pid}/stat").read()
    return s[s.rindex(")") + 2:].split()
f = fields(pm)
total = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        f = fields(pid)
        if int(f[1]) == pm:
            total += int(f[11]) + int(f[12])
    except (OSError, ValueError, IndexError):
        pass
print(total)
PY
}

# The mirror's counters from the admin API: processed spooled lag_txns lag_s divergences
mirror_status() {
    python3 - "$1" <<'PY'
import json, sys, urllib.request
s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=10))["mirror"]
print(s["applied_transactions"] + s["skipped_already_applied"], s["spooled_transactions"],
      s["lag_transactions"], s["lag_seconds"], s["report"]["divergences_total"])
PY
}

FAILED_BASELINE=0
run_one() { # run_one ROUND WORKLOAD TARGET
    local round="$1" wl="$2" tgt="$3" port pid out before="" after="" rc tps lat txns ticks=""
    local wbefore="" wafter="" wticks=""
    port="$(port_of "$tgt")"; pid="$(pid_of "$tgt")"
    out="$RUN_DIR/r$round-$wl-$tgt.log"
    if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
        log "  $tgt: process is gone; skipped"
        printf '%s\t%s\t%s\t\t\t\t\t\tfailed\n' "$round" "$wl" "$tgt" >>"$RESULTS"
        return 0
    fi
    local m0="" m1="" m2="" drain_start drain_s="" i p0 s0 p1 s1 l1 ls1 p2 d2 tc0="" tc1=""
    if [[ "$tgt" == pgshift-mirror ]]; then
        m0="$(mirror_status "${PX_ADMIN[$tgt]}" || true)"
        tc0="$(cluster_cpu_ticks "$PGSHIFT_CLUSTER_DIR/target" || true)"
    fi
    local rec0="" rec1="" prev="" j
    [[ "$tgt" == pgshift-rec ]] && rec0="$(record_status "${PX_ADMIN[$tgt]}" || true)"
    local cs0="" ct0="" cs1="" ct1="" lat_args=()
    if [[ "$wl" == select-* ]]; then
        # Every transaction's latency, for the client-side p99.
        rm -f "$RUN_DIR/lat-r$round-$wl-$tgt".*
        lat_args=(-l --log-prefix="$RUN_DIR/lat-r$round-$wl-$tgt")
        if [[ "$tgt" == pgshift || "$tgt" == pgshift-s* ]]; then
            cs0="$(cluster_cpu_ticks "$PGSHIFT_CLUSTER_DIR/source" || true)"
            ct0="$(cluster_cpu_ticks "$PGSHIFT_CLUSTER_DIR/target" || true)"
        fi
    fi
    [[ -n "$pid" ]] && before="$(proc_cpu_ticks "$pid" || true)"
    [[ "$tgt" == pgshift* ]] && wbefore="$(thread_cpu_ticks "$pid" pgshift-worker || true)"
    rc=0
    # shellcheck disable=SC2046
    timeout $((DURATION + 120)) pgbench -h "$H" -p "$port" -c "$CLIENTS" -j "$THREADS" \
        -T "$DURATION" $(workload_args "$wl") "${lat_args[@]}" "$DB" >"$out" 2>&1 || rc=$?
    if [[ -n "$rec0" ]]; then
        # Until the writer has written what the run recorded (bytes_written stops
        # moving; at most 5 s), so that its CPU counts too.
        for ((j = 0; j < 50; j++)); do
            rec1="$(record_status "${PX_ADMIN[$tgt]}" || true)"
            [[ -n "$rec1" && "$(awk '{print $3}' <<<"$rec1")" == "$(awk '{print $3}' <<<"$prev")" ]] && break
            prev="$rec1"
            sleep 0.1
        done
    fi
    [[ -n "$pid" ]] && after="$(proc_cpu_ticks "$pid" || true)"
    [[ "$tgt" == pgshift* ]] && wafter="$(thread_cpu_ticks "$pid" pgshift-worker || true)"
    if [[ -n "$cs0" && -n "$ct0" ]]; then
        cs1="$(cluster_cpu_ticks "$PGSHIFT_CLUSTER_DIR/source" || true)"
        ct1="$(cluster_cpu_ticks "$PGSHIFT_CLUSTER_DIR/target" || true)"
        [[ -n "$cs1" && -n "$ct1" ]] &&
            printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$wl" "$tgt" $((cs1 - cs0)) $((ct1 - ct0)) >>"$CLUSTER_TSV"
    fi
    if [[ -n "$m0" ]]; then
        # The mirror at the end of the run, then how long its backlog takes.
        m1="$(mirror_status "${PX_ADMIN[$tgt]}" || true)"
        drain_start=$(date +%s.%N)
        for ((i = 0; i < 6000; i++)); do
            m2="$(mirror_status "${PX_ADMIN[$tgt]}" || true)"
            [[ "$(awk '{print $3}' <<<"$m2")" == 0 ]] && break
            sleep 0.1
        done
        drain_s="$(awk -v a="$drain_start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b - a}')"
        [[ "$(awk '{print $3}' <<<"$m2")" == 0 ]] || warn "  $tgt: the mirror did not drain within 10 min"
        tc1="$(cluster_cpu_ticks "$PGSHIFT_CLUSTER_DIR/target" || true)"
    fi
    tps="$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' "$out" | head -1)"
    lat="$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' "$out" | head -1)"
    txns="$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$out" | head -1)"
    if [[ -n "$before" && -n "$after" ]]; then ticks=$((after - before)); fi
    if [[ -n "$wbefore" && -n "$wafter" ]]; then wticks=$((wafter - wbefore)); fi
    if [[ $rc -ne 0 || -z "$tps" || -z "$txns" ]]; then
        warn "  $tgt: pgbench failed (exit $rc, output $out)"
        tail -n 5 "$out" >&2
        printf '%s\t%s\t%s\t\t\t\t\t\tfailed\n' "$round" "$wl" "$tgt" >>"$RESULTS"
        [[ "$tgt" == pgshift* ]] || FAILED_BASELINE=1
        return 0
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\tok\n' "$round" "$wl" "$tgt" "$tps" "$lat" "$txns" "$ticks" "$wticks" >>"$RESULTS"
    if [[ -n "$rec0" && -n "$rec1" ]]; then
        # round workload txns messages bytes_written dropped_runs sessions sessions_incomplete
        # recording_at_end segment error (deltas over the run but the last three)
        local a b
        read -r -a a <<<"$rec0"
        read -r -a b <<<"$rec1"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$wl" "$txns" $((b[1] - a[1])) $((b[2] - a[2])) \
            $((b[3] - a[3])) $((b[4] - a[4])) $((b[5] - a[5])) "${b[0]}" "${b[6]}" "${b[*]:7}" >>"$REC_TSV"
        log "  recording: $((b[1] - a[1])) messages, $((b[2] - a[2])) bytes written ($(((b[2] - a[2]) / (txns > 0 ? txns : 1))) per txn), dropped runs $((b[3] - a[3])), segment ${b[6]}$([[ ${b[0]} == 1 ]] || echo ", NOT RECORDING: ${b[*]:7}")"
    fi
    if [[ -n "$m1" && -n "$m2" ]]; then
        # round workload processed_in_run spooled_in_run lag_end_txns lag_end_s drain_s
        # processed_in_drain divergences target_cluster_ticks
        read -r p0 s0 _ _ _ <<<"$m0"
        read -r p1 s1 l1 ls1 _ <<<"$m1"
        read -r p2 _ _ _ d2 <<<"$m2"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$wl" $((p1 - p0)) $((s1 - s0)) "$l1" "$ls1" \
            "$drain_s" $((p2 - p1)) "$d2" "$([[ -n "$tc0" && -n "$tc1" ]] && echo $((tc1 - tc0)))" >>"$MIRROR_TSV"
        log "  mirror: applied $((p1 - p0)) of $((s1 - s0)) spooled during the run, lag at end $l1 units (${ls1}s), drained in ${drain_s}s, divergences $d2"
    fi
    log "  $tgt: tps $tps, latency avg $lat ms, $txns txns${ticks:+, proxy cpu $ticks ticks}${wticks:+ (session workers $wticks)}"
}

nt=${#TARGETS[@]}
nr=0
for t in "${TARGETS[@]}"; do if select_only_target "$t"; then nr=$((nr + 1)); fi; done
total=$((ROUNDS * (${#WORKLOADS[@]} * (nt - nr) + 3 * nr)))
step "running $total pgbench runs of ${DURATION}s (~$((total * (DURATION + 2) / 60)) min): targets ${TARGETS[*]}"
for ((r = 1; r <= ROUNDS; r++)); do
    for wi in "${!WORKLOADS[@]}"; do
        wl="${WORKLOADS[$wi]}"
        log "round $r/$ROUNDS, workload $wl"
        for ((k = 0; k < nt; k++)); do
            tgt="${TARGETS[$(((r + wi + k) % nt))]}"
            if select_only_target "$tgt" && [[ "$wl" != select-* ]]; then continue; fi
            run_one "$r" "$wl" "$tgt"
        done
    done
done

# ---------------------------------------------------------------- report
step "results"
ROUTING_JSON="$RUN_DIR/routing.json"
python3 - "$ROUTING_JSON" "${TARGETS[@]}" <<PY
import json, sys, urllib.request
admin = {"pgshift": $PGSHIFT_ADMIN_PORT, "pgshift-r50": $PGSHIFT_R50_ADMIN_PORT, "pgshift-r100": $PGSHIFT_R100_ADMIN_PORT,
         "pgshift-s10": $PGSHIFT_S10_ADMIN_PORT, "pgshift-s100": $PGSHIFT_S100_ADMIN_PORT}
out = {}
for t in sys.argv[2:]:
    if t in admin:
        try:
            s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin[t]}/status", timeout=10))
            out[t] = {"read_percent": s["routing"]["read_percent"], "metrics": s["metrics"]["routing"],
                      "shadow": s["metrics"].get("shadow"),
                      "sample_percent": (s.get("shadow") or {}).get("settings", {}).get("sample_percent")}
        except Exception as e:
            out[t] = {"error": str(e)}
json.dump(out, open(sys.argv[1], "w"))
PY
TABLE="$RUN_DIR/results.md"
BENCH_TARGETS="${TARGETS[*]}" python3 - "$RESULTS" "$CLK_TCK" "$MIRROR_TSV" "$DURATION" "$ROUTING_JSON" "$RUN_DIR" \
    "$CLUSTER_TSV" "$REC_TSV" "$BENCH_MIRROR$BENCH_ROUTING$BENCH_SHADOW$BENCH_RECORD$BENCH_MT" >"$TABLE" <<'EOF'
import glob, json, os, sys, statistics
path, clk, mirror_path, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
routing = json.load(open(sys.argv[5])) if len(sys.argv) > 5 else {}
run_dir, cluster_path, rec_path, enabled = sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
started = os.environ.get("BENCH_TARGETS", "").split()

def p99_ms(wl, tgt, rnd="*"):
    # pgbench -l lines: client txn latency_us script_no epoch_s epoch_us
    lats = []
    for f in glob.glob(os.path.join(run_dir, f"lat-r{rnd}-{wl}-{tgt}.*")):
        for line in open(f):
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                lats.append(int(parts[2]))
    if not lats:
        return None
    lats.sort()
    return lats[min(len(lats) - 1, int(len(lats) * 0.99))] / 1000.0
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
workloads, targets, data = [], [], {}
for rnd, wl, tgt, tps, lat, txns, ticks, wticks, status in rows:
    if wl not in workloads: workloads.append(wl)
    if tgt not in targets: targets.append(tgt)
    d = data.setdefault((wl, tgt), {"tps": [], "lat": [], "cpu": [], "wcpu": [], "failed": 0})
    if status != "ok":
        d["failed"] += 1
        continue
    d["tps"].append(float(tps)); d["lat"].append(float(lat))
    if ticks != "" and int(txns) > 0:
        d["cpu"].append(int(ticks) / clk * 1e6 / int(txns))
    if wticks != "" and int(txns) > 0:
        d["wcpu"].append(int(wticks) / clk * 1e6 / int(txns))
order = {"direct": 0, "pgbouncer": 1, "pgshift-base": 1.5, "pgshift": 2, "pgshift-mt": 2.5, "pgshift-r50": 3, "pgshift-r100": 4,
         "pgshift-s10": 5, "pgshift-s100": 6, "pgshift-mirror": 7, "pgshift-spool": 8, "pgshift-rec": 9}
targets.sort(key=lambda t: order.get(t, 10))
med = lambda xs: statistics.median(xs) if xs else None

# The full comparison table first: one row per workload, one column per variant.
labels = {"select-simple": "select-only, -M simple", "select-extended": "select-only, -M extended",
          "select-prepared": "select-only, -M prepared", "tpcb-simple": "TPC-B, -M simple"}
variants = [("pgbouncer", "PgBouncer"), ("pgshift", "pgshift passthrough"),
            ("pgshift-mt", "pgshift passthrough, a thread per core"), ("pgshift-mirror", "pgshift mirroring"),
            ("pgshift-r50", "pgshift 50% routing"), ("pgshift-s100", "pgshift 100% shadowing"),
            ("pgshift-rec", "pgshift recording")]
if "pgshift-base" in started:
    variants.insert(1, ("pgshift-base", "pgshift passthrough, BENCH_BASE_BIN"))
# Which switch leaves a variant out (BENCH_MIRROR BENCH_ROUTING BENCH_SHADOW BENCH_RECORD BENCH_MT).
switch = {"pgshift-mt": (4, "BENCH_MT=0"), "pgshift-mirror": (0, "BENCH_MIRROR=0"), "pgshift-r50": (1, "BENCH_ROUTING=0"),
          "pgshift-s100": (2, "BENCH_SHADOW=0"), "pgshift-rec": (3, "BENCH_RECORD=0")}
print("Each cell: median TPS (TPS / direct) / the proxy's CPU time per transaction in µs; "
      "\"-\": the variant does not run that workload (routing and shadowing: select-only only).")
print()
print("| workload | direct TPS | " + " | ".join(l for _, l in variants) + " |")
print("|---|---:|" + "---:|" * len(variants))
for wl in workloads:
    base = med(data.get((wl, "direct"), {}).get("tps", []))
    cells = [f"{base:.0f}" if base else "failed"]
    for tgt, _ in variants:
        d = data.get((wl, tgt))
        if d is None:
            cells.append("-")
        elif not d["tps"]:
            cells.append(f"failed ×{d['failed']}")
        else:
            tps, cpu = med(d["tps"]), med(d["cpu"])
            ratio = f"{tps / base:.2f}" if base else "-"
            cpu_s = f"{cpu:.1f}" if cpu is not None else "-"
            cells.append(f"{tps:.0f} ({ratio}) / {cpu_s}" + (f" ({d['failed']} failed)" if d["failed"] else ""))
    print(f"| {labels.get(wl, wl)} | " + " | ".join(cells) + " |")
missing = []
for tgt, label in variants:
    if tgt in started:
        continue
    i, flag = switch.get(tgt, (None, None))
    missing.append(f"{tgt} ({flag})" if i is not None and enabled[i:i + 1] == "0" else f"{tgt} (did not start; see the log)")
if missing:
    print()
    print("Not in this run: " + ", ".join(missing) + ".")
print()
print("All targets, per workload:")
print()
print("| workload | target | median TPS | median latency ms | p99 latency ms | TPS vs direct | proxy CPU µs/txn | of which session workers |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for wl in workloads:
    base = med(data.get((wl, "direct"), {}).get("tps", []))
    for tgt in targets:
        d = data.get((wl, tgt))
        if d is None: continue
        tps, lat, cpu, wcpu = med(d["tps"]), med(d["lat"]), med(d["cpu"]), med(d["wcpu"])
        n = len(d["tps"])
        note = f" ({d['failed']} failed)" if d["failed"] else ""
        tps_s = f"{tps:.0f}{note}" if tps is not None else f"failed ×{d['failed']}"
        lat_s = f"{lat:.3f}" if lat is not None else "-"
        ratio = f"{tps / base:.3f}" if (tps is not None and base) else "-"
        cpu_s = "-" if tgt == "direct" else (f"{cpu:.1f}" if cpu is not None else "-")
        wcpu_s = f"{wcpu:.1f}" if wcpu is not None else "-"
        p99 = p99_ms(wl, tgt) if wl.startswith("select-") else None
        p99_s = f"{p99:.3f}" if p99 is not None else "-"
        print(f"| {wl} | {tgt} | {tps_s} | {lat_s} | {p99_s} | {ratio} | {cpu_s} | {wcpu_s} |")

# Mirroring on vs off: per-round ratios (the two ran in the same round).
by_round = {}
for rnd, wl, tgt, tps, lat, txns, ticks, wticks, status in rows:
    if status == "ok":
        by_round[(rnd, wl, tgt)] = float(tps)
ratios, spool_ratios = {}, {}
for (rnd, wl, tgt), tps in by_round.items():
    if tgt == "pgshift-mirror" and (rnd, wl, "pgshift") in by_round:
        ratios.setdefault(wl, []).append(tps / by_round[(rnd, wl, "pgshift")])
    if tgt == "pgshift-spool" and (rnd, wl, "pgshift") in by_round:
        spool_ratios.setdefault(wl, []).append(tps / by_round[(rnd, wl, "pgshift")])
mrows = [l.rstrip("\n").split("\t") for l in open(mirror_path) if l.strip()]
if ratios or mrows:
    print()
    print("Mirroring on vs off (pgshift-mirror / pgshift TPS, same round), and the mirror's apply figures:")
    print()
    print("| workload | TPS ratio, median | per round | units spooled/s | applied/s during the run | lag at end (units, s) | drain s | drain rate units/s | target Postgres CPU µs/unit | divergences |")
    print("|---|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for wl in workloads:
        rs = ratios.get(wl, [])
        mr = [r for r in mrows if r[1] == wl]
        if not rs and not mr:
            continue
        rs_s = " ".join(f"{r:.3f}" for r in rs)
        med_r = f"{statistics.median(rs):.3f}" if rs else "-"
        if mr:
            spooled = statistics.median(int(r[3]) / duration for r in mr)
            applied = statistics.median(int(r[2]) / duration for r in mr)
            lags = " ".join(f"{r[4]} ({float(r[5]):.1f})" for r in mr)
            drain = statistics.median(float(r[6]) for r in mr)
            rates = [int(r[7]) / float(r[6]) for r in mr if float(r[6]) > 0 and int(r[7]) > 0]
            rate = f"{statistics.median(rates):.0f}" if rates else "-"
            divs = max(int(r[8]) for r in mr)
            tcpu = [int(r[9]) / clk * 1e6 / (int(r[2]) + int(r[7])) for r in mr
                    if len(r) > 9 and r[9] and int(r[2]) + int(r[7]) > 0]
            tcpu_s = f"{statistics.median(tcpu):.0f}" if tcpu else "-"
            print(f"| {wl} | {med_r} | {rs_s} | {spooled:.0f} | {applied:.0f} | {lags} | {drain:.1f} | {rate} | {tcpu_s} | {divs} |")
        else:
            print(f"| {wl} | {med_r} | {rs_s} | - | - | - | - | - | - | - |")
route_ratios = {}
for (rnd, wl, tgt), tps in by_round.items():
    if tgt in ("pgshift-r50", "pgshift-r100") and (rnd, wl, "pgshift") in by_round:
        route_ratios.setdefault((wl, tgt), []).append(tps / by_round[(rnd, wl, "pgshift")])
if route_ratios or any(k in ("pgshift-r50", "pgshift-r100") for k in routing):
    print()
    print("Read routing: select-only TPS at read_percent 50 and 100 vs 0 (pgshift), same round:")
    print()
    print("| workload | read_percent | TPS ratio vs 0%, median | per round |")
    print("|---|---:|---:|---|")
    for wl in workloads:
        for tgt, pct in (("pgshift-r50", 50), ("pgshift-r100", 100)):
            rs = route_ratios.get((wl, tgt), [])
            if rs:
                print(f"| {wl} | {pct} | {statistics.median(rs):.3f} | {' '.join(f'{r:.3f}' for r in rs)} |")
    print()
    print("Reads each backend served, per instance (all its select-only runs), with the proxy's latency (request to ReadyForQuery):")
    print()
    print("| instance | read_percent | backend | reads | p50 µs | p99 µs | fallbacks |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for tgt in ("pgshift", "pgshift-r50", "pgshift-r100"):
        r = routing.get(tgt)
        if not r or "metrics" not in r:
            continue
        m = r["metrics"]
        fb = sum(m["fallbacks"].values())
        for backend in ("source", "target"):
            b = m[backend]
            print(f"| {tgt} | {r['read_percent']:g} | {backend} | {b['reads']} | {b['p50_us']} | {b['p99_us']} | {fb if backend == 'target' else ''} |")
shadow_ratios = {}
for (rnd, wl, tgt), tps in by_round.items():
    if tgt.startswith("pgshift-s") and tgt != "pgshift-spool" and (rnd, wl, "pgshift") in by_round:
        shadow_ratios.setdefault((wl, tgt), []).append(tps / by_round[(rnd, wl, "pgshift")])
crows = [l.rstrip("\n").split("\t") for l in open(cluster_path) if l.strip()]
if shadow_ratios:
    print()
    print("Shadow reads: select-only at shadow.sample_percent 0 (pgshift), 10 and 100, same rounds.")
    print("TPS and client p99 vs 0%; source and target Postgres CPU during the runs, in CPU-seconds per second of run (the target's is the shadow reads' extra work):")
    print()
    print("| workload | sample % | TPS ratio vs 0%, median | per round | p99 ms | p99 vs 0% | source CPU s/s | target CPU s/s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for wl in workloads:
        base_p99 = p99_ms(wl, "pgshift")
        for tgt, pct in (("pgshift", 0), ("pgshift-s10", 10), ("pgshift-s100", 100)):
            rs = shadow_ratios.get((wl, tgt), [])
            if tgt != "pgshift" and not rs:
                continue
            p99 = p99_ms(wl, tgt)
            cr = [r for r in crows if r[1] == wl and r[2] == tgt]
            src = statistics.median(int(r[3]) / clk / duration for r in cr) if cr else None
            tgc = statistics.median(int(r[4]) / clk / duration for r in cr) if cr else None
            ratio = f"{statistics.median(rs):.3f}" if rs else "1"
            per = " ".join(f"{r:.3f}" for r in rs)
            p99_s = f"{p99:.3f}" if p99 is not None else "-"
            p99r = f"{p99 / base_p99:.3f}" if (p99 is not None and base_p99) else "-"
            src_s = f"{src:.2f}" if src is not None else "-"
            tgc_s = f"{tgc:.2f}" if tgc is not None else "-"
            print(f"| {wl} | {pct} | {ratio} | {per} | {p99_s} | {p99r} | {src_s} | {tgc_s} |")
    print()
    print("Shadow counters per instance (all its select-only runs):")
    print()
    print("| instance | sample % | matched | confirmed | transient | noise | skipped (by reason) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for tgt in ("pgshift-s10", "pgshift-s100"):
        r = routing.get(tgt) or {}
        sh = r.get("shadow")
        if not sh:
            continue
        c = sh["compared"]
        sk = ", ".join(f"{k} {v}" for k, v in sh["skipped"].items() if v) or "none"
        print(f"| {tgt} | {r.get('sample_percent')} | {c['match']} | {c['mismatch_confirmed']} | {c['mismatch_transient']} | {c['noise']} | {sk} |")
if spool_ratios:
    print()
    print("Capture and spool only (pgshift-spool: mirroring on, target unreachable) / pgshift TPS, same round:")
    print()
    print("| workload | TPS ratio, median | per round |")
    print("|---|---:|---|")
    for wl in workloads:
        rs = spool_ratios.get(wl, [])
        if rs:
            print(f"| {wl} | {statistics.median(rs):.3f} | {' '.join(f'{r:.3f}' for r in rs)} |")
rec_ratios = {}
for (rnd, wl, tgt), tps in by_round.items():
    if tgt == "pgshift-rec" and (rnd, wl, "pgshift") in by_round:
        rec_ratios.setdefault(wl, []).append(tps / by_round[(rnd, wl, "pgshift")])
rrows = [l.rstrip("\n").split("\t") for l in open(rec_path) if l.strip()]
if rec_ratios or rrows:
    print()
    print("Recording on (pgshift-rec: [record] on, otherwise pgshift's passthrough config) vs off (pgshift), "
          "TPS ratio per round (same round); recorded per transaction from its GET /status record.current "
          "counters (bytes as written to the capture):")
    print()
    print("| workload | TPS ratio, median | per round | CPU µs/txn pgshift | CPU µs/txn pgshift-rec | messages/txn | bytes recorded/txn | dropped runs | sessions incomplete |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for wl in workloads:
        rs = rec_ratios.get(wl, [])
        rr = [r for r in rrows if r[1] == wl and int(r[2]) > 0]
        if not rs and not rr:
            continue
        c0, c1 = med(data.get((wl, "pgshift"), {}).get("cpu", [])), med(data.get((wl, "pgshift-rec"), {}).get("cpu", []))
        f = lambda x: f"{x:.1f}" if x is not None else "-"
        msgs = med([int(r[3]) / int(r[2]) for r in rr])
        byts = med([int(r[4]) / int(r[2]) for r in rr])
        dropped = sum(int(r[5]) for r in rr)
        incomplete = sum(int(r[7]) for r in rr)
        print(f"| {wl} | {f'{statistics.median(rs):.3f}' if rs else '-'} | {' '.join(f'{r:.3f}' for r in rs)} | "
              f"{f(c0)} | {f(c1)} | {f(msgs)} | {f(byts)} | {dropped} | {incomplete} |")
    off = [r for r in rrows if r[8] != "1"]
    if off:
        print()
        print(f"WARNING: pgshift-rec was not recording at the end of {len(off)} run(s): {off[-1][10]}")
EOF
{
    echo "pgbench: ROUNDS=$ROUNDS DURATION=${DURATION}s CLIENTS=$CLIENTS THREADS=$THREADS SCALE=$SCALE; $(nproc) cores; $(psql -X -At -h "$H" -p "$DIRECT_PORT" -d postgres -c 'show server_version') ; medians over rounds"
    [[ " ${TARGETS[*]} " == *" pgshift "* ]] || echo "pgshift: NOT BENCHMARKED (it did not build or start; see above)"
    echo
    cat "$TABLE"
} >"$RUN_DIR/report.md"
cat "$RUN_DIR/report.md"
if [[ -n "$OUT" ]]; then
    cp "$RUN_DIR/report.md" "$OUT"
    log "table written to $OUT"
fi
log "raw pgbench outputs: $RUN_DIR"

if [[ "$BENCH_MEMORY" == 1 && "$BENCH_ONLY" != pgbench ]]; then
    # The pgbench stage's proxies go first: their memory and ports.
    for name in "${!PX_PID[@]}"; do
        stop_pid "${PX_PID[$name]}" "$name"
        wait "${PX_PID[$name]}" 2>/dev/null || true
        unset "PX_PID[$name]"
    done
    stop_pid "$PGBOUNCER_PID" pgbouncer
    PGBOUNCER_PID=""
    rm -rf "$RUN_DIR"/capture-*
    memory_stage
    { echo; cat "$RUN_DIR/memory.md"; } >>"$RUN_DIR/report.md"
    echo
    cat "$RUN_DIR/memory.md"
    if [[ -n "$OUT" ]]; then
        cp "$RUN_DIR/report.md" "$OUT"
        log "table written to $OUT"
    fi
    log "whole report: $RUN_DIR/report.md"
fi
if ((FAILED_BASELINE)); then
    die "some direct/pgbouncer runs failed"
fi
