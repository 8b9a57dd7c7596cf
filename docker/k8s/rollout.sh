#!/usr/bin/env bash
# Roll a new encoder version out to every Triton pod sharing the repository volume, with no failed request:
# `python -m bert_recsys.rollout` (rollout/steps.py) stages and validates the export, changes the shared repository once,
# and loads on each pod in turn (one pod switching at a time), then canaries, promotes or rolls back.
#   NEW=/work/export/onnx-fp32 REPOSITORY=/models/repository NAMESPACE=prod docker/k8s/rollout.sh
# Runs where the project's venv is and the repository volume is mounted at $REPOSITORY (an ops pod or a Job
# with the PVC), with the pods' IPs reachable. Needs: kubectl, TRITON_ADMIN_KEY (the triton-admin Secret's key).
# The ready pods are listed again every few seconds into a file the rollout re-reads before every step, so
# pods the HPA adds while the rollout runs get every later load too.
set -euo pipefail
: "${TRITON_ADMIN_KEY:?set TRITON_ADMIN_KEY}"
: "${NEW:?set NEW to the export variant directory to roll out}"
namespace="${NAMESPACE:-default}"
replicas_file="$(mktemp)"
ready_pods() {
    # One "IP:8001,IP:8002" line per pod whose Ready condition is True.
    kubectl -n "$namespace" get pods -l app=triton -o \
        jsonpath='{range .items[*]}{.status.podIP}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
        awk '$2 == "True" && $1 != "" {print $1 ":8001," $1 ":8002"}'
}
refresh() {
    ready_pods > "${replicas_file}.next" && mv "${replicas_file}.next" "$replicas_file"
}
refresh
if [[ ! -s "$replicas_file" ]]; then
    echo "no ready pods with label app=triton in namespace ${namespace}" >&2
    rm -f "$replicas_file"
    exit 1
fi
(while sleep "${REFRESH_SECONDS:-5}"; do refresh || true; done) &
refresher=$!
trap 'kill "$refresher" 2>/dev/null; rm -f "$replicas_file" "${replicas_file}.next"' EXIT
python -m bert_recsys.rollout --repository "${REPOSITORY:-/models/repository}" --replicas-file "$replicas_file" run "${NEW}" "$@"
