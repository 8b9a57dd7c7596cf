"""One peer, measured inside its own venv: `python worker.py REQUEST.json`.

Runs under a peer's interpreter (build/peers/<venv>/bin/python), so it imports nothing of this project: only the
peer's own packages, numpy and the standard library. bench/peers/harness.py writes the request and reads back:
- RESULT (the request's `out`): JSON with the peer's versions and per-call seconds at b1 and b32;
- sts.npy, gate_batched.npy, gate_alone.npy beside it: the vectors the harness scores (STS-B Spearman, batch
  invariance) the same way for every peer.
With `"duel": true` in the request it measures nothing by itself: it loads the peer, says "ready" on stdout, and
then times blocks of b1 or b32 calls on demand (`duel`), so the harness can interleave them with its own served
calls.

Every call it times goes from text to vectors, tokenization included, on all of the machine's threads.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

def log(message: str) -> None:
    print(time.strftime("%Y-%m-%dT%H:%M:%S"), "peer", message, file=sys.stderr, flush=True)


def isa_config_name() -> str:
    """sentence-transformers' dynamic-INT8 config for this CPU's ISA (its own helper names: avx512_vnni, avx512,
    avx2, arm64)."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "arm64"


def dynamic_int8_file(folder: Path, config: str) -> str | None:
    """The file sentence-transformers' export_dynamic_quantized_onnx_model wrote for `config`, relative to `folder`.

    It names it model_<weights dtype>_<config>.onnx, and the dtype depends on the config: qint8 for avx512_vnni,
    quint8 for avx2 (optimum's AutoQuantizationConfig), so the name is found, not assumed."""
    found = sorted((folder / "onnx").glob(f"model_*int8_{config}.onnx"))
    return f"onnx/{found[0].name}" if found else None


# -- sentence-transformers backends ---------------------------------------------------------------------------------

def st_model(request: dict):
    from sentence_transformers import SentenceTransformer

    peer, model_dir, work = request["peer"], request["model"], Path(request["work"])
    if peer == "st-torch":
        model = SentenceTransformer(model_dir, device="cpu", backend="torch")
    elif peer == "st-onnx":
        model = SentenceTransformer(model_dir, device="cpu", backend="onnx")
    elif peer == "st-onnx-qint8":
        from sentence_transformers import export_dynamic_quantized_onnx_model

        config = isa_config_name()
        target = work / "st-onnx"
        file_name = dynamic_int8_file(target, config)
        if file_name is None:
            SentenceTransformer(model_dir, device="cpu", backend="onnx").save(str(target))
            export_dynamic_quantized_onnx_model(SentenceTransformer(str(target), device="cpu", backend="onnx"),
                                                config, str(target))
            file_name = dynamic_int8_file(target, config)
            if file_name is None:
                raise SystemExit(f"sentence-transformers wrote no onnx/model_*int8_{config}.onnx under {target}")
        model = SentenceTransformer(str(target), device="cpu", backend="onnx", model_kwargs={"file_name": file_name})
        request["details"] = {"quantization": f"ONNX Runtime dynamic INT8, config {config}", "file": file_name}
    elif peer == "st-openvino":
        model = SentenceTransformer(model_dir, device="cpu", backend="openvino")
    elif peer == "st-openvino-int8":
        from sentence_transformers import export_static_quantized_openvino_model

        target = work / "st-openvino"
        file_name = "openvino/openvino_model_qint8_quantized.xml"
        if not (target / file_name).exists():
            SentenceTransformer(model_dir, device="cpu", backend="openvino").save(str(target))
            calibration = write_calibration(request, work)
            # The peer's own recipe (OVQuantizationConfig's defaults, padded to 384), calibrated on training text.
            export_static_quantized_openvino_model(
                SentenceTransformer(str(target), device="cpu", backend="openvino"), None, str(target),
                dataset_name=str(calibration), dataset_config_name="default", dataset_split="train",
                column_name="sentence")
        model = SentenceTransformer(str(target), device="cpu", backend="openvino", model_kwargs={"file_name": file_name})
        request["details"] = {"quantization": "optimum-intel OVQuantizationConfig() defaults (NNCF static INT8)",
                              "calibration_texts": len(request["calibration"])}
    else:
        raise SystemExit(f"unknown sentence-transformers peer {peer!r}")
    return lambda texts: np.asarray(model.encode(texts, batch_size=len(texts), normalize_embeddings=True,
                                                 convert_to_numpy=True), dtype=np.float32)


