"""The gate's second task: retrieval, nDCG@10 on SciFact train (BEIR format: claims -> scientific abstracts).

STS-B scores sentence pairs; retrieval ranks long documents against short queries, a different use of the same
vectors. No recipe was chosen on SciFact, so its figure confirms quality on data the choices never saw.

The gate uses a fixed, seeded subset so every variant costs seconds, not minutes: `queries` claims with their
judged abstracts, plus distractor abstracts up to `documents` in all (title + abstract, truncated by the
tokenizer at the model's max length). Its sha256 goes into the recipe key: another subset re-gates.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUERIES = 300
DOCUMENTS = 1000
K = 10


@dataclass(frozen=True)
class RetrievalSet:
    name: str
    queries: tuple[str, ...]
    documents: tuple[str, ...]
    relevant: tuple[frozenset[int], ...]  # per query: indexes into `documents`
    sha256: str

    def describe(self) -> dict:
        return {"name": self.name, "queries": len(self.queries), "documents": len(self.documents),
                "judgments": sum(len(r) for r in self.relevant), "sha256": self.sha256}


def load_scifact(directory: Path, queries: int = QUERIES, documents: int = DOCUMENTS, seed: int = 0) -> RetrievalSet:
    """`queries` judged claims (seeded sample), their abstracts, and seeded distractors up to `documents`."""
    directory = Path(directory)
    with open(directory / "qrels" / "train.tsv", encoding="utf-8") as handle:
        judged: dict[str, set[str]] = {}
        for row in csv.DictReader(handle, delimiter="\t"):
            if int(row["score"]) > 0:
                judged.setdefault(row["query-id"], set()).add(row["corpus-id"])
    with open(directory / "queries.jsonl", encoding="utf-8") as handle:
        claims = {q["_id"]: q["text"] for q in map(json.loads, handle) if q["_id"] in judged}
    with open(directory / "corpus.jsonl", encoding="utf-8") as handle:
        corpus = {d["_id"]: f"{d['title']} {d['text']}".strip() for d in map(json.loads, handle)}
    rng = random.Random(seed)
    chosen = sorted(rng.sample(sorted(claims), min(queries, len(claims))), key=int)
    needed = sorted({doc for q in chosen for doc in judged[q] if doc in corpus}, key=int)
    if len(needed) > documents:
        raise ValueError(f"{len(needed)} judged abstracts for {len(chosen)} queries: ask for more documents")
    others = sorted(set(corpus) - set(needed), key=int)
    doc_ids = sorted(needed + rng.sample(others, min(documents - len(needed), len(others))), key=int)
    position = {doc: i for i, doc in enumerate(doc_ids)}
    relevant = tuple(frozenset(position[d] for d in judged[q] if d in position) for q in chosen)
    digest = hashlib.sha256(json.dumps([chosen, doc_ids]).encode()).hexdigest()
    return RetrievalSet(f"SciFact train ({directory.name})", tuple(claims[q] for q in chosen),
                        tuple(corpus[d] for d in doc_ids), relevant, digest)


def ndcg_at_k(query_vectors: np.ndarray, document_vectors: np.ndarray, relevant, k: int = K) -> float:
    """Mean nDCG@k with binary relevance, ranking documents by dot product (the vectors are L2-normalized)."""
    scores = query_vectors @ document_vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for row, judged in zip(top, relevant):
        if not judged:
            continue
        gains = np.array([1.0 if doc in judged else 0.0 for doc in row])
        ideal = discounts[: min(len(judged), k)].sum()
        values.append(float((gains * discounts[: len(gains)]).sum() / ideal))
    if not values:
        raise ValueError("no query has a judged document")
    return float(np.mean(values))
