"""bert-recsys train finetune DATA --out DIR: fine-tune the BERT on interactions, for recommendations.

What it learns from: pairs of items that the same users liked (co-occurrence neighbours), from the training part
only, on the item text the catalog index uses (client.item_text). The loss is in-batch contrastive (InfoNCE,
symmetric); `distill` optionally adds a term keeping the base model's item-item cosines.

What it is for: taste. On the validation split, the fine-tuned encoder ranks new items with better recall but
loses the base model's precision on "more like this" (sequels, the same subject), so it is served beside the
general encoder, not instead of it: the recommender's content score is the general encoder's "more like this"
plus the fine-tuned encoder's taste (client.scorers.content_scores), and the gate measures exactly that.

What it never learns from:
- with --split (client.protocols.SPLITS), what that evaluation split holds out: `cold:S` the hidden items of item
  cold-start seed S, `warm` each user's last 20%, `temporal` everything after the cutoff. The evaluation only
  uses an encoder for the split it was trained for; `all` (the default) is the production encoder;
- the validation items, always: a further 20% of the remaining items, carved from the training part
  (client.protocols.validation_split). The recommendation gate compares the base and the fine-tuned encoder on
  them (item cold start, nDCG@10), and every setting below was chosen on such a validation split.

Writes a sentence-transformers directory (the base model's files with the new weights) and `finetune.json`, its
lineage: base model and its sha256, data files and their sha256, the split, the template, the recipe, losses, the
recommendation gate, and how far STS-B and SciFact moved (reported, not gated). `bert-recsys export --model DIR`
exports and gates it like any encoder, and carries the lineage into every manifest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.client.catalog import CATALOG_FILES, Interactions, load_catalog
from bert_recsys.client.item_text import DEFAULT_TEMPLATE, TextTemplate, template
from bert_recsys.client.protocols import HoldoutSplit, ItemHoldout, parse_split, training_part, validation_split
from bert_recsys.contracts.digest import directory_files

log = logs.get("training")
LINEAGE_FILE = "finetune.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Recipe:
    """How the encoder is fine-tuned. The defaults were chosen on the validation split of item cold-start seed 0
    (docs/client.md, "Fine-tuning for recommendations")."""

    steps: int = 300
    batch: int = 32
    lr: float = 5e-5
    max_length: int = 96
    scale: float = 20.0          # logit scale of the in-batch softmax (1 / temperature)
    min_cooccurrence: int = 3    # a positive pair was liked by at least this many users
    neighbours: int = 20         # positives of an item: its top co-occurrence neighbours (cosine-normalised)
    distill: float = 0.0         # weight of a term keeping the base model's item-item cosines (0 = off)
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch < 2 or self.lr <= 0 or self.max_length < 8:
            raise ValueError(f"recipe out of range: {self}")
        if self.min_cooccurrence < 1 or self.neighbours < 1 or self.distill < 0:
            raise ValueError(f"recipe out of range: {self}")


# ---- the data: pure numpy, unit-tested --------------------------------------------------------------------
@dataclass
class Pairs:
    """Each item's co-occurrence neighbours among the training positives, with sampling weights."""

    neighbours: dict[int, tuple[np.ndarray, np.ndarray]]   # item -> (neighbour ids, weights summing to 1)
    anchors: np.ndarray                                    # one entry per training positive on an item with neighbours

    @property
    def items(self) -> set[int]:
        return set(self.neighbours) | {int(n) for ids, _ in self.neighbours.values() for n in ids}

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[list[int], list[int]]:
        """A batch of (anchor, positive): anchors in proportion to their positives, positives by weight."""
        anchors = [int(a) for a in self.anchors[rng.integers(0, len(self.anchors), batch)]]
        positives = []
        for anchor in anchors:
            ids, weights = self.neighbours[anchor]
            positives.append(int(ids[rng.choice(len(ids), p=weights)]))
        return anchors, positives


