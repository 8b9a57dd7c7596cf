"""What `make demo` shows once Triton is up: a real recommendation for a MovieLens user, explained."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from client.catalog import load_movielens
from client.index import build_catalog_index
from client.recommend import Recommender
from client.triton import TritonClient


def run_demo(server_settings, protocol: str, data_dir: Path, user_id: int | None) -> None:
    import settings

    if not (Path(data_dir) / "movies.csv").exists():
        raise SystemExit(f"demo: MovieLens data not found at {data_dir}; pass --data DIR (movies.csv, ratings.csv), "
                         "e.g. ml-latest-small from grouplens.org")
    url = server_settings.grpc_url if protocol == "grpc" else server_settings.http_url
    with TritonClient(url, protocol=protocol, settings=replace(settings.SETTINGS, server=server_settings)) as client:
        info = client.encoder_info()
        print(f"[demo] serving encoder {info['export_variant']} (manifest {info['export_manifest_sha256'][:12]})")
        vector = client.embed(["A heartwarming animated adventure about toys that come alive."])
        print(f"[demo] embed: 1 text -> {vector.shape[1]}-dim vector, norm {np.linalg.norm(vector):.4f}")

        items, interactions, errors = load_movielens(data_dir)
        if errors:
            print(f"[demo] skipped {len(errors)} malformed rows, first: {errors[0]}")
        started = time.perf_counter()
        index = build_catalog_index(client, items)
        print(f"[demo] embedded {len(items)} items through Triton and built a {index.kind} index "
              f"in {time.perf_counter() - started:.1f} s")
        recommender = Recommender(items, index, interactions, client)
        if user_id is None:  # a user with a long, recent history makes the most telling demo
            users, counts = np.unique(interactions.user, return_counts=True)
            user_id = int(users[np.argsort(-counts)][5])
        started = time.perf_counter()
        profile, recs = recommender.recommend(user_id, n=10)
        elapsed_ms = 1000 * (time.perf_counter() - started)
        print(f"\n[demo] profile: {profile.summary()}")
        recent = ", ".join(recommender.items[int(i)].title for i in profile.liked[-5:][::-1])
        print(f"[demo] recently liked: {recent}")
        print(f"[demo] top 10 for user {user_id} ({elapsed_ms:.0f} ms: recall, Triton scoring, assembly):")
        for rank, rec in enumerate(recs, 1):
            genres = "|".join(rec["categories"][:3])
            print(f"  {rank:>2}. {rec['title']:<55.55} {genres:<28.28} {rec['score']:.3f}  {rec['why']}")
        similar = recommender.similar_users(user_id, k=3)
        print(f"[demo] similar users: {', '.join(f'{u} ({s:.2f})' for u, s in similar)}")
        _, cold = recommender.recommend(-1, n=3)
        print(f"[demo] cold start (unknown user): {', '.join(r['title'] for r in cold)}")
