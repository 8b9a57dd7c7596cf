"""The ANN index over item embeddings, tagged with the encoder that made them.

Vectors from two encoders are not comparable, so the index records the identity of the encoder version that
made it (version, variant and manifest hash, read from Triton), refuses queries made by any other encoder,
and is embedded and queried through the ensembles pinned to that version. `IndexStore` keeps one index per
version and switches between them atomically during a rollout.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Sequence

import numpy as np

from bert_recsys.client.item_text import DEFAULT_TEMPLATE, TextTemplate
from bert_recsys.client.item_text import template as text_template
from bert_recsys.contracts.digest import file_sha256

FLAT_LIMIT = 50_000  # exact search up to here; IVF above (measured: bench/ann.py)


class EncoderMismatch(RuntimeError):
    """Query vectors come from a different encoder than the index's."""


class IndexFileError(ValueError):
    """An index file is missing, truncated, corrupt or belongs to another index. The message names the file."""


class TemplateMismatch(ValueError):
    """The index was embedded from item texts rendered by another template (client.item_text) than the one
    asked for: its vectors are not comparable with the new ones. The message names both templates."""


INDEX_FILES = ("vectors.npy", "item_ids.npy", "texts.json", "centre.npy")


class IndexKind(StrEnum):
    AUTO = "auto"   # flat up to FLAT_LIMIT items, else ivf
    FLAT = "flat"   # exact inner product
    IVF = "ivf"
    HNSW = "hnsw"


@dataclass(frozen=True)
class IndexSettings:
    kind: IndexKind = IndexKind.AUTO
    ivf_lists: int = 0          # 0 = 4 * sqrt(n), capped at 4096
    ivf_probe: int = 16         # 1M real-derived vectors: recall@10 0.987, p99 2 ms on 2 cores
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    # Subtract the catalog's mean vector (then re-normalise): all-MiniLM's item vectors share a strong common
    # direction (mean cosine between two movies 0.2-0.45), which drowns what tells items apart. The mean is
    # fitted when the index is built (on the vectors it is built from, or a `centre` given by the caller, e.g.
    # fitted on training items only) and kept: items added later are centred with the same mean.
    centre: bool = False


