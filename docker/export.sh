#!/usr/bin/env bash
# One-shot export job: every variant (TensorRT included), gated, then the native repository in /models.
#   MODEL_DIR         the fine-tuned BERT (default: all-MiniLM-L6-v2 from the image)
#   SERVE_VARIANT     which variant the repository serves (default trt-fp16)
#   CALIBRATION_FILE  text for trt-int8 / static INT8 (optional; trt-int8 is skipped without it)
set -euo pipefail
variants="onnx-fp32,onnx-fp16,onnx-int8,trt-fp16"
extra=()
if [[ -n "${CALIBRATION_FILE:-}" ]]; then
    variants="${variants},trt-int8"
    extra+=(--calibration-file "${CALIBRATION_FILE}")
fi
python3 -m bert_recsys.export ${MODEL_DIR:+--model "$MODEL_DIR"} --variants "${variants}" "${extra[@]}" ${STS_DEV:+--sts "$STS_DEV"}
python3 -m bert_recsys.model_repository build --runtime native --variant "${SERVE_VARIANT:-trt-fp16}" --out /models/repository
