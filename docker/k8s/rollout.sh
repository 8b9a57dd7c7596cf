#!/usr/bin/env bash
# Roll a new model version across every replica by repository swap, one pod at a time:
#   1. the export job has written the new version next to the serving one in the shared repository
#      (encoder/<n+1>/ with its manifest), and its gate passed;
#   2. each pod is told to (re)load the ensembles, which loads the new encoder version; readiness is
#      checked before moving to the next pod, so at most one replica is switching at any time.
# Loading the ensembles (not the encoder alone) avoids Triton unloading an ensemble whose composing model
# is reloaded. Needs: kubectl, curl, TRITON_ADMIN_KEY.
set -euo pipefail
: "${TRITON_ADMIN_KEY:?set TRITON_ADMIN_KEY}"
namespace="${NAMESPACE:-default}"
for pod in $(kubectl -n "$namespace" get pods -l app=triton -o jsonpath='{.items[*].metadata.name}'); do
    echo "reloading on $pod"
    for model in embed score; do
        kubectl -n "$namespace" exec "$pod" -- curl -sf -X POST \
            -H "triton-admin-key: ${TRITON_ADMIN_KEY}" "http://127.0.0.1:8000/v2/repository/models/${model}/load"
    done
    kubectl -n "$namespace" exec "$pod" -- curl -sf "http://127.0.0.1:8000/v2/health/ready" >/dev/null
    kubectl -n "$namespace" exec "$pod" -- curl -sf "http://127.0.0.1:8000/v2/models/encoder/config" \
        | python3 -c 'import json,sys; p=json.load(sys.stdin)["parameters"]; print("  serving", p["export_variant"]["string_value"], p["export_manifest_sha256"]["string_value"][:12])'
done
