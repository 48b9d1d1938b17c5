# Sourced by the KMS benchmarks (kms.sh, branch.sh), after they set ROOT, BIN,
# WORK and MNT: a private KMS harness for the run (stopped, with the mount,
# on exit), raw KMS calls, the proxy's control API and the create workload.
# shellcheck shell=bash

kms_cleanup() {
    if grep -q " $MNT " /proc/mounts; then "$BIN" unmount "$MNT" || fusermount3 -uz "$MNT" || true; fi
    "$ROOT/scripts/harness/kms-server.sh" stop "$WORK/kms" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap kms_cleanup EXIT
"$ROOT/scripts/harness/kms-server.sh" start "$WORK/kms" >/dev/null
# shellcheck disable=SC1091
. "$WORK/kms/env"

kms() { # kms OPERATION JSON -> response (moto needs only a KMS-scoped Authorization header)
    curl -sf -X POST "$AWS_ENDPOINT_URL_KMS/" -H "X-Amz-Target: TrentService.$1" \
        -H 'Content-Type: application/x-amz-json-1.1' \
        -H 'Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0' \
        -d "$2"
}
proxy() { curl -sf "$KMSFS_TEST_KMS_PROXY/__proxy/$1"; }
new_key() { kms CreateKey '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["KeyMetadata"]["KeyId"])'; }

create_files() { # create_files DIR N: N files of 1 KiB, then sync
    python3 - "$1" "$2" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
data = b"x" * 1024
for i in range(n):
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(data)
PY
    sync
}
