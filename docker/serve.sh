#!/usr/bin/env bash
# Container entrypoint: tritonserver on the mounted repository, explicit model control, admin APIs keyed.
# Inside the container it listens on all interfaces (port publishing needs it); compose and Kubernetes
# decide what is reachable from outside. The admin key is required: no key, no start.
set -euo pipefail
: "${TRITON_ADMIN_KEY:?set TRITON_ADMIN_KEY: it guards the model-repository, shared-memory, trace and logging APIs}"
restricted="model-repository,shared-memory,trace,logging:triton-admin-key=${TRITON_ADMIN_KEY}"
exec tritonserver \
    --model-repository="${MODEL_REPOSITORY:-/models}" \
    --model-control-mode=explicit --load-model='*' \
    --strict-readiness=true \
    --http-restricted-api="${restricted}" \
    --grpc-restricted-protocol="${restricted}" \
    --metrics-port=8002 --allow-metrics=true --allow-gpu-metrics=true \
    "$@"
