#!/usr/bin/env bash
# Install what kmsfs needs to build, run, test and benchmark. Idempotent: it
# installs only what is missing (one `apt-get update`, only when needed) and
# skips crates.io tools already present at the pinned version.
#
#   scripts/install-deps.sh [--for quickstart|test|bench|all]   (default: all)
#
#   quickstart  build toolchain pieces + fuse3 (fusermount3)
#   test        + attr, rsync, sqlite3, git, pip (moto for the KMS harness),
#                 pjdfstest and fsx from crates.io
#   bench       + fio, gocryptfs (comparison baseline), rsync, sqlite3, git
#
# Environment: CARGO_BUILD_JOBS limits parallelism of the `cargo install` builds.
set -euo pipefail
cd "$(dirname "$0")/.."

PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2

purpose=all
while [ $# -gt 0 ]; do
    case "$1" in
        --for) purpose="${2:-}"; shift 2 ;;
        --for=*) purpose="${1#--for=}"; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install-deps: unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$purpose" in
    quickstart|test|bench|all) ;;
    *) echo "install-deps: --for must be quickstart, test, bench or all (got '$purpose')" >&2; exit 2 ;;
esac

log() { echo "install-deps: $*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
        log "not root and no sudo: apt installs will fail if anything is missing" >&2
    fi
fi

# --- apt -------------------------------------------------------------------
apt_pkgs=(build-essential pkg-config fuse3)
case "$purpose" in
    test) apt_pkgs+=(attr rsync sqlite3 git libacl1-dev systemd) ;;
    bench) apt_pkgs+=(fio gocryptfs rsync sqlite3 git) ;;
    all) apt_pkgs+=(attr rsync sqlite3 git libacl1-dev systemd fio gocryptfs) ;;
esac
# pip is needed by scripts/harness/kms-server.sh (moto); only ask apt if pip is absent.
if [ "$purpose" = test ] || [ "$purpose" = all ]; then
    if ! python3 -m pip --version >/dev/null 2>&1 && ! command -v pip3 >/dev/null 2>&1; then
        apt_pkgs+=(python3-pip)
    fi
fi

missing=()
for p in "${apt_pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "apt: all present (${apt_pkgs[*]})"
fi

# --- Rust toolchain ----------------------------------------------------------
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install a Rust toolchain (>= 1.85, edition 2024) via rustup first" >&2
    exit 1
fi
if [ "$purpose" = test ] || [ "$purpose" = all ]; then
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            log "rustup: adding rustfmt and clippy"
            rustup component add rustfmt clippy
        else
            log "warning: cargo fmt / cargo clippy missing and no rustup" >&2
        fi
    fi
fi

# --- crates.io tools -----------------------------------------------------------
cargo_tool() { # name version
    local name=$1 version=$2
    if cargo install --list 2>/dev/null | grep -qx "$name v$version:"; then
        log "cargo: $name $version already installed"
        return 0
    fi
    log "cargo: installing $name $version"
    cargo install --locked --quiet "$name" --version "=$version"
}
if [ "$purpose" = test ] || [ "$purpose" = all ]; then
    cargo_tool pjdfstest "$PJDFSTEST_VERSION"
    cargo_tool fsx "$FSX_VERSION"
fi

log "done ($purpose)"
