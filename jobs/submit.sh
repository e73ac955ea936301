#!/usr/bin/env bash
# Submit an ftdist training job to a Ray cluster:
#   jobs/submit.sh jobs/configs/tiny-ray.yaml [--set key=value ...]
# RAY_ADDRESS picks the cluster's dashboard (default http://127.0.0.1:8265).
set -euo pipefail
cd "$(dirname "$0")/.."
# Ray 2.60 clusters require a token (from ~/.ray/auth_token or RAY_AUTH_TOKEN) by default.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
config="$1"; shift
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
    --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- ftdist train "$config" "$@"
