# shellcheck shell=bash
# scripts/lib.sh — shared helpers for pgshift's scripts. Source it, don't run it:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Provides:
#   ROOT                  absolute path of the repository root
#   log / warn / die      messages on stderr ("[pgshift] ...")
#   ensure_deps           installs what the scripts and tests need, only if missing:
#                         Debian packages postgresql postgresql-contrib pgbouncer openssl
#                         libclang-dev (pg_query's build generates its bindings with it)
#                         (apt-get update once, then apt-get install -y, never interactive)
#                         and the Python package psycopg[binary] (pip, only if
#                         `python3 -c 'import psycopg'` fails). Sets and exports
#                         PGSHIFT_PG_BIN and puts it first on PATH.
#   pg_bin_dir            prints the PostgreSQL server bin dir: $PGSHIFT_PG_BIN if set and
#                         valid, else the newest /usr/lib/postgresql/*/bin, else
#                         `pg_config --bindir` (whichever one has initdb in it)
#   as_pg_user CMD...     runs CMD as the `postgres` OS user when we are root (Postgres
#                         refuses to run as root), else runs it directly
#   pg_owner              the OS user that owns the clusters (postgres when root, else us)
#   port_open HOST PORT   true if something accepts TCP connections there
#   wait_port HOST PORT SECONDS [PID]
#                         waits (bounded) for the port; fails early if PID dies
#   pid_alive PID         true if PID runs (exists and is not a zombie)
#   proc_cpu_ticks PID    utime+stime of PID (all threads) in clock ticks
#   thread_cpu_ticks PID PREFIX   the same, summed over PID's threads whose name
#                         starts with PREFIX (e.g. pgshift-worker: the hot path)
#   pgshift_config PROXY_TOML [SECTION.KEY=VALUE ...]
#                         prints a pgshift config derived from PROXY_TOML with those keys
#                         set (or, with an empty VALUE, commented out), every sslmode
#                         disable and relative paths absolute (bench.sh, idle_memory.sh)
#   source_max_connections_raise N / source_max_connections_restore
#                         restart the source test cluster with max_connections=N, and
#                         back with its own settings (restore: only if raised; a marker
#                         file in the cluster dir remembers it across runs)
#
# Every command these helpers run reads from /dev/null, so nothing ever waits for input.

if [[ -n "${PGSHIFT_LIB_LOADED:-}" ]]; then
    return 0
fi
PGSHIFT_LIB_LOADED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export ROOT

_pgshift_ts() { date '+%H:%M:%S'; }
log()  { printf '[pgshift %s] %s\n' "$(_pgshift_ts)" "$*" >&2; }
warn() { printf '[pgshift %s] WARNING: %s\n' "$(_pgshift_ts)" "$*" >&2; }
die()  { printf '[pgshift %s] ERROR: %s\n' "$(_pgshift_ts)" "$*" >&2; exit 1; }
# A visible banner for the big steps of test.sh / demo.sh / bench.sh.
step() { printf '\n[pgshift %s] ==== %s ====\n' "$(_pgshift_ts)" "$*" >&2; }

is_root() { [[ "$(id -u)" -eq 0 ]]; }

pg_owner() {
    if is_root; then echo postgres; else id -un; fi
}

# Run a command as the postgres OS user when root. The working directory is changed
# to / first so that a cwd the postgres user cannot read causes no warnings; always
# pass absolute paths.
as_pg_user() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Run a command as root: directly when root, else through non-interactive sudo.
_as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "need root to run: $* (run as root, or install it yourself)"
    fi
}

_valid_pg_bin() { [[ -n "$1" && -x "$1/initdb" && -x "$1/pg_ctl" && -x "$1/postgres" ]]; }

pg_bin_dir() {
    local d best=""
    if [[ -n "${PGSHIFT_PG_BIN:-}" ]] && _valid_pg_bin "$PGSHIFT_PG_BIN"; then
        echo "$PGSHIFT_PG_BIN"; return 0
    fi
    # Newest version under /usr/lib/postgresql (Debian layout).
    while IFS= read -r d; do
        if _valid_pg_bin "$d"; then best="$d"; fi
    done < <(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V)
    if [[ -n "$best" ]]; then echo "$best"; return 0; fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if _valid_pg_bin "$d"; then echo "$d"; return 0; fi
    fi
    return 1
}

_pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

_PGSHIFT_APT_UPDATED=""
_apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [[ -z "$_PGSHIFT_APT_UPDATED" ]]; then
        log "apt-get update"
        _as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update </dev/null >&2 \
            || die "apt-get update failed"
        _PGSHIFT_APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q install -y \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" </dev/null >&2 \
        || die "apt-get install $* failed"
}

