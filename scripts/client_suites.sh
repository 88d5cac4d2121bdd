#!/usr/bin/env bash
# scripts/client_suites.sh — real client libraries' own test suites, run
# straight against Postgres and through pgshift, test by test (issue 17).
#
# Usage:
#   scripts/client_suites.sh install [SUITE...]
#       installs what the suites need (a Python venv, the suites' sources);
#       idempotent: only what is missing.
#   scripts/client_suites.sh run --port P --out DIR [--host H] [--test ID]... [SUITE...]
#       runs the suites against H:P (default 127.0.0.1), each in its own
#       database cl_<suite>, which must exist; writes DIR/<suite>.tsv
#       (`pass|fail|skip<TAB>test id` per test) and DIR/<suite>.log. With
#       --test (one suite), only those tests (node-postgres: their files).
#   scripts/client_suites.sh compare --source-port S --target-port T --proxy-port P --out DIR [SUITE...]
#       the whole comparison: fresh databases on both clusters, a run
#       straight against the source, fresh databases again, a run through the
#       pgshift listening on P, and re-runs of every test that passed
#       straight and failed through pgshift (three times straight, three
#       times through pgshift). Exits 1 when a test passes straight against
#       Postgres (in every run) and fails through pgshift in more than one of
#       its four runs there (a single failure is reported as a one-off). tests/client_libs.rs runs
#       this against a pgshift with mirroring, routing and shadow reads on.
#   scripts/client_suites.sh local [SUITE...]
#       for a developer: builds nothing, starts target/ci/pgshift with
#       [mirror] on, routing.read_percent = 50 and shadow.sample_percent = 100
#       on a free port (TLS with the clusters' server certificate, as the
#       source offers it: the suites' SSL tests expect it), and runs `compare` against it (clusters as in
#       `scripts/cluster.sh env`). Output in target/client-suites/last/.
#
# Suites (default: the registry ones, which is what CI runs):
#   asyncpg      asyncpg 0.32.0's tests/ from its PyPI sdist (pure protocol, asyncio)
#   psycopg2     psycopg2 2.9.10's tests/ from its PyPI sdist (libpq), run against
#                the psycopg2-binary wheel of the same version
#   pg8000       pg8000 1.31.6's test/native from its PyPI sdist (pure Python protocol)
# Local only (their tests are not in any package registry; give a checkout):
#   node-postgres  $CLIENT_SUITES_NODE_POSTGRES_SRC: a checkout of brianc/node-postgres
#                  (packages/pg test/integration, packages/pg-cursor)
#   psycopg        $CLIENT_SUITES_PSYCOPG_SRC: a checkout of psycopg/psycopg at tag 3.3.4
#                  (tests/, run against psycopg[binary] 3.3.4 from PyPI)
#
# Environment: CLIENT_SUITES_CACHE (default target/client-suites) holds the venv,
# the sources and node modules. PGSHIFT_HOST (default 127.0.0.1), PGUSER
# (default postgres: the suites create roles, extensions and databases).
# Never reads standard input; every suite run is bounded by a timeout.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec </dev/null

HERE="$ROOT/scripts/client_suites"
CACHE="${CLIENT_SUITES_CACHE:-$ROOT/target/client-suites}"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
HOST="${PGSHIFT_HOST:-127.0.0.1}"
PGUSER="${PGUSER:-postgres}"
REGISTRY_SUITES=(asyncpg psycopg2 pg8000)
# One suite run may take this long at most (seconds).
SUITE_TIMEOUT="${CLIENT_SUITES_TIMEOUT:-600}"

ASYNCPG_VERSION=0.32.0
ASYNCPG_SHA256=45e64e56714d888330b884aad1dfb363d0bf43fb343e3d1a8968525f3bade478
PSYCOPG2_VERSION=2.9.10
PSYCOPG2_SHA256=12ec0b40b0273f95296233e8750441339298e6a572f7039da5b260e3c8b60e11
PG8000_VERSION=1.31.6
PG8000_SHA256=553b240256d4b2d8f0ad2af28d07df1f9980247f74ac98d2c2b573762ec1ff1b
PSYCOPG_VERSION=3.3.4

