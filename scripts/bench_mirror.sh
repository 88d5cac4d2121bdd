#!/usr/bin/env bash
# scripts/bench_mirror.sh — what mirroring costs the application, against native
# logical replication: pgbench TPC-B on the source directly, with a logical-replication
# subscription running, through PgBouncer, and through pgshift with mirroring off and
# on under each spool durability policy ([mirror] fsync). A benchmark, not a test: it
# prints numbers, it does not judge them.
#
# Usage: [ROUNDS=3] [DURATION=15] [CLIENTS=8] [THREADS=2] [SCALE=10] [MODES=simple] \
#        [OUT=file.md] scripts/bench_mirror.sh
#
#   ROUNDS    rounds; each round runs every variant once per mode (default 3)
#   DURATION  seconds per pgbench run (default 15)
#   CLIENTS   pgbench -c (default 8)          THREADS  pgbench -j (default 2)
#   SCALE     pgbench -i -s (default 10)
#   MODES     pgbench -M query modes, space-separated: simple, extended, prepared
#             (default "simple"; e.g. MODES="simple prepared")
#   OUT       also write the report (markdown) to this file (default: stdout only)
#   BENCH_PGBOUNCER=0  leave out the pgbouncer variant
#   BENCH_LOGICAL=0    leave out the logical variant
#   DRAIN_TIMEOUT      seconds to wait, after a run, for the mirror to drain or the
#             subscriber to catch up (default 600; then the run is reported as not drained)
#   PGSHIFT_BIN  the proxy binary, used as is (default target/release/pgshift, else
#             target/ci/pgshift; this script never builds: without either, run
#             `cargo build --release --bins` first). A warning says when a source file
#             is newer than the binary.
#   PROXY_TOML  the config the pgshift instances derive theirs from (default proxy.toml)
#   Quick check: DURATION=2 ROUNDS=1 SCALE=1 scripts/bench_mirror.sh   (under a minute)
#
# The test clusters (scripts/cluster.sh: source 127.0.0.1:54321, target 127.0.0.1:54322,
# user postgres, trust; started if not running, left running at the end) both get
# database pgshift_bench_mirror with pgbench -i -s SCALE (the same data on both).
# Variants (all 127.0.0.1, that database, user postgres):
#   direct     the source cluster itself: no replication at all.
#   logical    the source, with native logical replication running to the target:
#              publication pgshift_bench_mirror_pub FOR TABLE the four pgbench tables on
#              the source (created once), and for each logical run a subscription on
#              the target created right before it (copy_data = false: the data is
#              already there; subscription and slot named bench_mirror_<pid>_r<round>_
#              <mode>) and dropped, with its slot, once the subscriber has caught up.
#              Why create/drop per run rather than one subscription DISABLEd between
#              its runs: a disabled subscription's slot keeps every WAL record written
#              after it, and the other variants' runs write the same published tables,
#              so at the next ENABLE the walsender would decode, and the subscriber
#              apply, all of their transactions, inside the logical run's measurement
#              (or, advanced past them with pg_replication_slot_advance, still decode
#              them). A slot created right before the run starts at the run's first
#              transaction; the run starts once the walsender and the apply worker are
#              up (slot active, worker pid in pg_stat_subscription). So no subscription,
#              slot or walsender exists while any other variant runs.
#   pgbouncer  Debian's PgBouncer on port 6459 (write_pgbouncer_ini in scripts/lib.sh:
#              session pooling, default_pool_size CLIENTS+2), in front of the source: the
#              cost of one proxy hop, for scale. BENCH_PGBOUNCER=0 leaves it out.
#   pgshift-off            pgshift, mirror.enabled = false (passthrough). Port 6450.
#   pgshift-commit         mirroring on, fsync = "commit" (the default). Port 6451.
#   pgshift-interval-200   mirroring on, fsync = "interval", fsync_interval_ms = 200. 6452.
#   pgshift-interval       mirroring on, fsync = "interval", fsync_interval_ms left to
#                          its default (1000 ms). Port 6453.
#   pgshift-nofsync        mirroring on, fsync = "off". Port 6454.
#              Admin API on 9950..9954 in the same order. Each config is PROXY_TOML through
#              pgshift_config (scripts/lib.sh: listen/admin addresses, every sslmode
#              disable, relative paths absolute), with mirror.spool_dir, audit.path and
#              shadow.mismatch_log in the run directory, routing.read_percent 0,
#              shadow.sample_percent 0, recording off, and the mirror keys above; copied
#              to the run directory. An instance that does not start is left out (said
#              in the report). The mirror applies TPC-B onto the target's copy of the data.
#              target.session_links stays as PROXY_TOML has it (true in proxy.toml): every
#              client session then also logs in to the target, which shows in the target
#              cluster's CPU of every pgshift variant, pgshift-off included.
# Every run: pgbench TPC-B (-n: no vacuum, no truncation of pgbench_history, which would
# be a replicated write) -c CLIENTS -j THREADS -T DURATION -M <mode>. Before each run, on
# both clusters directly: VACUUM pgbench_branches, pgbench_tellers and CHECKPOINT (so no
# run carries an earlier one's checkpoint or bloat). Within a round and mode the
# variants run one after another, in an order that rotates from one round/mode to the
# next. After a mirroring run the script waits until the mirror has applied everything
# (GET /status: mirror.lag_transactions 0), after a logical run until the subscriber
# has (the walsender's pg_stat_replication.replay_lsn, the apply position the
# subscriber reports, at or past the source's pg_current_wal_lsn() at the end of the
# run), so no run starts while the previous one is still being applied.
#
# Measured per run: TPS (pgbench "without initial connection time"), "latency
# average", transactions processed; CPU time (utime+stime in /proc, clock ticks of
# `getconf CLK_TCK`) of the proxy process (pgshift, PgBouncer), of the source cluster
# and of the target cluster (the postmaster, its reaped children and its live children,
# found from postmaster.pid in the data dirs of `scripts/cluster.sh env`), and for
# logical of its walsender (source) and apply worker (target) processes alone; each
# over the run, and over the run plus the drain / catch-up that followed. Lag at the
# end of the run: mirror: GET /status mirror.lag_transactions and lag_seconds; logical:
# transactions not yet applied (pgbench_history rows on the target, one per TPC-B
# transaction, against the run's transaction count), the walsender's replay_lag, and
# WAL bytes between the source's pg_current_wal_lsn() and replay_lsn, all sampled by a
# helper started (and logged in) before the run, within about 10-50 ms of pgbench's
# exit (runs.txt: sampled_after, in s). Drain / catch-up time: from pgbench's exit until
# the mirror's lag is 0 / replay_lsn reaches that LSN (0 when it already was at the
# first look); the logical one includes the subscriber's feedback delay. Units spooled and applied (mirror; the status counters)
# and transactions applied (logical; history rows) are checked against pgbench's count.
#
# Reported (markdown, stdout and OUT), per mode: median TPS, TPS vs direct and vs
# pgshift-off (medians of the per-round ratios, same round), median latency, CPU µs
# per transaction during the run (proxy; source and target clusters), lag at the end
# of the run and drain / catch-up time; then the whole cost per transaction from the
# run's start until the target had caught up (proxy + source + target, and how much
# more than direct), with the walsender / apply worker share; then every run. Raw
# files (pgbench outputs, runs.txt with one line of key=value per run, configs, logs)
# in target/bench/mirror-<timestamp>/.
# Cleanup (on any exit): the pgshift instances and PgBouncer are stopped, every
# subscription in pgshift_bench_mirror on the target is dropped with its slot, any slot
# left named bench_mirror_* on the source is dropped, and so is the publication. The
# clusters stay running; the database stays.
#   DURABLE=1 (default) both clusters run with fsync = on and synchronous_commit = on
#             for the benchmark (ALTER SYSTEM, reset at exit): Postgres waits for its
#             WAL at commit as pgshift-commit waits for its spool. DURABLE=0 keeps the
#             test clusters' fsync = off / synchronous_commit = off.
# Caveats: everything (clients, proxies, both clusters) shares this
# machine's cores, so the target's apply work competes with the source's.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
exec </dev/null

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-15}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
SCALE="${SCALE:-10}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-600}"
MODES="${MODES:-simple}"
OUT="${OUT:-}"
BENCH_PGBOUNCER="${BENCH_PGBOUNCER:-1}"
BENCH_LOGICAL="${BENCH_LOGICAL:-1}"
DURABLE="${DURABLE:-1}"
PROXY_TOML="${PROXY_TOML:-$ROOT/proxy.toml}"
for v in ROUNDS DURATION CLIENTS THREADS SCALE DRAIN_TIMEOUT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
read -r -a MODE_LIST <<<"$MODES"
((${#MODE_LIST[@]})) || die "MODES is empty"
for m in "${MODE_LIST[@]}"; do
    case "$m" in simple | extended | prepared) ;; *) die "MODES: unknown pgbench -M mode '$m'" ;; esac
done

H=127.0.0.1
DB=pgshift_bench_mirror
PUB=pgshift_bench_mirror_pub
SUB_PREFIX=bench_mirror_
SOURCE_PORT=54321
TARGET_PORT=54322
PGBOUNCER_PORT=6459
POOL_SIZE=$((CLIENTS + 2))
MAX_CLIENT_CONN=200
((CLIENTS <= MAX_CLIENT_CONN)) || die "CLIENTS ($CLIENTS) exceeds PgBouncer's max_client_conn ($MAX_CLIENT_CONN)"
# The pgshift instances: ports, [mirror] fsync ("-": mirroring off) and fsync_interval_ms ("": default)
PGSHIFT_VARIANTS=(pgshift-off pgshift-commit pgshift-interval-200 pgshift-interval pgshift-nofsync)
declare -A PX_PORT=([pgshift-off]=6450 [pgshift-commit]=6451 [pgshift-interval-200]=6452
    [pgshift-interval]=6453 [pgshift-nofsync]=6454)
declare -A PX_ADMIN=([pgshift-off]=9950 [pgshift-commit]=9951 [pgshift-interval-200]=9952
    [pgshift-interval]=9953 [pgshift-nofsync]=9954)
declare -A PX_FSYNC=([pgshift-off]=- [pgshift-commit]=commit [pgshift-interval-200]=interval
    [pgshift-interval]=interval [pgshift-nofsync]=off)
declare -A PX_INTERVAL=([pgshift-off]="" [pgshift-commit]="" [pgshift-interval-200]=200
    [pgshift-interval]="" [pgshift-nofsync]="")
declare -A PX_PID=()

RUN_DIR="$ROOT/target/bench/mirror-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
RUNS="$RUN_DIR/runs.txt"
: >"$RUNS"
NOTES="$RUN_DIR/notes.txt"   # variants left out, with the reason
: >"$NOTES"
CLK_TCK="$(getconf CLK_TCK)"
PGBOUNCER_PID=""
BOUNCER_DIR=""
PGSHIFT_CONFIGS=()
DURABLE_SET=()    # ports whose fsync/synchronous_commit this script set
CLEAN_LOGICAL=0   # set once the clusters' env is known: cleanup may touch them
BENCH_PID=""      # the running pgbench (timeout) and lag sampler, for the cleanup
WAIT_PID=""

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

psql_at() { # psql_at PORT DBNAME SQL: one value per line; fails on any error or after 180 s
    timeout 180 psql -X -q -At -v ON_ERROR_STOP=1 -h "$H" -p "$1" -d "$2" -c "$3"
}

db_exists() { [[ "$(psql_at "$1" postgres "select 1 from pg_database where datname = '$DB'" 2>/dev/null)" == 1 ]]; }

# Drops every subscription of database $DB on the target (with its slot on the source
# when it can reach it), then any slot named $SUB_PREFIX* on the source, then the
# publication. Used before the runs (leftovers of a killed run), after each logical
# run's own DROP failed, and by the cleanup.
drop_logical_all() {
    local sub slot i
    if db_exists "$TARGET_PORT"; then
        for sub in $(psql_at "$TARGET_PORT" "$DB" "select s.subname from pg_subscription s join pg_database d on d.oid = s.subdbid where d.datname = '$DB'" 2>/dev/null); do
            log "dropping subscription $sub on the target"
            if ! psql_at "$TARGET_PORT" "$DB" "drop subscription if exists $sub" >/dev/null 2>>"$RUN_DIR/cleanup.log"; then
                # The source unreachable or the slot busy: detach the slot, drop it below.
                psql_at "$TARGET_PORT" "$DB" "alter subscription $sub disable" >/dev/null 2>>"$RUN_DIR/cleanup.log"
                psql_at "$TARGET_PORT" "$DB" "alter subscription $sub set (slot_name = none)" >/dev/null 2>>"$RUN_DIR/cleanup.log"
                psql_at "$TARGET_PORT" "$DB" "drop subscription if exists $sub" >/dev/null 2>>"$RUN_DIR/cleanup.log" \
                    || warn "could not drop subscription $sub on the target (see $RUN_DIR/cleanup.log)"
            fi
        done
    fi
    for slot in $(psql_at "$SOURCE_PORT" postgres "select slot_name from pg_replication_slots where slot_name like '${SUB_PREFIX//_/\\_}%'" 2>/dev/null); do
        log "dropping replication slot $slot on the source"
        for ((i = 0; i < 50; i++)); do
            [[ "$(psql_at "$SOURCE_PORT" postgres "select active from pg_replication_slots where slot_name = '$slot'" 2>/dev/null)" == t ]] || break
            psql_at "$SOURCE_PORT" postgres "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = '$slot' and active_pid is not null" >/dev/null 2>&1
            sleep 0.2
        done
        psql_at "$SOURCE_PORT" postgres "select pg_drop_replication_slot('$slot') from pg_replication_slots where slot_name = '$slot'" >/dev/null 2>>"$RUN_DIR/cleanup.log" \
            || warn "could not drop replication slot $slot on the source (see $RUN_DIR/cleanup.log)"
    done
    if db_exists "$SOURCE_PORT"; then
        psql_at "$SOURCE_PORT" "$DB" "drop publication if exists $PUB" >/dev/null 2>>"$RUN_DIR/cleanup.log" \
            || warn "could not drop publication $PUB on the source"
    fi
}

cleanup() {
    local rc=$?
    set +e
    local name p
    for p in "$BENCH_PID" "$WAIT_PID"; do
        [[ -n "$p" ]] && kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    for name in "${!PX_PID[@]}"; do
        stop_pid "${PX_PID[$name]}" "$name"
        wait "${PX_PID[$name]}" 2>/dev/null
    done
    stop_pid "$PGBOUNCER_PID" pgbouncer
    if [[ -n "$BOUNCER_DIR" ]]; then
        cp "$BOUNCER_DIR/pgbouncer.log" "$RUN_DIR/pgbouncer.log" 2>/dev/null
        rm -rf "$BOUNCER_DIR"
    fi
    ((${#PGSHIFT_CONFIGS[@]})) && rm -f "${PGSHIFT_CONFIGS[@]}"
    # The spools hold every mirrored unit; they are not needed after the run.
    rm -rf "$RUN_DIR"/spool-*
    ((CLEAN_LOGICAL)) && drop_logical_all
    for p in "${DURABLE_SET[@]}"; do
        psql_at "$p" postgres "alter system reset fsync" >/dev/null 2>&1
        psql_at "$p" postgres "alter system reset synchronous_commit" >/dev/null 2>&1
        psql_at "$p" postgres "select pg_reload_conf()" >/dev/null 2>&1
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- binary
if [[ -n "${PGSHIFT_BIN:-}" ]]; then
    BIN="$PGSHIFT_BIN"
    [[ -x "$BIN" ]] || die "PGSHIFT_BIN=$BIN is not an executable"
elif [[ -x "$ROOT/target/release/pgshift" ]]; then
    BIN="$ROOT/target/release/pgshift"
elif [[ -x "$ROOT/target/ci/pgshift" ]]; then
    BIN="$ROOT/target/ci/pgshift"
    log "no target/release/pgshift; using $BIN"
else
    die "no pgshift binary (target/release/pgshift or target/ci/pgshift): run 'cargo build --release --bins' first, or set PGSHIFT_BIN (this script never builds)"
fi
newer="$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$BIN" -type f 2>/dev/null | head -3 | sed "s|^$ROOT/||" | tr '\n' ' ')"
[[ -z "$newer" ]] || warn "$BIN is older than ${newer}(it may not be the current code: cargo build --release --bins)"
[[ -f "$PROXY_TOML" ]] || die "$PROXY_TOML not found (PROXY_TOML): the pgshift instances derive their config from it"

# ---------------------------------------------------------------- clusters, database
step "dependencies and test clusters"
ensure_deps
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
export PGUSER=postgres PGCONNECT_TIMEOUT=10
unset PGHOST PGPORT PGDATABASE PGPASSWORD PGSSLMODE PGSERVICE PGOPTIONS

for p in "$PGBOUNCER_PORT" "${PX_PORT[@]}" "${PX_ADMIN[@]}"; do
    port_open "$H" "$p" && die "$H:$p is already in use; stop whatever listens there first"
done
if [[ "$BENCH_LOGICAL" == 1 && "$(psql_at "$SOURCE_PORT" postgres 'show wal_level')" != logical ]]; then
    die "the source's wal_level is not logical (BENCH_LOGICAL=0 leaves out the logical variant)"
fi

CLEAN_LOGICAL=1
drop_logical_all   # leftovers of an earlier run killed before its cleanup

# Durable clusters for the comparison (DURABLE=1): Postgres waits for its WAL
# flush at commit as pgshift-commit waits for its spool, as in production. Set
# with ALTER SYSTEM (postgresql.auto.conf) and reset by the cleanup, which
# brings back the test clusters' own fsync = off.
if [[ "$DURABLE" == 1 ]]; then
    for p in "$SOURCE_PORT" "$TARGET_PORT"; do
        DURABLE_SET+=("$p")
        psql_at "$p" postgres "alter system set fsync = on" >/dev/null
        psql_at "$p" postgres "alter system set synchronous_commit = on" >/dev/null
        psql_at "$p" postgres "select pg_reload_conf()" >/dev/null
    done
    sleep 1
fi

step "database $DB at scale $SCALE on source and target"
for port in "$SOURCE_PORT" "$TARGET_PORT"; do
    db_exists "$port" || psql_at "$port" postgres "create database $DB" >/dev/null
    log "pgbench -i -s $SCALE on port $port"
    timeout 1800 pgbench -i -q -s "$SCALE" -h "$H" -p "$port" "$DB" >"$RUN_DIR/init-$port.log" 2>&1 \
        || { cat "$RUN_DIR/init-$port.log" >&2; die "pgbench -i failed on port $port"; }
done
if [[ "$BENCH_LOGICAL" == 1 ]]; then
    psql_at "$SOURCE_PORT" "$DB" "create publication $PUB for table pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history" >/dev/null
fi

# ---------------------------------------------------------------- PgBouncer
TARGETS=(direct)
if [[ "$BENCH_LOGICAL" == 1 ]]; then TARGETS+=(logical); else echo "logical (BENCH_LOGICAL=0)" >>"$NOTES"; fi
[[ "$BENCH_PGBOUNCER" == 1 ]] || echo "pgbouncer (BENCH_PGBOUNCER=0)" >>"$NOTES"
if [[ "$BENCH_PGBOUNCER" == 1 ]]; then
    step "starting PgBouncer on $H:$PGBOUNCER_PORT"
    PGBOUNCER_BIN="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
    BOUNCER_DIR="$PGSHIFT_CLUSTER_DIR/bench-mirror"   # traversable by the postgres user
    rm -rf "$BOUNCER_DIR"
    mkdir -p "$BOUNCER_DIR"
    write_pgbouncer_ini "$BOUNCER_DIR" "$PGBOUNCER_PORT" "$SOURCE_PORT" "$POOL_SIZE" "$MAX_CLIENT_CONN" scripts/bench_mirror.sh
    if [[ -x "$PGBOUNCER_BIN" ]] && as_pg_user "$PGBOUNCER_BIN" -d -q "$BOUNCER_DIR/pgbouncer.ini" </dev/null >/dev/null 2>&1; then
        for ((i = 0; i < 100; i++)); do
            [[ -s "$BOUNCER_DIR/pgbouncer.pid" ]] && break
            sleep 0.1
        done
        PGBOUNCER_PID="$(cat "$BOUNCER_DIR/pgbouncer.pid" 2>/dev/null || true)"
    fi
    if [[ -n "$PGBOUNCER_PID" ]] && wait_port "$H" "$PGBOUNCER_PORT" 10 "$PGBOUNCER_PID" \
        && psql_at "$PGBOUNCER_PORT" "$DB" 'select 1' >/dev/null 2>&1; then
        log "pgbouncer running (pid $PGBOUNCER_PID)"
        TARGETS+=(pgbouncer)
    else
        cat "$BOUNCER_DIR/pgbouncer.log" >&2 2>/dev/null
        warn "pgbouncer did not start; benchmarking without it"
        echo "pgbouncer (did not start; log: $BOUNCER_DIR/pgbouncer.log)" >>"$NOTES"
        stop_pid "$PGBOUNCER_PID" pgbouncer
        PGBOUNCER_PID=""
    fi
fi

# ---------------------------------------------------------------- pgshift
# The mirror's counters: processed (applied + skipped as already applied) spooled
# lag_transactions lag_seconds divergences state fsync
mirror_status() {
    python3 - "$1" <<'PY'
import json, sys, urllib.request
s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=10))["mirror"]
print(s["applied_transactions"] + s["skipped_already_applied"], s["spooled_transactions"], s["lag_transactions"],
      s["lag_seconds"], s["report"]["divergences_total"], s["state"], s["fsync"])
PY
}
start_pgshift() { # start_pgshift NAME
    local name="$1" port="${PX_PORT[$1]}" admin="${PX_ADMIN[$1]}" fsync="${PX_FSYNC[$1]}" cfg pid st
    local keys=()
    step "starting $name on $H:$port (admin $admin)"
    if [[ "$fsync" == - ]]; then
        keys=("mirror.enabled=false")
    else
        keys=("mirror.enabled=true" "mirror.fsync=\"$fsync\"" "mirror.fsync_interval_ms=${PX_INTERVAL[$name]}")
    fi
    cfg="$(mktemp /tmp/pgshift-bench-mirror-XXXXXX.toml)"
    PGSHIFT_CONFIGS+=("$cfg")
    rm -rf "$RUN_DIR/spool-$name"
    pgshift_config "$PROXY_TOML" "listen.addr=\"$H:$port\"" "admin.addr=\"$H:$admin\"" \
        "source.port=$SOURCE_PORT" "target.port=$TARGET_PORT" "${keys[@]}" \
        "mirror.spool_dir=\"$RUN_DIR/spool-$name\"" "routing.read_percent=0" \
        "shadow.sample_percent=0" "shadow.mismatch_log=\"$RUN_DIR/mismatches-$name.jsonl\"" \
        "audit.path=\"$RUN_DIR/audit-$name.jsonl\"" "record.path=" >"$cfg" \
        || { warn "could not derive a config from $PROXY_TOML; no $name"; echo "$name (no config)" >>"$NOTES"; return 1; }
    cp "$cfg" "$RUN_DIR/$name.toml"
    "$BIN" --config "$cfg" >"$RUN_DIR/$name.log" 2>&1 &
    pid=$!
    PX_PID[$name]=$pid
    if ! wait_port "$H" "$port" 30 "$pid" \
        || ! psql_at "$port" "$DB" 'select 1' >"$RUN_DIR/$name-check.log" 2>&1; then
        tail -n 20 "$RUN_DIR/$name.log" "$RUN_DIR/$name-check.log" >&2 2>/dev/null
        warn "$name did not start or cannot query (config: $RUN_DIR/$name.toml, log: $RUN_DIR/$name.log); benchmarking without it"
        echo "$name (did not start; log: $RUN_DIR/$name.log)" >>"$NOTES"
        stop_pid "$pid" "$name"
        unset "PX_PID[$name]"
        return 1
    fi
    if [[ "$fsync" != - ]]; then
        st="$(mirror_status "$admin" 2>&1)" || st="no mirror status: $st"
        if [[ "$(awk '{print $7}' <<<"$st")" != "$fsync" || "$(awk '{print $6}' <<<"$st")" == stopped ]]; then
            warn "$name: the mirror is not running with fsync=$fsync ($st); benchmarking without it"
            echo "$name (mirror not running as configured: $st)" >>"$NOTES"
            stop_pid "$pid" "$name"
            unset "PX_PID[$name]"
            return 1
        fi
    fi
    log "$name running (pid $pid)"
}
for name in "${PGSHIFT_VARIANTS[@]}"; do
    if start_pgshift "$name"; then TARGETS+=("$name"); fi
done

# ---------------------------------------------------------------- runs
port_of() {
    case "$1" in
        direct | logical) echo "$SOURCE_PORT" ;;
        pgbouncer) echo "$PGBOUNCER_PORT" ;;
        *) echo "${PX_PORT[$1]}" ;;
    esac
}
pid_of() {
    case "$1" in
        direct | logical) echo "" ;;
        pgbouncer) echo "$PGBOUNCER_PID" ;;
        *) echo "${PX_PID[$1]:-}" ;;
    esac
}

