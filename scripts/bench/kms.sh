#!/usr/bin/env bash
# KMS benchmark: does DEK pre-generation hide KMS latency when files are
# created in bursts? Creates N files (default 2,000, 1 KiB each) on an
# aws-kms volume (moto behind the project's KMS proxy on 127.0.0.1), once
# with no added latency and once with 10 ms added to every KMS call, and
# prints the ratio (target: at most 1.3x). Also prints the KMS call budget.
#   scripts/bench/kms.sh [N] [LATENCY_MS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
N=${1:-2000}
LAT=${2:-10}
BIN=${KMSFS_BIN:-$ROOT/target/release/kmsfs}
[ -x "$BIN" ] || cargo build --release
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-kmsbench.XXXXXX")
MNT=$WORK/m
mkdir -p "$MNT"
# shellcheck source=scripts/bench/kms-lib.sh
. "$ROOT/scripts/bench/kms-lib.sh"

KEY=$(new_key)

run() { # run LATENCY -> prints seconds
    local lat=$1 vol=$WORK/vol-$1
    proxy "latency?ms=0" >/dev/null
    "$BIN" init "$vol" --kms-key "$KEY" >/dev/null 2>&1
    "$BIN" mount "$vol" "$MNT"
    proxy "latency?ms=$lat" >/dev/null
    proxy reset-counts >/dev/null
    local t0 t1
    t0=$(date +%s.%N)
    create_files "$MNT" "$N"
    t1=$(date +%s.%N)
    local gen
    gen=$(proxy counts | python3 -c 'import json,sys; print(json.load(sys.stdin).get("GenerateDataKey", 0))')
    "$BIN" unmount "$MNT"
    sleep 0.5
    echo "$(python3 -c "print($t1 - $t0)") $gen"
}

read -r base gen0 < <(run 0)
read -r slow gen1 < <(run "$LAT")
ratio=$(python3 -c "print($slow / $base)")
printf '| test | no added latency | +%s ms per KMS call | ratio | target |\n|---|--:|--:|--:|--:|\n' "$LAT"
printf '| create %s files of 1 KiB, s | %.2f | %.2f | %.2f | <= 1.3 |\n' "$N" "$base" "$slow" "$ratio"
printf '| GenerateDataKey calls | %s | %s | | N + look-ahead (64) |\n' "$gen0" "$gen1"