pip_in_venv() {
    "$PY" -m pip install -q --disable-pip-version-check --no-input "$@" >&2 \
        || die "pip install $* failed"
}

ensure_venv() {
    if [[ ! -x "$PY" ]]; then
        log "creating $VENV"
        mkdir -p "$CACHE"
        python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
    fi
}

# Downloads a pinned sdist from PyPI, checks its digest and unpacks it into
# $CACHE/src/NAME-VERSION (once). The unpacked package directory itself is
# moved aside, so that the tests import the installed wheel.
fetch_sdist() {
    local name=$1 version=$2 sha=$3 pkgdir=$4
    local dest="$CACHE/src/$name-$version"
    [[ -f "$dest/.ready" ]] && return 0
    local dl="$CACHE/dl"
    mkdir -p "$dl" "$CACHE/src"
    local file="$dl/$name-$version.tar.gz"
    if [[ ! -f "$file" ]]; then
        log "pip download $name==$version (sdist)"
        "$PY" -m pip download -q --disable-pip-version-check --no-input --no-deps \
            --no-binary :all: -d "$dl" "$name==$version" >&2 || die "pip download $name==$version failed"
    fi
    local got
    got="$(sha256sum "$file" | cut -d' ' -f1)"
    [[ "$got" == "$sha" ]] || die "$file: sha256 $got, expected $sha"
    rm -rf "$dest"
    tar xzf "$file" -C "$CACHE/src"
    [[ -d "$dest/$pkgdir" ]] && mv "$dest/$pkgdir" "$dest/$pkgdir.sdist-unused"
    touch "$dest/.ready"
}

