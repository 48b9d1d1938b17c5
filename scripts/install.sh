#!/usr/bin/env bash
# Installs kmsfs system-wide: the binary in /usr/local/bin (mount.fuse3 runs
# it from a reset PATH for `mount -t fuse.kmsfs` and fstab), the systemd
# template unit, shell completions and the man page.
#   scripts/install.sh [--prefix /usr/local] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=/usr/local
BUILD=1
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) PREFIX=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) echo "usage: $0 [--prefix DIR] [--no-build]" >&2; exit 2 ;;
    esac
done
[ "$BUILD" = 1 ] && cargo build --release
BIN=target/release/kmsfs
install -D -m 0755 "$BIN" "$PREFIX/bin/kmsfs"
"$BIN" completions bash | install -D -m 0644 /dev/stdin "$PREFIX/share/bash-completion/completions/kmsfs"
"$BIN" completions zsh | install -D -m 0644 /dev/stdin "$PREFIX/share/zsh/site-functions/_kmsfs"
"$BIN" completions fish | install -D -m 0644 /dev/stdin "$PREFIX/share/fish/vendor_completions.d/kmsfs.fish"
"$BIN" manpage | gzip -9n | install -D -m 0644 /dev/stdin "$PREFIX/share/man/man1/kmsfs.1.gz"
if [ -d /etc/systemd/system ]; then
    sed "s|/usr/local/bin/kmsfs|$PREFIX/bin/kmsfs|" scripts/kmsfs@.service |
        install -D -m 0644 /dev/stdin /etc/systemd/system/kmsfs@.service
    install -d -m 0700 /etc/kmsfs
    command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
fi
echo "installed $PREFIX/bin/kmsfs ($("$PREFIX/bin/kmsfs" --version))"