ensure_deps() {
    local missing=() pkg bindir tool
    if command -v dpkg-query >/dev/null 2>&1; then
        for pkg in postgresql postgresql-contrib pgbouncer openssl libclang-dev; do
            _pkg_installed "$pkg" || missing+=("$pkg")
        done
        # A package may be "installed" while the server binaries are gone; reinstall then.
        if ! pg_bin_dir >/dev/null; then
            [[ " ${missing[*]-} " == *" postgresql "* ]] || missing+=(postgresql)
        fi
        if ((${#missing[@]})); then
            _apt_install "${missing[@]}"
            # Debian may auto-start a system pgbouncer on 127.0.0.1:6432 (the proxy's
            # demo port). If our install started one, stop that service.
            if [[ " ${missing[*]} " == *" pgbouncer "* && -s /var/run/postgresql/pgbouncer.pid ]]; then
                warn "the pgbouncer package started its system service; stopping it (port 6432 belongs to pgshift's demo)"
                _as_root service pgbouncer stop </dev/null >&2 || true
            fi
        fi
    fi
    for tool in openssl pgbouncer runuser; do
        if ! command -v "$tool" >/dev/null 2>&1 && ! [[ -x "/usr/sbin/$tool" ]]; then
            die "$tool not found and could not be installed"
        fi
    done
    bindir="$(pg_bin_dir)" || die "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and pg_config --bindir)"
    for tool in initdb pg_ctl postgres psql pgbench pg_isready; do
        [[ -x "$bindir/$tool" ]] || die "$bindir/$tool missing"
    done
    export PGSHIFT_PG_BIN="$bindir"
    case ":$PATH:" in
        *":$bindir:"*) ;;
        *) export PATH="$bindir:$PATH" ;;
    esac
    if is_root && ! id postgres >/dev/null 2>&1; then
        die "running as root but there is no 'postgres' OS user (the postgresql package normally creates it)"
    fi

    # Python driver for the Python-based tests/tools.
    if ! command -v python3 >/dev/null 2>&1; then
        _apt_install python3 python3-pip
    fi
    if ! python3 -c 'import psycopg' >/dev/null 2>&1; then
        if ! python3 -m pip --version >/dev/null 2>&1; then
            _apt_install python3-pip
        fi
        log "pip install 'psycopg[binary]'"
        python3 -m pip install -q --disable-pip-version-check --no-input --root-user-action=ignore 'psycopg[binary]' </dev/null >&2 \
            || python3 -m pip install -q --disable-pip-version-check --no-input --root-user-action=ignore --break-system-packages 'psycopg[binary]' </dev/null >&2 \
            || die "pip install 'psycopg[binary]' failed"
        python3 -c 'import psycopg' || die "psycopg still not importable after pip install"
    fi
}

# True if PID exists and is not a zombie (a daemon reparented to a slow reaper can
# linger as a zombie after it exited).
pid_alive() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != Z ]]
}

# True if HOST:PORT accepts a TCP connection (bash /dev/tcp, 2 s bound).
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
}

# wait_port HOST PORT SECONDS [PID]: bounded wait for a listening port.
wait_port() {
    local host="$1" port="$2" secs="$3" pid="${4:-}" i
    for ((i = 0; i < secs * 10; i++)); do
        if port_open "$host" "$port"; then return 0; fi
        if [[ -n "$pid" ]] && ! pid_alive "$pid"; then return 2; fi
        sleep 0.1
    done
    return 1
}