def cooccurrence_pairs(train: Interactions, min_cooccurrence: int = 2, neighbours: int = 50,
                       positive: float = 4.0) -> Pairs:
    from scipy import sparse

    liked = train.take(train.rating >= positive)
    users, user_rows = np.unique(liked.user, return_inverse=True)
    items, item_cols = np.unique(liked.item, return_inverse=True)
    matrix = sparse.csr_matrix((np.ones(len(liked), dtype=np.float32), (user_rows, item_cols)),
                               shape=(len(users), len(items)))
    matrix.data[:] = 1.0  # a user who rated an item twice likes it once
    counts = np.asarray(matrix.sum(axis=0)).ravel()
    together = (matrix.T @ matrix).tocsr()
    together.setdiag(0)
    together.data[together.data < min_cooccurrence] = 0
    together.eliminate_zeros()
    norm = sparse.diags(1.0 / np.sqrt(np.maximum(counts, 1.0)))
    cosine = (norm @ together @ norm).tocsr()
    table = {}
    for row in range(cosine.shape[0]):
        start, end = cosine.indptr[row], cosine.indptr[row + 1]
        if end == start:
            continue
        order = np.argsort(-cosine.data[start:end], kind="stable")[:neighbours]
        weights = cosine.data[start:end][order].astype(np.float64)
        table[int(items[row])] = (items[cosine.indices[start:end][order]], weights / weights.sum())
    anchors = liked.item[np.isin(liked.item, list(table))] if table else np.zeros(0, dtype=np.int64)
    return Pairs(table, anchors)


@dataclass
class TrainingSplit:
    """What a fine-tune trains on and what its gate measures on."""

    name: str                        # the evaluation split it is trained for (client.protocols.SPLITS)
    excluded: np.ndarray             # items whose interactions it must never see (the split's held-out items)
    validation: HoldoutSplit         # carved from the training part: the gate's items, never trained on

    @property
    def train(self) -> Interactions:
        return self.validation.train

    def describe(self) -> dict:
        return {"name": self.name, "excluded_items": int(len(self.excluded)),
                "validation": self.validation.describe()}


def training_split(item_ids: np.ndarray, data: Interactions, split: str = "all") -> TrainingSplit:
    """The training part of `split` (client.protocols.training_part), less a validation hold-out of its items."""
    name = parse_split(split)
    train, excluded = training_part(name, item_ids, data)
    outer = HoldoutSplit(ItemHoldout(seed=int(name[5:]) if name.startswith("cold:") else 0), excluded, train, {})
    return TrainingSplit(name, excluded, validation_split(outer, item_ids))


def data_files(directory: Path) -> dict[str, str]:
    """The sha256 of each catalog file a fine-tune read (links resolved): its data identity."""
    return directory_files(directory, CATALOG_FILES)


# ---- the encoder: torch ------------------------------------------------------------------------------------
class TextEncoder:
    """The served function (BERT, pooling, L2 normalisation: export.onnx_export.SentenceEncoder) with its
    tokenizer, for training and for embedding a catalog in process."""

    def __init__(self, model_dir: Path, max_length: int):
        import torch
        from transformers import AutoTokenizer

        from bert_recsys.export.onnx_export import load_torch_encoder
        from bert_recsys.export.source import load_source

        self.torch = torch
        self.source = load_source(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source.transformer_path)
        self.encoder = load_torch_encoder(self.source, attn_implementation="sdpa")
        self.max_length = max_length

    def __call__(self, texts: list[str], max_length: int | None = None):
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length or self.max_length,
                               return_tensors="pt")
        return self.encoder(batch["input_ids"], batch["attention_mask"])

    def embed(self, texts, batch_size: int = 64, label: str = "embedding", max_length: int | None = None) -> np.ndarray:
        """Every text, in batches of similar length, without gradients; progress every tenth. `max_length`: the
        training length unless given (the general tasks use the model's own)."""
        torch = self.torch
        self.encoder.eval()
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.source.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        with torch.inference_mode():
            for n, start in enumerate(starts):
                index = order[start : start + batch_size]
                out[index] = self([texts[i] for i in index], max_length).float().numpy()
                if n % max(1, len(starts) // 10) == 0:
                    log.info("%s: %d/%d texts", label, min(start + batch_size, len(texts)), len(texts))
        return out


def train(encoder: TextEncoder, texts: dict[int, str], pairs: Pairs, recipe: Recipe,
          base_vectors: dict[int, np.ndarray] | None) -> list[float]:
    """The contrastive fine-tune, in place; returns the loss of every step."""
    torch = encoder.torch
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model = encoder.encoder.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    warmup = max(1, recipe.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (recipe.steps - s) / max(1, recipe.steps - warmup))))
    losses, started = [], time.perf_counter()
    for step in range(recipe.steps):
        anchors, positives = pairs.sample(rng, recipe.batch)
        a = encoder([texts[i] for i in anchors])
        b = encoder([texts[i] for i in positives])
        logits = recipe.scale * a @ b.T
        # Another row's positive that is this row's own item (or positive) is not a negative.
        same = torch.tensor([[positives[j] in (anchors[i], positives[i]) and j != i for j in range(len(positives))]
                             for i in range(len(anchors))])
        logits = logits.masked_fill(same, -1e4)
        labels = torch.arange(len(anchors))
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        if recipe.distill and base_vectors is not None:
            both = torch.cat([a, b])
            reference = torch.tensor(np.stack([base_vectors[i] for i in anchors + positives]))
            loss = loss + recipe.distill * ((both @ both.T - reference @ reference.T) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.item()))
        if step == 0 or (step + 1) % 25 == 0 or step + 1 == recipe.steps:
            spent = time.perf_counter() - started
            log.info("step %d/%d loss %.3f (last 25: %.3f), %.0f s, ~%.0f s left", step + 1, recipe.steps, losses[-1],
                     float(np.mean(losses[-25:])), spent, spent / (step + 1) * (recipe.steps - step - 1))
    model.eval()
    return losses


