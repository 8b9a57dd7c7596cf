"""bert-recsys bench crosscheck: perf_analyzer and Locust on the same model and load, side by side.

Both drive `embed` over gRPC with the same concurrency (perf_analyzer's --concurrency-range = Locust users,
no think time) and the same real texts, against one local tritonserver. If they disagree much, one of the
two measurement paths is wrong. Locust runs in .venv-loadtest.
"""
from __future__ import annotations

import argparse
import json
import subprocess

from bert_recsys import settings
from bench.perf import run_perf_analyzer
from loadtest.workload import real_texts



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench crosscheck", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=20)
    args = parser.parse_args(argv)

    from bench.served import serve

    out = settings.BUILD_DIR / "reports" / "crosscheck"
    texts = real_texts(400)[:200]
    with serve(settings.MODEL_REPOSITORY_DIR, settings.BUILD_DIR / "crosscheck_triton.log") as triton:
        server_settings = triton.server
        data = [{"TEXT": {"content": [t], "shape": [1]}} for t in texts]
        pa = run_perf_analyzer(server_settings.grpc_url, "embed", 1, data, args.concurrency, args.seconds / 4)
        locust = subprocess.run(
            [str(settings.LOADTEST_PYTHON), "-m", "loadtest.run", "--host", server_settings.host,
             "--grpc-port", str(server_settings.grpc_port), "--http-port", str(server_settings.http_port),
             "--protocol", "grpc", "--tasks", "embed:1", "--users", str(args.concurrency),
             "--spawn-rate", str(args.concurrency), "--duration", str(args.seconds), "--out", str(out)],
            cwd=settings.REPO_ROOT, capture_output=True, text=True)
    if locust.returncode != 0:
        raise SystemExit(f"locust failed:\n{locust.stdout[-2000:]}\n{locust.stderr[-2000:]}")
    agg = json.loads((out / "summary.json").read_text())["aggregated"]
    print(f"embed over gRPC, concurrency {args.concurrency}, {len(texts)} real texts")
    print(f"{'client':<15}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'perf_analyzer':<15}{pa['infer_per_s']:>9.0f}{pa['p50_ms']:>9.1f}{pa['p99_ms']:>9.1f}")
    print(f"{'locust':<15}{agg['rps']:>9.0f}{agg['p50_ms']:>9.1f}{agg['p99_ms']:>9.1f}")
    print(f"locust / perf_analyzer throughput: {agg['rps'] / pa['infer_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
