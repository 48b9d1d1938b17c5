#!/usr/bin/env bash
# Branch key mode benchmark: creates N files (default 2,000, 1 KiB each) on
# an aws-kms volume in branch key mode (moto behind the project's KMS proxy
# on 127.0.0.1, +LATENCY_MS per KMS call, default 10) and on a local-key
# volume, interleaved over ROUNDS rounds (default 3), and prints the medians,
# the speed ratio (local time / branch time; goal >= 0.8) and the KMS calls
# each branch-mode run made (mount and creates).
#   scripts/bench/branch.sh [N] [LATENCY_MS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
N=${1:-2000}
LAT=${2:-10}
ROUNDS=${3:-3}
BIN=${KMSFS_BIN:-$ROOT/target/release/kmsfs}
[ -x "$BIN" ] || cargo build --release
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-branchbench.XXXXXX")
MNT=$WORK/m
mkdir -p "$MNT"
# shellcheck source=scripts/bench/kms-lib.sh
. "$ROOT/scripts/bench/kms-lib.sh"
export KMSFS_TRUST_DIR=$WORK/trust
total_calls() { proxy counts | python3 -c 'import json,sys; print(sum(v for v in json.load(sys.stdin).values() if isinstance(v, int)))'; }

KEY=$(new_key)

run() { # run branch|local ROUND -> prints "seconds mount_calls create_calls"
    local mode=$1 vol=$WORK/vol-$1-$2
    proxy "latency?ms=0" >/dev/null
    if [ "$mode" = branch ]; then
        "$BIN" init "$vol" --kms-key "$KEY" --key-mode branch >/dev/null 2>&1
    else
        "$BIN" init "$vol" --key-file "$WORK/key-$2" >/dev/null 2>&1
    fi
    proxy "latency?ms=$LAT" >/dev/null
    proxy reset-counts >/dev/null
    "$BIN" mount "$vol" "$MNT"
    local c0 t0 t1 c1
    c0=$(total_calls)
    t0=$(date +%s.%N)
    create_files "$MNT" "$N"
    t1=$(date +%s.%N)
    c1=$(total_calls)
    "$BIN" unmount "$MNT"
    sleep 0.3
    echo "$(python3 -c "print($t1 - $t0)") $c0 $((c1 - c0))"
}

b=() l=()
for r in $(seq 1 "$ROUNDS"); do
    read -r tb mb cb < <(run branch "$r")
    read -r tl _ _ < <(run local "$r")
    b+=("$tb") l+=("$tl")
    echo "round $r: branch ${tb} s (mount $mb KMS calls, creates $cb), local ${tl} s" >&2
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mb_=$(med "${b[@]}") ml_=$(med "${l[@]}")
ratio=$(python3 -c "print($ml_ / $mb_)")
printf '| test (+%s ms per KMS call, median of %s) | branch-mode aws-kms | local key | speed vs local | goal |\n|---|--:|--:|--:|--:|\n' "$LAT" "$ROUNDS"
printf '| create %s files of 1 KiB, s | %.2f | %.2f | %.2fx | >= 0.8x |\n' "$N" "$mb_" "$ml_" "$ratio"
printf '| KMS calls: mount / %s creates (last round) | %s / %s | 0 | | |\n' "$N" "$mb" "$cb"
