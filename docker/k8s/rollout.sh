#!/usr/bin/env bash
# Roll a new encoder version out to every Triton pod sharing the repository volume, with no failed request:
# `python -m rollout` (rollout/steps.py) stages and validates the export, changes the shared repository once,
# and loads on each pod in turn (one pod switching at a time), then canaries, promotes or rolls back.
#   NEW=/work/export/onnx-fp32 REPOSITORY=/models/repository NAMESPACE=prod docker/k8s/rollout.sh
# Runs where the project's venv is and the repository volume is mounted at $REPOSITORY (an ops pod or a Job
# with the PVC), with the pods' IPs reachable. Needs: kubectl, TRITON_ADMIN_KEY.
set -euo pipefail
: "${TRITON_ADMIN_KEY:?set TRITON_ADMIN_KEY}"
: "${NEW:?set NEW to the export variant directory to roll out}"
namespace="${NAMESPACE:-default}"
replicas=()
for ip in $(kubectl -n "$namespace" get pods -l app=triton -o jsonpath='{.items[*].status.podIP}'); do
    replicas+=(--replica "${ip}:8001,${ip}:8002")
done
if [[ ${#replicas[@]} -eq 0 ]]; then
    echo "no pods with label app=triton in namespace ${namespace}" >&2
    exit 1
fi
exec python -m rollout --repository "${REPOSITORY:-/models/repository}" "${replicas[@]}" run "${NEW}" "$@"
