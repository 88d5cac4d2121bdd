#!/usr/bin/env bash
# scripts/test.sh — THE one command that runs pgshift's whole test suite.
#
# Usage: scripts/test.sh [CARGO TEST ARGS...] [-- TEST BINARY ARGS...]
#
#   scripts/test.sh                        # everything
#   scripts/test.sh --test basic           # one integration test target
#   scripts/test.sh -- some_test_name      # filter, passed to the test binaries
#
# What it does:
#   0. checks that the crate's modules import each other without a cycle
#      (scripts/check_layers.py; the layers are in docs/architecture.md)
#   1. installs what is missing (PostgreSQL, pgbouncer, openssl, psycopg) — scripts/lib.sh
#   2. raises `ulimit -n` to 65536 (or as high as the hard limit allows)
#   3. starts the two test clusters (scripts/cluster.sh start) and exports their
#      environment (scripts/cluster.sh env: PGSHIFT_HOST, PGSHIFT_SOURCE_PORT,
#      PGSHIFT_TARGET_PORT, PGSHIFT_CLUSTER_DIR, PGSHIFT_PG_BIN, ...), plus PGSHIFT_BIN
#      (the release binary)
#   4. cargo build --profile ci --bins (the `ci` profile in Cargo.toml: optimised
#      like release, without LTO, so the test harnesses link quickly)
#   5. RUST_TEST_THREADS=2 cargo test --profile ci --no-fail-fast [ARGS] [-- TEST BINARY ARGS]
#      (the benches are built and run once each in test mode too, with --benches,
#      unless you pass your own cargo args; RUST_TEST_THREADS is left alone if
#      you pass your own --test-threads)
#   6. stops the clusters on exit, unless PGSHIFT_KEEP_CLUSTERS=1
#
# Exit code: cargo test's (or the failing step's). Never reads standard input.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
exec </dev/null

# Split "$@" into cargo args and test-binary args (after the first --).
cargo_args=()
bin_args=()
seen_dashdash=0
for a in "$@"; do
    if [[ $seen_dashdash -eq 0 && "$a" == "--" ]]; then
        seen_dashdash=1
    elif [[ $seen_dashdash -eq 0 ]]; then
        cargo_args+=("$a")
    else
        bin_args+=("$a")
    fi
done
# Two tests at a time. Set through RUST_TEST_THREADS rather than a
# --test-threads argument: the criterion benches run in test mode by the same
# `cargo test` and reject libtest's arguments.
if [[ " ${bin_args[*]-} " != *" --test-threads"* ]]; then
    export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
fi

step "installing missing dependencies"
ensure_deps
command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH"

step "checking the module layers (scripts/check_layers.py)"
python3 "$ROOT/scripts/check_layers.py" || die "an import cycle among the crate's modules (see above)"

step "raising the open-file limit"
want=65536
hard="$(ulimit -Hn)"
if [[ "$hard" != unlimited && "$hard" -lt "$want" ]]; then
    ulimit -Hn "$want" 2>/dev/null || true
    hard="$(ulimit -Hn)"
fi
if [[ "$hard" == unlimited || "$hard" -ge "$want" ]]; then
    ulimit -Sn "$want"
else
    ulimit -Sn "$hard"
    warn "hard limit on open files is $hard (< $want); using $hard"
fi
log "ulimit -n = $(ulimit -Sn) (hard $(ulimit -Hn))"

cleanup() {
    local rc=$?
    if [[ "${PGSHIFT_KEEP_CLUSTERS:-0}" == 1 ]]; then
        log "PGSHIFT_KEEP_CLUSTERS=1: leaving the clusters running"
    else
        step "stopping the test clusters"
        "$ROOT/scripts/cluster.sh" stop || warn "could not stop the clusters"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting the test clusters"
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
export PGSHIFT_BIN="$ROOT/target/ci/pgshift"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
env | grep '^PGSHIFT_' | sort | sed 's/^/    /' >&2

step "cargo build --profile ci --bins"
cargo build --profile ci --bins

# With no cargo args: every test target, plus the benches once each in test
# mode (their assertions run, their timings do not matter).
if [[ ${#cargo_args[@]} -eq 0 ]]; then
    cargo_args=(--lib --bins --tests --benches)
fi
# --no-fail-fast: one run reports every failing binary, not just the first.
step "cargo test --profile ci --no-fail-fast ${cargo_args[*]} -- ${bin_args[*]-} (RUST_TEST_THREADS=${RUST_TEST_THREADS:-})"
set +e
cargo test --profile ci --no-fail-fast "${cargo_args[@]}" -- "${bin_args[@]+"${bin_args[@]}"}"
rc=$?
set -e
if [[ $rc -eq 0 ]]; then
    log "cargo test passed"
else
    log "cargo test FAILED (exit $rc)"
fi
exit "$rc"
