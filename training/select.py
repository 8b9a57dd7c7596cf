"""bert-recsys train select DATA [--finetuned DIR ...]: the cold-start settings, compared on the validation split.

Every setting the evaluation and the recommender use for new items was chosen here, on the validation split of
item cold-start seed 0 (client.protocols.validation_split: 20% of the *visible* items hidden again, inside the
training part), never on a reported test split:

- the item text template (client.item_text) for the encoder and for TF-IDF;
- TF-IDF's n-grams and user representation (client.coldstart.TFIDF);
- the encoder's user representation (mean, interests, maxsim over m), raw or centred;
- the fine-tuning recipe (training.finetune.Recipe): each DIR passed with --finetuned is a model fine-tuned with
  `bert-recsys train finetune DATA --split cold:0 ...` (trained without the validation items, see there);
- the taste weight of the content score (client.scorers.TASTE_WEIGHT).

Embeds the catalog in process (PyTorch, as training does), prints one row per setting (recall@10, recall@50,
nDCG@10 +- SE, users) and writes them as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.client.catalog import load_catalog
from bert_recsys.client.item_text import TEMPLATES
from bert_recsys.client.protocols import ItemHoldout, item_holdout, rank_metrics, summarise, validation_split
from bert_recsys.client.scorers import ContentScorer, TfidfScorer, VectorScorer, centred, histories, rank
from bert_recsys.training.finetune import TextEncoder

log = logs.get("training")
MAX_LENGTH = 128


def evaluate(scorer, users, split) -> dict:
    return summarise([rank_metrics(rank(scorer, users[u], split.hidden), split.truth[u]) for u in split.users])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys train select", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--finetuned", type=Path, action="append", default=[],
                        help="a model from training.finetune --split cold:0 (repeat to compare recipes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "select.json")
    args = parser.parse_args(argv)
    logs.configure()
    started = time.perf_counter()
    catalog = load_catalog(args.data)
    item_ids = np.array([item.item_id for item in catalog.items], dtype=np.int64)
    split = validation_split(item_holdout(item_ids, catalog.interactions, ItemHoldout(seed=args.seed)), item_ids)
    users = histories(split.train)
    visible = np.setdiff1d(item_ids, split.hidden)
    visible_rows = np.flatnonzero(np.isin(item_ids, visible))
    log.info("validation split of seed %d: %d hidden (visible) items, %d users", args.seed, len(split.hidden),
             len(split.truth))
    texts = {name: t.render_all(catalog.items) for name, t in TEMPLATES.items()}
    rows: dict[str, dict] = {}

    def record(name: str, scorer) -> None:
        rows[name] = evaluate(scorer, users, split)
        r = rows[name]
        print(f"{name:<58} r@10 {r['recall@10']:.4f}  r@50 {r['recall@50']:.4f}  nDCG@10 {r['ndcg@10']:.4f} "
              f"+-{r['ndcg@10_se']:.4f}  ({r['users']} users)", flush=True)

    for template, documents in texts.items():
        for ngrams in (1, 2):
            for representation, m in (("mean", 3), ("maxsim", 3), ("maxsim", 10)):
                label = f"{representation}{m}" if representation == "maxsim" else representation
                record(f"tfidf {template} {ngrams}-gram {label}",
                       TfidfScorer("tfidf", item_ids, documents, visible, representation, m, ngrams))
    base = TextEncoder(settings.default_model_dir(), MAX_LENGTH)
    vectors = {}
    for template, documents in texts.items():
        vectors[template] = base.embed(documents, label=f"base, {template}")
        for space, matrix in (("raw", vectors[template]), ("centred", centred(vectors[template], visible_rows))):
            for representation, m in (("mean", 3), ("interests", 3), ("maxsim", 1), ("maxsim", 3), ("maxsim", 10)):
                label = f"{representation}{m}" if representation == "maxsim" else representation
                record(f"base {template} {space} {label}", VectorScorer("v", item_ids, matrix, representation, m))
    similar = centred(vectors["rich"], visible_rows)
    for weight in (0.5, 1.0, 2.0):
        record(f"content: base maxsim3 + {weight} x base mean", ContentScorer("c", item_ids, similar, similar, weight))
    for directory in args.finetuned:
        tuned = centred(TextEncoder(directory, MAX_LENGTH).embed(texts["rich"], label=f"{directory.name}, rich"),
                        visible_rows)
        for representation in ("mean", "interests"):
            record(f"{directory.name} rich centred {representation}", VectorScorer("v", item_ids, tuned, representation))
        record(f"{directory.name} rich centred maxsim3", VectorScorer("v", item_ids, tuned, "maxsim", 3))
        for weight in (0.5, 1.0, 2.0):
            record(f"content: base maxsim3 + {weight} x {directory.name} mean",
                   ContentScorer("c", item_ids, similar, tuned, weight))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"split": split.describe(), "rows": rows}, indent=2))
    log.info("%d settings compared in %.0f s; written %s", len(rows), time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
