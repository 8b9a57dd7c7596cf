"""bert-recsys bench serving: what Triton adds on top of the bare encoder, measured by perf_analyzer.

In one run, on the same texts and token lengths:
1. the bare encoder: its runtime (ONNX Runtime or OpenVINO) in this process (no server), b1 and b32;
2. Triton's `encoder` model alone (token ids in, via perf_analyzer over gRPC);
3. Triton's `embed` ensemble (text in: the encoder taking the text, or tokenizer -> encoder with
   ENCODER_TOKENIZES=false), via perf_analyzer over gRPC.
The difference between 1 and 3 is the ensemble + IPC + protocol overhead. perf_analyzer is the outside
client (the tritonclient 2.51 wheel ships it). Writes build/reports/serving_bench.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.contracts.manifest import Manifest
from bert_recsys.contracts.machine import machine
from bench.timing import time_calls
from bert_recsys.export.runners import runner_for, tokenize
from bench.perf import run_perf_analyzer
from bench.served import serve_variant

log = logs.get("loadtest")

# Real text (from this project's gate set), cut to the token lengths the export benchmark uses.
SHORT_TEXT = "How do I reset my password if I no longer have access to my email?"  # 17 tokens with specials


def long_text(tokenizer, tokens: int) -> str:
    from bert_recsys.export.gate import load_gate_sentences

    paragraph = max(load_gate_sentences()[0], key=len)
    ids = tokenizer(paragraph, add_special_tokens=False)["input_ids"][: tokens - 2]
    return tokenizer.decode(ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench serving", description=__doc__)
    parser.add_argument("--variant", default="onnx-int8")
    parser.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer measurement window")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "serving_bench.json")
    args = parser.parse_args(argv)
    logs.configure()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
    texts = {"b1": SHORT_TEXT, "b32": long_text(tokenizer, 128)}
    shapes = {"b1": 1, "b32": 32}
    encoded = {k: tokenize(tokenizer, [texts[k]] * shapes[k], 256) for k in texts}
    print(f"token lengths: b1 {encoded['b1'][0].shape[1]}, b32 {encoded['b32'][0].shape[1]}", flush=True)

    bare = runner_for(settings.EXPORT_DIR / args.variant, Manifest.read(settings.EXPORT_DIR / args.variant))
    rows = {}
    for key, (ids, mask) in encoded.items():
        times = time_calls(lambda i=ids, m=mask: bare(i, m), args.seconds, max_runs=3000)
        rows[f"bare {key}"] = {"p50_ms": 1000 * float(np.median(times)), "infer_per_s": shapes[key] / float(np.median(times))}
    print("bare encoder measured", flush=True)

    with serve_variant(args.variant, settings.BUILD_DIR / "bench_serving") as server:
        url = server.server.grpc_url
        for key, (ids, mask) in encoded.items():
            token_data = {"input_ids": {"content": ids[0].tolist(), "shape": [ids.shape[1]]},
                          "attention_mask": {"content": mask[0].tolist(), "shape": [ids.shape[1]]}}
            text_data = {"TEXT": {"content": [texts[key]], "shape": [1]}}
            rows[f"encoder {key}"] = run_perf_analyzer(url, "encoder", shapes[key], token_data, 1, args.seconds)
            rows[f"embed {key}"] = run_perf_analyzer(url, "embed", shapes[key], text_data, 1, args.seconds)
            print(f"{key} measured", flush=True)

    print(f"\nServing {args.variant} on the embedded runtime, perf_analyzer over gRPC, concurrency 1; {machine()}")
    print(f"{'path':<14}{'p50 ms':>10}{'seq/s':>10}")
    for name, row in rows.items():
        flag = "  (unstable: perf_analyzer accepted at a looser criterion)" if row.get("stable") is False else ""
        print(f"{name:<14}{row['p50_ms']:>10.2f}{row['infer_per_s']:>10.0f}{flag}")
    overhead = rows["embed b1"]["p50_ms"] - rows["bare b1"]["p50_ms"]
    ratio = rows["embed b32"]["infer_per_s"] / rows["bare b32"]["infer_per_s"]
    print(f"\nembed b1 p50 {rows['embed b1']['p50_ms']:.2f} ms; overhead over the bare encoder {overhead:.2f} ms")
    print(f"embed b32 throughput = {100 * ratio:.1f}% of the bare encoder")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "variant": args.variant, "rows": rows,
                                    "b1_overhead_ms": overhead, "b32_throughput_ratio": ratio}, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
