#!/usr/bin/env bash
# scripts/idle_memory.sh — memory a proxy holds for N idle client connections:
# pgshift, and PgBouncer for comparison. A measurement, not a test. scripts/bench.sh
# runs it as its last stage (BENCH_MEMORY=0 skips that); it also runs on its own.
#
# Usage: [MEMORY_SESSIONS="1000 10000"] [MEMORY_TARGETS="pgshift pgbouncer"] \
#        [OUT=file.md] scripts/idle_memory.sh
#
#   MEMORY_SESSIONS  idle client counts, one measurement each (default "1000 10000";
#                    SESSIONS=N, the old name, is the same as MEMORY_SESSIONS=N)
#   MEMORY_TARGETS   which proxies (default "pgshift pgbouncer")
#   MEMORY_LINKS     pgshift's target.session_links: auto (default) measures a count
#                    with links on and with links off when the target cluster has the
#                    backends for it (N + 50 <= its max_connections), else off only;
#                    on / off force one
#   MEMORY_THREADS   pgbench -j (default 8)
#   MEMORY_FALLBACK  1 (default): when a pgshift count does not fit under the file
#                    descriptor limit, also measure the largest count (in hundreds) that
#                    does, and say so in its row; 0: only report why not
#   MEMORY_DIR       configs, logs and the result TSV (default target/bench/memory-<time>)
#   OUT              also write the markdown table to this file
#   PGSHIFT_BIN      the proxy (default target/release/pgshift, built first when unset)
#   MEMORY_PGSHIFT_PORT / MEMORY_PGSHIFT_ADMIN_PORT / MEMORY_PGBOUNCER_PORT
#                    the instances' ports (default 6443 / 9939 / 6442, all on 127.0.0.1)
#
# Method, per proxy and count N (every measurement starts a fresh proxy process):
#   pgshift    target/release/pgshift with proxy.toml's settings in passthrough (mirror
#              off, routing.read_percent 0, shadow.sample_percent 0, no recording),
#              limits.max_client_connections N+100, target.session_links on or off (the
#              table says which). Every pgshift session is a real source backend, and
#              with links on a real target backend as well.
#   pgbouncer  Debian's PgBouncer 1.x, its own instance: session pooling, auth_type
#              trust, max_client_conn N+100, default_pool_size 20. Idle clients that
#              never send a query get no server connection. It runs as the postgres OS
#              user when we are root, with its soft fd limit raised in the launching
#              shell (runuser's PAM session resets it to 1024).
#   Then: RSS before (VmRSS of the idle proxy); `pgbench -n -c N -j MEMORY_THREADS -T
#   36000 -f idle.sql postgres` through it, where idle.sql is `\sleep 3600 s`: every
#   client logs in and then sits idle; wait until the proxy reports all N logged in
#   (pgshift: GET /status metrics.clients.sessions_active, and with links
#   metrics.target.links_up; PgBouncer: SHOW POOLS cl_active), 3 s more, then RSS with
#   all idle clients (VmRSS), the backends on each cluster (pg_stat_activity rows with
#   application_name pgbench) and the machine's MemAvailable drop since before the
#   ramp (mostly the Postgres backends); then pgbench is stopped, the proxy waited for
#   until its sessions are gone, and its peak RSS read (VmHWM: the whole run, login
#   ramp and teardown included). Per client = (RSS with all - RSS before) / N.
#
# Limits it checks first, and reports in the table instead of measuring when one does
# not hold (the rest still runs; a measurement that fails on the way, e.g. pgbench
# giving up or the ramp stalling, is a row with the reason too):
#   - file descriptors: pgshift needs 2 per session (client + source socket), 3 with
#     target links, plus its own (~30; 100 allowed); PgBouncer and pgbench 1 per client.
#     The limit is raised to 3 x the largest count + 200 when CAP_SYS_RESOURCE allows,
#     else the soft limit to the hard one. Where 10,000 pgshift sessions do not fit
#     (under a hard limit of 20000: 2 x 10,000 + its own > 20000), MEMORY_FALLBACK adds
#     a row at the largest count in hundreds that does (9,900 there).
#   - backends: a count N with N + 50 above the source cluster's max_connections (2200
#     as scripts/cluster.sh sets it) restarts the source with
#     `pg_ctl restart -o "-c max_connections=N+100"` for that measurement, and restarts
#     it with -o "" (its own settings) right after, on any exit too (a marker file in
#     the cluster dir lets scripts/bench.sh's cleanup, or the next run, finish that).
#   - memory: pgshift at N needs MEMORY_KIB_PER_BACKEND (default 1650, i.e. 15.7 GiB
#     for 10,000; measured: 9,900 idle backends of these clusters took 15.2 GiB of
#     MemAvailable) per Postgres backend it opens, or that row is skipped; a ramp is
#     stopped if MemAvailable falls under MEMORY_FLOOR_MIB (default 1024).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
exec </dev/null

