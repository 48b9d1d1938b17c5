#!/usr/bin/env bash
# The local KMS for tests now lives in scripts/harness/kms-server.sh; this
# path stays because notes and older commands name it.
exec "$(dirname "$0")/harness/kms-server.sh" "$@"
