#!/usr/bin/env bash
# Run the pjdfstest POSIX suite (crates.io Rust rewrite) against a directory
# and compare its failures with tests/pjdfstest/expected-failures.txt.
#
#   scripts/harness/run-pjdfstest.sh MOUNTDIR [SECOND_FS_DIR] [-- PJDFSTEST_PATTERNS...]
#
# MOUNTDIR       directory on the file system under test (tests run in a
#                temporary subdirectory, removed afterwards)
# SECOND_FS_DIR  directory on a different file system, for the EXDEV cases
#                (default: a temporary directory under ${TMPDIR:-/tmp}, used
#                only if it really is on another device)
#
# Run as root: many cases switch to the dummy users of the config (the mount
# must then allow other users, e.g. FUSE `-o allow_other,default_permissions`).
#
# Environment:
#   PJDFSTEST_CONFIG    config file (default tests/pjdfstest/pjdfstest.toml)
#   PJDFSTEST_EXPECTED  expected-failure list (default tests/pjdfstest/expected-failures.txt)
#   PJDFSTEST_LOG       where to keep the full output (default: a temp file, path printed)
#   PJDFSTEST_TIMEOUT   seconds before the run is killed (default 1800)
#
# Prints the failing cases, then one line
#   pjdfstest: passed=N failed=N skipped=N expected_failures=N unexpected_failures=N newly_passing=N
# and exits 0 iff every failure is listed as expected (newly passing expected
# failures are only reported as a hint).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