MEMORY_SESSIONS="${MEMORY_SESSIONS:-${SESSIONS:-1000 10000}}"
MEMORY_TARGETS="${MEMORY_TARGETS:-pgshift pgbouncer}"
MEMORY_LINKS="${MEMORY_LINKS:-auto}"
MEMORY_THREADS="${MEMORY_THREADS:-8}"
MEMORY_FALLBACK="${MEMORY_FALLBACK:-1}"
MEMORY_KIB_PER_BACKEND="${MEMORY_KIB_PER_BACKEND:-1650}"
MEMORY_FLOOR_MIB="${MEMORY_FLOOR_MIB:-1024}"
MEMORY_DIR="${MEMORY_DIR:-$ROOT/target/bench/memory-$(date +%Y%m%d-%H%M%S)}"
OUT="${OUT:-}"
PX_PORT="${MEMORY_PGSHIFT_PORT:-6443}"
PX_ADMIN="${MEMORY_PGSHIFT_ADMIN_PORT:-9939}"
PB_PORT="${MEMORY_PGBOUNCER_PORT:-6442}"
H=127.0.0.1
for n in $MEMORY_SESSIONS; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "MEMORY_SESSIONS must be positive integers (got '$MEMORY_SESSIONS')"
done
for t in $MEMORY_TARGETS; do
    [[ "$t" == pgshift || "$t" == pgbouncer ]] || die "MEMORY_TARGETS: pgshift and/or pgbouncer (got '$t')"
done
[[ "$MEMORY_LINKS" =~ ^(auto|on|off)$ ]] || die "MEMORY_LINKS must be auto, on or off"
for v in MEMORY_THREADS MEMORY_KIB_PER_BACKEND MEMORY_FLOOR_MIB PX_PORT PX_ADMIN PB_PORT; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done

# File descriptors: pgshift with target links needs 3 per session. Raising the hard
# limit needs CAP_SYS_RESOURCE (bit 24 of CapEff); without it, the soft limit goes up
# to the hard one.
max_n=0
for n in $MEMORY_SESSIONS; do ((n > max_n)) && max_n=$n; done
want=$((3 * max_n + 200))
if [[ "$(ulimit -Hn)" != unlimited ]] && ((want > $(ulimit -Hn))); then
    ulimit -n "$(( want < $(cat /proc/sys/fs/nr_open) ? want : $(cat /proc/sys/fs/nr_open) ))" 2>/dev/null || true
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT="$(ulimit -n)"
FD_HARD="$(ulimit -Hn)"
[[ "$FD_LIMIT" == unlimited ]] && FD_LIMIT=1048576
[[ "$FD_HARD" == unlimited ]] && FD_HARD=1048576
if (( (0x$(awk '$1 == "CapEff:" {print $2}' /proc/self/status) >> 24) & 1 )); then
    FD_WHY="it could not be raised further (fs.nr_open is $(cat /proc/sys/fs/nr_open))"
else
    FD_WHY="raising it needs CAP_SYS_RESOURCE, which this process does not have (as in a container that drops it)"
fi

