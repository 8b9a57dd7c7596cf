"""What the load test sends: real texts, candidate vectors, and a recommender for the whole path.

Loaded once per Locust process. The recommender's catalog index is embedded through the server under test
on first use and cached in build/loadtest_index, keyed by the serving encoder's manifest hash and the catalog's
item ids (MovieLens from settings.MOVIELENS_DIR, i.e. $SHARED_DATA_DIR/movielens-latest-small).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field

import numpy as np

from bert_recsys import settings

CANDIDATES_PER_QUERY = 50


def real_texts(limit: int = 4000) -> list[str]:
    texts: list[str] = []
    if settings.STSB_DEV.exists():
        with open(settings.STSB_DEV.with_name("sts-train.csv"), encoding="utf-8") as handle:
            for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                texts += [row[5], row[6]]
                if len(texts) >= limit:
                    break
    if settings.MOVIELENS_DIR.exists():
        with open(settings.MOVIELENS_DIR / "movies.csv", encoding="utf-8", newline="") as handle:
            texts += [f"{row['title']}. Genres: {row['genres'].replace('|', ', ')}" for _, row in zip(range(limit // 4), csv.DictReader(handle))]
    if not texts:
        from bert_recsys.export.gate import load_gate_sentences

        texts = load_gate_sentences()[0]
    return texts


@dataclass
class Workload:
    texts: list[str]
    dim: int = 384
    recommender: object = None
    user_ids: list[int] = field(default_factory=list)
    _pool: np.ndarray | None = None

    @classmethod
    def load(cls, with_recommender: bool, grpc_url: str) -> "Workload":
        workload = cls(texts=real_texts())
        if with_recommender:
            workload._load_recommender(grpc_url)
        return workload

    def _load_recommender(self, grpc_url: str) -> None:
        from bert_recsys.client.catalog import load_catalog
        from bert_recsys.client.index import ItemIndex, build_catalog_index
        from bert_recsys.client.recommend import Recommender
        from bert_recsys.client.triton import TritonClient

        client = TritonClient(grpc_url, protocol="grpc")
        catalog = load_catalog(settings.MOVIELENS_DIR)
        items, interactions = catalog.items, catalog.interactions
        cache = settings.BUILD_DIR / "loadtest_index"
        encoder = client.encoder_info()
        index = None
        if (cache / "index.json").exists():
            index = ItemIndex.load(cache)
            same_catalog = [int(i) for i in index.item_ids] == [item.item_id for item in items]
            if index.encoder != encoder or not same_catalog:  # another encoder, or another MovieLens directory
                index = None
        if index is None:
            index = build_catalog_index(client, items)
            index.save(cache)
        self.recommender = Recommender(items, index, interactions, client)
        self.user_ids = sorted(self.recommender.histories)
        self.dim = index.vectors.shape[1]
        self._pool = index.vectors

    def candidates(self) -> np.ndarray:
        """[k, D] candidate vectors: real item embeddings when the catalog is loaded, else random unit vectors."""
        if self._pool is None:
            rng = np.random.default_rng(0)
            pool = rng.normal(size=(2000, self.dim)).astype(np.float32)
            self._pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
        rows = np.random.randint(0, len(self._pool), CANDIDATES_PER_QUERY)
        return np.ascontiguousarray(self._pool[rows])

    def recommend(self, user_id: int):
        return self.recommender.recommend(user_id, n=10)
