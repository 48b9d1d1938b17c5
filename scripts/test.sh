#!/usr/bin/env bash
# The one test command for kmsfs:
#
#   ./scripts/test.sh
#
# Steps: install test dependencies; start the local KMS (moto + proxy); cargo
# fmt --check, clippy -D warnings, release build, cargo test --release --all-targets;
# then, as root with /dev/fuse, pjdfstest and fsx against a real kmsfs mount
# (release binary, -o allow_other,default_permissions).  Every step runs even
# if an earlier one failed (the mount steps need the release build).  A final
# table lists each step with its counts; the last line is "N passed, N failed"
# over the steps, and the exit status is non-zero if any step failed.
#
# Environment:
#   KMSFS_TEST_QUICK=1   skip pjdfstest and fsx
#   FSX_OPS=N            fsx operations in total over the three profiles (default 100000)
#   KMSFS_TEST_LOGDIR    where logs are kept (default target/test-logs)
#
# Cleanup (always, also on failure or Ctrl-C): unmount what it mounted
# (fusermount3 -u, -uz if busy), kill the daemons it started, stop the KMS.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

T0=$SECONDS
LOGDIR=${KMSFS_TEST_LOGDIR:-$ROOT/target/test-logs}
mkdir -p "$LOGDIR"
rm -f "$LOGDIR"/*.log "$LOGDIR"/*.out
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-test.XXXXXX")
# The dummy users of pjdfstest must be able to reach the mount point.
chmod 755 "$WORK"
STATE=$WORK/kms
mkdir -p "$STATE"
: >"$WORK/mounts"   # mount points this script mounted, one per line
: >"$WORK/pids"     # daemon PIDs behind those mounts
KMS_STARTED=0

is_mounted() { # exact mount-point match in /proc/mounts (octal-escaped)
    local m
    m=$(printf '%s' "$1" | sed -e 's/\\/\\134/g' -e 's/ /\\040/g' -e 's/\t/\\011/g')
    awk -v m="$m" '$2 == m { found = 1 } END { exit !found }' /proc/mounts
}

unmount_one() {
    local mnt=$1 i
    is_mounted "$mnt" || return 0
    fusermount3 -u "$mnt" 2>/dev/null || true
    for i in 1 2 3 4 5 6 7 8 9 10; do
        is_mounted "$mnt" || return 0
        sleep 0.5
        [ "$i" = 5 ] && { fusermount3 -u "$mnt" 2>/dev/null || true; }
    done
    echo "test.sh: $mnt busy, lazy unmount" >&2
    fusermount3 -uz "$mnt" 2>/dev/null || true
}

cleanup() {
    local rc=$? mnt pid i
    trap - EXIT INT TERM
    trap '' PIPE INT   # finish cleaning up even if stdout is gone or ^C is hit again
    set +e
    while read -r mnt; do
        [ -n "$mnt" ] && unmount_one "$mnt"
    done <"$WORK/mounts"
    while read -r pid; do
        [ -n "$pid" ] || continue
        # Only a process that is still ours (its command line names $WORK).
        tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$WORK" || continue
        for i in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            [ "$i" = 1 ] && kill -TERM "$pid" 2>/dev/null
            sleep 0.3
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    done <"$WORK/pids"
    if [ "$KMS_STARTED" = 1 ]; then
        scripts/harness/kms-server.sh stop "$STATE" >/dev/null 2>&1 ||
            echo "test.sh: warning: kms-server.sh stop failed" >&2
    fi
    # Never rm -rf through a live mount.
    if ! grep -qF "$WORK" /proc/mounts; then rm -rf "$WORK"; else
        echo "test.sh: leaving $WORK (still mounted)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "test.sh: interrupted" >&2; exit 130' INT TERM

# --- step bookkeeping ----------------------------------------------------------
STEP_NAMES=()
STEP_STATUS=()
STEP_TIME=()
STEP_DETAIL=()
banner() { printf '\n==== %s ====\n' "$*"; }

# run_step NAME FUNCTION: run FUNCTION in a subshell with errexit; it may write
# a one-line detail to $DETAIL.  Records PASS/FAIL and the duration, sets
# STEP_RC and always returns 0.  Never call it in an `if`/`||`/`&&` context:
# that would switch errexit off inside the step.
run_step() {
    local name=$1 fn=$2 rc t
    banner "$name"
    DETAIL=$WORK/detail.$name
    : >"$DETAIL"
    t=$SECONDS
    set +e
    ( set -e; "$fn" )
    rc=$?
    set -e
    STEP_RC=$rc
    record "$name" "$([ "$rc" -eq 0 ] && echo PASS || echo FAIL)" "$((SECONDS - t))" "$(cat "$DETAIL")"
}
record() { # NAME STATUS SECONDS DETAIL
    STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_TIME+=("$3"); STEP_DETAIL+=("$4")
    [ "$2" = FAIL ] && echo "---- $1: FAIL" >&2
    return 0
}
skip_step() { # NAME REASON
    banner "$1"
    echo "SKIPPED: $1 ($2)"
    record "$1" SKIPPED 0 "$2"
}

# --- steps ----------------------------------------------------------------------
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/kmsfs

step_deps() { scripts/install-deps.sh --for test; }

step_fmt() { cargo fmt --all -- --check; }

step_clippy() {
    cargo clippy --all-targets -- -D warnings 2>&1 | tee "$LOGDIR/clippy.log"
}

step_build() {
    cargo build --release 2>&1 | tee "$LOGDIR/build.log"
    [ -x "$BIN" ] || { echo "no binary at $BIN" >&2; return 1; }
}

step_cargo_test() {
    local rc=0
    # --release reuses the release build's dependencies: one cold build, not two.
    cargo test --release --all-targets --no-fail-fast 2>&1 | tee "$LOGDIR/cargo-test.log" || rc=$?
    # Sum the per-binary "test result:" lines.
    awk '
        /^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i+1) ~ /^passed;?$/)  p += $i
                if ($(i+1) ~ /^failed;?$/)  f += $i
                if ($(i+1) ~ /^ignored;?$/) g += $i
            }
            n++
        }
        END { printf "%d passed, %d failed, %d ignored (%d test binaries)", p, f, g, n }
    ' "$LOGDIR/cargo-test.log" >"$DETAIL"
    grep -q '^test result:' "$LOGDIR/cargo-test.log" || { echo "no test results found" >&2; rc=1; }
    grep -q '^test result: FAILED' "$LOGDIR/cargo-test.log" && rc=1
    return "$rc"
}

# mount_volume NAME: init (once) and mount $WORK/NAME/{cipher,plain}; prints the mount point.
mount_volume() {
    local v=$WORK/$1 pid p
    mkdir -p "$v/cipher" "$v/plain"
    chmod 755 "$v" "$v/plain"
    if [ ! -f "$v/kmsfs.key" ]; then
        "$BIN" init "$v/cipher" --key-file "$v/kmsfs.key" >&2
    fi
    echo "$v/plain" >>"$WORK/mounts"
    "$BIN" mount "$v/cipher" "$v/plain" -o allow_other,default_permissions \
        --key-file "$v/kmsfs.key" --log-file "$LOGDIR/kmsfs-$1.log" >&2
    is_mounted "$v/plain" || { echo "kmsfs mount returned but $v/plain is not mounted" >&2; return 1; }
    # Remember the daemon (the process whose command line names this mount
    # point) so cleanup can kill it if unmounting is not enough.
    : >>"$WORK/pids.$1"
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        if tr '\0' '\n' 2>/dev/null <"$p/cmdline" | grep -qxF "$v/plain"; then
            echo "$pid" >>"$WORK/pids"
            echo "$pid" >>"$WORK/pids.$1"
        fi
    done
    echo "$v/plain"
}

# unmount_volume NAME: unmount $WORK/NAME/plain and wait for its daemon to exit
# (so that a later mount at the same path cannot race with its shutdown).
unmount_volume() {
    local mnt=$WORK/$1/plain pid i
    if ! "$BIN" unmount "$mnt"; then
        echo "kmsfs unmount failed; trying fusermount3 -u" >&2
        unmount_one "$mnt"
    fi
    if is_mounted "$mnt"; then
        echo "$mnt is still mounted after unmount" >&2
        return 1
    fi
    while read -r pid; do
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            [ "$i" = 100 ] && { echo "kmsfs daemon $pid still running 10s after unmount" >&2; return 1; }
            sleep 0.1
        done
    done <"$WORK/pids.$1"
    : >"$WORK/pids.$1"
}

# still_mounted MOUNTPOINT STEP: fail if the mount vanished during STEP.
still_mounted() {
    is_mounted "$1" && return 0
    echo "$1 is no longer mounted after $2: the kmsfs daemon died or was unmounted (see $LOGDIR/kmsfs-vol.log)" >&2
    return 1
}

step_pjdfstest() {
    local mnt rc=0 line
    mnt=$(mount_volume vol)
    PJDFSTEST_LOG=$LOGDIR/pjdfstest.log scripts/harness/run-pjdfstest.sh "$mnt" 2>&1 |
        tee "$LOGDIR/pjdfstest.out" || rc=$?
    line=$(grep '^pjdfstest: ' "$LOGDIR/pjdfstest.out" | tail -n 1 || true)
    line=${line#pjdfstest: }
    echo "${line/expected_failures=/expected=}" >"$DETAIL"
    still_mounted "$mnt" pjdfstest || rc=1
    unmount_volume vol || rc=1
    return "$rc"
}

step_fsx() {
    local mnt rc=0
    mnt=$(mount_volume vol)   # same volume, mounted again
    FSX_LOGDIR=$LOGDIR/fsx scripts/harness/run-fsx.sh "$mnt/fsx-file" "${FSX_OPS:-100000}" 2>&1 |
        tee "$LOGDIR/fsx.out" || rc=$?
    # "fsx[plain]: PASS ops=N seed=S time=Ts" -> "plain PASS N ops 12s; ..."
    sed -n '/^--- fsx summary/,$p' "$LOGDIR/fsx.out" |
        sed -n 's/^fsx\[\([a-z_]*\)\]: \([A-Z]*\) ops=\([0-9]*\) seed=[0-9]* time=\([0-9]*s\).*/\1 \2 \3 ops \4/p' |
        paste -sd ';' | sed 's/;/; /g' >"$DETAIL"
    still_mounted "$mnt" fsx || rc=1
    unmount_volume vol || rc=1
    return "$rc"
}

