#!/usr/bin/env bash
# Quick start: build kmsfs and mount a demo volume with a local key file.
#
#   ./scripts/quickstart.sh
#
# Creates (once) ./demo/cipher (encrypted files) with key ./demo/kmsfs.key and
# mounts the plaintext view at ./demo/plain.  Running it again is harmless: an
# existing volume is reused and an existing mount is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

scripts/install-deps.sh --for quickstart
echo "quickstart: cargo build --release"
cargo build --release
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/kmsfs
[ -x "$BIN" ] || { echo "quickstart: no binary at $BIN" >&2; exit 1; }

DEMO=$ROOT/demo
CIPHER=$DEMO/cipher
PLAIN=$DEMO/plain
KEY=$DEMO/kmsfs.key
mkdir -p "$CIPHER" "$PLAIN"

is_mounted() { # exact mount-point match in /proc/mounts (octal-escaped)
    local m
    m=$(printf '%s' "$1" | sed -e 's/\\/\\134/g' -e 's/ /\\040/g' -e 's/\t/\\011/g')
    awk -v m="$m" '$2 == m { found = 1 } END { exit !found }' /proc/mounts
}

if [ -z "$(ls -A "$CIPHER")" ]; then
    if [ -e "$KEY" ]; then
        echo "quickstart: $KEY exists but $CIPHER is empty; move the old key away first" >&2
        exit 1
    fi
    echo "quickstart: creating a volume in demo/cipher (key file demo/kmsfs.key)"
    "$BIN" init "$CIPHER" --key-file "$KEY"
else
    echo "quickstart: reusing the existing volume in demo/cipher"
fi

if is_mounted "$PLAIN" && ! stat "$PLAIN" >/dev/null 2>&1; then
    echo "quickstart: demo/plain is a dead mount; unmounting it"
    fusermount3 -u "$PLAIN" 2>/dev/null || fusermount3 -uz "$PLAIN"
fi
if is_mounted "$PLAIN"; then
    echo "quickstart: demo/plain is already mounted"
else
    echo "quickstart: mounting demo/cipher at demo/plain"
    "$BIN" mount "$CIPHER" "$PLAIN" --key-file "$KEY"
fi

cat <<EOF

kmsfs is mounted. Files you put in demo/plain are stored encrypted in demo/cipher:

    echo hello > demo/plain/hello.txt
    cat demo/plain/hello.txt        # hello
    ls -l demo/cipher               # encrypted names; each file = header + encrypted blocks
    target/release/kmsfs inspect "\$(target/release/kmsfs path demo/cipher hello.txt)"   # header, no KMS call

The key is demo/kmsfs.key (keep it outside the cipher dir; without it the data
is unreadable). Unmount with:

    target/release/kmsfs unmount demo/plain

Run ./scripts/quickstart.sh again to remount the same volume.
EOF
