"""bert-recsys bench ann: recall at catalog scale, 1M vectors of dim 384 on this machine.

The 1M vectors are derived from real embeddings: ~28k real texts (MovieLens titles+genres, STS-B
sentences, SciFact titles) are embedded by the exported encoder, and each of the 1M vectors is a random
mix of two of them plus noise, re-normalised. That keeps the geometry of real sentence embeddings (uniform
noise would be far harder than any encoder's output, tight synthetic clusters far easier). Queries are
fresh mixes from the same process. Ground truth is exact inner-product search.

Reports, per index: build time, memory, p50/p99 single-query latency, recall@10 against exact search.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from bert_recsys import settings


def real_embeddings(limit_per_source: int = 12000) -> np.ndarray:
    """Embeddings of real texts from ../shared/data, by the exported onnx-int8 encoder (in-process)."""
    import csv

    from transformers import AutoTokenizer

    from bert_recsys.contracts.manifest import Manifest
    from bert_recsys.export.runners import OrtRunner, embed_texts

    texts: list[str] = []
    with open(settings.MOVIELENS_DIR / "movies.csv", encoding="utf-8", newline="") as handle:
        texts += [f"{r['title']}. Genres: {r['genres'].replace('|', ', ')}" for r in csv.DictReader(handle)]
    for name in ("sts-train.csv", "sts-dev.csv"):
        with open(settings.STSB_DEV.with_name(name), encoding="utf-8") as handle:
            for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                texts += [row[5], row[6]]
    scifact = settings.SHARED_DATA_DIR / "scifact-train" / "corpus.jsonl"
    if scifact.exists():
        texts += [json.loads(line)["title"] for line in scifact.read_text().splitlines() if line.strip()]
    texts = sorted(set(texts))
    tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
    variant = settings.EXPORT_DIR / "onnx-int8"
    runner = OrtRunner(variant / Manifest.read(variant).artifact.file)
    return embed_texts(runner, tokenizer, texts, 128, batch_size=128, progress="embedding real texts")


def mixed_unit_vectors(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        a, b = base[rng.integers(0, len(base), m)], base[rng.integers(0, len(base), m)]
        w = rng.uniform(0.5, 1.0, size=(m, 1)).astype(np.float32)
        v = w * a + (1 - w) * b + noise * rng.normal(size=(m, base.shape[1])).astype(np.float32) / np.sqrt(base.shape[1])
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


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

    parser = argparse.ArgumentParser(prog="bert-recsys bench ann", description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--data", choices=("real-mix", "clusters"), default="real-mix")
    parser.add_argument("--centres", type=int, default=20000, help="topic centres; more = harder")
    parser.add_argument("--spread", type=float, default=2.0, help="noise around a centre; more = harder")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "ann_bench.json")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)  # single-query latency: one thread per query, as a request would see it

    t0 = time.perf_counter()
    if args.data == "real-mix":
        base = real_embeddings()
        args.dim = base.shape[1]
        data = mixed_unit_vectors(base, args.n, noise=0.3, seed=0)
        queries = mixed_unit_vectors(base, args.queries, noise=0.3, seed=1)
        source = f"mixes of {len(base)} real embeddings"
    else:
        data = clustered_unit_vectors(args.n, args.dim, centres=args.centres, spread=args.spread, seed=0)
        queries = clustered_unit_vectors(args.queries, args.dim, centres=args.centres, spread=args.spread, seed=0)
        source = f"{args.centres} synthetic clusters"
    print(f"data: {args.n} x {args.dim} ({source}) in {time.perf_counter() - t0:.1f} s; rss {rss_mb():.0f} MB", flush=True)

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


    from bert_recsys.client.index import IndexSettings, ItemIndex

    encoder = {"export_manifest_sha256": "bench"}
    faiss.omp_set_num_threads(2)  # build with both cores
    t0 = time.perf_counter()
    index = ItemIndex(np.arange(args.n), data, encoder, IndexSettings(kind="auto"))
    build = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    for nprobe in (8, 16, 32, 64):
        index.index.nprobe = nprobe
        found, times = [], []
        for q in queries:
            t = time.perf_counter()
            ids, _ = index.search(q, 10, encoder)
            times.append(time.perf_counter() - t)
            found.append(ids[0])
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        lists = index.index.nlist
        rows.append({"index": f"ItemIndex {index.kind}{lists} nprobe={nprobe}", "build_s": build,
                     "memory_mb": (data.nbytes + lists * args.dim * 4 + args.n * 8) / 2**20,
                     "p50_ms": 1000 * float(np.median(times)), "p99_ms": 1000 * float(np.percentile(times, 99)),
                     "recall@10": recall})
        print(f"  {rows[-1]}", flush=True)

    print(f"\n{'index':<24}{'build s':>9}{'memory MB':>11}{'p50 ms':>9}{'p99 ms':>9}{'recall@10':>11}")
    for r in rows:
        print(f"{r['index']:<24}{r['build_s']:>9.1f}{r['memory_mb']:>11.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['recall@10']:>11.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "dim": args.dim, "data": source, "rows": rows, "peak_rss_mb": rss_mb()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