# --- run ------------------------------------------------------------------------
echo "kmsfs test run: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), logs in ${LOGDIR#"$ROOT"/}"

run_step install-deps step_deps

banner kms-server
t=$SECONDS
KMS_STARTED=1
if scripts/harness/kms-server.sh start "$STATE" && [ -f "$STATE/env" ]; then
    # shellcheck disable=SC1091
    . "$STATE/env"
    record kms-server PASS "$((SECONDS - t))" "${AWS_ENDPOINT_URL_KMS:-}"
else
    record kms-server FAIL "$((SECONDS - t))" "scripts/harness/kms-server.sh start failed"
fi

run_step fmt step_fmt
run_step clippy step_clippy
run_step build step_build
build_ok=$((STEP_RC == 0))
run_step cargo-test step_cargo_test

if [ "${KMSFS_TEST_QUICK:-0}" = 1 ]; then
    skip_step pjdfstest "KMSFS_TEST_QUICK=1"
    skip_step fsx "KMSFS_TEST_QUICK=1"
elif [ "$(id -u)" -ne 0 ] || [ ! -c /dev/fuse ]; then
    echo
    echo "################################################################"
    echo "### SKIPPED (needs root and /dev/fuse): pjdfstest, fsx"
    echo "################################################################"
    record pjdfstest SKIPPED 0 "needs root and /dev/fuse"
    record fsx SKIPPED 0 "needs root and /dev/fuse"
elif [ "$build_ok" != 1 ]; then
    skip_step pjdfstest "release build failed"
    skip_step fsx "release build failed"
else
    run_step pjdfstest step_pjdfstest
    run_step fsx step_fsx
fi

# --- summary --------------------------------------------------------------------
npass=0 nfail=0 nskip=0
banner summary
printf '%-13s %-8s %6s  %s\n' STEP RESULT TIME DETAIL
for i in "${!STEP_NAMES[@]}"; do
    printf '%-13s %-8s %5ss  %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_TIME[$i]}" "${STEP_DETAIL[$i]}"
    case "${STEP_STATUS[$i]}" in
        PASS) npass=$((npass + 1)) ;;
        FAIL) nfail=$((nfail + 1)) ;;
        *) nskip=$((nskip + 1)) ;;
    esac
done
el=$((SECONDS - T0))
printf 'total wall time: %dm%02ds; logs in %s\n' $((el / 60)) $((el % 60)) "${LOGDIR#"$ROOT"/}"
if [ "$nskip" -gt 0 ]; then
    echo "$npass passed, $nfail failed, $nskip skipped"
else
    echo "$npass passed, $nfail failed"
fi
[ "$nfail" -eq 0 ]
