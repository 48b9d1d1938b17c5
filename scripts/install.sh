#!/usr/bin/env bash
# Installs kmsfs system-wide: the binary in /usr/local/bin (mount.fuse3 runs
# it from a reset PATH for `mount -t fuse.kmsfs` and fstab), the systemd
# template unit, shell completions and the man page.
# The installed binary is stripped (~14 MB instead of ~95 MB); with
# --debug-info its debug info goes to PREFIX/lib/debug/.build-id/ for gdb.
#   scripts/install.sh [--prefix /usr/local] [--no-build] [--debug-info] [--no-unit]
# `cargo install --path .` works too (binary only, not stripped: set
# CARGO_PROFILE_RELEASE_STRIP=true to strip it).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=/usr/local
BUILD=1
DEBUG_INFO=0
UNIT=1
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) PREFIX=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --debug-info) DEBUG_INFO=1; shift ;;
        --no-unit) UNIT=0; shift ;;
        *) echo "usage: $0 [--prefix DIR] [--no-build] [--debug-info] [--no-unit]" >&2; exit 2 ;;
    esac
done
[ "$BUILD" = 1 ] && cargo build --release
BIN=${CARGO_TARGET_DIR:-target}/release/kmsfs
install -D -m 0755 -s "$BIN" "$PREFIX/bin/kmsfs"
if [ "$DEBUG_INFO" = 1 ]; then
    # gdb finds it by the binary's build ID.
    id=$(readelf -n "$BIN" | sed -n 's/.*Build ID: *//p')
    if [ -n "$id" ]; then
        dbg=$(mktemp)
        objcopy --only-keep-debug "$BIN" "$dbg"
        install -D -m 0644 "$dbg" "$PREFIX/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
        rm -f "$dbg"
    fi
fi
"$BIN" completions bash | install -D -m 0644 /dev/stdin "$PREFIX/share/bash-completion/completions/kmsfs"
"$BIN" completions zsh | install -D -m 0644 /dev/stdin "$PREFIX/share/zsh/site-functions/_kmsfs"
"$BIN" completions fish | install -D -m 0644 /dev/stdin "$PREFIX/share/fish/vendor_completions.d/kmsfs.fish"
"$BIN" manpage | gzip -9n | install -D -m 0644 /dev/stdin "$PREFIX/share/man/man1/kmsfs.1.gz"
if [ "$UNIT" = 1 ] && [ -d /etc/systemd/system ]; then
    sed "s|/usr/local/bin/kmsfs|$PREFIX/bin/kmsfs|" scripts/kmsfs@.service |
        install -D -m 0644 /dev/stdin /etc/systemd/system/kmsfs@.service
    install -d -m 0700 /etc/kmsfs
    command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
fi
echo "installed $PREFIX/bin/kmsfs ($("$PREFIX/bin/kmsfs" --version))"
