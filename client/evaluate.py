"""python -m client.evaluate DATA_DIR: offline quality of the recommender on a MovieLens-format directory.

Split: per user, interactions sorted by time; the last 20% (at least one) are the test part and everything
before it the history. Test positives are test ratings >= 4. The recommender (co-occurrence, popularity,
profiles) is fitted on the history part only, so no evaluated positive is ever trained on.

Prints JSON on stdout (recall@10, recall@50, ndcg@10, auc, coverage, diversity, novelty for the
recommender, its channel ablations and the popularity and random baselines) and a readable table on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import logs
import settings
from client.catalog import Interactions, load_movielens
from client.index import build_catalog_index
from client.recall import RecallChannel
from client.recommend import Recommender
from client.triton import TritonClient

log = logs.get("client")

TEST_FRACTION = 0.2


def test_mask(data: Interactions, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Per user (interactions sorted by user, then time): True for the last `test_fraction` (at least one)."""
    is_test = np.zeros(len(data), dtype=bool)
    starts = np.flatnonzero(np.r_[True, data.user[1:] != data.user[:-1]])
    ends = np.r_[starts[1:], len(data)]
    for a, b in zip(starts, ends):
        n_test = max(1, int(round((b - a) * test_fraction)))
        if b - a > n_test:  # users with a single interaction stay in history only
            is_test[b - n_test : b] = True
    return is_test


def time_split(data: Interactions, test_fraction: float = TEST_FRACTION, positive: float = 4.0):
    """-> (history interactions, {user: set of test positive items})."""
    history, future = future_ratings(data, test_fraction, positive)
    return history, {user: set(ratings) for user, ratings in future.items()}


def future_ratings(data: Interactions, test_fraction: float = TEST_FRACTION, positive: float = 4.0):
    """-> (history interactions, {user: {test positive item: its rating}}): what the simulator replays."""
    is_test = test_mask(data, test_fraction)
    test = data.take(is_test)
    future: dict[int, dict[int, float]] = {}
    for user, item, rating in zip(test.user, test.item, test.rating):
        if rating >= positive:
            future.setdefault(int(user), {})[int(item)] = float(rating)
    return data.take(~is_test), future


def ranking_metrics(ranked: list[int], truth: set[int], n_items: int, n_seen: int) -> dict:
    hits10 = [i for i in ranked[:10] if i in truth]
    hits50 = [i for i in ranked[:50] if i in truth]
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(ranked[:10]) if i in truth)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(10, len(truth))))
    # AUC over the whole unseen catalog: ranked items in order, the unranked rest tied behind them.
    negatives = n_items - n_seen - len(truth)
    position = {item: r for r, item in enumerate(ranked)}
    ranked_negatives_before = 0
    auc_sum = 0.0
    unranked_neg = negatives - sum(1 for i in ranked if i not in truth)
    for item in ranked:
        if item in truth:
            auc_sum += negatives - ranked_negatives_before
        else:
            ranked_negatives_before += 1
    for item in truth:
        if item not in position:
            auc_sum += 0.5 * unranked_neg
    return {
        "recall@10": len(hits10) / len(truth),
        "recall@50": len(hits50) / len(truth),
        "ndcg@10": dcg / idcg,
        "auc": auc_sum / (len(truth) * max(negatives, 1)),
    }


def list_metrics(lists: list[list[int]], index, popularity: dict[int, float], n_items: int) -> dict:
    recommended = {i for ranked in lists for i in ranked[:10]}
    diversities, novelties = [], []
    for ranked in lists:
        top = ranked[:10]
        if len(top) > 1:
            v = index.vectors_of(top)
            sim = v @ v.T
            diversities.append(1 - (sim.sum() - len(top)) / (len(top) * (len(top) - 1)))
        novelties.extend(-math.log2(popularity.get(i, 0.5 / n_items) or 0.5 / n_items) for i in top)
    return {"coverage": len(recommended) / n_items, "diversity": float(np.mean(diversities)),
            "novelty": float(np.mean(novelties))}


