#!/usr/bin/env bash
# shellcheck disable=SC2317  # test functions are called indirectly ("$fn"), cleanup from a trap
# Benchmark kmsfs against gocryptfs and a plain tmpfs directory, side by side.
#
#   sudo scripts/bench.sh          (root: it mounts a tmpfs and drops caches)
#
# All three targets live on one tmpfs this script mounts (so the backing store
# is never the bottleneck) and unmounts at the end:
#   plain      a directory on the tmpfs
#   gocryptfs  gocryptfs -fg over a cipher dir on the tmpfs
#   kmsfs      kmsfs mount -f over a cipher dir on the tmpfs (local key file)
# Rounds are interleaved (for each round, for each test, for each target) and
# every figure is the median over the rounds.
#
# Tests: sequential write (fio bs=1M, end_fsync) and read (after dropping
# caches); random 4 KiB read and write (fio psync, one job, O_DIRECT so every
# op reaches the file system); small files (create, stat, read, delete of
# 1 KiB files, caches dropped between phases); `tar -x` of a tarball of
# /usr/include (+ sync of the target); and the FUSE daemon's CPU seconds
# (utime+stime from /proc/PID/stat) per GiB sequentially written and read.
#
# Output: the table on stdout, also saved as target/bench/bench-DATE.md;
# daemon logs and raw per-round figures go to target/bench/logs-DATE/.
#
# Environment:
#   BENCH_ROUNDS=N       rounds (default 3; 1 with BENCH_QUICK)
#   BENCH_QUICK=1        smoke run: smaller sizes, short runtimes, one round
#   BENCH_WARMUP=0       no unmeasured pass before each sequential test
#   BENCH_RAND_DIRECT=0  random 4 KiB tests through the page cache instead
#                        (caches dropped first; default 1 = O_DIRECT)
#   BENCH_TAR_SRC=DIR    tree to tar up for the extract test (default /usr/include)
#   BENCH_NO_BUILD=1     skip `cargo build --release` (use the existing binary)
#   BENCH_TMPFS_SIZE=S   size of the scratch tmpfs (default 6G)
#   BENCH_FSX=1          afterwards, a long fsx soak on the kmsfs mount
#                        (scripts/harness/run-fsx.sh; BENCH_FSX_OPS ops per profile,
#                        default 1000000, 20000 with BENCH_QUICK)
#   BENCH_SHARED=1       shared mode (-o shared) against the default mode (scripts/bench/shared.sh)
#   BENCH_KMS=1          KMS section: DEK pre-generation under +10 ms KMS latency (scripts/bench/kms.sh),
#                        and branch key mode against a local key (scripts/bench/branch.sh)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export LC_ALL=C

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

usage() { sed -n '3,39p' "$0"; exit "${1:-0}"; }
case "${1:-}" in
    -h|--help) usage 0 ;;
    "") ;;
    *) echo "bench: unknown argument: $1" >&2; usage 2 >&2 ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root (mounts a tmpfs, drops caches)"

# --- settings ----------------------------------------------------------------
QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    ROUNDS=${BENCH_ROUNDS:-1}
    SEQ_MB=256          # sequential file size, MiB
    RAND_MB=64          # random-I/O file size, MiB
    RAND_RUNTIME=3      # seconds per random test
    NFILES=1000         # small files
    FSX_OPS=${BENCH_FSX_OPS:-20000}
else
    ROUNDS=${BENCH_ROUNDS:-3}
    SEQ_MB=1024
    RAND_MB=256
    RAND_RUNTIME=15
    NFILES=5000
    FSX_OPS=${BENCH_FSX_OPS:-1000000}