def write_calibration(request: dict, work: Path) -> Path:
    folder = work / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    import csv

    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence"])
        writer.writerows([text] for text in request["calibration"])
    return folder


# -- fastembed ------------------------------------------------------------------------------------------------------

def fastembed_model(request: dict):
    """fastembed on the ONNX file the st-onnx-qint8 peer wrote (fastembed has no exporter of its own)."""
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    source = Path(request["work"]) / "st-onnx"
    config = isa_config_name()
    file_name = dynamic_int8_file(source, config)
    if file_name is None:
        raise SystemExit(f"fastembed runs the st-onnx-qint8 peer's file, not found: {source}/onnx/model_*int8_{config}.onnx")
    name = "local/all-minilm-l6-v2-qint8"
    TextEmbedding.add_custom_model(model=name, pooling=PoolingType.MEAN, normalization=True,
                                   sources=ModelSource(hf="sentence-transformers/all-MiniLM-L6-v2"), dim=384,
                                   model_file=file_name)
    model = TextEmbedding(model_name=name, specific_model_path=str(source), threads=os.cpu_count())
    request["details"] = {"file": file_name}
    return lambda texts: np.asarray(list(model.embed(texts, batch_size=len(texts))), dtype=np.float32)


# -- measuring ------------------------------------------------------------------------------------------------------

def time_calls(embed, texts: list[str], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        embed(texts)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        embed(texts)
        seconds.append(time.perf_counter() - start)
    return seconds


def embed_in_batches(embed, texts: list[str], batch: int) -> np.ndarray:
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), 0), dtype=np.float32)
    for start in range(0, len(texts), batch):
        index = order[start : start + batch]
        vectors = embed([texts[i] for i in index])
        if out.shape[1] == 0:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[index] = vectors
    return out


def duel(embed, batches: dict[str, list[str]], commands, answers) -> int:
    """Blocks of calls on demand: each line read from `commands` is "<batch> <calls>" (a key of `batches`, e.g.
    "b1 50"); the calls' seconds go back as one JSON line on `answers`. Ends at the end of `commands`; -> the number
    of blocks timed."""
    print("ready", file=answers, flush=True)
    blocks = 0
    for line in commands:
        batch, calls = line.split()
        if batch not in batches or int(calls) < 1:
            raise ValueError(f"a block is one of {sorted(batches)} and at least one call, not {line.strip()!r}")
        print(json.dumps(time_calls(embed, batches[batch], int(calls), warmup=0)), file=answers, flush=True)
        blocks += 1
    return blocks


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("sentence-transformers", "torch", "transformers", "onnxruntime", "openvino", "optimum",
                 "optimum-intel", "optimum-onnx", "nncf", "fastembed", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the worker's own process only (the harness sets them too)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    request = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    answers = sys.stdout
    if request.get("duel"):
        # stdout carries the protocol alone: the answers get their own copy of it, and whatever the peer's
        # libraries print goes to stderr (the log) instead.
        answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    log(f"{request['peer']}: loading")
    started = time.perf_counter()
    embed = fastembed_model(request) if request["peer"] == "fastembed" else st_model(request)
    load_s = time.perf_counter() - started
    if request.get("duel"):
        batches = {"b1": request["b1"], "b32": request["b32"]}
        time_calls(embed, batches["b1"], 20)  # warm, as the measured rows are
        time_calls(embed, batches["b32"], 2)
        log(f"{request['peer']}: {duel(embed, batches, sys.stdin, answers)} blocks timed on demand")
        return 0
    out = Path(request["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"{request['peer']}: timing b1 and b32")
    b1 = time_calls(embed, request["b1"], request["runs_b1"])
    b32 = time_calls(embed, request["b32"], request["runs_b32"])
    log(f"{request['peer']}: STS-B dev and the gate set")
    np.save(out.parent / "sts.npy", embed_in_batches(embed, request["sts"], 32))
    np.save(out.parent / "gate_batched.npy", embed_in_batches(embed, request["gate"], 32))
    np.save(out.parent / "gate_alone.npy", np.concatenate([embed([text]) for text in request["gate"]]))
    result = {"peer": request["peer"], "versions": versions(), "load_s": load_s, "b1_s": b1, "b32_s": b32,
              "details": request.get("details", {})}
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1), encoding="utf-8")
    partial.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