def evaluate(data_dir: Path, client: TritonClient, max_users: int | None = None, use_triton_score: bool = True,
             ablations: bool = True) -> dict:
    items, interactions, errors = load_movielens(data_dir)
    for error in errors[:10]:
        log.warning("skipped %s", error)
    history, truth = time_split(interactions)
    log.info("%d items, %d interactions, %d users with test positives", len(items), len(interactions), len(truth))
    started = time.perf_counter()
    index = build_catalog_index(client, items)
    log.info("catalog embedded and indexed in %.1f s (%s, %s)", time.perf_counter() - started, index.kind,
             index.encoder.get("export_variant"))
    recommender = Recommender(items, index, history, client)
    n_items = len(items)
    popularity_counts = recommender.popularity / max(recommender.popularity.sum(), 1)
    popularity = {int(i): float(p) for i, p in zip(recommender.item_ids, popularity_counts)}
    pop_order = [int(i) for i in recommender.item_ids[np.argsort(-recommender.popularity)]]
    rng = np.random.default_rng(0)
    users = sorted(truth)[:max_users] if max_users else sorted(truth)

    C = RecallChannel
    every = tuple(C)
    systems = {"recommender": dict(channels=every, use_triton_score=use_triton_score)}
    if ablations:
        systems.update({
            "content only (semantic+item2item)": dict(channels=(C.SEMANTIC, C.ITEM2ITEM), use_triton_score=use_triton_score),
            "- cooccurrence": dict(channels=tuple(c for c in every if c != C.COOCCURRENCE), use_triton_score=use_triton_score),
            "- semantic/item2item": dict(channels=(C.COOCCURRENCE, C.POPULARITY), use_triton_score=False),
            "- triton profile score": dict(channels=every, use_triton_score=False),
        })
    results = {}
    for name, options in systems.items():
        per_user, lists = [], []
        t0 = time.perf_counter()
        for user in users:
            _, recs = recommender.recommend(user, n=50, diversify=False, **options)
            ranked = [r["item_id"] for r in recs]
            per_user.append(ranking_metrics(ranked, truth[user], n_items, len(recommender.profile(user).history)))
            lists.append(ranked)
        results[name] = summarise(per_user, lists, index, popularity, n_items)
        results[name]["seconds_per_user"] = (time.perf_counter() - t0) / len(users)
        log.info("evaluated %s", name)
    for name in ("popularity", "random"):
        per_user, lists = [], []
        for user in users:
            seen = set(int(i) for i in recommender.profile(user).history)
            if name == "popularity":
                ranked = [i for i in pop_order if i not in seen][:50]
            else:
                pool = [int(i) for i in rng.choice(recommender.item_ids, 50 + len(seen), replace=False) if int(i) not in seen]
                ranked = pool[:50]
            per_user.append(ranking_metrics(ranked, truth[user], n_items, len(seen)))
            lists.append(ranked)
        results[name] = summarise(per_user, lists, index, popularity, n_items)
    rec, pop = results["recommender"]["recall@10"], results["popularity"]["recall@10"]
    return {"data": str(data_dir), "users": len(users), "items": n_items, "encoder": index.encoder,
            "split": f"per-user time split, last {TEST_FRACTION:.0%} of each user's ratings; positives = rating >= 4",
            "results": results, "recall@10_vs_popularity": rec / pop if pop else None}


def summarise(per_user, lists, index, popularity, n_items) -> dict:
    summary = {k: float(np.mean([m[k] for m in per_user])) for k in per_user[0]}
    summary.update(list_metrics(lists, index, popularity, n_items))
    return summary


def print_table(report: dict, stream=sys.stderr) -> None:
    keys = ["recall@10", "recall@50", "ndcg@10", "auc", "coverage", "diversity", "novelty"]
    print(f"\n{'system':<36}" + "".join(f"{k:>11}" for k in keys), file=stream)
    for name, row in report["results"].items():
        print(f"{name:<36}" + "".join(f"{row[k]:>11.4f}" for k in keys), file=stream)
    if report.get("recall@10_vs_popularity"):
        print(f"\nrecommender recall@10 = {report['recall@10_vs_popularity']:.2f}x popularity "
              f"({report['users']} users, encoder {report['encoder'].get('export_variant')})", file=stream)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=settings.MOVIELENS_DIR)
    parser.add_argument("--url", default=None, help="Triton address (default: from settings)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--max-users", type=int, default=None)
    parser.add_argument("--no-ablations", action="store_true")
    args = parser.parse_args(argv)
    logs.configure()
    with TritonClient(args.url, protocol=args.protocol) as client:
        report = evaluate(args.data, client, args.max_users, ablations=not args.no_ablations)
    print(json.dumps(report, indent=2))
    print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