mkdir -p "$MEMORY_DIR"
ROWS="$MEMORY_DIR/memory.tsv"
: >"$ROWS"

PROXY_PID=""
BENCH_PID=""
CURRENT=""   # "TARGET N" of the measurement under way
RENDERED=0
PB_PID=""
CONFIGS=()
cleanup() {
    local rc=$?
    set +e
    [[ -n "$BENCH_PID" ]] && kill -TERM "$BENCH_PID" 2>/dev/null && wait "$BENCH_PID" 2>/dev/null
    stop_pid "$PROXY_PID" pgshift
    stop_pid "$PB_PID" pgbouncer
    [[ ${#CONFIGS[@]} -gt 0 ]] && rm -f "${CONFIGS[@]}"
    [[ -n "${PGSHIFT_CLUSTER_DIR:-}" ]] && source_max_connections_restore
    if ((rc != 0 && !RENDERED)) && [[ -n "$CURRENT" ]]; then
        row "${CURRENT% *}" "${CURRENT##* }" "" failed "" "" "" "" "" "" "" \
            "aborted: scripts/idle_memory.sh exited with status $rc during this measurement (log above; files in $MEMORY_DIR)"
        render_table
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_pid() { # stop_pid PID NAME: SIGTERM, bounded wait, then SIGKILL
    local pid="$1" name="$2" i
    [[ -n "$pid" ]] && pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 600; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    warn "$name did not exit within 60 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

ensure_deps
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
export PGUSER=postgres PGCONNECT_TIMEOUT=10
unset PGHOST PGPORT PGDATABASE PGPASSWORD PGSSLMODE
# A source left with a raised max_connections by a killed run.
source_max_connections_restore
for p in "$PX_PORT" "$PX_ADMIN" "$PB_PORT"; do
    port_open "$H" "$p" && die "$H:$p is already in use; stop whatever listens there first"
done
PGSHIFT="${PGSHIFT_BIN:-}"
if [[ -z "$PGSHIFT" && " $MEMORY_TARGETS " == *" pgshift "* ]]; then
    cargo build --release --bin pgshift
    PGSHIFT="$ROOT/target/release/pgshift"
fi
PGBOUNCER_BIN="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"

kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
mem_avail_kb() { awk '$1 == "MemAvailable:" {print $2}' /proc/meminfo; }
max_conn() { psql -X -At -h "$H" -p "$1" -d postgres -c 'show max_connections'; }
pgbench_backends() {
    psql -X -At -h "$H" -p "$1" -d postgres \
        -c "select count(*) from pg_stat_activity where application_name = 'pgbench'" 2>/dev/null || echo "?"
}
gib() { awk -v k="$1" 'BEGIN{printf "%.1f", k / 1048576}'; }

# row TARGET N LINKS STATUS BASE HELD PEAK DROP SRC_BACKENDS TGT_BACKENDS FDS NOTE
row() {
    local IFS=$'\t'
    printf '%s\n' "$*" >>"$ROWS"
}

printf '\\sleep 3600 s\n' >"$MEMORY_DIR/idle.sql"

# ramp N COUNT_FN PROXY_PID LOG: starts pgbench, waits until COUNT_FN reports N sessions.
# On failure returns 1 with the reason in RAMP_WHY (pgbench is then stopped).
RAMP_WHY=""
ramp() {
    local n="$1" count_fn="$2" proxy="$3" port="$4" logf="$5" c=0 last=-1 since=$SECONDS t0=$SECONDS avail
    local deadline=$((SECONDS + 120 + n / 10)) shown=$SECONDS
    RAMP_WHY=""
    pgbench -h "$H" -p "$port" -U postgres -n -c "$n" -j "$MEMORY_THREADS" -T 36000 \
        -f "$MEMORY_DIR/idle.sql" postgres >"$logf" 2>&1 &
    BENCH_PID=$!
    while :; do
        c="$($count_fn 2>/dev/null)" || c=0
        [[ "$c" =~ ^[0-9]+$ ]] || c=0
        if ((c >= n)); then
            log "  all $n clients logged in after $((SECONDS - t0)) s"
            return 0
        fi
        avail="$(mem_avail_kb)"
        if ! pid_alive "$BENCH_PID"; then
            RAMP_WHY="pgbench exited with $c of $n clients logged in: $(grep -v '^$' "$logf" | tail -n 1)"
        elif ! pid_alive "$proxy"; then
            RAMP_WHY="the proxy exited with $c of $n clients logged in"
        elif ((avail < MEMORY_FLOOR_MIB * 1024)); then
            RAMP_WHY="stopped for safety: MemAvailable fell to $((avail / 1024)) MiB with $c of $n clients logged in"
        elif ((SECONDS > deadline)); then
            RAMP_WHY="only $c of $n clients logged in after $((SECONDS - t0)) s"
        elif ((c == last && SECONDS - since > 120)); then
            RAMP_WHY="no progress for 120 s at $c of $n clients logged in"
        fi
        if [[ -n "$RAMP_WHY" ]]; then
            end_bench
            return 1
        fi
        if ((c != last)); then last=$c since=$SECONDS; fi
        if ((SECONDS - shown >= 15)); then
            log "  $c of $n clients logged in ($((SECONDS - t0)) s, MemAvailable $((avail / 1024)) MiB)"
            shown=$SECONDS
        fi
        sleep 1
    done
}
end_bench() {
    [[ -n "$BENCH_PID" ]] || return 0
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    wait "$BENCH_PID" 2>/dev/null || true
    BENCH_PID=""
}
# wait_gone COUNT_FN: bounded wait until the proxy has no client sessions left.
wait_gone() {
    local i c
    for ((i = 0; i < 600; i++)); do
        c="$($1 2>/dev/null)" || c=""
        [[ "$c" == 0 ]] && return 0
        sleep 0.5
    done
    warn "  the proxy still reports ${c:-?} sessions 5 min after pgbench ended"
}

LINKS_WANTED=0
pgshift_count() {
    curl -s --max-time 10 "http://$H:$PX_ADMIN/status" | python3 -c '
import json, sys
m = json.load(sys.stdin)["metrics"]
s, l = m["clients"]["sessions_active"], m["target"]["links_up"]
print(min(s, l) if int(sys.argv[1]) else s)' "$LINKS_WANTED"
}

# measure_pgshift N LINKS(on|off) [NOTE]
measure_pgshift() {
    local n="$1" links="$2" note="${3:-}" per=2 src_max tgt_max need avail fit raised=0 cfg
    local base held peak drop sb tb fds avail0 avail1 why=""
    [[ "$links" == on ]] && per=3
    CURRENT="pgshift $n"
    step "pgshift: $n idle clients, target links $links"
    src_max="$(max_conn "$PGSHIFT_SOURCE_PORT")"
    tgt_max="$(max_conn "$PGSHIFT_TARGET_PORT")"
    need=$((per * n + 100))
    if ((need > FD_LIMIT)); then
        fit=$(((FD_LIMIT - 100) / per / 100 * 100))
        local what="client socket + source socket"
        [[ "$links" == on ]] && what+=" + target link"
        why="not measured: pgshift needs $per file descriptors per session ($what), $((per * n)) for $n, plus its own (~30; 100 allowed), and its fd limit here is $FD_LIMIT: the hard limit, and $FD_WHY${note:+; $note}"
        warn "  $why"
        row pgshift "$n" "$links" skipped "" "" "" "" "" "" "" "$why"
        if [[ "$MEMORY_FALLBACK" == 1 ]] && ((fit >= 100 && fit < n)); then
            log "  measuring at $fit instead, the largest count in hundreds that fits"
            measure_pgshift "$fit" "$links" "the largest count (in hundreds) under the fd limit: $n does not fit (row above)${note:+; $note}"
        fi
        return 0
    fi
    if ((n + 50 > FD_LIMIT)); then
        why="not measured: pgbench needs a file descriptor per client, $((n + 50)) for $n, and the fd limit here is $FD_LIMIT"
        row pgshift "$n" "$links" skipped "" "" "" "" "" "" "" "$why"
        return 0
    fi
    if [[ "$links" == on ]] && ((n + 50 > tgt_max)); then
        why="not measured: with target links each session is also a target backend, and the target cluster's max_connections is $tgt_max"
        row pgshift "$n" "$links" skipped "" "" "" "" "" "" "" "$why"
        return 0
    fi
    avail="$(mem_avail_kb)"
    need=$((n * (per - 1) * MEMORY_KIB_PER_BACKEND))
    if ((avail < need)); then
        why="not measured: $((n * (per - 1))) Postgres backends need about $(gib "$need") GiB of MemAvailable ($MEMORY_KIB_PER_BACKEND KiB each), the machine has $(gib "$avail") GiB"
        warn "  $why"
        row pgshift "$n" "$links" skipped "" "" "" "" "" "" "" "$why"
        return 0
    fi
    if ((n + 50 > src_max)); then
        source_max_connections_raise $((n + 100)) \
            || { why="not measured: the source cluster did not restart with max_connections=$((n + 100)) (log: $PGSHIFT_CLUSTER_DIR/logs/source.log)"
                 row pgshift "$n" "$links" failed "" "" "" "" "" "" "" "$why"; source_max_connections_restore || true; return 0; }
        raised=1
        note="${note:+$note; }source restarted with max_connections=$((n + 100)) for this row"
    fi
    cfg="$MEMORY_DIR/pgshift-$n-links-$links.toml"
    rm -rf "$MEMORY_DIR/spool"
    pgshift_config "$ROOT/proxy.toml" "listen.addr=\"$H:$PX_PORT\"" "admin.addr=\"$H:$PX_ADMIN\"" \
        "mirror.enabled=false" "mirror.spool_dir=\"$MEMORY_DIR/spool\"" "routing.read_percent=0" \
        "shadow.sample_percent=0" "shadow.mismatch_log=\"$MEMORY_DIR/mismatches.jsonl\"" "record.path=" \
        "audit.path=\"$MEMORY_DIR/audit.jsonl\"" "limits.max_client_connections=$((n + 100))" \
        "target.session_links=$([[ $links == on ]] && echo true || echo false)" >"$cfg"
    "$PGSHIFT" --config "$cfg" >"$MEMORY_DIR/pgshift-$n-links-$links.log" 2>&1 &
    PROXY_PID=$!
    if ! wait_port "$H" "$PX_PORT" 30 "$PROXY_PID"; then
        why="failed: pgshift did not start (log: $MEMORY_DIR/pgshift-$n-links-$links.log)"
        tail -n 5 "$MEMORY_DIR/pgshift-$n-links-$links.log" >&2
    else
        sleep 1
        base="$(kb "$PROXY_PID" VmRSS)"
        avail0="$(mem_avail_kb)"
        LINKS_WANTED=$([[ $links == on ]] && echo 1 || echo 0)
        if ramp "$n" pgshift_count "$PROXY_PID" "$PX_PORT" "$MEMORY_DIR/pgbench-pgshift-$n-links-$links.log"; then
            sleep 3
            held="$(kb "$PROXY_PID" VmRSS)"
            avail1="$(mem_avail_kb)"
            fds="$(find "/proc/$PROXY_PID/fd" -mindepth 1 | wc -l)"
            sb="$(pgbench_backends "$PGSHIFT_SOURCE_PORT")"
            tb="$(pgbench_backends "$PGSHIFT_TARGET_PORT")"
            end_bench
            LINKS_WANTED=0
            wait_gone pgshift_count
            peak="$(kb "$PROXY_PID" VmHWM)"
            drop=$((avail0 - avail1))
            row pgshift "$n" "$links" ok "$base" "$held" "$peak" "$drop" "$sb" "$tb" "$fds" "$note"
            log "  pgshift: RSS $base -> $held KiB, peak $peak KiB; $fds fds; backends source $sb target $tb; MemAvailable drop $((drop / 1024)) MiB"
        else
            why="failed: $RAMP_WHY"
            grep -iE 'too many open files|error' "$MEMORY_DIR/pgshift-$n-links-$links.log" | tail -n 3 >&2 || true
        fi
    fi
    [[ -n "$why" ]] && { warn "  $why"; row pgshift "$n" "$links" failed "" "" "" "" "" "" "" "$why"; }
    stop_pid "$PROXY_PID" pgshift
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=""
    rm -rf "$MEMORY_DIR/spool"
    if ((raised)); then
        source_max_connections_restore || row pgshift "$n" "$links" failed "" "" "" "" "" "" "" \
            "the source cluster could not be restarted with its normal settings"
    fi
    return 0
}

pgbouncer_count() {
    psql -X -A -F $'\t' -h "$H" -p "$PB_PORT" -U postgres -d pgbouncer -c 'show pools' | awk -F '\t' '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        $1 == "postgres" { n += $col["cl_active"] }
        END { print n + 0 }'
}

# measure_pgbouncer N
measure_pgbouncer() {
    local n="$1" dir="$PGSHIFT_CLUSTER_DIR/bench-memory" need base held peak drop sb fds avail0 avail1 why="" i lim
    CURRENT="pgbouncer $n"
    step "PgBouncer: $n idle clients"
    need=$((n + 200))
    if ((need > FD_HARD || n + 50 > FD_LIMIT)); then
        why="not measured: PgBouncer and pgbench need a file descriptor per client, about $need for $n, and the fd limit is $FD_LIMIT (hard $FD_HARD): $FD_WHY"
        row pgbouncer "$n" - skipped "" "" "" "" "" "" "" "$why"
        return 0
    fi
    [[ -x "$PGBOUNCER_BIN" ]] || { row pgbouncer "$n" - failed "" "" "" "" "" "" "" "pgbouncer not found"; return 0; }
    rm -rf "$dir"
    mkdir -p "$dir"
    write_pgbouncer_ini "$dir" "$PB_PORT" "$PGSHIFT_SOURCE_PORT" 20 "$((n + 100))" scripts/idle_memory.sh
    # runuser's PAM session sets the soft fd limit to 1024: raise it where pgbouncer starts.
    # shellcheck disable=SC2016
    if ! as_pg_user bash -c 'ulimit -n "$1" && exec "$2" -d -q "$3"' _ "$need" "$PGBOUNCER_BIN" "$dir/pgbouncer.ini" \
        </dev/null >"$MEMORY_DIR/pgbouncer-$n.out" 2>&1; then
        why="failed: pgbouncer did not start: $(tail -n 2 "$MEMORY_DIR/pgbouncer-$n.out" "$dir/pgbouncer.log" 2>/dev/null | tr '\n' ' ')"
    else
        for ((i = 0; i < 100; i++)); do
            [[ -s "$dir/pgbouncer.pid" ]] && break
            sleep 0.1
        done
        PB_PID="$(cat "$dir/pgbouncer.pid" 2>/dev/null || true)"
        if [[ -z "$PB_PID" ]] || ! wait_port "$H" "$PB_PORT" 10 "$PB_PID"; then
            why="failed: pgbouncer is not listening on $PB_PORT (log: $dir/pgbouncer.log)"
        else
            lim="$(awk '/^Max open files/ {print $4}' "/proc/$PB_PID/limits")"
            log "  pgbouncer pid $PB_PID, fd limit $lim, max_client_conn $((n + 100))"
            sleep 1
            base="$(kb "$PB_PID" VmRSS)"
            avail0="$(mem_avail_kb)"
            if ramp "$n" pgbouncer_count "$PB_PID" "$PB_PORT" "$MEMORY_DIR/pgbench-pgbouncer-$n.log"; then
                sleep 3
                held="$(kb "$PB_PID" VmRSS)"
                avail1="$(mem_avail_kb)"
                fds="$(find "/proc/$PB_PID/fd" -mindepth 1 | wc -l)"
                sb="$(pgbench_backends "$PGSHIFT_SOURCE_PORT")"
                end_bench
                wait_gone pgbouncer_count
                peak="$(kb "$PB_PID" VmHWM)"
                drop=$((avail0 - avail1))
                row pgbouncer "$n" - ok "$base" "$held" "$peak" "$drop" "$sb" 0 "$fds" ""
                log "  pgbouncer: RSS $base -> $held KiB, peak $peak KiB; $fds fds; source backends $sb; MemAvailable drop $((drop / 1024)) MiB"
            else
                why="failed: $RAMP_WHY"
                tail -n 3 "$dir/pgbouncer.log" >&2 2>/dev/null || true
            fi
        fi
    fi
    [[ -n "$why" ]] && { warn "  $why"; row pgbouncer "$n" - failed "" "" "" "" "" "" "" "$why"; }
    stop_pid "$PB_PID" pgbouncer
    PB_PID=""
    return 0
}

# The markdown table of every row so far, to $MEMORY_DIR/memory.md (and OUT).
render_table() {
    local table="$MEMORY_DIR/memory.md"
    RENDERED=1
    python3 - "$ROWS" "$(nproc)" "$(gib "$(awk '$1 == "MemTotal:" {print $2}' /proc/meminfo)")" "$MEMORY_THREADS" >"$table" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
cores, mem, threads = sys.argv[2:5]
mib = lambda k: f"{int(k) / 1024:.1f} MiB"
print(f"Idle client connections: pgbench -c N -j {threads} clients that log in and then only `\\sleep` "
      f"({cores} cores, {mem} GiB RAM). RSS is the proxy process's (VmRSS); peak is its VmHWM over the whole "
      "run (login ramp and teardown included); per client = (RSS with all - RSS before) / N. "
      "Target links: pgshift's target.session_links (each session also holds a target connection). "
      "MemAvailable drop: the whole machine's, mostly the Postgres backends.")
print()
print("| proxy | idle clients | target links | backends source / target | RSS before | RSS with all idle clients | peak RSS (VmHWM) | per client | MemAvailable drop | note |")
print("|---|---:|---|---|---:|---:|---:|---:|---:|---|")
for r in rows:
    r += [""] * (12 - len(r))
    tgt, n, links, status, base, held, peak, drop, sb, tb, fds, note = r[:12]
    if status == "ok":
        per = (int(held) - int(base)) / int(n)
        be = f"{sb} / {tb}"
        print(f"| {tgt} | {int(n):,} | {links} | {be} | {mib(base)} | {mib(held)} | {mib(peak)} | {per:.1f} KiB | "
              f"{int(drop) / 1048576:.2f} GiB | {note} |")
    else:
        print(f"| {tgt} | {int(n):,} | {links} | - | - | - | - | - | - | {note} |")
PY
    echo
    cat "$table"
    if [[ -n "$OUT" ]]; then
        cp "$table" "$OUT"
        log "table written to $OUT"
    fi
}

log "idle-memory stage: clients $MEMORY_SESSIONS; proxies $MEMORY_TARGETS; fd limit $FD_LIMIT (hard $FD_HARD); MemAvailable $(gib "$(mem_avail_kb)") GiB; results in $MEMORY_DIR"
TGT_MAX="$(max_conn "$PGSHIFT_TARGET_PORT")"
for n in $MEMORY_SESSIONS; do
    for t in $MEMORY_TARGETS; do
        if [[ "$t" == pgbouncer ]]; then
            measure_pgbouncer "$n"
        elif [[ "$MEMORY_LINKS" == auto ]]; then
            if ((n + 50 <= TGT_MAX)); then
                measure_pgshift "$n" on
                measure_pgshift "$n" off
            else
                measure_pgshift "$n" off "target.session_links = false: $n target backends exceed the target cluster's max_connections ($TGT_MAX)"
            fi
        else
            measure_pgshift "$n" "$MEMORY_LINKS"
        fi
    done
done

render_table
