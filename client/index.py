"""The ANN index over item embeddings, tagged with the encoder that made them.

Vectors from two encoders are not comparable, so the index records the serving export's identity (variant
and manifest hash, read from Triton) and refuses queries made by any other encoder.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

FLAT_LIMIT = 50_000  # exact search up to here; IVF above (measured: client/ann_bench.py)


class EncoderMismatch(RuntimeError):
    """Query vectors come from a different encoder than the index's."""


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "auto"          # auto (flat up to FLAT_LIMIT, else ivf) | flat | ivf | hnsw
    ivf_lists: int = 0          # 0 = 4 * sqrt(n), capped at 4096
    ivf_probe: int = 16         # 1M real-derived vectors: recall@10 0.987, p99 2 ms on 2 cores
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64


class ItemIndex:
    def __init__(self, item_ids: np.ndarray, vectors: np.ndarray, encoder: dict, settings: IndexSettings = IndexSettings()):
        import faiss

        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} ids for {len(vectors)} vectors")
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.encoder = dict(encoder)
        self.settings = settings
        self.position = {int(item): row for row, item in enumerate(self.item_ids)}
        dim = self.vectors.shape[1]
        kind = settings.kind if settings.kind != "auto" else ("flat" if len(self.item_ids) <= FLAT_LIMIT else "ivf")
        self.kind = kind
        started = time.perf_counter()
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)  # inner product = cosine on normalized vectors
        elif kind == "ivf":
            lists = settings.ivf_lists or int(min(4096, max(16, 4 * np.sqrt(len(self.item_ids)))))
            self._quantizer = faiss.IndexFlatIP(dim)  # kept referenced: the IVF index does not own it
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
            sample = self.vectors[np.random.default_rng(0).choice(len(self.vectors), min(len(self.vectors), 40 * lists), replace=False)]
            self.index.train(sample)
            self.index.nprobe = settings.ivf_probe
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = settings.hnsw_ef_construction
            self.index.hnsw.efSearch = settings.hnsw_ef_search
        else:
            raise ValueError(f"unknown index kind {kind!r}")
        self.index.add(self.vectors)
        self.build_seconds = time.perf_counter() - started

    def __len__(self) -> int:
        return len(self.item_ids)

    def check_encoder(self, encoder: dict) -> None:
        mine, theirs = self.encoder.get("export_manifest_sha256"), encoder.get("export_manifest_sha256")
        if mine != theirs:
            raise EncoderMismatch(
                f"index built with encoder {self.encoder.get('export_variant')} ({str(mine)[:12]}), "
                f"query from {encoder.get('export_variant')} ({str(theirs)[:12]}): re-index the catalog")

    def search(self, queries: np.ndarray, k: int, encoder: dict) -> tuple[np.ndarray, np.ndarray]:
        """-> (item ids [n, k], cosine scores [n, k]); id -1 where fewer than k items exist."""
        self.check_encoder(encoder)
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, rows = self.index.search(queries, min(k, len(self)))
        ids = np.where(rows >= 0, self.item_ids[np.clip(rows, 0, None)], -1)
        return ids, scores

    def vectors_of(self, item_ids: Sequence[int]) -> np.ndarray:
        return self.vectors[[self.position[int(i)] for i in item_ids]]

    def has(self, item_id: int) -> bool:
        return int(item_id) in self.position

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "vectors.npy", self.vectors)
        np.save(directory / "item_ids.npy", self.item_ids)
        meta = {"encoder": self.encoder, "kind": self.kind, "settings": self.settings.__dict__, "count": len(self)}
        (directory / "index.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "ItemIndex":
        directory = Path(directory)
        meta = json.loads((directory / "index.json").read_text())
        settings = IndexSettings(**meta["settings"])
        return cls(np.load(directory / "item_ids.npy"), np.load(directory / "vectors.npy"), meta["encoder"], settings)


def build_catalog_index(client, items, settings: IndexSettings = IndexSettings(), concurrency: int = 4) -> ItemIndex:
    """Embeds every item's text through Triton's `embed` and indexes it, tagged with the serving encoder."""
    encoder = client.encoder_info()
    vectors = client.embed_many([item.text for item in items], concurrency=concurrency, progress="embedding catalog")
    index = ItemIndex(np.array([item.item_id for item in items]), vectors, encoder, settings)
    if client.encoder_info() != encoder:
        raise EncoderMismatch("the serving encoder changed while the catalog was being embedded: index again")
    return index