class ItemIndex:
    def __init__(self, item_ids: np.ndarray, vectors: np.ndarray, encoder: dict, settings: IndexSettings = IndexSettings(),
                 texts: Sequence[str] | None = None, template: str | None = None, centre: np.ndarray | None = None):
        """`vectors` are the encoder's (L2-normalised); `template` is the identity of the item text template the
        texts were rendered with (client.item_text); `centre` overrides the mean that `settings.centre` fits."""
        import faiss

        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} ids for {len(vectors)} vectors")
        if texts is not None and len(texts) != len(item_ids):
            raise ValueError(f"{len(texts)} texts for {len(item_ids)} items")
        if len(set(np.asarray(item_ids).tolist())) != len(item_ids):
            raise ValueError("item ids must be unique")
        self._lock = threading.RLock()
        # The texts the vectors were embedded from: a rollout re-embeds the catalog from them.
        self.texts = list(texts) if texts is not None else None
        self.template = template
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.raw_vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if centre is None and settings.centre:
            centre = self.raw_vectors.mean(axis=0)
        self.centre = None if centre is None else np.asarray(centre, dtype=np.float32)
        self.vectors = self.transform(self.raw_vectors)
        self.encoder = dict(encoder)
        self.settings = settings
        self.position = {int(item): row for row, item in enumerate(self.item_ids)}
        dim = self.vectors.shape[1]
        if settings.kind not in IndexKind._value2member_map_:
            raise ValueError(f"unknown index kind {settings.kind!r}; choose from {[k.value for k in IndexKind]}")
        kind = IndexKind(settings.kind)
        if kind is IndexKind.AUTO:
            kind = IndexKind.FLAT if len(self.item_ids) <= FLAT_LIMIT else IndexKind.IVF
        self.kind = kind
        started = time.perf_counter()
        if kind is IndexKind.FLAT:
            self.index = faiss.IndexFlatIP(dim)  # inner product = cosine on normalized vectors
        elif kind is IndexKind.IVF:
            lists = settings.ivf_lists or int(min(4096, max(16, 4 * np.sqrt(len(self.item_ids)))))
            self._quantizer = faiss.IndexFlatIP(dim)  # kept referenced: the IVF index does not own it
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
            sample = self.vectors[np.random.default_rng(0).choice(len(self.vectors), min(len(self.vectors), 40 * lists), replace=False)]
            self.index.train(sample)
            self.index.nprobe = settings.ivf_probe
        elif kind is IndexKind.HNSW:
            self.index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = settings.hnsw_ef_construction
            self.index.hnsw.efSearch = settings.hnsw_ef_search
        self.index.add(self.vectors)
        self.build_seconds = time.perf_counter() - started

    def __len__(self) -> int:
        return len(self.item_ids)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Encoder vectors -> the index's space: centred on the index's mean and re-normalised, where it has one."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if self.centre is None:
            return vectors
        moved = vectors - self.centre
        return np.ascontiguousarray(moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12))

    def check_template(self, expected: str | None) -> None:
        """TemplateMismatch unless the index was embedded from texts rendered by the template `expected` names."""
        if expected is not None and self.template != expected:
            raise TemplateMismatch(f"catalog index embedded from item texts of template {self.template!r}, but "
                                   f"template {expected!r} was asked for: rebuild the index (its vectors are not "
                                   "comparable with the new template's)")

    def add(self, item_ids: Sequence[int], vectors: np.ndarray, texts: Sequence[str] | None = None) -> None:
        """New items, live: searchable as soon as this returns, with no rebuild. `vectors` are the encoder's;
        they are centred with the index's own mean. An id the index already holds is refused."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        raw = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if len(item_ids) != len(raw) or raw.shape[1] != self.raw_vectors.shape[1]:
            raise ValueError(f"{len(item_ids)} ids for vectors of shape {raw.shape}; the index holds dim "
                             f"{self.raw_vectors.shape[1]}")
        if not np.isfinite(raw).all():
            raise ValueError("vectors hold NaN or infinite values")
        if (self.texts is None) != (texts is None) or (texts is not None and len(texts) != len(item_ids)):
            raise ValueError("texts must be given for every new item exactly when the index keeps texts")
        with self._lock:
            taken = [int(i) for i in item_ids if int(i) in self.position]
            if taken or len(set(item_ids.tolist())) != len(item_ids):
                raise ValueError(f"item ids already in the index (or repeated): {taken[:10] or item_ids.tolist()}")
            moved = self.transform(raw)
            self.index.add(moved)
            start = len(self.item_ids)
            self.raw_vectors = np.concatenate([self.raw_vectors, raw])
            self.vectors = np.concatenate([self.vectors, moved])
            self.item_ids = np.concatenate([self.item_ids, item_ids])
            if texts is not None:
                self.texts = [*self.texts, *texts]
            self.position = {**self.position, **{int(i): start + k for k, i in enumerate(item_ids)}}

    @property
    def encoder_version(self) -> int | None:
        """The encoder version whose pinned ensembles (`embed_v<N>`, `score_v<N>`) match these vectors."""
        version = self.encoder.get("export_version")
        return int(version) if version is not None else None

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
        with self._lock:
            scores, rows = self.index.search(queries, min(k, len(self)))
            ids = np.where(rows >= 0, self.item_ids[np.clip(rows, 0, None)], -1)
        return ids, scores

    def vectors_of(self, item_ids: Sequence[int]) -> np.ndarray:
        """Vectors in the index's space (centred where the index is)."""
        with self._lock:
            return self.vectors[[self.position[int(i)] for i in item_ids]]

    def has(self, item_id: int) -> bool:
        return int(item_id) in self.position

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            np.save(directory / "vectors.npy", self.raw_vectors)
            np.save(directory / "item_ids.npy", self.item_ids)
            if self.texts is not None:
                (directory / "texts.json").write_text(json.dumps(self.texts))
            if self.centre is not None:
                np.save(directory / "centre.npy", self.centre)
            count = len(self)
        files = {name: file_sha256(directory / name) for name in INDEX_FILES if (directory / name).exists()}
        meta = {"encoder": self.encoder, "kind": self.kind, "settings": self.settings.__dict__, "count": count,
                "dim": int(self.vectors.shape[1]), "template": self.template, "files": files}
        (directory / "index.json").write_text(json.dumps(meta, indent=2))  # last: its presence marks a whole index

    @classmethod
    def load(cls, directory: Path, template: str | None = None) -> "ItemIndex":
        """Reads an index written by `save`, checking each file against index.json before FAISS sees it: a
        truncated, corrupt or foreign file raises IndexFileError naming it. With `template` (an identity from
        client.item_text), an index embedded from another template raises TemplateMismatch naming both."""
        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.exists():
            raise IndexFileError(f"{meta_path}: missing (not an index directory, or one whose writing never finished)")
        try:
            meta = json.loads(meta_path.read_text())
            settings = IndexSettings(**meta["settings"])
            encoder, count = dict(meta["encoder"]), int(meta["count"])
            stored_template = meta.get("template")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise IndexFileError(f"{meta_path}: not an index description ({type(error).__name__}: {error})") from None
        for name, digest in meta.get("files", {}).items():
            path = directory / name
            if not path.exists():
                raise IndexFileError(f"{path}: missing")
            if file_sha256(path) != digest:
                raise IndexFileError(f"{path}: does not match the sha256 recorded in {meta_path.name} "
                                     "(truncated, damaged, or copied from another index)")
        if template is not None and stored_template != template:
            raise TemplateMismatch(f"{directory}: catalog index embedded from item texts of template "
                                   f"{stored_template!r}, but template {template!r} was asked for: rebuild the index")
        item_ids = _load_array(directory / "item_ids.npy", 1, np.integer)
        vectors = _load_array(directory / "vectors.npy", 2, np.floating)
        if len(item_ids) != count or len(vectors) != count:
            raise IndexFileError(f"{directory}: {meta_path.name} says {count} items, item_ids.npy holds "
                                 f"{len(item_ids)} and vectors.npy {len(vectors)}")
        if "dim" in meta and vectors.shape[1] != int(meta["dim"]):
            raise IndexFileError(f"{directory / 'vectors.npy'}: vectors of dim {vectors.shape[1]}, {meta_path.name} "
                                 f"says {meta['dim']}")
        if not np.isfinite(vectors).all():
            raise IndexFileError(f"{directory / 'vectors.npy'}: holds NaN or infinite values")
        texts = None
        texts_path = directory / "texts.json"
        if texts_path.exists():
            try:
                texts = json.loads(texts_path.read_text())
            except (OSError, ValueError) as error:
                raise IndexFileError(f"{texts_path}: unreadable ({error})") from None
            if not isinstance(texts, list) or len(texts) != count:
                raise IndexFileError(f"{texts_path}: expected a list of {count} texts")
        centre = _load_array(directory / "centre.npy", 1, np.floating) if "centre.npy" in meta.get("files", {}) else None
        if centre is not None and len(centre) != vectors.shape[1]:
            raise IndexFileError(f"{directory / 'centre.npy'}: a mean of dim {len(centre)} for vectors of dim {vectors.shape[1]}")
        return cls(item_ids, vectors, encoder, settings, texts, stored_template, centre)


