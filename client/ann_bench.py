"""python -m client.ann_bench: recall at catalog scale, 1M vectors of dim 384 on this machine.

The vectors are synthetic but shaped like sentence embeddings: unit vectors scattered around 20,000 topic
centres (clustered, unlike uniform noise, which no ANN index can search well and no encoder produces).
Queries are perturbed catalog vectors. Ground truth is exact inner-product search.

Reports, per index: build time, memory, p50/p99 single-query latency, recall@10 against exact search.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

import settings


def clustered_unit_vectors(n: int, dim: int, centres: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(centres, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        v = topics[rng.integers(0, centres, m)] + spread * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim)
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    results, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, rows = index.search(q[None, :], k)
        times.append(time.perf_counter() - t0)
        results.append(rows[0])
    return np.array(results), times


def main(argv=None) -> int:
    import faiss

    parser = argparse.ArgumentParser(prog="python -m client.ann_bench", description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--centres", type=int, default=20000, help="topic centres; more = harder")
    parser.add_argument("--spread", type=float, default=2.0, help="noise around a centre; more = harder")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "ann_bench.json")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)  # single-query latency: one thread per query, as a request would see it

    t0 = time.perf_counter()
    data = clustered_unit_vectors(args.n, args.dim, centres=args.centres, spread=args.spread, seed=0)
    # Queries: perturbed copies of random catalog vectors (a user's taste sits near items, not on them).
    queries = data[np.random.default_rng(1).choice(args.n, args.queries, replace=False)] + 0.0
    queries += 1.0 * np.random.default_rng(2).normal(size=queries.shape).astype(np.float32) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"data: {args.n} x {args.dim} in {time.perf_counter() - t0:.1f} s; rss {rss_mb():.0f} MB", flush=True)

    faiss.omp_set_num_threads(2)  # ground truth in bulk, both cores
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(data)
    _, truth = exact.search(queries, 10)
    faiss.omp_set_num_threads(1)
    _, exact_times = latency(exact, queries[:50], 10)
    rows = [{"index": "flat (exact)", "build_s": 0.0, "memory_mb": data.nbytes / 2**20,
             "p50_ms": 1000 * float(np.median(exact_times)), "p99_ms": 1000 * float(np.percentile(exact_times, 99)),
             "recall@10": 1.0}]
    print("exact search measured", flush=True)

    candidates = [("ivf4096,flat", 4096, [16, 32, 64, 128])]
    for name, nlist, probes in candidates:
        faiss.omp_set_num_threads(2)
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatIP(args.dim)
        index = faiss.IndexIVFFlat(quantizer, args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = data[np.random.default_rng(3).choice(args.n, 40 * nlist, replace=False)]
        index.train(sample)
        index.add(data)
        build = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        for nprobe in probes:
            index.nprobe = nprobe
            found, times = latency(index, queries, 10)
            recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
            rows.append({"index": f"{name} nprobe={nprobe}", "build_s": build,
                         "memory_mb": (data.nbytes + nlist * args.dim * 4 + args.n * 8) / 2**20,
                         "p50_ms": 1000 * float(np.median(times)), "p99_ms": 1000 * float(np.percentile(times, 99)),
                         "recall@10": recall})
            print(f"  {rows[-1]}", flush=True)

    print(f"\n{'index':<24}{'build s':>9}{'memory MB':>11}{'p50 ms':>9}{'p99 ms':>9}{'recall@10':>11}")
    for r in rows:
        print(f"{r['index']:<24}{r['build_s']:>9.1f}{r['memory_mb']:>11.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['recall@10']:>11.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "dim": args.dim, "rows": rows, "peak_rss_mb": rss_mb()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