# ---- the gate: the recommendation task, on the validation items ------------------------------------------
def recommendation_figures(item_ids: np.ndarray, base: np.ndarray, tuned: np.ndarray | None,
                           split: HoldoutSplit) -> dict:
    """Item cold start on `split`: the recommender's content score (client.scorers.content_scores), centred on
    the visible items, with the taste term from the fine-tuned model, or from the base model (`tuned` None: what
    the recommender does without a recommendation encoder)."""
    from bert_recsys.client.protocols import rank_metrics, summarise
    from bert_recsys.client.scorers import ContentScorer, centred, histories, rank

    visible_rows = np.flatnonzero(~np.isin(item_ids, split.hidden))
    similar = centred(base, visible_rows)
    scorer = ContentScorer("content", item_ids, similar, centred(tuned, visible_rows) if tuned is not None else similar)
    users = histories(split.train)
    return summarise([rank_metrics(rank(scorer, users[u], split.hidden), split.truth[u]) for u in split.users])


def gate_verdict(base: dict, served: dict) -> dict:
    """Pass when the fine-tuned encoder's taste term ranks the validation items better (nDCG@10) than the base
    model's in the same content score."""
    passed = served["ndcg@10"] > base["ndcg@10"]
    return {"passed": passed, "metric": "ndcg@10", "base": base, "finetuned": served,
            "ratio": served["ndcg@10"] / base["ndcg@10"] if base["ndcg@10"] else None,
            "rule": "item cold start on the validation items: the content score with the fine-tuned taste term has a "
                    "higher nDCG@10 than with the base model's"}


def general_figures(encoder: TextEncoder) -> dict:
    """STS-B dev Spearman and SciFact nDCG@10 (the export gate's tasks), where the data is: reported, not gated."""
    from bert_recsys.export.gate import load_sts, sts_spearman
    from bert_recsys.export.retrieval import load_scifact, ndcg_at_k

    out = {}
    length = encoder.source.max_length
    if settings.STSB_DEV.exists():
        rows = load_sts(settings.STSB_DEV)
        a = encoder.embed([r[0] for r in rows], label="STS-B dev, first sentences", max_length=length)
        b = encoder.embed([r[1] for r in rows], label="STS-B dev, second sentences", max_length=length)
        out["stsb_dev_spearman"] = sts_spearman(a, b, np.array([r[2] for r in rows]))
    if (settings.SCIFACT_TRAIN / "corpus.jsonl").exists():
        data = load_scifact(settings.SCIFACT_TRAIN)
        queries = encoder.embed(data.queries, label="SciFact claims", max_length=length)
        documents = encoder.embed(data.documents, label="SciFact abstracts", max_length=length)
        out["scifact_ndcg@10"] = ndcg_at_k(queries, documents, data.relevant)
    return out