def _load_array(path: Path, ndim: int, kind) -> np.ndarray:
    """np.load without pickles, and the shape and dtype an index needs, or IndexFileError naming the file."""
    if not path.exists():
        raise IndexFileError(f"{path}: missing")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise IndexFileError(f"{path}: not a readable .npy array ({error})") from None
    if array.ndim != ndim or not np.issubdtype(array.dtype, kind):
        raise IndexFileError(f"{path}: expected a {ndim}-d {kind.__name__} array, found {array.ndim}-d {array.dtype}")
    return array


def build_catalog_index(client, items, template: "str | TextTemplate" = DEFAULT_TEMPLATE,
                        settings: IndexSettings = IndexSettings(), concurrency: int = 4,
                        encoder_version: int | None = None, centre: np.ndarray | None = None) -> ItemIndex:
    """Embeds every item's text (rendered by `template`, client.item_text) through Triton and indexes it, tagged
    with the encoder version that made it and the template. The requests are pinned to that version
    (`embed_v<N>`), so a rollout midway cannot mix two encoders."""
    chosen = text_template(template)
    return embed_index(client, np.array([item.item_id for item in items]), chosen.render_all(items), settings,
                       concurrency, encoder_version, template=chosen.identity, centre=centre)


def embed_index(client, item_ids: np.ndarray, texts: list[str], settings: IndexSettings = IndexSettings(),
                concurrency: int = 4, encoder_version: int | None = None, template: str | None = None,
                centre: np.ndarray | None = None) -> ItemIndex:
    encoder = client.encoder_info(encoder_version)
    version = int(encoder["export_version"])
    vectors = client.embed_many(texts, concurrency=concurrency, progress=f"embedding catalog (encoder v{version})",
                                encoder_version=version)
    if client.encoder_info(version) != encoder:
        raise EncoderMismatch(f"encoder version {version} changed while the catalog was being embedded: index again")
    return ItemIndex(item_ids, vectors, encoder, settings, texts, template, centre)


