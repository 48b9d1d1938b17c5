#!/usr/bin/env bash
# Shared mode (-o shared) against the default mode, on one local-key volume
# on a scratch tmpfs, interleaved over ROUNDS rounds (default 3): sequential
# write and cold read of SIZE MiB (default 512, 1 MiB blocks), and random
# 4 KiB writes then reads (fio psync, 15 s each). Prints the medians and the
# ratio shared/default (>1.0 = shared is slower for times, faster for rates).
#   sudo scripts/bench/shared.sh [SIZE_MIB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SIZE=${1:-512}
ROUNDS=${2:-3}
BIN=${KMSFS_BIN:-$ROOT/target/release/kmsfs}
[ "$(id -u)" -eq 0 ] || { echo "shared.sh: needs root (tmpfs, drop_caches)" >&2; exit 1; }
[ -x "$BIN" ] || cargo build --release
command -v fio >/dev/null || { echo "shared.sh: needs fio (scripts/install-deps.sh --for bench)" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-sharedbench.XXXXXX")
MNT=$WORK/m
mkdir -p "$WORK/t"
mount -t tmpfs -o size=$((SIZE * 3 + 256))M tmpfs "$WORK/t"
cleanup() {
    if grep -q " $MNT " /proc/mounts; then "$BIN" unmount "$MNT" >/dev/null 2>&1 || fusermount3 -uz "$MNT" || true; fi
    umount "$WORK/t" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
export KMSFS_TRUST_DIR=$WORK/trust
mkdir -p "$MNT"
"$BIN" init "$WORK/t/cipher" --key-file "$WORK/vol.key" >/dev/null 2>&1

fio_rate() { # fio_rate JOBARGS... -> MiB/s or IOPS from fio's JSON
    fio --output-format=json "$@" 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
w, r = j["write"], j["read"]
x = w if w["io_bytes"] > 0 else r
print(x["bw_bytes"] / 2**20 if sys.argv[1] == "bw" else x["iops"])' "$KIND"
}

run() { # run default|shared -> "write_MiBs read_MiBs randwrite_iops randread_iops"
    local opts=()
    [ "$1" = shared ] && opts=(-o shared)
    "$BIN" mount "$WORK/t/cipher" "$MNT" "${opts[@]}"
    rm -f "$MNT/seq" "$MNT/rand"
    local w r rw rr
    KIND=bw w=$(KIND=bw fio_rate --name=w --filename="$MNT/seq" --rw=write --bs=1M --size="${SIZE}M" --end_fsync=1)
    echo 3 >/proc/sys/vm/drop_caches
    KIND=bw r=$(KIND=bw fio_rate --name=r --filename="$MNT/seq" --rw=read --bs=1M --size="${SIZE}M")
    rw=$(KIND=iops fio_rate --name=rw --filename="$MNT/rand" --rw=randwrite --bs=4k --size=64M \
        --ioengine=psync --time_based --runtime=15)
    rr=$(KIND=iops fio_rate --name=rr --filename="$MNT/rand" --rw=randread --bs=4k --size=64M \
        --ioengine=psync --time_based --runtime=15)
    "$BIN" unmount "$MNT" >/dev/null
    sleep 0.3
    echo "$w $r $rw $rr"
}

declare -A all
for i in $(seq 1 "$ROUNDS"); do
    for mode in default shared; do
        read -r w r rw rr < <(run "$mode")
        all[$mode,w]+="$w " all[$mode,r]+="$r " all[$mode,rw]+="$rw " all[$mode,rr]+="$rr "
        echo "round $i $mode: write $w MiB/s, read $r MiB/s, randwrite $rw IOPS, randread $rr IOPS" >&2
    done
done
med() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| test | default | shared | shared/default |"
echo "|---|--:|--:|--:|"
for t in w:"sequential write 1 MiB (MiB/s)" r:"sequential read 1 MiB, cold (MiB/s)" \
    rw:"random write 4 KiB (IOPS)" rr:"random read 4 KiB (IOPS)"; do
    k=${t%%:*} label=${t#*:}
    d=$(med "${all[default,$k]}") s=$(med "${all[shared,$k]}")
    printf '| %s | %.0f | %.0f | %.2f |\n' "$label" "$d" "$s" "$(python3 -c "print($s / $d if $d else 0)")"
done
