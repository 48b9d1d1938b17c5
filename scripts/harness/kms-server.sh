#!/usr/bin/env bash
# Local KMS for tests: moto_server behind scripts/harness/kms-proxy.py.
#
#   scripts/harness/kms-server.sh start STATEDIR   start both, write STATEDIR/env
#   scripts/harness/kms-server.sh stop STATEDIR    stop exactly the PIDs it started
#   scripts/harness/kms-server.sh status STATEDIR
#
# Then: . STATEDIR/env && cargo test --test aws_kms
#
# Needs only python3 with pip. moto is used from the current python if it is
# the pinned version, else installed with `pip --target` into a private
# directory (works on Debian 12, whose system python refuses plain installs).
set -euo pipefail

MOTO_VERSION=5.2.1
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOTO_HOME=${KMSFS_MOTO_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/kmsfs/moto-$MOTO_VERSION}

die() { echo "kms-server: $*" >&2; exit 1; }
usage() { die "usage: $0 start|stop|status STATEDIR"; }

[ $# -eq 2 ] || usage
cmd=$1
state=$2

# Is PID alive and the process we started (guards against PID reuse)?
ours() {
    local pid=$1 pat=$2
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pat"
}

stop_one() {
    local file=$1 pat=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if ours "$pid" "$pat"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$file"
}

do_stop() {
    stop_one "$state/proxy.pid" kms-proxy.py
    stop_one "$state/moto.pid" moto.server
    rm -f "$state/env" "$state/proxy.port" "$state/moto.port"
}

# Sets MOTO_PYTHONPATH so that `$PY -m moto.server` runs the pinned moto.
ensure_moto() {
    MOTO_PYTHONPATH=
    if "$PY" - "$MOTO_VERSION" <<'EOF' 2>/dev/null
import sys, moto, moto.server, flask, flask_cors  # server extras present
sys.exit(0 if moto.__version__ == sys.argv[1] else 1)
EOF
    then
        return 0
    fi
    if [ ! -f "$MOTO_HOME/.complete" ]; then
        echo "kms-server: installing moto[server]==$MOTO_VERSION into $MOTO_HOME" >&2
        rm -rf "$MOTO_HOME"
        mkdir -p "$MOTO_HOME"
        "$PY" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            --target "$MOTO_HOME" "moto[server]==$MOTO_VERSION" ||
            die "pip could not install moto[server]==$MOTO_VERSION"
        touch "$MOTO_HOME/.complete"
    fi
    MOTO_PYTHONPATH=$MOTO_HOME
}

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until a KMS ListKeys through URL answers 200 (moto routes on the
# credential scope, so a fake unsigned Authorization header is enough).
wait_kms() {
    local url=$1 pid=$2 what=$3
    "$PY" - "$url" "$pid" "$what" <<'EOF' || return 1
import json, os, sys, time, urllib.request
url, pid, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 60
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"kms-server: {what} exited during start-up")
    req = urllib.request.Request(url + "/", data=b"{}", method="POST", headers={
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "TrentService.ListKeys",
        "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/kms/aws4_request, "
                         "SignedHeaders=host, Signature=0",
    })
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            if r.status == 200 and "Keys" in json.loads(r.read()):
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(f"kms-server: {what} did not answer KMS ListKeys at {url} within 60 s")
EOF
}

do_start() {
    mkdir -p "$state"
    state=$(cd "$state" && pwd)
    if ours "$(cat "$state/moto.pid" 2>/dev/null)" moto.server ||
        ours "$(cat "$state/proxy.pid" 2>/dev/null)" kms-proxy.py; then
        die "already running for $state (stop it first: $0 stop $state)"
    fi
    do_stop
    command -v "$PY" >/dev/null || die "python3 not found"
    ensure_moto

    local mport pport
    mport=$(free_port)
    PYTHONPATH=$MOTO_PYTHONPATH${PYTHONPATH:+:$PYTHONPATH} nohup "$PY" -m moto.server \
        -H 127.0.0.1 -p "$mport" >"$state/moto.log" 2>&1 </dev/null &
    echo $! >"$state/moto.pid"
    echo "$mport" >"$state/moto.port"
    wait_kms "http://127.0.0.1:$mport" "$(cat "$state/moto.pid")" moto_server ||
        { tail -20 "$state/moto.log" >&2; do_stop; exit 1; }

    # The proxy binds a free port itself and reports it: no race on the port.
    nohup "$PY" "$HERE/kms-proxy.py" --upstream "http://127.0.0.1:$mport" --port 0 \
        --port-file "$state/proxy.port" >"$state/proxy.log" 2>&1 </dev/null &
    echo $! >"$state/proxy.pid"
    for _ in $(seq 100); do
        [ -s "$state/proxy.port" ] && break
        sleep 0.1
    done
    [ -s "$state/proxy.port" ] || { cat "$state/proxy.log" >&2; do_stop; die "proxy did not start"; }
    pport=$(cat "$state/proxy.port")
    wait_kms "http://127.0.0.1:$pport" "$(cat "$state/proxy.pid")" kms-proxy ||
        { tail -20 "$state/proxy.log" >&2; do_stop; exit 1; }

    # Empty config files keep the user's ~/.aws out of the tests.
    : >"$state/aws-config"
    : >"$state/aws-credentials"
    cat >"$state/env" <<EOF
# Written by scripts/harness/kms-server.sh start; source it before the KMS tests.
export AWS_ENDPOINT_URL_KMS=http://127.0.0.1:$pport
export KMSFS_TEST_KMS_PROXY=http://127.0.0.1:$pport
export KMSFS_TEST_MOTO=http://127.0.0.1:$mport
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_EC2_METADATA_DISABLED=true
export AWS_CONFIG_FILE=$state/aws-config
export AWS_SHARED_CREDENTIALS_FILE=$state/aws-credentials
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL
EOF
    echo "kms-server: moto on 127.0.0.1:$mport, proxy on 127.0.0.1:$pport; run: . $state/env" >&2
}

do_status() {
    local rc=0
    if ours "$(cat "$state/moto.pid" 2>/dev/null)" moto.server; then
        echo "moto_server running (pid $(cat "$state/moto.pid"), port $(cat "$state/moto.port" 2>/dev/null))"
    else
        echo "moto_server not running"; rc=1
    fi
    if ours "$(cat "$state/proxy.pid" 2>/dev/null)" kms-proxy.py; then
        echo "kms-proxy running (pid $(cat "$state/proxy.pid"), port $(cat "$state/proxy.port" 2>/dev/null))"
    else
        echo "kms-proxy not running"; rc=1
    fi
    return $rc
}

case $cmd in
start) do_start ;;
stop) [ -d "$state" ] && do_stop; true ;;
status) do_status ;;
*) usage ;;
esac
