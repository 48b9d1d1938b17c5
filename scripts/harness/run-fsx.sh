#!/usr/bin/env bash
# Run fsx (crates.io Rust fsx) against a file on the file system under test,
# once per profile, with a fixed seed so failures are reproducible.
#
#   scripts/harness/run-fsx.sh FILE_IN_MOUNT [OPS] [SEED]
#
# FILE_IN_MOUNT  test file path (its directory must exist); each profile uses
#                FILE_IN_MOUNT.<profile>, removed after a passing run
# OPS            operations in total (default: $FSX_OPS or 100000), split
#                plain 50 % / mmap 20 % / extended 30 %: mmap operations on
#                FUSE cost ~10x the others, and the total keeps CI's budget
# SEED           RNG seed (default: $FSX_SEED or 1)
#
# Profiles are fsx config files tests/fsx/<profile>.toml:
#   plain     pread/pwrite/truncate/close-open/fsync, no mmap
#   mmap      mmap reads and writes (msync, MS_INVALIDATE) mixed with I/O
#   extended  posix_fallocate, sendfile, copy_file_range, posix_fadvise
#
# Environment:
#   FSX_PROFILES  space-separated subset/order (default "plain mmap extended")
#   FSX_TIMEOUT   seconds per profile before it is killed (default 900)
#   FSX_LOGDIR    where logs and failure artifacts (.fsxgood) go (default: temp dir)
#
# Prints one line per profile:
#   fsx[PROFILE]: PASS|FAIL ops=N seed=S time=Ts
# and exits non-zero if any profile failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

usage() { sed -n '2,24p' "$0" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 3 ]; then usage; fi
case "$1" in -h|--help) usage ;; esac
FILE=$1
OPS=${2:-${FSX_OPS:-100000}}
SEED=${3:-${FSX_SEED:-1}}
PROFILES=${FSX_PROFILES:-plain mmap extended}
TIMEOUT=${FSX_TIMEOUT:-900}

die() { echo "run-fsx: $*" >&2; exit 1; }
command -v fsx >/dev/null 2>&1 || die "fsx not found (run scripts/install-deps.sh --for test)"
[[ "$OPS" =~ ^[1-9][0-9]*$ ]] || die "OPS must be a positive integer (got '$OPS')"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "SEED must be a non-negative integer (got '$SEED')"
dir=$(dirname "$FILE")
[ -d "$dir" ] || die "directory does not exist: $dir"
FILE=$(cd "$dir" && pwd)/$(basename "$FILE")
LOGDIR=${FSX_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/run-fsx.XXXXXX")}
mkdir -p "$LOGDIR"

trap 'echo "run-fsx: interrupted" >&2; exit 130' INT
trap 'echo "run-fsx: terminated" >&2; exit 143' TERM
# The device of the target directory: if it changes during a run, the file
# system under test went away (e.g. a FUSE daemon died) and fsx was really
# exercising the directory underneath.
dev0=$(stat -c %d "$(dirname "$FILE")")

failed=0
summary=()
for profile in $PROFILES; do
    conf=$ROOT/tests/fsx/$profile.toml
    [ -f "$conf" ] || die "no such profile: $conf"
    target=$FILE.$profile
    log=$LOGDIR/fsx-$profile.log
    case $profile in
        plain) share=50 ;;
        mmap) share=20 ;;
        extended) share=30 ;;
        *) share=100 ;;
    esac
    pops=$(( OPS * share / 100 ))
    [ "$pops" -ge 1 ] || pops=1
    cmd=(fsx -f "$conf" -N "$pops" -S "$SEED" -P "$LOGDIR" "$target")
    echo "run-fsx: ${cmd[*]}"
    start=$(date +%s)
    rc=0
    timeout --foreground --kill-after=30 "$TIMEOUT" "${cmd[@]}" >"$log" 2>&1 || rc=$?
    elapsed=$(( $(date +%s) - start ))
    if [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then
        echo "run-fsx: fsx[$profile] interrupted" >&2
        exit "$rc"
    fi
    devnow=$(stat -c %d "$(dirname "$FILE")" 2>/dev/null || echo gone)
    if [ "$devnow" != "$dev0" ]; then
        echo "run-fsx: the file system under $(dirname "$FILE") changed during fsx[$profile] (device $dev0 -> $devnow): was it unmounted?" >&2
        rc=99
    fi
    if [ "$rc" -eq 0 ] && grep -q 'All operations completed A-OK!' "$log"; then
        line="fsx[$profile]: PASS ops=$pops seed=$SEED time=${elapsed}s"
        rm -f "$target"
    else
        failed=1
        why="exit $rc"
        [ "$rc" -eq 124 ] && why="timed out after ${TIMEOUT}s"
        [ "$rc" -eq 99 ] && why="file system under test went away"
        line="fsx[$profile]: FAIL ops=$pops seed=$SEED time=${elapsed}s ($why; log $log)"
        echo "--- fsx[$profile] failed; first error lines and tail of $log:" >&2
        grep -m 10 -E 'ERROR|panicked|error' "$log" >&2 || true
        echo "  ..." >&2
        tail -n 40 "$log" >&2
        echo "  reproduce: ${cmd[*]}" >&2
    fi
    echo "$line"
    summary+=("$line")
done

echo "--- fsx summary"
printf '%s\n' "${summary[@]}"
if [ "$failed" -eq 0 ] && [ -z "${FSX_LOGDIR:-}" ]; then
    rm -rf "$LOGDIR"
fi
exit "$failed"
