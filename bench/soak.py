"""Soak benchmark: a steady mixed load on one tritonserver for N minutes, watching its memory.

    bert-recsys bench soak --minutes 10        # or: make soak

Starts its own server (onnx-int8, free loopback ports), runs `--threads` gRPC clients sending `embed` and
`score` calls on real texts, and samples the resident memory (RSS) of tritonserver and of each Python backend
stub every `--sample-s` seconds. Growth is measured from the end of the warm-up (`--warmup-s`, when caches,
arenas and batch shapes have settled) to the last sample. Writes build/reports/soak.json and soak.png, and
exits 1 when any process grew more than `--max-growth` (default 10%) or a request failed.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bert_recsys import settings
from bert_recsys.client.triton import TritonClient
from loadtest.workload import real_texts
from bench.served import render, serve


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def processes(server_pid: int) -> dict[str, int]:
    """tritonserver and its stubs, named by the model instance each stub serves."""
    found = {"tritonserver": server_pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == server_pid and args and args[0].endswith(b"triton_python_backend_stub"):
            # The stub's arguments: model.py path, shared-memory region, ..., instance name among them.
            model_path = Path(args[1].decode())
            found[f"stub {model_path.parent.parent.name}/{model_path.parent.name} pid {entry.name}"] = int(entry.name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--variant", default="onnx-int8")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    s = settings.SETTINGS
    repository = render(args.variant, settings.BUILD_DIR / "soak_repository", s)
    server_settings = None  # the served ports, once the server below is up
    texts = real_texts()
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stop = threading.Event()

    def load(seed: int):
        rng = random.Random(seed)
        client = TritonClient(server_settings.grpc_url, settings=replace(s, server=server_settings))
        candidates = np.random.default_rng(seed).normal(size=(1, 50, 384)).astype(np.float32)
        while not stop.is_set():
            batch = rng.sample(texts, rng.choice((1, 1, 1, 4, 16)))  # mostly single texts, some batches
            try:
                if rng.random() < 0.7:
                    client.embed(batch)
                else:
                    client.score(batch[:1], candidates, outputs=["SCORES"])
                counts["ok"] += 1
            except Exception as error:  # counted and reported: a soak must not fail silently
                counts["failed"] += 1
                errors.append(str(error)[:200])
        client.close()

    samples: list[dict] = []
    with serve(repository, args.out / "soak_triton.log", s) as triton:
        server_settings = triton.server
        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(args.threads)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        duration = args.minutes * 60
        try:
            while (elapsed := time.monotonic() - started) <= duration:
                sample = {"t_s": round(elapsed, 1), "requests": counts["ok"], "failed": counts["failed"]}
                sample.update({name: round(rss_mb(pid), 1) for name, pid in processes(triton.process.pid).items()})
                samples.append(sample)
                print(f"[soak] {elapsed / 60:5.1f}/{args.minutes:.0f} min  {counts['ok']} requests, {counts['failed']} failed  "
                      f"tritonserver {sample['tritonserver']:.0f} MB", file=sys.stderr, flush=True)
                time.sleep(args.sample_s)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)

    warm = next((x for x in samples if x["t_s"] >= args.warmup_s), samples[0])
    last = samples[-1]
    growth = {name: (last[name] - warm[name]) / warm[name] for name in warm
              if name not in ("t_s", "requests", "failed") and name in last and warm[name] > 0}
    elapsed = last["t_s"] - warm["t_s"]
    report = {
        "minutes": args.minutes, "threads": args.threads, "variant": args.variant, "warmup_s": args.warmup_s,
        "requests": counts["ok"], "failed": counts["failed"], "errors": errors[:5],
        "req_per_s_after_warmup": round((last["requests"] - warm["requests"]) / elapsed, 1) if elapsed else None,
        "rss_mb_after_warmup": {k: warm[k] for k in growth}, "rss_mb_end": {k: last[k] for k in growth},
        "growth": {k: round(v, 4) for k, v in growth.items()}, "max_growth_allowed": args.max_growth,
        "samples": samples,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    plot(samples, growth, args.out / "soak.png", args.warmup_s)
    print(f"\n{'process':<48}{'RSS after warm-up':>18}{'RSS at end':>12}{'growth':>9}")
    for name, value in growth.items():
        print(f"{name:<48}{warm[name]:>15.0f} MB{last[name]:>9.0f} MB{100 * value:>8.1f}%")
    print(f"{counts['ok']} requests, {counts['failed']} failed, {report['req_per_s_after_warmup']} req/s after warm-up; "
          f"written {args.out}/soak.json, soak.png")
    problems = [f"{k} grew {100 * v:.1f}%" for k, v in growth.items() if v > args.max_growth]
    problems += [f"{counts['failed']} requests failed"] if counts["failed"] else []
    for problem in problems:
        print(f"soak: {problem}", file=sys.stderr)
    return 1 if problems else 0


def plot(samples: list[dict], growth: dict, path: Path, warmup_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [x["t_s"] / 60 for x in samples]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for name in growth:
        axis.plot(minutes, [x.get(name, np.nan) for x in samples], label=f"{name} ({100 * growth[name]:+.1f}%)")
    axis.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
    axis.set_xlabel("minutes")
    axis.set_ylabel("RSS (MB)")
    axis.set_yscale("log")
    axis.set_title("Soak: resident memory of tritonserver and its Python backend stubs")
    axis.legend(fontsize=7, loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
