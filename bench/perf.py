"""perf_analyzer, the outside client of every serving benchmark: where its libraries are, and a run that
returns a figure (flagged when perf_analyzer could not stabilise) instead of crashing. Imports nothing heavy:
the GPU benchmark runs it on a machine without onnx."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings

log = logs.get("loadtest")


def perf_analyzer_libs() -> Path:
    """perf_analyzer links libb64 and libcudart, which nvidia-pytriton's bundled libs provide."""
    import pytriton

    libs = Path(pytriton.__file__).resolve().parents[1] / "nvidia_pytriton.libs"
    target = settings.BUILD_DIR / "perf_analyzer_libs"
    target.mkdir(parents=True, exist_ok=True)
    for pattern, names in (("libb64-*", ["libb64.so.0d"]), ("libcudart-*", ["libcudart.so.12"])):
        source = next(libs.glob(pattern))
        for name in names:
            link = target / name
            if not link.exists():
                link.symlink_to(source)
    return target


# perf_analyzer's tries, in order: (window x, stability %, trials). On a noisy machine the first may never settle;
# the last accepts what it measured, and the row says so (`stable: false`) instead of the benchmark crashing.
STABILITY_LADDER = ((1, 20, 5), (2, 30, 5), (3, 1000, 3))


def run_perf_analyzer(url: str, model: str, batch: int, data: dict | list[dict], concurrency: int, seconds: float,
                      binary: Path | None = None) -> dict:
    """`data`: one input set, or a list that perf_analyzer cycles through. -> p50, p99, throughput, and whether
    the figure met perf_analyzer's stability criterion (20% over its windows) or had to be accepted looser."""
    binary = binary or Path(sys.executable).parent / "perf_analyzer"
    env = {**os.environ, "LD_LIBRARY_PATH": str(perf_analyzer_libs())}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "data.json"
        data_file.write_text(json.dumps({"data": data if isinstance(data, list) else [data]}))
        for attempt, (scale, stability, trials) in enumerate(STABILITY_LADDER):
            csv_file = Path(tmp) / f"out{attempt}.csv"
            command = [str(binary), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
                       "--input-data", str(data_file), f"--concurrency-range={concurrency}",
                       "--measurement-interval", str(int(seconds * scale * 1000)),
                       f"--stability-percentage={stability}", f"--max-trials={trials}", "-f", str(csv_file)]
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            if result.returncode == 0 and csv_file.exists():
                row = next(csv.DictReader(csv_file.open()))
                return {"p50_ms": float(row["p50 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000,
                        "infer_per_s": float(row["Inferences/Second"]), "concurrency": concurrency, "batch": batch,
                        "stable": stability <= STABILITY_LADDER[0][1], "window_s": seconds * scale,
                        "stability_percentage": stability}
            failures.append(f"window {seconds * scale:g} s, stability {stability}%: exit {result.returncode}: "
                            f"{(result.stderr or result.stdout).strip()[-300:]}")
            log.warning("perf_analyzer %s b%d: no result (%s); trying a longer window", model, batch, failures[-1])
    raise RuntimeError(f"perf_analyzer gave no figure for {model} b{batch}:\n" + "\n".join(failures))
