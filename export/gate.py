"""The verification gate: every variant is compared with the PyTorch FP32 model before it may serve.

Two measurements:
- cosine between the variant's and PyTorch's embeddings on a fixed, versioned sentence set
  (`gate_sentences.txt`, whose sha256 goes into the manifest);
- Spearman correlation of cosine similarity with the gold scores on STS-B dev, as a ratio to PyTorch FP32;
- batch invariance: each gate sentence embedded alone vs in its batch, min cosine. The same text must get the same
  vector at index time and at query time, whatever it is batched with;
- retrieval nDCG@10 on a SciFact-train subset (export/retrieval.py) as a ratio to PyTorch FP32: a second task,
  on which no recipe was chosen.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bert_recsys.contracts.manifest import GateFigures

GATE_SENTENCES = Path(__file__).with_name("gate_sentences.txt")
# Bump when what the gate measures changes: cached variants are then re-gated.
GATE_VERSION = 4


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float | None = None
    mean_cosine: float | None = None
    spearman_ratio: float | None = None
    batch_invariance_min_cosine: float | None = None
    # A distilled student (training.distill) against its teacher: STS-B Spearman ratio, whole dev.
    teacher_spearman_ratio: float | None = None
    # SciFact retrieval nDCG@10 as a ratio to PyTorch FP32 (checked where the data is, like STS-B).
    retrieval_ndcg_ratio: float | None = None

    def with_overrides(self, **values: float) -> "Thresholds":
        unknown = set(values) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown threshold {sorted(unknown)}; known: {sorted(asdict(self))}")
        return Thresholds(**{**asdict(self), **values})


TEACHER_SPEARMAN_RATIO = 0.985
# Batch invariance holds by construction for FP32, FP16, static and per-row INT8; ORT's dynamic INT8 fails it.
BATCH_INVARIANCE = 0.999
DEFAULT_THRESHOLDS = {
    "fp32": Thresholds(min_cosine=0.9999, batch_invariance_min_cosine=BATCH_INVARIANCE),
    "fp16": Thresholds(min_cosine=0.999, batch_invariance_min_cosine=BATCH_INVARIANCE),
    # BF16 keeps 8 bits of mantissa (FP16: 11): held to the Spearman ratio like INT8, and to a tighter mean cosine.
    "bf16": Thresholds(mean_cosine=0.998, spearman_ratio=0.995, batch_invariance_min_cosine=BATCH_INVARIANCE,
                       retrieval_ndcg_ratio=0.98),
    "int8": Thresholds(mean_cosine=0.99, spearman_ratio=0.99, batch_invariance_min_cosine=BATCH_INVARIANCE,
                       retrieval_ndcg_ratio=0.98),
}


def load_gate_sentences(path: Path = GATE_SENTENCES) -> tuple[list[str], str]:
    text = path.read_text(encoding="utf-8")
    sentences = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return sentences, hashlib.sha256(text.encode()).hexdigest()


def load_sts(path: Path) -> list[tuple[str, str, float]]:
    """STS Benchmark rows: TAB-separated, no quoting, some rows carry extra trailing fields."""
    with open(path, encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r[5], r[6], float(r[4])) for r in rows]


def sts_spearman(a: np.ndarray, b: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(spearmanr(cosine, gold).statistic)


STS_HALVES = ("selection", "confirmation")


def sts_half(first: str, second: str) -> str:
    """Which half of STS-B dev a pair is in, by a hash of its text: recipes (which layers stay FP32, the INT8 mode)
    are chosen on `selection`; `confirmation` played no part in any choice and is the figure to quote."""
    digest = hashlib.sha256(f"{first}\t{second}".encode("utf-8")).hexdigest()
    return STS_HALVES[int(digest, 16) % 2]


def spearman_by_half(a: np.ndarray, b: np.ndarray, pairs: list[tuple[str, str, float]]) -> dict[str, float]:
    gold = np.array([score for _, _, score in pairs])
    halves = np.array([sts_half(s1, s2) for s1, s2, _ in pairs])
    return {half: sts_spearman(a[halves == half], b[halves == half], gold[halves == half]) for half in STS_HALVES}


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@dataclass
class Reference:
    """PyTorch FP32 figures every variant is held against; computed once per export run."""

    embed: Callable[[Any, list[str], str | None], np.ndarray]  # (runner, texts, progress label) -> embeddings
    sentences: list[str]
    sentences_sha256: str
    sentence_embeddings: np.ndarray
    sts_pairs: list[tuple[str, str, float]] = field(default_factory=list)
    sts_spearman: float | None = None
    sts_spearman_halves: dict = field(default_factory=dict)   # selection / confirmation, PyTorch FP32
    sts_note: str = ""
    # A student's teacher, PyTorch FP32 on the same pairs (None: not a student, or no STS-B here).
    teacher_spearman: float | None = None
    teacher_spearman_halves: dict = field(default_factory=dict)
    # The retrieval task (export.retrieval.RetrievalSet), PyTorch FP32's nDCG@10 on it, or why it was not run.
    retrieval: Any = None
    retrieval_ndcg: float | None = None
    retrieval_note: str = "not run"

    def add_teacher(self, teacher_runner) -> None:
        if self.sts_pairs:
            a, b = self._embed_sts(teacher_runner, "teacher sts-b")
            self.teacher_spearman = sts_spearman(a, b, self.sts_gold)
            self.teacher_spearman_halves = spearman_by_half(a, b, self.sts_pairs)

    def add_retrieval(self, retrieval, runner) -> None:
        """`retrieval`: an export.retrieval.RetrievalSet; PyTorch FP32's nDCG@10 on it becomes the reference."""
        self.retrieval = retrieval
        self.retrieval_ndcg = self._ndcg(runner, "pytorch")
        self.retrieval_note = f"{retrieval.name}: {len(retrieval.queries)} queries, {len(retrieval.documents)} documents"

    def _ndcg(self, runner, label: str) -> float:
        from bert_recsys.export.retrieval import ndcg_at_k

        queries = self.embed(runner, list(self.retrieval.queries), f"{label} retrieval queries")
        documents = self.embed(runner, list(self.retrieval.documents), f"{label} retrieval documents")
        return ndcg_at_k(queries, documents, self.retrieval.relevant)

    @classmethod
    def build(cls, embed_with, torch_runner, sts_path: Path | None) -> "Reference":
        """`embed_with(runner, texts, label)` embeds texts with any runner."""
        sentences, sha = load_gate_sentences()
        ref = cls(
            embed=embed_with,
            sentences=sentences,
            sentences_sha256=sha,
            sentence_embeddings=embed_with(torch_runner, sentences, "pytorch gate set"),
        )
        if sts_path is not None and Path(sts_path).exists():
            ref.sts_pairs = load_sts(Path(sts_path))
            a, b = ref._embed_sts(torch_runner, "pytorch sts-b")
            ref.sts_spearman = sts_spearman(a, b, ref.sts_gold)
            ref.sts_spearman_halves = spearman_by_half(a, b, ref.sts_pairs)
            ref.sts_note = f"{Path(sts_path).name} ({len(ref.sts_pairs)} pairs)"
        else:
            ref.sts_note = f"not run: STS-B dev not found at {sts_path}"
        return ref

    @property
    def sts_gold(self) -> np.ndarray:
        return np.array([score for _, _, score in self.sts_pairs])

    def _embed_sts(self, runner, label: str) -> tuple[np.ndarray, np.ndarray]:
        texts = [s1 for s1, _, _ in self.sts_pairs] + [s2 for _, s2, _ in self.sts_pairs]
        vectors = self.embed(runner, texts, label)
        return vectors[: len(self.sts_pairs)], vectors[len(self.sts_pairs) :]