# utime+stime (fields 14 and 15 of /proc/PID/stat) in clock ticks; the comm field
# may contain spaces, so cut everything up to the last ')'.
thread_cpu_ticks() {
    local pid="$1" prefix="$2" t stat rest name total=0
    for t in /proc/"$pid"/task/*; do
        stat="$(cat "$t/stat" 2>/dev/null)" || continue
        name="${stat#*(}"
        name="${name%%)*}"
        [[ "$name" == "$prefix"* ]] || continue
        rest="${stat##*) }"
        # shellcheck disable=SC2086
        set -- $rest
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

proc_cpu_ticks() {
    local stat rest
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    rest="${stat##*) }"
    # rest starts at field 3 (state) = $1, so field N is $((N-2)): utime (14) = $12,
    # stime (15) = $13.
    # shellcheck disable=SC2086
    set -- $rest
    echo $(( ${12} + ${13} ))
}

# ---------------------------------------------------------------- benchmark helpers
# (used by scripts/bench.sh and scripts/idle_memory.sh)

# pgshift_config PROXY_TOML [SECTION.KEY=VALUE ...] > NEW_TOML
#   A pgshift config derived from PROXY_TOML (normally proxy.toml). VALUE is raw TOML
#   (quote strings: 'listen.addr="127.0.0.1:6433"'); it replaces the section's
#   uncommented KEY line, or is inserted right after the section's header (a section
#   that does not exist is appended). An empty VALUE (record.path=) comments the
#   KEY line out, i.e. leaves the key at its default. Also: every sslmode is set to
#   disable, and relative paths of keys named *cert, *tls_key, *file, *path, *dir,
#   *log are made absolute (".clusters/..." -> $PGSHIFT_CLUSTER_DIR/..., others ->
#   the repository root, where proxy.toml lives). Needs PGSHIFT_CLUSTER_DIR.
pgshift_config() {
    local src="$1"
    shift
    python3 - "$src" "${PGSHIFT_CLUSTER_DIR:?run eval \"\$(scripts/cluster.sh env)\" first}" "$ROOT" "$@" <<'PY'
import re, sys
src, cluster_dir, root = sys.argv[1:4]
over = {}
for a in sys.argv[4:]:
    k, eq, v = a.partition("=")
    sec, dot, key = k.partition(".")
    if not eq or not dot:
        sys.exit(f"pgshift_config: bad override {a!r} (want section.key=value)")
    over.setdefault(sec, {})[key] = v.strip() or None
lines = open(src).read().splitlines(keepends=True)
if lines and not lines[-1].endswith("\n"):
    lines[-1] += "\n"
hdr = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
kv = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
defined, section = set(), ""
for line in lines:
    m = hdr.match(line)
    if m:
        section = m.group(1)
    elif kv.match(line):
        defined.add((section, kv.match(line).group(1)))
out, section, sections = [], "", set()
for line in lines:
    m = hdr.match(line)
    if m:
        section = m.group(1)
        sections.add(section)
        out.append(line)
        out += [f"{k} = {v}\n" for k, v in over.get(section, {}).items()
                if v is not None and (section, k) not in defined]
        continue
    m = kv.match(line)
    if m and m.group(1) in over.get(section, {}):
        v = over[section][m.group(1)]
        out.append(f"{m.group(1)} = {v}\n" if v is not None else "# " + line)
        continue
    line = re.sub(r"""(sslmode\s*=\s*)(["'])[a-z-]*\2""", r"\1\2disable\2", line)
    line = re.sub(r"sslmode=[a-z-]+", "sslmode=disable", line)
    # Relative paths are resolved against the config file's dir by pgshift.
    m = re.match(r"""^(\s*#?\s*\w+\s*=\s*")([^"/][^"]*)(".*)$""", line, re.S)
    if m and re.search(r"(cert|tls_key|file|path|dir|log)$", m.group(1).split("=")[0].strip().lstrip("#").strip()):
        val = m.group(2)
        val = cluster_dir + val[len(".clusters"):] if val.startswith(".clusters/") else root + "/" + val
        line = m.group(1) + val + m.group(3)
    out.append(line)
for sec, kvs in over.items():
    add = [f"{k} = {v}\n" for k, v in kvs.items() if v is not None]
    if sec not in sections and add:
        out += [f"\n[{sec}]\n"] + add
sys.stdout.write("".join(out))
PY
}

# source_max_connections_raise N: restarts the source test cluster
# ($PGSHIFT_CLUSTER_DIR/source) with `pg_ctl restart -o "-c max_connections=N"` (as the
# cluster owner), for a measurement that needs more backends than its 2200.
# source_max_connections_restore: if raised, restarts it with -o "" (the settings of
# its config files again). A marker file remembers a raised cluster, so restore is
# safe to call any time (cleanup traps) and also undoes one left by a killed run.
_source_raised_marker() { echo "${PGSHIFT_CLUSTER_DIR:?}/source.max_connections_raised"; }
_source_pg_ctl_restart() { # OPTS
    local d="$PGSHIFT_CLUSTER_DIR/source"
    # The postmaster must inherit no pipe of ours (a caller reading our output to EOF
    # would wait for it), hence all three redirected.
    as_pg_user "$PGSHIFT_PG_BIN/pg_ctl" -D "$d" -l "$PGSHIFT_CLUSTER_DIR/logs/source.log" \
        -m fast -w -t 300 restart -o "$1" </dev/null >/dev/null 2>&1
}
source_max_connections_raise() {
    local n="$1"
    echo "$n" >"$(_source_raised_marker)"
    log "restarting the source cluster with max_connections=$n"
    _source_pg_ctl_restart "-c max_connections=$n"
}
source_max_connections_restore() {
    [[ -f "$(_source_raised_marker)" ]] || return 0
    log "restarting the source cluster with its normal settings"
    if _source_pg_ctl_restart ""; then
        rm -f "$(_source_raised_marker)"
    else
        warn "could not restart the source cluster (log: $PGSHIFT_CLUSTER_DIR/logs/source.log)"
        return 1
    fi
}

# write_pgbouncer_ini DIR LISTEN_PORT SERVER_PORT POOL_SIZE MAX_CLIENT_CONN WRITER
# A PgBouncer for the benchmarks: session pooling, trust auth for postgres,
# every database on 127.0.0.1:SERVER_PORT; config, userlist, log and pid
# file in DIR (which must be traversable by the postgres user).
write_pgbouncer_ini() {
    local dir="$1" port="$2" server_port="$3" pool="$4" max_clients="$5" writer="$6"
    printf '"postgres" ""\n' >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
; Written by $writer
[databases]
* = host=127.0.0.1 port=$server_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = session
default_pool_size = $pool
max_client_conn = $max_clients
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
admin_users = postgres
EOF
    chown -R "$(pg_owner)" "$dir"
}