fi
SMALL_SIZE=1024
RAND_DIRECT=${BENCH_RAND_DIRECT:-1}
WARMUP=${BENCH_WARMUP:-1}
TAR_SRC=${BENCH_TAR_SRC:-/usr/include}
TMPFS_SIZE=${BENCH_TMPFS_SIZE:-6G}
TARGETS=(plain gocryptfs kmsfs)
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer (got '$ROUNDS')"
[[ "$FSX_OPS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_FSX_OPS must be a positive integer (got '$FSX_OPS')"
[ -d "$TAR_SRC" ] || die "BENCH_TAR_SRC is not a directory: $TAR_SRC"

# --- dependencies and build ----------------------------------------------------
need_install=0
for tool in fio gocryptfs fusermount3 jq python3; do
    command -v "$tool" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    if [ -x scripts/install-deps.sh ]; then
        scripts/install-deps.sh --for bench
    else
        apt-get update && apt-get install -y fio gocryptfs fuse3 jq python3
    fi
    command -v jq >/dev/null 2>&1 || apt-get install -y jq
fi
for tool in fio gocryptfs fusermount3 jq python3 tar; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    cargo build --release
fi
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/kmsfs
[ -x "$BIN" ] || die "no kmsfs binary at $BIN"

STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR=${CARGO_TARGET_DIR:-$ROOT/target}/bench
LOGDIR=$OUTDIR/logs-$STAMP
MD=$OUTDIR/bench-$STAMP.md
mkdir -p "$LOGDIR"
RAW=$LOGDIR/raw.tsv
printf 'round\tmetric\ttarget\tvalue\n' >"$RAW"

# --- scratch tmpfs, mounts, cleanup ---------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-bench.XXXXXX")
WORK_MOUNTED=0
declare -A DAEMON_PID=()   # target -> PID of its foreground FUSE daemon
declare -A MNT=()          # target -> directory the tests run in

is_mounted() { # exact mount-point match in /proc/mounts (octal-escaped)
    local m
    m=$(printf '%s' "$1" | sed -e 's/\\/\\134/g' -e 's/ /\\040/g' -e 's/\t/\\011/g')
    awk -v m="$m" '$2 == m { found = 1 } END { exit !found }' /proc/mounts
}

# Unmount one FUSE mount and make sure its daemon (our child) is gone.
stop_daemon() {
    local t=$1 mnt=$2 pid=${DAEMON_PID[$1]:-} i
    if is_mounted "$mnt"; then
        fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true
    fi
    if [ -n "$pid" ]; then
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$t daemon $pid did not exit after unmount; sending TERM"
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && { log "$t daemon $pid still alive; sending KILL"; kill -KILL "$pid" 2>/dev/null || true; }
        fi
        wait "$pid" 2>/dev/null || true
        unset 'DAEMON_PID[$t]'
    fi
    if is_mounted "$mnt"; then fusermount3 -uz "$mnt" 2>/dev/null || true; fi
}

cleanup() {
    local rc=$? t
    trap - EXIT INT TERM
    set +e
    for t in gocryptfs kmsfs; do
        [ -n "${MNT[$t]:-}" ] && stop_daemon "$t" "${MNT[$t]}"
    done
    if [ "$WORK_MOUNTED" = 1 ]; then
        umount "$WORK" 2>/dev/null || umount -l "$WORK" 2>/dev/null || log "could not unmount $WORK"
    fi
    rmdir "$WORK" 2>/dev/null
    [ "$rc" -ne 0 ] && log "failed (exit $rc); logs in $LOGDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mount -t tmpfs -o "size=$TMPFS_SIZE,mode=0755" kmsfs-bench "$WORK"
WORK_MOUNTED=1
mkdir -p "$WORK/plain" "$WORK/gocryptfs.cipher" "$WORK/gocryptfs.mnt" \
    "$WORK/kmsfs.cipher" "$WORK/kmsfs.mnt"
MNT[plain]=$WORK/plain

# Start a foreground daemon in the background; wait until its mount serves.
start_daemon() {
    local t=$1 mnt=$2 i
    shift 2
    "$@" >>"$LOGDIR/$t.log" 2>&1 &
    DAEMON_PID[$t]=$!
    MNT[$t]=$mnt
    for ((i = 0; i < 300; i++)); do
        if is_mounted "$mnt" && stat "$mnt/." >/dev/null 2>&1; then
            log "$t mounted at $mnt (daemon PID ${DAEMON_PID[$t]})"
            return 0
        fi
        kill -0 "${DAEMON_PID[$t]}" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$LOGDIR/$t.log" >&2
    die "$t did not mount at $mnt (log: $LOGDIR/$t.log)"
}

gocryptfs -init -q -extpass 'echo pw' -scryptn 10 "$WORK/gocryptfs.cipher" >>"$LOGDIR/gocryptfs.log" 2>&1 \
    || die "gocryptfs -init failed (log: $LOGDIR/gocryptfs.log)"
start_daemon gocryptfs "$WORK/gocryptfs.mnt" \
    gocryptfs -fg -extpass 'echo pw' "$WORK/gocryptfs.cipher" "$WORK/gocryptfs.mnt"

KEY=$WORK/kmsfs.key
"$BIN" init "$WORK/kmsfs.cipher" --key-file "$KEY" >>"$LOGDIR/kmsfs.log" 2>&1 \
    || die "kmsfs init failed (log: $LOGDIR/kmsfs.log)"
start_daemon kmsfs "$WORK/kmsfs.mnt" \
    "$BIN" mount -f "$WORK/kmsfs.cipher" "$WORK/kmsfs.mnt" --key-file "$KEY"

log "making the tarball of $TAR_SRC"
TARBALL=$WORK/src.tar
tar -cf "$TARBALL" -C "$(dirname "$TAR_SRC")" "$(basename "$TAR_SRC")" 2>>"$LOGDIR/tar-create.log" \
    || [ -s "$TARBALL" ] || die "could not create $TARBALL"
TAR_MB=$(( $(stat -c %s "$TARBALL") / 1048576 ))
TAR_ENTRIES=$(tar -tf "$TARBALL" | wc -l)

# --- measurement helpers -----------------------------------------------------------
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
CLK_TCK=$(getconf CLK_TCK)

# utime+stime in seconds of the target's daemon (empty for plain)
daemon_cpu() {
    local pid=${DAEMON_PID[$1]:-}
    [ -n "$pid" ] || return 0
    # Fields after the ")" that closes comm: $1 is field 3 (state), so utime
    # (field 14) is $12 and stime (field 15) is $13.
    sed 's/.*) //' "/proc/$pid/stat" | awk -v hz="$CLK_TCK" '{ printf "%.2f", ($12 + $13) / hz }'
}

fio_run() { # fio_run JSONOUT ARGS... (fails with the fio output on error)
    local out=$1
    shift
    if ! fio --output-format=json --output="$out" "$@" >>"$LOGDIR/fio.stderr" 2>&1; then
        cat "$out" >&2 2>/dev/null || true
        tail -n 5 "$LOGDIR/fio.stderr" >&2
        return 1
    fi
}

# Each test function runs in a subshell with errexit on and prints its figure(s).

# One sequential pass over DIR/seq.dat: seq_fio JSONOUT DIR write|read
seq_fio() {
    local extra=()
    if [ "$3" = write ]; then extra=(--end_fsync=1 --fallocate=none); fi
    fio_run "$1" --name="seq$3" --filename="$2/seq.dat" --ioengine=psync --rw="$3" \
        --bs=1M --size="${SEQ_MB}M" "${extra[@]}"
}
# With WARMUP=1 each sequential test first runs once unmeasured. On a VM whose
# freed memory goes back to the host (virtio-balloon free page reporting),
# the first pass over fresh memory pays for host page faults, and which target
# pays depended on the order; after a warm-up pass every target starts from
# memory that was just in use.
t_seq() { # t_seq TARGET write|read; prints "MiB/s cpu_s_per_GiB"
    local t=$1 rw=$2 dir=${MNT[$1]} c0 c1 j=$LOGDIR/fio-last.json
    if [ "$rw" = write ]; then
        rm -f "$dir/seq.dat"
    elif [ ! -f "$dir/seq.dat" ]; then
        echo "no seq.dat from the write test" >&2
        return 1
    fi
    if [ "$WARMUP" = 1 ]; then
        drop_caches
        seq_fio "$j" "$dir" "$rw"
        if [ "$rw" = write ]; then rm -f "$dir/seq.dat"; fi
    fi
    drop_caches
    c0=$(daemon_cpu "$t")
    seq_fio "$j" "$dir" "$rw"
    c1=$(daemon_cpu "$t")
    if [ "$rw" = read ]; then rm -f "$dir/seq.dat"; fi
    jq -r --arg rw "$rw" --arg c0 "${c0:-}" --arg c1 "${c1:-}" --argjson gib "$SEQ_MB" \
        '(.jobs[0][$rw].bw_bytes / 1048576) as $bw
         | "\($bw) \(if $c0 == "" then "-" else (($c1|tonumber) - ($c0|tonumber)) / ($gib / 1024) end)"' "$j"
}
t_seqwrite() { t_seq "$1" write; }
t_seqread() { t_seq "$1" read; }
t_random() { # prints "randread_IOPS randwrite_IOPS"
    local t=$1 dir=${MNT[$1]} j=$LOGDIR/fio-last.json r w
    local common=(--filename="$dir/rand.dat" --ioengine=psync --bs=4k --size="${RAND_MB}M"
        --runtime="$RAND_RUNTIME" --time_based --direct="$RAND_DIRECT" --randrepeat=0 --norandommap)
    rm -f "$dir/rand.dat"
    fio_run "$j" --name=layout --filename="$dir/rand.dat" --ioengine=psync --rw=write \
        --bs=1M --size="${RAND_MB}M" --end_fsync=1 --fallocate=none
    drop_caches
    fio_run "$j" --name=randread --rw=randread "${common[@]}"
    r=$(jq -r '.jobs[0].read.iops' "$j")
    drop_caches
    fio_run "$j" --name=randwrite --rw=randwrite --fsync_on_close=1 "${common[@]}"
    w=$(jq -r '.jobs[0].write.iops' "$j")
    rm -f "$dir/rand.dat"
    echo "$r $w"
}
t_small() { # prints "create_s stat_s read_s delete_s"
    local dir=${MNT[$1]}
    rm -rf "$dir/small"
    drop_caches
    python3 "$ROOT/scripts/bench/smallfiles.py" "$dir/small" "$NFILES" "$SMALL_SIZE" --drop-caches
}
t_tar() { # prints seconds for tar -x plus sync of the target file system
    local dir=${MNT[$1]} t0 t1
    rm -rf "$dir/tree"
    mkdir "$dir/tree"
    drop_caches
    t0=$(now)
    tar -xf "$TARBALL" -C "$dir/tree"
    sync -f "$dir/tree"
    t1=$(now)
    # verify that the extracted tree matches the tarball (untimed)
    tar -df "$TARBALL" -C "$dir/tree" >&2
    rm -rf "$dir/tree"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

declare -A VALS=()   # "metric|target" -> space-separated per-round values
FAILURES=()
record() { # record ROUND METRIC TARGET VALUE
    VALS["$2|$3"]+="$4 "
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"
}

# run_test ROUND TARGET TESTFN METRIC... : runs TESTFN TARGET with errexit in
# force, records one figure per METRIC, or ERR for each if the test failed.
run_test() {
    local round=$1 t=$2 fn=$3 out rc i
    shift 3
    local metrics=("$@") vals=()
    set +e
    out=$(set -e; "$fn" "$t" 2>>"$LOGDIR/$t.test-errors.log")
    rc=$?
    set -e
    read -r -a vals <<<"$out"
    if [ "$rc" -ne 0 ] || [ "${#vals[@]}" -ne "${#metrics[@]}" ]; then
        log "round $round: $fn on $t FAILED (exit $rc); see $LOGDIR/$t.test-errors.log"
        tail -n 5 "$LOGDIR/$t.test-errors.log" | sed 's/^/    /' >&2
        FAILURES+=("round $round: $fn on $t (exit $rc)")
        for i in "${!metrics[@]}"; do record "$round" "${metrics[$i]}" "$t" ERR; done
        return 0
    fi
    for i in "${!metrics[@]}"; do record "$round" "${metrics[$i]}" "$t" "${vals[$i]}"; done
    log "round $round: $fn $t: $out"
}

# --- header ---------------------------------------------------------------------------
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
[ -n "$cpu_model" ] || cpu_model=$(uname -m)
git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || git_rev="$git_rev (+ uncommitted changes in src)"
if [ "$RAND_DIRECT" = 1 ]; then rand_mode="O_DIRECT"; else rand_mode="buffered, caches dropped first"; fi
# virtio-balloon free page reporting (feature bit 5) hands freed guest memory
# back to the host; touching it again is slow, which adds noise to tests that
# allocate a lot (sequential write). Say so in the header when it is on.
balloon_note=""
for dev in /sys/bus/virtio/drivers/virtio_balloon/virtio*; do
    [ -r "$dev/features" ] || continue
    if [ "$(cut -c6 "$dev/features")" = 1 ]; then
        balloon_note="; this VM has virtio-balloon free page reporting on, so memory freed between tests is faulted back in from the host (noise in the write figures)"
    fi
done
quick_note=""
if [ "$QUICK" = 1 ]; then quick_note="; QUICK mode (smaller sizes: figures are not comparable with a full run)"; fi
HEADER=$(cat <<EOF
- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')
- machine: $(nproc) CPUs ($cpu_model), $(awk '/^MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r), load average at start $(cut -d' ' -f1-3 /proc/loadavg)
- kmsfs: $("$BIN" --version) at git $git_rev, default mount options, local key file, 4096-byte blocks
- gocryptfs: $(gocryptfs --version 2>&1 | head -n1)
- fio: $(fio --version)
- backing store: tmpfs for all three targets; $ROUNDS round(s), interleaved with the order rotating each round, median shown$quick_note$balloon_note
- sizes: sequential ${SEQ_MB} MiB at bs=1M (write with end_fsync$([ "$WARMUP" = 1 ] && echo "; each after one unmeasured pass")); random 4 KiB over ${RAND_MB} MiB, ${RAND_RUNTIME} s each, psync, 1 job, $rand_mode; $NFILES files of $SMALL_SIZE B (caches dropped between phases); tar -x of $TAR_SRC ($TAR_MB MiB, $TAR_ENTRIES entries) + sync
EOF
)
echo "== kmsfs benchmark"
echo "$HEADER"

# --- the rounds -------------------------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
    # Rotate who goes first: on a VM the target that first touches memory
    # freed by the previous test can pay for the host faulting it back in.
    order=()
    for ((i = 0; i < ${#TARGETS[@]}; i++)); do
        order+=("${TARGETS[$(((i + round - 1) % ${#TARGETS[@]}))]}")
    done
    log "=== round $round/$ROUNDS (order: ${order[*]})"
    for t in "${order[@]}"; do run_test "$round" "$t" t_seqwrite seqwrite cpu_write; done
    for t in "${order[@]}"; do run_test "$round" "$t" t_seqread seqread cpu_read; done
    for t in "${order[@]}"; do run_test "$round" "$t" t_random randread randwrite; done
    for t in "${order[@]}"; do run_test "$round" "$t" t_small create stat read delete; done
    for t in "${order[@]}"; do run_test "$round" "$t" t_tar tar; done
done

# --- table --------------------------------------------------------------------------------
median() { # median of the numeric words in $1; "ERR" if none, "-" if all are "-"
    local nums
    nums=$(tr ' ' '\n' <<<"$1" | grep -E '^[0-9.eE+-]+$' | grep -vx -- '-' | sort -g) || true
    if [ -z "$nums" ]; then
        if tr ' ' '\n' <<<"$1" | grep -qx ERR; then echo ERR; else echo -; fi
        return
    fi
    awk '{ v[NR] = $1 } END { if (NR % 2) printf "%.6g", v[(NR + 1) / 2]; else printf "%.6g", (v[NR / 2] + v[NR / 2 + 1]) / 2 }' <<<"$nums"
}
fmt() { # fmt VALUE DECIMALS
    case "$1" in ERR|-) echo "$1" ;; *) awk -v v="$1" -v d="$2" 'BEGIN { printf "%.*f", d, v }' ;; esac
}

# metric | label | unit | better (high/low) | decimals | target speedup
ROWS=(
    "seqwrite|sequential write 1 MiB blocks|MiB/s|high|0|1.5"
    "seqread|sequential read 1 MiB blocks (cold cache)|MiB/s|high|0|1.5"
    "randread|random read 4 KiB|IOPS|high|0|1.2"
    "randwrite|random write 4 KiB|IOPS|high|0|1.2"
    "create|small files: create $NFILES × 1 KiB|s|low|3|1.0"
    "stat|small files: stat $NFILES|s|low|3|1.0"
    "read|small files: read $NFILES|s|low|3|1.0"
    "delete|small files: delete $NFILES|s|low|3|1.0"
    "tar|tar -x $(basename "$TAR_SRC") + sync|s|low|2|-"
    "cpu_write|daemon CPU per GiB written|s/GiB|low|2|1.25"
    "cpu_read|daemon CPU per GiB read|s/GiB|low|2|-"
)
TABLE="| test | unit | plain | gocryptfs | kmsfs | kmsfs vs gocryptfs (>1.0 = kmsfs better) | target | met |
|---|---|--:|--:|--:|--:|--:|:-:|"
met_count=0; miss_count=0
for row in "${ROWS[@]}"; do
    IFS='|' read -r metric label unit better dec target <<<"$row"
    p=$(median "${VALS[$metric|plain]:-}")
    g=$(median "${VALS[$metric|gocryptfs]:-}")
    k=$(median "${VALS[$metric|kmsfs]:-}")
    ratio=-; met=""
    if [[ "$g" =~ ^[0-9] && "$k" =~ ^[0-9] ]]; then
        if [ "$better" = high ]; then
            ratio=$(awk -v k="$k" -v g="$g" 'BEGIN { if (g > 0) printf "%.2f", k / g; else print "-" }')
        else
            ratio=$(awk -v k="$k" -v g="$g" 'BEGIN { if (k > 0) printf "%.2f", g / k; else print "-" }')
        fi
        if [ "$target" != - ] && [ "$ratio" != - ]; then
            if awk -v r="$ratio" -v t="$target" 'BEGIN { exit !(r >= t) }'; then
                met=yes; met_count=$((met_count + 1))
            else
                met=NO; miss_count=$((miss_count + 1))
            fi
        fi
    fi
    if [ "$better" = high ]; then arrow="higher is better; ratio kmsfs/gocryptfs"; else arrow="lower is better; ratio gocryptfs/kmsfs"; fi
    tgt=-; [ "$target" != - ] && tgt="≥$target"
    TABLE+="
| $label | $unit ($arrow) | $(fmt "$p" "$dec") | $(fmt "$g" "$dec") | $(fmt "$k" "$dec") | $ratio | $tgt | $met |"
done

NOTES="Ratios: every ratio is oriented so that >1.0 means kmsfs is better than gocryptfs (throughput and IOPS: kmsfs/gocryptfs; times and CPU: gocryptfs/kmsfs, a speedup). Targets are the project's goals (CPU per GiB written ≤0.8× gocryptfs = speedup ≥1.25); $met_count met, $miss_count missed. Plain has no daemon, so no CPU figure."
if [ "${#FAILURES[@]}" -gt 0 ]; then
    NOTES+="
Failed tests (recorded as ERR, excluded from medians): $(printf '%s; ' "${FAILURES[@]}")"
fi

# kmsfs health: counters and anything alarming the daemon logged
KSTATS=$("$BIN" stats "${MNT[kmsfs]}" --json 2>&1 | jq -c '{cache, handles, inodes, generate_data_key_calls: .provider_calls.generate_data_key.calls, decrypt_calls: .provider_calls.decrypt.calls, provider_errors: ([.provider_calls[].errors] | add)}' 2>/dev/null) \
    || KSTATS="(kmsfs stats failed)"

echo
echo "$TABLE"
echo
echo "$NOTES"
echo "kmsfs stats after the run: $KSTATS"

{
    echo "# kmsfs benchmark $STAMP"
    echo
    echo "$HEADER"
    echo
    echo "$TABLE"
    echo
    echo "$NOTES"
    echo
    echo "kmsfs stats after the run: \`$KSTATS\`"
    echo
    echo "Raw per-round figures: \`${RAW#"$ROOT"/}\`. Produced by \`scripts/bench.sh\`."
} >"$MD"

# --- optional sections ------------------------------------------------------------------------
# bench_section TITLE HEADING SCRIPT ARGS...: runs scripts/bench/SCRIPT, prints
# its table and appends it to the report under HEADING.
bench_section() {
    local title=$1 heading=$2 script=$3 out
    shift 3
    echo
    echo "== $title (scripts/bench/$script)"
    out=$(KMSFS_BIN=$BIN "scripts/bench/$script" "$@") || out="$script failed"
    echo "$out"
    printf '\n## %s\n\n%s\n' "$heading" "$out" >>"$MD"
}

if [ "${BENCH_KMS:-0}" = 1 ]; then
    bench_section "KMS: creating files with added KMS latency" "KMS latency and DEK pre-generation" kms.sh 2000 10
    bench_section "KMS: creating files on a branch-mode volume vs a local-key volume" \
        "Branch key mode against a local key" branch.sh 2000 10 3
fi

if [ "${BENCH_SHARED:-0}" = 1 ]; then
    bench_section "shared mode (-o shared) against the default mode" "Shared mode against the default mode" \
        shared.sh 512 3
fi

if [ "${BENCH_FSX:-0}" = 1 ]; then
    echo
    echo "== fsx soak on kmsfs ($FSX_OPS ops per profile)"
    fsx_rc=0
    mkdir -p "${MNT[kmsfs]}/fsx"
    FSX_LOGDIR=$LOGDIR/fsx FSX_TIMEOUT=${FSX_TIMEOUT:-14400} \
        scripts/harness/run-fsx.sh "${MNT[kmsfs]}/fsx/soak" "$FSX_OPS" 2>&1 | tee "$LOGDIR/fsx-soak.log" || fsx_rc=$?
    {
        printf '\n## fsx soak on kmsfs (%s ops per profile)\n\n' "$FSX_OPS"
        grep -E '^fsx\[' "$LOGDIR/fsx-soak.log" | sort -u | sed 's/^/- /' || echo "- no result lines (exit $fsx_rc)"
    } >>"$MD"
    [ "$fsx_rc" -eq 0 ] || FAILURES+=("fsx soak (exit $fsx_rc)")
fi

echo
# Unmount now (not only from the trap) so that whatever the daemons log at
# unmount is in their logs before we look; the trap still unmounts the tmpfs.
for t in gocryptfs kmsfs; do stop_daemon "$t" "${MNT[$t]}"; done
for t in gocryptfs kmsfs; do
    # strip ANSI colour codes, then keep what looks alarming
    issues=$(sed 's/\x1b\[[0-9;]*m//g' "$LOGDIR/$t.log" | grep -iE 'error|panic|warn|fail' || true)
    n=0; [ -n "$issues" ] && n=$(wc -l <<<"$issues")
    echo "$t daemon log: $n line(s) matching error/panic/warn/fail"
    printf '\n%s daemon log: %s line(s) matching error/panic/warn/fail\n' "$t" "$n" >>"$MD"
    if [ "$n" -gt 0 ]; then
        head -n 5 <<<"$issues" | sed 's/^/    /'
        { echo; echo '```'; head -n 5 <<<"$issues"; echo '```'; } >>"$MD"
    fi
done
find "$LOGDIR" -maxdepth 1 -type f -empty -delete

echo
echo "bench: table saved to ${MD#"$ROOT"/}; logs in ${LOGDIR#"$ROOT"/}"
if [ "${#FAILURES[@]}" -gt 0 ]; then
    log "${#FAILURES[@]} test(s) failed:"
    printf '    %s\n' "${FAILURES[@]}" >&2
    exit 1
fi
exit 0