@dataclass
class GateResult:
    figures: GateFigures
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self, thresholds: Thresholds) -> dict:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "thresholds": asdict(thresholds),
            "figures": self.figures.to_json(),
        }


def evaluate(runner, reference: Reference, thresholds: Thresholds, require_sts: bool = False) -> GateResult:
    vectors = reference.embed(runner, reference.sentences, f"{runner.name} gate set")
    cosines = row_cosines(vectors, reference.sentence_embeddings)
    figures = GateFigures(gate_set={"sentences": len(reference.sentences), "sha256": reference.sentences_sha256},
                          cosine_mean=float(np.mean(cosines)), cosine_min=float(np.min(cosines)), sts=reference.sts_note)
    # Same sentences one at a time: ORT's dynamic INT8 quantizes activations per batch, so its output depends on
    # what a text is batched with.
    alone = np.concatenate([reference.embed(runner, [s], None) for s in reference.sentences])
    figures.batch_invariance_min_cosine = float(np.min(row_cosines(alone, vectors)))
    failures = []
    invariance = thresholds.batch_invariance_min_cosine
    if invariance is not None and figures.batch_invariance_min_cosine < invariance:
        failures.append(f"batch invariance {figures.batch_invariance_min_cosine:.6f} < {invariance}: a text's "
                        "vector depends on what it is batched with")
    if thresholds.min_cosine is not None and figures.cosine_min < thresholds.min_cosine:
        failures.append(f"min cosine {figures.cosine_min:.6f} < {thresholds.min_cosine}")
    if thresholds.mean_cosine is not None and figures.cosine_mean < thresholds.mean_cosine:
        failures.append(f"mean cosine {figures.cosine_mean:.6f} < {thresholds.mean_cosine}")
    if reference.sts_spearman is not None:
        a, b = reference._embed_sts(runner, f"{runner.name} sts-b")
        spearman = sts_spearman(a, b, reference.sts_gold)
        ratio = spearman / reference.sts_spearman
        figures.sts_spearman, figures.sts_spearman_fp32, figures.spearman_ratio = spearman, reference.sts_spearman, ratio
        halves = spearman_by_half(a, b, reference.sts_pairs)  # STS_HALVES: selection, confirmation
        figures.spearman_ratio_selection = halves["selection"] / reference.sts_spearman_halves["selection"]
        figures.spearman_ratio_confirmation = halves["confirmation"] / reference.sts_spearman_halves["confirmation"]
        if reference.teacher_spearman is not None:
            to_teacher = spearman / reference.teacher_spearman
            figures.sts_spearman_teacher, figures.spearman_ratio_to_teacher = reference.teacher_spearman, to_teacher
            teacher = reference.teacher_spearman_halves
            figures.spearman_ratio_to_teacher_selection = halves["selection"] / teacher["selection"]
            figures.spearman_ratio_to_teacher_confirmation = halves["confirmation"] / teacher["confirmation"]
            if thresholds.teacher_spearman_ratio is not None and to_teacher < thresholds.teacher_spearman_ratio:
                failures.append(f"STS-B Spearman ratio to the teacher {to_teacher:.5f} < {thresholds.teacher_spearman_ratio}")
        if thresholds.spearman_ratio is not None and ratio < thresholds.spearman_ratio:
            failures.append(f"STS-B Spearman ratio {ratio:.5f} < {thresholds.spearman_ratio}")
    elif thresholds.spearman_ratio is not None and require_sts:
        failures.append(f"Spearman check required but {reference.sts_note}")
    figures.retrieval = reference.retrieval_note
    if reference.retrieval_ndcg is not None:
        ndcg = reference._ndcg(runner, runner.name)
        ratio = ndcg / reference.retrieval_ndcg
        figures.retrieval_ndcg10, figures.retrieval_ndcg10_fp32, figures.retrieval_ndcg_ratio = ndcg, reference.retrieval_ndcg, ratio
        figures.retrieval_set = reference.retrieval.describe()
        if thresholds.retrieval_ndcg_ratio is not None and ratio < thresholds.retrieval_ndcg_ratio:
            failures.append(f"SciFact nDCG@10 ratio {ratio:.5f} < {thresholds.retrieval_ndcg_ratio}")
    return GateResult(figures=figures, failures=failures)