install_suite() {
    case "$1" in
        asyncpg)
            ensure_venv
            "$PY" -c "import asyncpg, pytest, distro; assert asyncpg.__version__ == '$ASYNCPG_VERSION'" 2>/dev/null \
                || pip_in_venv "asyncpg==$ASYNCPG_VERSION" pytest distro
            fetch_sdist asyncpg "$ASYNCPG_VERSION" "$ASYNCPG_SHA256" asyncpg
            ;;
        psycopg2)
            ensure_venv
            "$PY" -c "import psycopg2, pytest; assert psycopg2.__version__.startswith('$PSYCOPG2_VERSION')" 2>/dev/null \
                || pip_in_venv "psycopg2-binary==$PSYCOPG2_VERSION" pytest
            fetch_sdist psycopg2 "$PSYCOPG2_VERSION" "$PSYCOPG2_SHA256" lib
            ;;
        pg8000)
            ensure_venv
            "$PY" -c "import pg8000, pytest, pytz, pytest_mock; from importlib.metadata import version; assert version('pg8000') == '$PG8000_VERSION'" 2>/dev/null \
                || pip_in_venv "pg8000==$PG8000_VERSION" pytest pytz pytest-mock
            local dest="$CACHE/src/pg8000-$PG8000_VERSION"
            fetch_sdist pg8000 "$PG8000_VERSION" "$PG8000_SHA256" src/pg8000
            # Its fixtures take host, port and password from the environment
            # but always use the database named after the user: add PGDATABASE.
            local conftest
            for conftest in "$dest"/test/*/conftest.py; do
                grep -q PGDATABASE "$conftest" || sed -i \
                    's/("port", "PGPORT", int),/("port", "PGPORT", int),\n        ("database", "PGDATABASE", str),/' "$conftest"
            done
            ;;
        psycopg)
            local src="${CLIENT_SUITES_PSYCOPG_SRC:-}"
            [[ -n "$src" && -d "$src/tests" ]] \
                || die "psycopg: its tests are not in its PyPI sdist; set CLIENT_SUITES_PSYCOPG_SRC to a checkout of psycopg/psycopg (tag $PSYCOPG_VERSION)"
            ensure_venv
            "$PY" -c "import psycopg, pytest, anyio, pproxy; assert psycopg.__version__ == '$PSYCOPG_VERSION'" 2>/dev/null \
                || pip_in_venv "psycopg[binary]==$PSYCOPG_VERSION" pytest anyio pproxy
            local dest="$CACHE/src/psycopg-$PSYCOPG_VERSION"
            if [[ ! -f "$dest/.ready" ]]; then
                rm -rf "$dest" && mkdir -p "$dest"
                cp -r "$src/tests" "$src/pyproject.toml" "$dest/"
                touch "$dest/.ready"
            fi
            ;;
        node-postgres)
            local src="${CLIENT_SUITES_NODE_POSTGRES_SRC:-}"
            [[ -n "$src" && -d "$src/packages/pg/test/integration" ]] \
                || die "node-postgres: its tests are not in the npm packages; set CLIENT_SUITES_NODE_POSTGRES_SRC to a checkout of brianc/node-postgres"
            command -v node >/dev/null || die "node not found"
            local dest="$CACHE/src/node-postgres"
            if [[ ! -f "$dest/.ready" ]]; then
                rm -rf "$dest" && mkdir -p "$dest/packages"
                cp -r "$src/packages/pg" "$src/packages/pg-cursor" "$dest/packages/"
                cat >"$dest/package.json" <<'EOF'
{"name": "client-suites-node-postgres", "private": true,
 "dependencies": {"pg-types": "2.2.0", "pgpass": "1.0.5", "pg-protocol": "1.16.1",
  "pg-pool": "3.14.0", "pg-connection-string": "2.14.0", "async": "2.6.4",
  "bluebird": "3.7.2", "co": "4.6.0", "pg-copy-streams": "0.3.0", "mocha": "10.8.2",
  "expect.js": "0.3.1", "lodash": "4.17.21"}}
EOF
                (cd "$dest" && npm install --no-audit --no-fund --loglevel=error >&2) || die "npm install failed"
                # The suites' own packages, as the monorepo links them.
                rm -rf "$dest/node_modules/pg" "$dest/node_modules/pg-cursor"
                ln -s "$dest/packages/pg" "$dest/node_modules/pg"
                ln -s "$dest/packages/pg-cursor" "$dest/node_modules/pg-cursor"
                touch "$dest/.ready"
            fi
            ;;
        *) die "unknown suite: $1" ;;
    esac
}

# run_suite SUITE PORT OUTDIR [TEST...]: one suite against HOST:PORT; with
# TESTs, only those (test ids as in the .tsv; node-postgres: whole files).
run_suite() {
    local suite=$1 port=$2 out=$3
    shift 3
    local db="cl_${suite//-/_}"
    local tsv="$out/$suite.tsv" logf="$out/$suite.log"
    mkdir -p "$out"
    : >"$tsv"
    local started=$SECONDS rc=0
    case "$suite" in
        asyncpg | psycopg2 | pg8000 | psycopg)
            local dir args=()
            case "$suite" in
                asyncpg)
                    dir="$CACHE/src/asyncpg-$ASYNCPG_VERSION"
                    # test__sourcecode runs flake8/mypy on asyncpg's source.
                    # test_executemany_server_failure_during_writes asserts that
                    # executemany() stops sending rows before all 128 x 32 kB
                    # are written once the server has failed the batch: with any
                    # proxy in between (pgbouncer in session mode too: 5 of 20
                    # runs) more bytes are in flight when the error comes back,
                    # so it fails now and then through any proxy. Not a
                    # difference pgshift could remove; see scripts/client_suites.md.
                    # test_pool_config_persistence fails straight against
                    # Postgres too ("unexpected connection_lost() call" from
                    # a pool of max_queries=1 connections: 5 of 12 runs
                    # straight, 3 of 12 through pgshift), so three straight
                    # reruns can all pass by chance and call it a difference.
                    args=(tests --deselect tests/test__sourcecode.py
                        --deselect tests/test_execute.py::TestExecuteMany::test_executemany_server_failure_during_writes
                        --deselect tests/test_pool.py::TestPool::test_pool_config_persistence)
                    ;;
                psycopg2)
                    dir="$CACHE/src/psycopg2-$PSYCOPG2_VERSION"
                    args=(tests)
                    ;;
                pg8000)
                    dir="$CACHE/src/pg8000-$PG8000_VERSION"
                    # The native API (its core; dbapi and legacy wrap the same
                    # protocol code). test_benchmarks needs pytest-benchmark;
                    # test_max_parameters (65535 parameters) takes 30 s; auth/
                    # needs pg_hba.conf lines of its own and turns the server's
                    # ssl off and on with ALTER SYSTEM: never on shared clusters.
                    args=(test/native --ignore=test/native/test_benchmarks.py
                        --ignore=test/native/auth
                        --deselect test/native/test_query.py::test_max_parameters)
                    ;;
                psycopg)
                    dir="$CACHE/src/psycopg-$PSYCOPG_VERSION"
                    # -m "not slow": the leak tests (gc.collect loops) take many minutes.
                    args=(-m "not slow" tests/test_connection.py tests/test_connection_async.py
                        tests/test_cursor.py tests/test_cursor_async.py
                        tests/test_cursor_server.py tests/test_cursor_raw.py
                        tests/test_pipeline.py tests/test_pipeline_async.py
                        tests/test_prepared.py tests/test_prepared_async.py
                        tests/test_copy.py tests/test_copy_async.py
                        tests/test_notify.py tests/test_notify_async.py
                        tests/test_transaction.py tests/test_transaction_async.py
                        tests/test_errors.py tests/test_concurrency.py tests/test_concurrency_async.py
                        tests/test_query.py tests/test_typeinfo.py)
                    ;;
            esac
            [[ -f "$dir/.ready" ]] || die "$suite is not installed: run scripts/client_suites.sh install $suite"
            if [[ $# -gt 0 ]]; then
                args=("$@")
            fi
            (
                cd "$dir"
                export PGHOST="$HOST" PGPORT="$port" PGUSER PGDATABASE="$db"
                export PSYCOPG2_TESTDB="$db" PSYCOPG2_TESTDB_HOST="$HOST" PSYCOPG2_TESTDB_PORT="$port" PSYCOPG2_TESTDB_USER="$PGUSER"
                export PSYCOPG_TEST_DSN="host=$HOST port=$port user=$PGUSER dbname=$db"
                export CLIENT_SUITES_REPORT="$tsv" PYTHONPATH="$HERE"
                timeout -k 10 "$SUITE_TIMEOUT" "$PY" -m pytest -p report_plugin -o "cache_dir=$out/.pytest_cache" \
                    -q -rfE --tb=short "${args[@]}"
            ) >"$logf" 2>&1 || rc=$?
            ;;
        node-postgres)
            local dir="$CACHE/src/node-postgres"
            [[ -f "$dir/.ready" ]] || die "$suite is not installed: run scripts/client_suites.sh install $suite"
            local files=() f
            if [[ $# -gt 0 ]]; then
                for f in "$@"; do
                    files+=("${f%%::*}")
                done
                mapfile -t files < <(printf '%s\n' "${files[@]}" | sort -u)
            else
                mapfile -t files < <(cd "$dir/packages/pg" && find test/integration -name '*-tests.js' | sort)
                files+=(pg-cursor)
            fi
            : >"$logf"
            for f in "${files[@]}"; do
                local one="$out/node-postgres.one.log" code=0
                if [[ "$f" == pg-cursor ]]; then
                    (cd "$dir/packages/pg-cursor" && PGHOST="$HOST" PGPORT="$port" PGUSER="$PGUSER" PGDATABASE="$db" \
                        timeout -k 5 120 "$dir/node_modules/.bin/mocha" --reporter json \
                        --reporter-option "output=$out/pg-cursor.json" test/) >"$one" 2>&1 || code=$?
                    python3 "$HERE/results.py" mocha "$out/pg-cursor.json" pg-cursor >>"$tsv"
                else
                    (cd "$dir/packages/pg" && PGHOST="$HOST" PGPORT="$port" PGUSER="$PGUSER" PGDATABASE="$db" \
                        timeout -k 5 60 node "$f") >"$one" 2>&1 || code=$?
                    python3 "$HERE/results.py" node-file "$f" "$one" "$code" >>"$tsv"
                fi
                { echo "==== $f (exit $code)"; cat "$one"; } >>"$logf"
                rm -f "$one"
            done
            ;;
        *) die "unknown suite: $suite" ;;
    esac
    local n_pass n_fail
    n_pass=$(grep -c '^pass' "$tsv" || true)
    n_fail=$(grep -c '^fail' "$tsv" || true)
    log "$suite on port $port: $n_pass passed, $n_fail failed ($((SECONDS - started)) s, exit $rc); log $logf"
    if [[ ! -s "$tsv" ]]; then
        warn "$suite reported no test; the end of its log:"
        tail -n 30 "$logf" >&2 || true
    fi
}

# fresh_db SUITE PORT...: drops and recreates cl_<suite> on each cluster.
fresh_db() {
    local suite=$1
    shift
    local db="cl_${suite//-/_}" port
    for port in "$@"; do
        psql -X -q -w -v ON_ERROR_STOP=1 "host=$HOST port=$port user=$PGUSER dbname=postgres" \
            -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" 2>&1 \
            | grep -v 'does not exist, skipping' >&2 || true
        psql -X -q -w -At "host=$HOST port=$port user=$PGUSER dbname=$db" -c "SELECT 1" >/dev/null \
            || die "could not recreate $db on port $port"
    done
}

# What the suites leave on a cluster outside their own database when a test
# fails half-way (or by design), dropped after every run: databases and
# roles of their own making, never anything else.
LEFTOVER_DATABASES=(testdb asyncpg_intro_test pg8000_md5 pg8000_scram_sha_256)
LEFTOVER_ROLES=('"Æthelred"' boltzmann pooluser ssl_user scram_sha_256_user md5_user password_user norm1 norm2)
cleanup_clusters() {
    local port d r sql=()
    for d in "${LEFTOVER_DATABASES[@]}"; do sql+=(-c "DROP DATABASE IF EXISTS $d WITH (FORCE)"); done
    for r in "${LEFTOVER_ROLES[@]}"; do sql+=(-c "DROP ROLE IF EXISTS $r"); done
    for port in "$@"; do
        psql -X -q -w "host=$HOST port=$port user=$PGUSER dbname=postgres" "${sql[@]}" 2>&1 \
            | grep -v 'does not exist, skipping' >&2 || true
    done
}

# drop_db SUITE PORT...: drops cl_<suite> when done.
drop_db() {
    local suite=$1 port
    shift
    for port in "$@"; do
        psql -X -q -w "host=$HOST port=$port user=$PGUSER dbname=postgres" \
            -c "DROP DATABASE IF EXISTS cl_${suite//-/_} WITH (FORCE)" >&2 || true
    done
}

# The tests of SUITE that passed straight and failed through pgshift.
differing() {
    local out=$1 suite=$2
    awk -F'\t' 'NR == FNR { if ($1 == "pass") ok[$2] = 1; next }
                $1 == "fail" && ($2 in ok) { print $2 }' \
        "$out/direct/$suite.tsv" "$out/proxy/$suite.tsv"
}

cmd_compare() {
    local sp="" tp="" pp="" out=""
    local suites=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --source-port) sp=$2; shift 2 ;;
            --target-port) tp=$2; shift 2 ;;
            --proxy-port) pp=$2; shift 2 ;;
            --out) out=$2; shift 2 ;;
            -*) die "unknown option $1" ;;
            *) suites+=("$1"); shift ;;
        esac
    done
    [[ -n "$sp" && -n "$tp" && -n "$pp" && -n "$out" ]] || die "compare needs --source-port, --target-port, --proxy-port and --out"
    [[ ${#suites[@]} -gt 0 ]] || suites=("${REGISTRY_SUITES[@]}")
    rm -rf "$out" && mkdir -p "$out"
    local s
    for s in "${suites[@]}"; do
        install_suite "$s"
    done
    local started=$SECONDS
    for s in "${suites[@]}"; do
        step "$s: straight against the source (port $sp)"
        fresh_db "$s" "$sp" "$tp"
        run_suite "$s" "$sp" "$out/direct"
        cleanup_clusters "$sp" "$tp"
        step "$s: through pgshift (port $pp)"
        fresh_db "$s" "$sp" "$tp"
        run_suite "$s" "$pp" "$out/proxy"
        cleanup_clusters "$sp" "$tp"
        local tests=()
        mapfile -t tests < <(differing "$out" "$s")
        if [[ ${#tests[@]} -gt 0 ]]; then
            step "$s: ${#tests[@]} test(s) passed straight and failed through pgshift; running them again"
            printf '  %s\n' "${tests[@]}" >&2
            local i
            for i in 1 2 3; do
                fresh_db "$s" "$sp" "$tp"
                run_suite "$s" "$sp" "$out/rerun-direct-$i" "${tests[@]}"
                cleanup_clusters "$sp" "$tp"
            done
            for i in 1 2 3; do
                fresh_db "$s" "$sp" "$tp"
                run_suite "$s" "$pp" "$out/rerun-proxy-$i" "${tests[@]}"
                cleanup_clusters "$sp" "$tp"
            done
        fi
        drop_db "$s" "$sp" "$tp"
    done
    step "verdict (${SECONDS}s in all, $((SECONDS - started))s running suites)"
    python3 "$HERE/results.py" compare "$out" "${suites[@]}" | tee "$out/verdict.txt"
    return "${PIPESTATUS[0]}"
}

cmd_local() {
    eval "$("$ROOT/scripts/cluster.sh" env)"
    local bin="$ROOT/target/ci/pgshift"
    [[ -x "$bin" ]] || die "$bin not found: cargo build --profile ci --bins"
    local work="$CACHE/last"
    rm -rf "$work" && mkdir -p "$work/spool"
    chmod 700 "$work/spool"
    local port admin
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$work/proxy.toml" <<EOF
[listen]
addr = "127.0.0.1:$port"
tls_cert = "$PGSHIFT_TLS_DIR/server.crt"
tls_key = "$PGSHIFT_TLS_DIR/server.key"
[source]
host = "$HOST"
port = $PGSHIFT_SOURCE_PORT
sslmode = "disable"
[target]
host = "$HOST"
port = $PGSHIFT_TARGET_PORT
sslmode = "disable"
passfile = "$PGSHIFT_TARGET_PGPASS"
[admin]
addr = "127.0.0.1:$admin"
[limits]
shutdown_timeout_s = 10
[mirror]
enabled = true
spool_dir = "$work/spool"
fsync_interval_ms = 200
max_txn_bytes = 1073741824
[routing]
read_percent = 50
[shadow]
sample_percent = 100
mismatch_log = "$work/mismatches.jsonl"
EOF
    "$bin" --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
    PROXY_PID=$!
    trap 'kill "$PROXY_PID" 2>/dev/null || true; wait "$PROXY_PID" 2>/dev/null || true' EXIT
    wait_port 127.0.0.1 "$port" 20 "$PROXY_PID" || die "pgshift did not start: $(tail -n 20 "$work/proxy.log")"
    log "pgshift $PROXY_PID on port $port (log $work/proxy.log)"
    cmd_compare --source-port "$PGSHIFT_SOURCE_PORT" --target-port "$PGSHIFT_TARGET_PORT" \
        --proxy-port "$port" --out "$work/results" "$@"
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        install)
            local s suites=("$@")
            [[ ${#suites[@]} -gt 0 ]] || suites=("${REGISTRY_SUITES[@]}")
            for s in "${suites[@]}"; do install_suite "$s"; done
            ;;
        run)
            local port="" out="" suites=() tests=()
            while [[ $# -gt 0 ]]; do
                case "$1" in
                    --port) port=$2; shift 2 ;;
                    --test) tests+=("$2"); shift 2 ;;
                    --host) HOST=$2; shift 2 ;;
                    --out) out=$2; shift 2 ;;
                    -*) die "unknown option $1" ;;
                    *) suites+=("$1"); shift ;;
                esac
            done
            [[ -n "$port" && -n "$out" ]] || die "run needs --port and --out"
            [[ ${#suites[@]} -gt 0 ]] || suites=("${REGISTRY_SUITES[@]}")
            [[ ${#tests[@]} -eq 0 || ${#suites[@]} -eq 1 ]] || die "--test needs exactly one suite"
            local s
            for s in "${suites[@]}"; do run_suite "$s" "$port" "$out" "${tests[@]+"${tests[@]}"}"; done
            ;;
        compare) cmd_compare "$@" ;;
        local) cmd_local "$@" ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}

main "$@"