def write_model(encoder: TextEncoder, out: Path, lineage: dict) -> Path:
    """The base model's directory with the new weights and the lineage: built aside, renamed into place whole."""
    source = encoder.source
    out = Path(out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source.path, staging, ignore=shutil.ignore_patterns(
        *WEIGHT_FILES, "onnx", "openvino", "*.onnx", "__pycache__", "*.py", LINEAGE_FILE, "distill.json"))
    encoder.encoder.bert.save_pretrained(staging / source.transformer_path.relative_to(source.path), safe_serialization=True)
    (staging / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def read_lineage(model_dir: Path) -> dict | None:
    path = Path(model_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finetune(data_dir: Path, out: Path, recipe: Recipe = Recipe(), chosen: TextTemplate | str = DEFAULT_TEMPLATE,
             split: str = "all", model_dir: Path | None = None, general: bool = True) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    chosen = template(chosen)
    catalog = load_catalog(data_dir)
    if catalog.errors:
        log.warning("%s: skipped %d malformed rows, first: %s", data_dir, len(catalog.errors), catalog.errors[0])
    item_ids = np.array([item.item_id for item in catalog.items], dtype=np.int64)
    texts = dict(zip(item_ids.tolist(), chosen.render_all(catalog.items)))
    split = training_split(item_ids, catalog.interactions, split)
    pairs = cooccurrence_pairs(split.train, recipe.min_cooccurrence, recipe.neighbours)
    held = set(split.validation.hidden.tolist()) | set(split.excluded.tolist())
    if pairs.items & held:  # by construction impossible: the training part holds no interaction with them
        raise AssertionError(f"held-out items in the training pairs: {sorted(pairs.items & held)[:10]}")
    if not pairs.neighbours:
        raise ValueError(f"{data_dir}: no item pair liked by >= {recipe.min_cooccurrence} users in the training part")
    log.info("split %s: %d items with co-liked neighbours, %d anchor positives; %d validation items, %d validation "
             "users; %d items of the split never trained on", split.name, len(pairs.neighbours), len(pairs.anchors),
             len(split.validation.hidden), len(split.validation.truth), len(split.excluded))
    model_dir = Path(model_dir or settings.default_model_dir())
    encoder = TextEncoder(model_dir, recipe.max_length)
    base_vectors = encoder.embed([texts[i] for i in item_ids.tolist()], label="catalog, base model")
    base_general = general_figures(encoder) if general else {}
    losses = train(encoder, texts, pairs, recipe, dict(zip(item_ids.tolist(), base_vectors)))
    tuned_vectors = encoder.embed([texts[i] for i in item_ids.tolist()], label="catalog, fine-tuned")
    verdict = gate_verdict(recommendation_figures(item_ids, base_vectors, None, split.validation),
                           recommendation_figures(item_ids, base_vectors, tuned_vectors, split.validation))
    tuned_general = general_figures(encoder) if general else {}
    lineage = {
        "kind": "recommendation fine-tune",
        "base": {"path": str(encoder.source.path), "sha256": encoder.source.sha256},
        "data": {"path": str(Path(data_dir).resolve()), "format": catalog.format, "files": data_files(data_dir),
                 "items": len(catalog.items), "interactions": len(catalog.interactions)},
        "template": chosen.identity,
        "split": split.describe(),
        "recipe": asdict(recipe),
        "pairs": {"items_with_neighbours": len(pairs.neighbours), "anchor_positives": int(len(pairs.anchors))},
        "losses": {"first_25": float(np.mean(losses[:25])), "last_25": float(np.mean(losses[-25:]))},
        "recommendation_gate": verdict,
        "general_tasks": {"base": base_general, "finetuned": tuned_general,
                          "note": "reported, not gated: the fine-tuned encoder serves recommendations, not /v1/embeddings"},
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_model(encoder, out, lineage)
    g = verdict
    log.info("recommendation gate %s: nDCG@10 on %d validation users %.4f (base) -> %.4f (fine-tuned); written %s",
             "passed" if g["passed"] else "FAILED", g["base"]["users"], g["base"]["ndcg@10"], g["finetuned"]["ndcg@10"], out)
    for name, value in tuned_general.items():
        log.info("%s: %.4f (base) -> %.4f (fine-tuned), not gated", name, base_general.get(name, math.nan), value)
    return lineage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys train finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a catalog directory (client.catalog: MovieLens or items.csv)")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "finetuned" / "rec")
    parser.add_argument("--model", type=Path, default=None, help="the base BERT directory (default: the default model)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="item text template (client.item_text)")
    parser.add_argument("--split", default="all",
                        help="what to train without: all (production), warm, temporal or cold:<seed> (the evaluation's "
                             "encoders, client.protocols)")
    parser.add_argument("--no-general", action="store_true", help="skip the STS-B and SciFact figures")
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logs.configure()
    try:
        recipe = Recipe(**{name: getattr(args, name) for name in asdict(defaults)})
        lineage = finetune(args.data, args.out, recipe, args.template, args.split, args.model, not args.no_general)
    except (ValueError, FileNotFoundError) as error:
        print(f"training.finetune: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "recommendation_gate": lineage["recommendation_gate"]["passed"],
                      "ndcg@10": {"base": lineage["recommendation_gate"]["base"]["ndcg@10"],
                                  "finetuned": lineage["recommendation_gate"]["finetuned"]["ndcg@10"]}}))
    return 0 if lineage["recommendation_gate"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