class IndexStore:
    """Catalog indexes side by side, one per encoder version, and a `current` symlink to the one in use.

        root/v2-1a2b3c4d5e6f/   index embedded by encoder version 2 (manifest 1a2b3c4d5e6f...)
        root/v3-9f8e7d6c5b4a/   the next one, written by a rollout before it promotes version 3
        root/current -> v3-...  switched atomically (a new symlink renamed over the old one)

    Recommenders follow `current` (`Recommender.refresh_index`), and each index queries Triton with its own
    pinned version, so a recommendation never mixes the vectors of two encoders."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def name_for(index: ItemIndex) -> str:
        """`v<version>-<manifest hash>`, and `-<template name>-<hash>` for an index that records its template."""
        name = f"v{index.encoder_version}-{index.encoder['export_manifest_sha256'][:12]}"
        return f"{name}-{index.template.replace('@', '-')}" if index.template else name

    def publish(self, index: ItemIndex) -> str:
        """Writes the index beside the others (renamed into place whole); does not switch to it."""
        name = self.name_for(index)
        target = self.root / name
        incoming = self.root / f".{name}.incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        index.save(incoming)
        shutil.rmtree(target, ignore_errors=True)
        incoming.rename(target)
        return name

    def switch(self, name: str) -> None:
        if not (self.root / name / "index.json").exists():
            raise FileNotFoundError(f"no index {name} in {self.root}")
        link = self.root / ".current.incoming"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
        os.replace(link, self.root / "current")

    def current_name(self) -> str | None:
        link = self.root / "current"
        return os.readlink(link) if link.is_symlink() else None

    def load(self, name: str | None = None, template: str | None = None) -> ItemIndex:
        name = name or self.current_name()
        if name is None:
            raise FileNotFoundError(f"{self.root} has no current index")
        return ItemIndex.load(self.root / name, template)

    def names(self) -> list[str]:
        """The published indexes (not one still being written), by name."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if not p.is_symlink() and not p.name.startswith(".") and (p / "index.json").exists())

    def find(self, version: int, manifest_sha256: str | None = None, template: str | None = None) -> str | None:
        """The newest published index embedded by encoder `version`: by the export whose manifest hash is given
        (a version number is reused after a rollback, by another export), and from the template given, when
        given. None when there is none (a rollout has not published it yet)."""
        prefix = f"v{int(version)}-" + (manifest_sha256[:12] if manifest_sha256 else "")
        suffix = f"-{template.replace('@', '-')}" if template else ""
        found = [n for n in self.names() if n.startswith(prefix) and n.endswith(suffix)]

        def written(name: str) -> int:
            try:
                return (self.root / name / "index.json").stat().st_mtime_ns
            except OSError:  # removed meanwhile (a rollback's clean-up)
                return -1

        return max(found, key=written, default=None)

    def remove_others(self, keep: set[str]) -> None:
        for name in self.names():
            if name not in keep:
                shutil.rmtree(self.root / name, ignore_errors=True)