usage() { sed -n '2,26p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac
MOUNTDIR=$1; shift
SECOND=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then SECOND=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
PATTERNS=("$@")

CONFIG=${PJDFSTEST_CONFIG:-$ROOT/tests/pjdfstest/pjdfstest.toml}
EXPECTED=${PJDFSTEST_EXPECTED:-$ROOT/tests/pjdfstest/expected-failures.txt}
TIMEOUT=${PJDFSTEST_TIMEOUT:-1800}

die() { echo "run-pjdfstest: $*" >&2; exit 1; }
command -v pjdfstest >/dev/null 2>&1 || die "pjdfstest not found (run scripts/install-deps.sh --for test)"
[ -d "$MOUNTDIR" ] || die "not a directory: $MOUNTDIR"
[ -f "$CONFIG" ] || die "config not found: $CONFIG"
[ -f "$EXPECTED" ] || die "expected-failure list not found: $EXPECTED"
[ "$(id -u)" -eq 0 ] || echo "run-pjdfstest: WARNING: not root; cases needing root or user switching will be skipped" >&2
MOUNTDIR=$(cd "$MOUNTDIR" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/run-pjdfstest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ -z "$SECOND" ]; then
    SECOND=$WORK/secondary
    mkdir -p "$SECOND"
fi
[ -d "$SECOND" ] || die "not a directory: $SECOND"
sec_args=()
if [ "$(stat -c %d "$SECOND")" != "$(stat -c %d "$MOUNTDIR")" ]; then
    sec_args=(-s "$(cd "$SECOND" && pwd)")
else
    echo "run-pjdfstest: WARNING: $SECOND is on the same file system as $MOUNTDIR; EXDEV cases will be skipped" >&2
fi

LOG=${PJDFSTEST_LOG:-$(mktemp --suffix=.log "${TMPDIR:-/tmp}/pjdfstest.XXXXXX")}
RAW=$WORK/raw.log

cmd=(pjdfstest -c "$CONFIG" -p "$MOUNTDIR" "${sec_args[@]}" "${PATTERNS[@]}")
echo "run-pjdfstest: ${cmd[*]}"
start=$(date +%s)
rc=0
dev0=$(stat -c %d "$MOUNTDIR")
trap 'echo "run-pjdfstest: interrupted" >&2; exit 130' INT
trap 'echo "run-pjdfstest: terminated" >&2; exit 143' TERM
NO_COLOR=1 timeout --foreground --kill-after=30 "$TIMEOUT" "${cmd[@]}" >"$RAW" 2>&1 || rc=$?
elapsed=$(( $(date +%s) - start ))
if [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then
    echo "run-pjdfstest: pjdfstest interrupted" >&2
    exit "$rc"
fi
devnow=$(stat -c %d "$MOUNTDIR" 2>/dev/null || echo gone)
# Strip any colour escapes so the log and the parsing are plain text.
sed -e 's/\x1b\[[0-9;]*m//g' "$RAW" >"$LOG"
echo "run-pjdfstest: full output in $LOG (${elapsed}s, pjdfstest exit $rc)"

# name -> status, for lines "NAME   ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY"
awk '
    /^[^ \t]+[ \t]+(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)[ \t]*$/ {
        name = $1; $1 = ""; sub(/^[ \t]+/, ""); sub(/[ \t]+$/, "")
        print name "\t" $0
    }' "$LOG" >"$WORK/results.tsv"

# Expected failures: first field of each non-comment line.
sed -e 's/#.*//' "$EXPECTED" | awk 'NF { print $1 }' | sort -u >"$WORK/expected"
awk -F'\t' '$2 == "FAILED" || $2 == "failed as expected" { print $1 }' "$WORK/results.tsv" | sort -u >"$WORK/failed"
awk -F'\t' '$2 == "ok" || $2 == "PASSED UNEXPECTEDLY" { print $1 }' "$WORK/results.tsv" | sort -u >"$WORK/passed"

n_pass=$(wc -l <"$WORK/passed")
n_fail=$(wc -l <"$WORK/failed")
n_skip=$(awk -F'\t' '$2 == "skipped"' "$WORK/results.tsv" | wc -l)
comm -23 "$WORK/failed" "$WORK/expected" >"$WORK/unexpected"
comm -12 "$WORK/failed" "$WORK/expected" >"$WORK/expected_hit"
comm -12 "$WORK/passed" "$WORK/expected" >"$WORK/newly_passing"
n_unexp=$(wc -l <"$WORK/unexpected")
n_exp=$(wc -l <"$WORK/expected_hit")
n_new=$(wc -l <"$WORK/newly_passing")

status=0
if [ "$n_fail" -gt 0 ]; then
    echo "--- failed cases (with pjdfstest's message):"
    # Print each FAILED line plus its panic message (up to any backtrace).
    awk '
        /^[^ \t]+[ \t]+FAILED[ \t]*$/ { show = 1; print; next }
        /^[^ \t]+[ \t]+(ok|skipped|failed as expected|PASSED UNEXPECTEDLY)[ \t]*$/ { show = 0 }
        /^(Backtrace:|Summary:)/ { show = 0 }
        show { print "    " $0 }' "$LOG" | head -n 200
fi
if [ "$n_unexp" -gt 0 ]; then
    echo "--- UNEXPECTED failures (not in ${EXPECTED#"$ROOT"/}):"
    sed 's/^/  /' "$WORK/unexpected"
    status=1
fi
if [ "$n_exp" -gt 0 ]; then
    echo "--- expected failures that failed as listed: $n_exp"
fi
if [ "$n_new" -gt 0 ]; then
    echo "--- hint: these expected failures now PASS; remove them from ${EXPECTED#"$ROOT"/}:"
    sed 's/^/  /' "$WORK/newly_passing"
fi
if [ "$devnow" != "$dev0" ]; then
    echo "run-pjdfstest: the file system at $MOUNTDIR changed during the run (device $dev0 -> $devnow): was it unmounted?" >&2
    status=1
fi
if ! grep -q '^Summary:' "$LOG"; then
    echo "run-pjdfstest: pjdfstest did not finish (exit $rc, no Summary line); tail of output:" >&2
    tail -n 20 "$LOG" >&2
    status=1
elif [ "$rc" -ne 0 ] && [ "$n_fail" -eq 0 ]; then
    echo "run-pjdfstest: pjdfstest exited $rc without failing cases" >&2
    status=1
fi
grep '^Summary:' "$LOG" || true
echo "pjdfstest: passed=$n_pass failed=$n_fail skipped=$n_skip expected_failures=$n_exp unexpected_failures=$n_unexp newly_passing=$n_new"
exit "$status"