# cpu_sample [PID ...]: "source_ticks target_ticks ticks_of_each_PID" in one pass over
# /proc ("-" for what cannot be read). A cluster's ticks: its postmaster's own and
# reaped children's, plus its live children's.
cpu_sample() {
    python3 - "$PGSHIFT_CLUSTER_DIR/source" "$PGSHIFT_CLUSTER_DIR/target" "$@" <<'PY'
import os, sys
def fields(pid):
    s = open(f"/proc/{pid}/stat").read()
    return s[s.rindex(")") + 2:].split()
live = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            f = fields(p)
            live[int(p)] = (int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
        except (OSError, ValueError, IndexError):
            pass
out = []
for d in sys.argv[1:3]:
    try:
        pm = int(open(os.path.join(d, "postmaster.pid")).readline())
        total = live[pm][1] + live[pm][2] + sum(t for pp, t, _ in live.values() if pp == pm)
        out.append(str(total))
    except (OSError, ValueError, KeyError):
        out.append("-")
for p in sys.argv[3:]:
    out.append(str(live[int(p)][1]) if p.isdigit() and int(p) in live else "-")
print(" ".join(out))
PY
}
delta() { [[ "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ ]] && echo $(($2 - $1)) || echo ""; }

prepare_clusters() { # outside any measurement, straight to both clusters
    local port
    for port in "$SOURCE_PORT" "$TARGET_PORT"; do
        psql -X -q -v ON_ERROR_STOP=1 -h "$H" -p "$port" -d "$DB" \
            -c 'vacuum pgbench_branches, pgbench_tellers' -c 'checkpoint' >/dev/null 2>>"$RUN_DIR/prepare.log" \
            || warn "vacuum/checkpoint failed on port $port (see $RUN_DIR/prepare.log)"
    done
}

# Logical: the subscription for one run. Sets SUB, WS_PID (walsender), AW_PID (apply
# worker), HIST0 (pgbench_history rows on the target before the run).
SUB="" WS_PID="" AW_PID="" HIST0=""
logical_start() { # logical_start NAME
    local sub="$1" i
    SUB="$sub" WS_PID="" AW_PID="" HIST0=""
    if ! psql_at "$TARGET_PORT" "$DB" "create subscription $sub connection 'host=$H port=$SOURCE_PORT dbname=$DB user=postgres' publication $PUB with (copy_data = false, slot_name = '$sub', create_slot = true, enabled = true)" \
        >/dev/null 2>"$RUN_DIR/$sub-create.log"; then
        cat "$RUN_DIR/$sub-create.log" >&2
        return 1
    fi
    for ((i = 0; i < 300; i++)); do
        WS_PID="$(psql_at "$SOURCE_PORT" postgres "select r.pid from pg_replication_slots s join pg_stat_replication r on r.pid = s.active_pid where s.slot_name = '$sub' and r.state = 'streaming'" 2>/dev/null || true)"
        AW_PID="$(psql_at "$TARGET_PORT" "$DB" "select pid from pg_stat_subscription where subname = '$sub' and relid is null and pid is not null" 2>/dev/null || true)"
        [[ -n "$WS_PID" && -n "$AW_PID" ]] && break
        sleep 0.1
    done
    if [[ -z "$WS_PID" || -z "$AW_PID" ]]; then
        warn "  logical: the walsender/apply worker of $sub did not come up within 30 s"
        return 1
    fi
    HIST0="$(psql_at "$TARGET_PORT" "$DB" 'select count(*) from pgbench_history')"
}
logical_stop() {
    [[ -n "$SUB" ]] || return 0
    if ! psql_at "$TARGET_PORT" "$DB" "drop subscription if exists $SUB" >/dev/null 2>>"$RUN_DIR/cleanup.log"; then
        warn "  logical: drop subscription $SUB failed; forcing"
        drop_logical_all
        [[ "$BENCH_LOGICAL" == 1 ]] && psql_at "$SOURCE_PORT" "$DB" "create publication $PUB for table pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history" >/dev/null
    fi
    SUB=""
}
# replication_wait BASE KIND ARG: the lag and drain figures of one run, as key=value on
# stdout. Started in the background before the run, so that its end-of-run sample does
# not wait for a Python start-up or a login: it gets ready (KIND logical: logs in to
# both clusters, ARG the subscription, HIST0 the target's pgbench_history rows before
# the run; KIND mirror: reads the mirror's counters from GET /status on admin port ARG),
# touches BASE.ready, waits for the pgbench pid in BASE.pid, polls every 10 ms until
# that process has ended, samples the lag at once, reads the transaction count from
# pgbench's output BASE.out, then waits at most DRAIN_TIMEOUT for the target to have
# applied everything.
replication_wait() {
    python3 - "$1" "$2" "$3" "$H" "$SOURCE_PORT" "$TARGET_PORT" "$DB" "$HIST0" "$DRAIN_TIMEOUT" "$DURATION" <<'PY'
import json, os, re, sys, time, urllib.request
path, kind, arg, host, sport, tport, db, hist0, timeout, duration = sys.argv[1:]
timeout, duration = float(timeout), float(duration)
if kind == "logical":
    import psycopg
    s = psycopg.connect(host=host, port=sport, dbname=db, user="postgres", autocommit=True, connect_timeout=10)
    t = psycopg.connect(host=host, port=tport, dbname=db, user="postgres", autocommit=True, connect_timeout=10)
    hist0 = int(hist0)
    q = ("select pg_wal_lsn_diff(%s::pg_lsn, replay_lsn)::bigint, extract(epoch from replay_lag)::float8 "
         "from pg_stat_replication where application_name = %s")
    s.execute(q, ("0/0", arg)).fetchall()   # plan and warm up before the run
    t.execute("select count(*) from pgbench_history").fetchall()
else:
    def st():
        m = json.load(urllib.request.urlopen(f"http://127.0.0.1:{arg}/status", timeout=10))["mirror"]
        return m["applied_transactions"] + m["skipped_already_applied"], m
    p0, m0 = st()
    s0 = m0["spooled_transactions"]
open(path + ".ready", "w").close()
deadline = time.time() + 120
while not os.path.exists(path + ".pid"):
    if time.time() > deadline:
        sys.exit("no pgbench pid")
    time.sleep(0.01)
pid = open(path + ".pid").read().strip()
deadline = time.time() + duration + 300
def running():
    try:
        st_ = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return st_[st_.rindex(")") + 2] != "Z"
while running():
    if time.time() > deadline:
        sys.exit("pgbench did not end")
    time.sleep(0.01)
end = time.time()
out = {}
if kind == "logical":
    lend = s.execute("select pg_current_wal_lsn()").fetchone()[0]
    r = s.execute(q, (lend, arg)).fetchone()
    applied_end = t.execute("select count(*) from pgbench_history").fetchone()[0] - hist0
    out["lag_s"] = f"{r[1] or 0.0:.3f}" if r else ""
    out["lag_bytes"] = r[0] if r else ""
else:
    p1, m1 = st()
    out["lag_n"] = m1["lag_transactions"]
    out["lag_s"] = f"{m1['lag_seconds']:.3f}"
out["sampled_after"] = f"{time.time() - end:.3f}"
try:
    m = re.search(r"^number of transactions actually processed: (\d+)", open(path + ".out").read(), re.M)
    txns = int(m.group(1)) if m else 0
except OSError:
    txns = 0
first, caught = True, False
deadline = time.time() + timeout
while True:
    if kind == "logical":
        r = s.execute(q, (lend, arg)).fetchone()
        caught = bool(r and r[0] is not None and r[0] <= 0)
    else:
        p2, m2 = st()
        caught = m2["lag_transactions"] == 0
        if m2["state"] == "stopped":
            break
    if caught or time.time() > deadline:
        break
    first = False
    time.sleep(0.05)
out["drain_s"] = f"{0.0 if (caught and first) else time.time() - end:.2f}"
out["drained"] = int(caught)
if kind == "logical":
    applied_all = t.execute("select count(*) from pgbench_history").fetchone()[0] - hist0
    out.update(lag_n=max(0, txns - applied_end), applied_run=applied_end, applied_all=applied_all, spooled=txns)
else:
    out.update(spooled=m2["spooled_transactions"] - s0, applied_run=p1 - p0, applied_all=p2 - p0,
               div=m2["report"]["divergences_total"], mstate=m2["state"])
print(" ".join(f"{k}={v}" for k, v in out.items()))
PY
}

run_one() { # run_one ROUND MODE VARIANT
    local round="$1" mode="$2" tgt="$3" port pid out rc wfile i tps lat txns
    local c0 c1 c2 a b c extra="" sub=""
    port="$(port_of "$tgt")"
    pid="$(pid_of "$tgt")"
    out="$RUN_DIR/r$round-$mode-$tgt.log"
    wfile="$RUN_DIR/r$round-$mode-$tgt.wait"
    local line="round=$round mode=$mode variant=$tgt"
    if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
        warn "  $tgt: process is gone; skipped"
        echo "$line status=failed why=process-gone" >>"$RUNS"
        return 0
    fi
    prepare_clusters
    if [[ "$tgt" == logical ]]; then
        sub="${SUB_PREFIX}$$_r${round}_$mode"
        if ! logical_start "$sub"; then
            warn "  logical: could not set up subscription $sub; skipped"
            logical_stop
            echo "$line status=failed why=subscription-setup" >>"$RUNS"
            return 0
        fi
    fi
    rm -f "$wfile".*
    ln -s "$out" "$wfile.out"
    if [[ "$tgt" == logical ]]; then
        replication_wait "$wfile" logical "$sub" >"$wfile.result" 2>>"$RUN_DIR/wait.log" &
        WAIT_PID=$!
    elif [[ "$tgt" == pgshift-* && "${PX_FSYNC[$tgt]}" != - ]]; then
        replication_wait "$wfile" mirror "${PX_ADMIN[$tgt]}" >"$wfile.result" 2>>"$RUN_DIR/wait.log" &
        WAIT_PID=$!
    fi
    if [[ -n "$WAIT_PID" ]]; then
        for ((i = 0; i < 300; i++)); do
            [[ -e "$wfile.ready" ]] && break
            pid_alive "$WAIT_PID" || break
            sleep 0.05
        done
        if [[ ! -e "$wfile.ready" ]]; then
            warn "  $tgt: the lag sampler did not get ready (see $RUN_DIR/wait.log); no lag figures for this run"
            kill "$WAIT_PID" 2>/dev/null || true
            wait "$WAIT_PID" 2>/dev/null || true
            WAIT_PID=""
        fi
    fi
    c0="$(cpu_sample "${pid:--}" "${WS_PID:--}" "${AW_PID:--}")"
    timeout $((DURATION + 120)) pgbench -h "$H" -p "$port" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -n \
        -M "$mode" "$DB" >"$out" 2>&1 &
    BENCH_PID=$!
    echo "$BENCH_PID" >"$wfile.pid.tmp" && mv "$wfile.pid.tmp" "$wfile.pid"
    rc=0
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    c1="$(cpu_sample "${pid:--}" "${WS_PID:--}" "${AW_PID:--}")"
    tps="$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' "$out" | head -1)"
    lat="$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' "$out" | head -1)"
    txns="$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$out" | head -1)"
    c2="$c1"
    if [[ -n "$WAIT_PID" ]]; then
        if wait "$WAIT_PID"; then
            extra="$(cat "$wfile.result")"
            c2="$(cpu_sample "${pid:--}" "${WS_PID:--}" "${AW_PID:--}")"
        else
            warn "  $tgt: the lag sampler failed (see $RUN_DIR/wait.log); no lag figures for this run"
        fi
        WAIT_PID=""
    fi
    rm -f "$wfile".*
    [[ "$tgt" == logical ]] && logical_stop
    WS_PID="" AW_PID=""
    if [[ $rc -ne 0 || -z "$tps" || -z "$txns" ]]; then
        warn "  $tgt: pgbench failed (exit $rc, output $out)"
        tail -n 5 "$out" >&2
        echo "$line status=failed why=pgbench-exit-$rc $extra" >>"$RUNS"
        return 0
    fi
    read -r -a a <<<"$c0"
    read -r -a b <<<"$c1"
    read -r -a c <<<"$c2"
    line+=" status=ok tps=$tps lat=$lat txns=$txns"
    line+=" src_run=$(delta "${a[0]}" "${b[0]}") tgt_run=$(delta "${a[1]}" "${b[1]}") px_run=$(delta "${a[2]}" "${b[2]}")"
    line+=" ws_run=$(delta "${a[3]}" "${b[3]}") aw_run=$(delta "${a[4]}" "${b[4]}")"
    line+=" src_all=$(delta "${a[0]}" "${c[0]}") tgt_all=$(delta "${a[1]}" "${c[1]}") px_all=$(delta "${a[2]}" "${c[2]}")"
    line+=" ws_all=$(delta "${a[3]}" "${c[3]}") aw_all=$(delta "${a[4]}" "${c[4]}") $extra"
    echo "$line" >>"$RUNS"
    log "  $tgt: tps $tps, latency avg $lat ms, $txns txns${extra:+; $extra}"
    if [[ "$extra" == *drained=0* ]]; then
        warn "  $tgt: the target had not caught up within ${DRAIN_TIMEOUT}s"
    fi
}

nt=${#TARGETS[@]}
total=$((ROUNDS * ${#MODE_LIST[@]} * nt))
step "running $total pgbench runs of ${DURATION}s (~$(((total * (DURATION + 4) + 59) / 60)) min plus drain/catch-up time): ${TARGETS[*]}"
for ((r = 1; r <= ROUNDS; r++)); do
    for mi in "${!MODE_LIST[@]}"; do
        mode="${MODE_LIST[$mi]}"
        log "round $r/$ROUNDS, TPC-B -M $mode"
        for ((k = 0; k < nt; k++)); do
            run_one "$r" "$mode" "${TARGETS[$(((r - 1 + mi + k) % nt))]}"
        done
    done
done

# ---------------------------------------------------------------- report
step "results"
info() { psql_at "$1" postgres "select current_setting('fsync') || ', synchronous_commit ' || current_setting('synchronous_commit') || ', wal_level ' || current_setting('wal_level')" 2>/dev/null || echo "?"; }
{
    echo "# pgshift mirroring vs native logical replication (scripts/bench_mirror.sh)"
    echo
    echo "pgbench TPC-B -n, modes: ${MODE_LIST[*]}; ROUNDS=$ROUNDS DURATION=${DURATION}s CLIENTS=$CLIENTS THREADS=$THREADS SCALE=$SCALE; $(nproc) cores; PostgreSQL $(psql_at "$SOURCE_PORT" postgres 'show server_version'); medians over rounds."
    echo "Source: fsync $(info "$SOURCE_PORT"). Target: fsync $(info "$TARGET_PORT")."
    echo "pgshift: $BIN (built $(date -r "$BIN" '+%Y-%m-%d %H:%M'); tree $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)$([[ -n "$(git -C "$ROOT" status --porcelain -- src 2>/dev/null)" ]] && echo ', src/ modified')); spool in $RUN_DIR ($(df -PT "$RUN_DIR" | awk 'NR == 2 {print $2 " on " $1}'))."
    if [[ -s "$NOTES" ]]; then
        echo "Not in this run: $(paste -sd ';' "$NOTES" | sed 's/;/; /g')."
    fi
    echo
} >"$RUN_DIR/report.md"
python3 - "$RUNS" "$CLK_TCK" "${TARGETS[@]}" >>"$RUN_DIR/report.md" <<'PY'
import statistics, sys
runs_path, clk, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = []
for line in open(runs_path):
    d = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    if d:
        runs.append(d)
med = lambda xs: statistics.median(xs) if xs else None
def num(d, k):
    v = d.get(k, "")
    try:
        return float(v)
    except ValueError:
        return None
def us_per_txn(d, k):
    t, n = num(d, k), num(d, "txns")
    return t / clk * 1e6 / n if t is not None and n else None
f0 = lambda x: "-" if x is None else f"{x:.0f}"
f1 = lambda x: "-" if x is None else f"{x:.1f}"
f2 = lambda x: "-" if x is None else f"{x:.2f}"
f3 = lambda x: "-" if x is None else f"{x:.3f}"
mirror = lambda v: v.startswith("pgshift-") and v != "pgshift-off"
replicating = lambda v: v == "logical" or mirror(v)
modes = []
for d in runs:
    if d["mode"] not in modes:
        modes.append(d["mode"])
for mode in modes:
    rs = [d for d in runs if d["mode"] == mode]
    ok = [d for d in rs if d.get("status") == "ok"]
    tps_by = {(d["round"], d["variant"]): float(d["tps"]) for d in ok}
    def ratios(v, base):
        return [tps_by[(r, v)] / tps_by[(r, base)] for (r, vv) in tps_by if vv == v and (r, base) in tps_by]
    def col(v, k, fn=num):
        return med([x for x in (fn(d, k) for d in ok if d["variant"] == v) if x is not None])
    failed = {v: sum(1 for d in rs if d["variant"] == v and d.get("status") != "ok") for v in targets}
    print(f"## TPC-B, -M {mode}")
    print()
    print("During the run. CPU: µs per transaction (proxy process; every process of the source / target cluster). "
          "Lag at end: mirror units or logical transactions not yet applied on the target when pgbench exited, "
          "and how old (mirror: oldest unapplied unit; logical: the walsender's replay_lag). "
          "Drain / catch-up: from the end of the run until the target had applied everything.")
    print()
    print("| variant | median TPS | vs direct | vs pgshift-off | latency ms | proxy CPU µs/txn | source CPU µs/txn | target CPU µs/txn | lag at end | drain / catch-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    direct_total = None
    for v in targets:
        vr = [d for d in ok if d["variant"] == v]
        note = f" ({failed[v]} failed)" if failed.get(v) else ""
        if not vr:
            print(f"| {v} | failed ×{failed.get(v, 0)} | | | | | | | | |")
            continue
        tps = col(v, "tps")
        rd, ro = ratios(v, "direct"), ratios(v, "pgshift-off")
        lag = "-"
        if replicating(v):
            unit = "txns" if v == "logical" else "units"
            lag = f"{f0(col(v, 'lag_n'))} {unit}, {f2(col(v, 'lag_s'))} s"
            if v == "logical":
                lb = col(v, "lag_bytes")
                lag += f", {f0(lb / 1024 if lb is not None else None)} kB WAL"
        drain = f2(col(v, "drain_s")) if replicating(v) else "-"
        if replicating(v) and any(d.get("drained") == "0" for d in vr):
            drain += " (not drained in some runs)"
        print(f"| {v}{note} | {f0(tps)} | {f3(med(rd)) if v != 'direct' else '1'} | {f3(med(ro)) if ro and v != 'pgshift-off' else ('1' if v == 'pgshift-off' else '-')} | "
              f"{f3(col(v, 'lat'))} | {f1(col(v, 'px_run', us_per_txn)) if v.startswith('pgshift') or v == 'pgbouncer' else '-'} | "
              f"{f1(col(v, 'src_run', us_per_txn))} | {f1(col(v, 'tgt_run', us_per_txn))} | {lag} | {drain} |")
    print()
    print("Whole cost, from the start of the run until the target had applied everything: CPU µs per transaction "
          "(medians). Extra vs direct: total minus direct's total. Applied: mirror units spooled → applied, "
          "logical transactions applied (pgbench_history rows on the target), vs pgbench's transactions.")
    print()
    print("| variant | proxy | source | target | total | extra vs direct | of which walsender / apply worker | transactions | spooled → applied | divergences |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---:|")
    tot = {}
    for v in targets:
        vals = []
        for d in ok:
            if d["variant"] != v:
                continue
            parts = [us_per_txn(d, k) for k in ("px_all", "src_all", "tgt_all")]
            vals.append(sum(p for p in parts if p is not None))
        tot[v] = med(vals)
    for v in targets:
        vr = [d for d in ok if d["variant"] == v]
        if not vr:
            continue
        px = col(v, "px_all", us_per_txn) if v.startswith("pgshift") or v == "pgbouncer" else None
        extra = tot[v] - tot["direct"] if tot.get(v) is not None and tot.get("direct") is not None else None
        wa = f"{f1(col(v, 'ws_all', us_per_txn))} / {f1(col(v, 'aw_all', us_per_txn))}" if v == "logical" else "-"
        txns = sum(int(d["txns"]) for d in vr)
        if replicating(v):
            sp = sum(int(d.get("spooled") or 0) for d in vr)
            ap = sum(int(d.get("applied_all") or 0) for d in vr)
            flow = f"{sp} → {ap}" if mirror(v) else f"{ap}"
            if ap != txns or (mirror(v) and sp != txns):
                flow += " (≠ transactions)"
        else:
            flow = "-"
        div = str(max(int(d.get("div") or 0) for d in vr)) if mirror(v) else "-"
        print(f"| {v} | {f1(px)} | {f1(col(v, 'src_all', us_per_txn))} | {f1(col(v, 'tgt_all', us_per_txn))} | "
              f"{f1(tot[v])} | {f1(extra) if v != 'direct' else '-'} | {wa} | {txns} | {flow} | {div} |")
    print()
    print("Every run (in the order run):")
    print()
    print("| round | variant | TPS | vs direct | latency ms | CPU µs/txn proxy / source / target (run) | lag at end | drain s |")
    print("|---:|---|---:|---:|---:|---|---|---:|")
    for d in rs:
        v = d["variant"]
        if d.get("status") != "ok":
            print(f"| {d['round']} | {v} | failed ({d.get('why', '?')}) | | | | | |")
            continue
        base = tps_by.get((d["round"], "direct"))
        lag = f"{d.get('lag_n', '-')} / {d.get('lag_s', '-')} s" if replicating(v) else "-"
        print(f"| {d['round']} | {v} | {float(d['tps']):.0f} | {f3(float(d['tps']) / base) if base else '-'} | {d['lat']} | "
              f"{f1(us_per_txn(d, 'px_run'))} / {f1(us_per_txn(d, 'src_run'))} / {f1(us_per_txn(d, 'tgt_run'))} | "
              f"{lag} | {d.get('drain_s', '-') if replicating(v) else '-'} |")
    print()
PY
cat "$RUN_DIR/report.md"
if [[ -n "$OUT" ]]; then
    cp "$RUN_DIR/report.md" "$OUT"
    log "report written to $OUT"
fi
log "raw files: $RUN_DIR"
