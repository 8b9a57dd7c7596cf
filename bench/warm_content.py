"""bert-recsys bench warm-content: how far item text lifts EASE^R on warm items, with the text in EASE^R itself.

A research probe, not the product. The warm goal of docs/client.md asks the recommender's BERT channels to add
>= 10% recall@10 over the same recommender without them; the blend family there adds +4.5% on test. This probe
tries the other family the literature offers: side information inside the closed form (Jeunen et al., RecSys
2020), B from (X'X + alpha * S + lambda I)^-1, S the cosines of the items' centred text embeddings (the catalog's
mean removed, fitted on the training items). S's diagonal is 1, so alpha * S also raises EASE^R's ridge to
lambda + alpha: EASE^R alone at lambda + alpha is printed beside each alpha as the control, so that what the text
adds is not mistaken for what more regularisation does.

Protocol, as `make evaluate`'s warm part: the per-user time split (each user's last 20% of ratings; positives are
ratings >= 4), EASE^R's lambda chosen on the history's own time split. alpha and the encoder are chosen on that
inner split (validation), and the choice is reported on the test split. Only the base encoder can be chosen:
the warm fine-tune (`rec_embed`, trained for the warm split) learnt from the whole history, which holds the
validation targets, so its validation figures would flatter it; its test figures are printed for every alpha, as a
bound, not a choice. Item vectors come from the exported variants' own runtime in this process (the numbers
Triton serves). Writes build/reports/warm_content.json and .png.

It also measures three families of blends after EASE^R, on the same splits (`--no-blends`: not): EASE^R's
z-scored scores plus w x the z-scored text score (the mean of the 3 highest centred cosines to the user's last 10
or all liked items: the semantic channel's "more like this"); the same with the text's weight gated towards items
EASE^R knows little, w x c / (c + positives of the item), rescaled to a mean of 1; and EASE^R's scores smoothed along
the text graph (each item's k nearest by the text cosines) added with weight beta. A fourth family learns how
a user's text turns into their next likes, from the training part alone ("next likes", `next_likes`): each user's
training ratings are cut in time, the mean vector of the liked items before a cut is regressed (ridge) on the
positives in the next 20% after it, and the learnt map scores every item from the user's profile; it is blended
like the others. A fifth is a learnt ranker, as recommenders are built in practice ("ranker", `ranker_rows`):
EASE^R's top 100 and the text's top 30 re-ranked by gradient-boosted trees on CF features (EASE^R's score and
rank, the item's positives, recent positives, the user's likes), with and without six text features (maxsim3 over
several spans of the history, the profile cosine, the max cosine, the last liked item's cosine); the trees learn
from the split one level below the one they are measured on, never from its targets, and the same trees without
the text are the control. The base encoder's settings are chosen per family on validation; the warm fine-tune's
rows are bounds, as above. `--fine-tune-splits` makes the warm fine-tune honest instead: the encoder is fine-tuned
on the validation split's and on the test split's training parts separately (`tuned_on`, make finetune's recipe),
and the ranker chosen on validation gets the fine-tuned text features beside the base encoder's, each split's rows
from its own fine-tune; it is measured on test, with no further choice.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bert_recsys import logs, settings

log = logs.get("bench")


def centred_unit(vectors: np.ndarray, fitted_on: np.ndarray | None = None) -> np.ndarray:
    """The vectors less the mean of the `fitted_on` rows (the training items; default all), to unit length."""
    v = vectors.astype(np.float64)
    v = v - v[fitted_on if fitted_on is not None else slice(None)].mean(axis=0)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v.astype(np.float32)


def centred_cosines(vectors: np.ndarray, fitted_on: np.ndarray) -> np.ndarray:
    """[items, items] cosines of the vectors less the mean of the `fitted_on` rows (the training items)."""
    v = centred_unit(vectors, fitted_on).astype(np.float64)
    return (v @ v.T).astype(np.float32)


def top_metrics(total: np.ndarray, seen: list[int], item_ids: np.ndarray, truths: set, n_items: int, n_seen: int) -> dict:
    """One user's metrics for scores over `item_ids`: its top 50 less the items it has seen, as `make evaluate`
    ranks them."""
    from bert_recsys.client.evaluate import ranking_metrics

    total = total.copy()
    total[seen] = -np.inf
    top = np.argpartition(-total, 50)[:50]
    ranked = [int(item_ids[i]) for i in top[np.argsort(-total[top], kind="stable")]]
    return ranking_metrics(ranked, truths, n_items, n_seen)


def user_columns(scorer, history) -> tuple[list[int], list[int]]:
    """A user's liked and seen items, as `scorer`'s columns (items it scores)."""
    return ([scorer.column[int(i)] for i in history.liked if int(i) in scorer.column],
            [scorer.column[int(i)] for i in history.items if int(i) in scorer.column])


def measured_users(scorer, train, truth: dict[int, set], positive: float = 4.0):
    """(user, truths, history, liked columns, seen columns) for every user with a truth and a training history, in
    user order."""
    from bert_recsys.client.scorers import histories

    known = histories(train, positive)
    for user, truths in sorted(truth.items()):
        history = known.get(user)
        if history is not None:
            yield (user, truths, history, *user_columns(scorer, history))


def mean_metrics(rows: list[dict]) -> dict:
    return {key: float(np.mean([m[key] for m in rows])) for key in ("recall@10", "ndcg@10")} | {"users": len(rows)}


def scores(scorer, train, truth: dict[int, set], n_items: int) -> dict:
    """An EaseScorer's top 50 for every user with a test positive, among the items it scores less the user's seen
    ones, as `make evaluate`'s EASE^R baseline ranks them (vectorised here: 11 systems on two splits)."""
    per_user = []
    for _, positives, history, liked, seen in measured_users(scorer, train, truth):
        total = scorer.weights[liked].sum(axis=0) if liked else np.zeros(len(scorer.item_ids), dtype=np.float32)
        per_user.append(top_metrics(total, seen, scorer.item_ids, positives, n_items, len(history.items)))
    return mean_metrics(per_user)


BLEND_WEIGHTS = (0.2, 0.35, 0.5, 0.75)
BLEND_LAST = (10, 0)            # the user's last 10 liked items, or all (0)
GATES = (3, 10, 30)             # c in c / (c + positives)
SMOOTHING = {5: (0.1, 0.25, 0.5), 20: (0.1, 0.25, 0.5)}  # k nearest by text -> beta


def zscored(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean()) / (scores.std() + 1e-9)


def maxsim(unit: np.ndarray, liked: list[int], k: int = 3) -> np.ndarray:
    """Every item's mean of its k highest cosines to the liked items (rows of `unit`, unit vectors)."""
    sims = unit[liked] @ unit.T
    k = min(k, len(liked))
    return np.partition(sims, -k, axis=0)[-k:].mean(axis=0)


def text_graph(unit: np.ndarray, k: int):
    """Row-stochastic [items, items]: each item's k nearest others by cosine, weighted by it (negatives as 0)."""
    from scipy import sparse

    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argpartition(-sims, k, axis=1)[:, :k]
    weights = np.take_along_axis(sims, nearest, axis=1).clip(0)
    weights /= weights.sum(axis=1, keepdims=True) + 1e-12
    return sparse.csr_matrix((weights.ravel(), (np.repeat(np.arange(len(unit)), k), nearest.ravel())),
                             shape=sims.shape)


# The learnt text profile ("next likes"): cuts in each user's training ratings, the profile before a cut -> the
# positives in the next 20% after it.
NEXT_CUTS = {"one cut": (0.8,), "five cuts": (0.5, 0.6, 0.7, 0.8, 0.9)}
NEXT_LAST = (20, 0)             # the profile: the mean of the last 20 liked items' vectors, or of all (0)
NEXT_RIDGE = (1.0, 10.0, 100.0)
NEXT_WEIGHTS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


def text_profile(unit: np.ndarray, liked: list[int], last: int) -> np.ndarray:
    """The mean of the unit vectors of the user's `last` liked items (all: 0), oldest first; zeros without any."""
    chosen = liked[-last:] if last else liked
    return unit[chosen].mean(axis=0) if chosen else np.zeros(unit.shape[1], dtype=unit.dtype)


def next_likes(train, column: dict[int, int], unit: np.ndarray, cuts: tuple[float, ...], last: int, ridge: float,
               bilinear: bool = False, positive: float = 4.0) -> np.ndarray:
    """[dim, items] weights V, learnt from `train` alone, so that profile @ V scores the items a user likes next.
    Each user's ratings (time order) are cut at each fraction in `cuts`: the text profile of the positives before
    the cut is a row, and the positives among the next 20% of ratings are its targets; V is the ridge regression
    of the targets on the profiles, (A'A + ridge I)^-1 A'Y. `bilinear`: V is also tied to the items' own vectors
    (V = W F', W the least-squares fit of V F), so that it scores items by their text, not only by their column.
    `column`: item id -> column of `unit` (the items scored). An item never a target gets a zero column."""
    from scipy import sparse

    from bert_recsys.client.protocols import TEST_FRACTION
    from bert_recsys.client.scorers import histories

    rows, targets = [], []
    for history in histories(train, positive).values():
        n = len(history.items)
        kept = [(column.get(int(i), -1), r >= positive) for i, r in zip(history.items, history.ratings)]
        for cut in cuts:
            k = int(round(n * cut))
            if k < 3 or k >= n:
                continue
            end = min(n, k + max(1, int(round(n * TEST_FRACTION))))  # the same share as the split's test part
            before = [c for c, liked in kept[:k] if liked and c >= 0]
            after = [c for c, liked in kept[k:end] if liked and c >= 0]
            if before and after:
                rows.append(text_profile(unit, before, last))
                targets.append(after)
    if not rows:
        raise ValueError("no user has positives on both sides of a cut: nothing to learn the text profile from")
    a = np.asarray(rows, dtype=np.float64)
    y = sparse.csr_matrix((np.ones(sum(map(len, targets))),
                           (np.repeat(np.arange(len(targets)), [len(t) for t in targets]), np.concatenate(targets))),
                          shape=(len(targets), len(unit)))
    v = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), np.asarray((y.T @ a).T))
    if bilinear:
        f = unit.astype(np.float64)
        v = v @ f @ np.linalg.inv(f.T @ f + np.eye(f.shape[1])) @ f.T
    return v.astype(np.float32)


def blend_scores(scorer, train, truth: dict[int, set], n_items: int, units: dict[str, np.ndarray],
                 smoothing_unit: np.ndarray) -> dict[str, dict]:
    """recall@10 and nDCG@10 of every blend (names: "family | encoder | setting") and of EASE^R alone, over the
    users with a test positive, on the items `scorer` scores. `units`: encoder -> unit vectors of those items
    (centred on them); `smoothing_unit`: the vectors the smoothing graph is built from."""
    from collections import defaultdict

    # EaseScorer's items are those with a training positive, in np.unique's order: their counts line up with them.
    items, positives = np.unique(train.take(train.rating >= 4.0).item, return_counts=True)
    assert np.array_equal(items, scorer.item_ids), "the scorer's items are not the training positives' items"
    gates = {c: (g := c / (c + positives)) / g.mean() for c in GATES}
    graphs = {k: text_graph(smoothing_unit, k) for k in SMOOTHING}
    learnt = {(name, mode, cuts, last, ridge): next_likes(train, scorer.column, unit, NEXT_CUTS[cuts], last, ridge,
                                                          bilinear=mode == "bilinear")
              for name, unit in units.items() for mode in ("free", "bilinear") for cuts in NEXT_CUTS
              for last in NEXT_LAST for ridge in NEXT_RIDGE}
    figures = defaultdict(list)
    for _, truths, history, liked, seen in measured_users(scorer, train, truth):
        zero = np.zeros(len(scorer.item_ids))
        ease = zscored(scorer.weights[liked].sum(axis=0)) if liked else zero
        systems = {"ease": ease}
        for name, unit in units.items():
            for last in BLEND_LAST:
                chosen = liked[-last:] if last else liked
                text = zscored(maxsim(unit, chosen)) if chosen else zero
                for w in BLEND_WEIGHTS:
                    where = f"last {last or 'all'}, w {w}"
                    systems[f"text | {name} | {where}"] = ease + w * text
                    for c, gate in gates.items():
                        systems[f"gated text | {name} | {where}, c {c}"] = ease + w * gate * text
        for (name, mode, cuts, last, ridge), v in learnt.items():
            text = zscored(text_profile(units[name], liked, last) @ v) if liked else zero
            for w in NEXT_WEIGHTS:
                systems[f"next likes | {name} | {mode}, {cuts}, last {last or 'all'}, ridge {ridge:g}, w {w}"] = ease + w * text
        for k, graph in graphs.items():
            for beta in SMOOTHING[k]:
                systems[f"smoothed EASE^R | base | k {k}, beta {beta}"] = ease + beta * zscored(graph @ ease)
        for system, total in systems.items():
            figures[system].append(top_metrics(total, seen, scorer.item_ids, truths, n_items, len(history.items)))
    return {system: mean_metrics(rows) for system, rows in figures.items()}


# A learnt ranker ("two stage", as recommenders are built in practice): EASE^R's candidates, and the text's, re-ranked
# by gradient-boosted trees on CF features alone or on CF and text features. The trees learn from the split one
# level below the one they are measured on (validation: the history's inner split cut once more; test: the
# validation split itself), so they never see the targets they are measured on.
RANKER_CANDIDATES = (100, 30)   # EASE^R's top 100 and the text's top 30 (maxsim3 over all liked), less the seen
RANKER_TREES = {"50 trees, 4 leaves": (50, 4), "100 trees, 7 leaves": (100, 7), "200 trees, 7 leaves": (200, 7)}
CF_FEATURES = ("ease", "ease rank", "positives", "recent positives", "user likes")
TEXT_FEATURES = ("maxsim3 all", "maxsim3 last 10", "profile last 20", "max cosine", "maxsim3 last 5", "last liked")
TUNED_FEATURES = tuple(f"fine-tuned {name}" for name in TEXT_FEATURES)  # the same, from a warm fine-tune's vectors
ALL_FEATURES = CF_FEATURES + TEXT_FEATURES + TUNED_FEATURES
# family -> features (the family names are the report's)
RANKER_FEATURES = {"ranker": CF_FEATURES + TEXT_FEATURES, "ranker without text": CF_FEATURES}


def text_scores(unit: np.ndarray, liked: list[int]) -> list[np.ndarray]:
    """TEXT_FEATURES over every item, each z-scored: maxsim3 over all, the last 10 and the last 5 liked items, the
    cosine to the mean of the last 20, the max cosine and the cosine to the last liked item (in that order)."""
    profile = unit[liked[-20:]].mean(axis=0)
    scores = {"maxsim3 all": maxsim(unit, liked), "maxsim3 last 10": maxsim(unit, liked[-10:]),
              "profile last 20": unit @ (profile / (np.linalg.norm(profile) + 1e-12)),
              "max cosine": maxsim(unit, liked, 1), "maxsim3 last 5": maxsim(unit, liked[-5:]),
              "last liked": unit @ unit[liked[-1]]}
    return [zscored(scores[name]) for name in TEXT_FEATURES]


def ranker_rows(scorer, train, truth: dict[int, set], unit: np.ndarray, tuned: np.ndarray | None = None,
                positive: float = 4.0) -> list[dict]:
    """Per user with a truth and a training history: the candidate columns of `scorer` (its top
    RANKER_CANDIDATES[0] and the text's top RANKER_CANDIDATES[1], less the seen), their features (CF_FEATURES then
    TEXT_FEATURES, each score z-scored over the user's items) and labels (1: in the user's truth); none for a user
    without a liked item. `unit`: the scorer's items' unit vectors; `tuned`: a fine-tuned encoder's, whose text
    features (TUNED_FEATURES) then follow. Everything but the labels comes from `train`."""
    liked_rows = train.take(train.rating >= positive)
    positives = np.zeros(len(scorer.item_ids))
    np.add.at(positives, np.searchsorted(scorer.item_ids, liked_rows.item), 1)
    recent = np.zeros(len(scorer.item_ids))  # positives in the last 10% of the training part's time
    late = liked_rows.take(liked_rows.time >= np.quantile(liked_rows.time, 0.9))
    np.add.at(recent, np.searchsorted(scorer.item_ids, late.item), 1)
    width = len(ALL_FEATURES if tuned is not None else CF_FEATURES + TEXT_FEATURES)
    rows = []
    for user, truths, history, liked, seen in measured_users(scorer, train, truth, positive):
        if not liked:  # nothing to rank from: ranked as EASE^R alone ranks it (ranker_scores)
            rows.append({"user": user, "candidates": np.zeros(0, dtype=np.int64), "features": np.zeros((0, width)),
                         "labels": np.zeros(0, np.int8), "by_ease": np.zeros(0, dtype=bool), "truths": truths,
                         "seen": seen, "n_seen": len(history.items)})
            continue
        ease = zscored(scorer.weights[liked].sum(axis=0))
        text = text_scores(unit, liked) + (text_scores(tuned, liked) if tuned is not None else [])
        unseen = np.ones(len(ease), dtype=bool)
        unseen[seen] = False
        open_ = np.flatnonzero(unseen)
        by_ease = open_[np.argsort(-ease[open_], kind="stable")]
        rank = np.empty(len(ease))
        rank[by_ease] = np.arange(len(by_ease))
        candidates = np.union1d(by_ease[:RANKER_CANDIDATES[0]],
                                open_[np.argsort(-text[0][open_], kind="stable")[:RANKER_CANDIDATES[1]]])
        features = np.c_[ease[candidates], np.log1p(rank[candidates]), np.log1p(positives[candidates]),
                         np.log1p(recent[candidates]), np.full(len(candidates), np.log1p(len(liked))),
                         *[t[candidates] for t in text]]
        labels = np.isin(scorer.item_ids[candidates], list(truths)).astype(np.int8)
        rows.append({"user": user, "candidates": candidates, "features": features, "labels": labels,
                     "by_ease": rank[candidates] < RANKER_CANDIDATES[0],
                     "truths": truths, "seen": seen, "n_seen": len(history.items)})
    return rows


def kept(row: dict, features: tuple[str, ...]) -> np.ndarray:
    """The row's candidates a ranker on `features` sees: without text features, EASE^R's own candidates only (the
    text's candidates are a text channel too)."""
    return np.ones(len(row["candidates"]), dtype=bool) if set(features) - set(CF_FEATURES) else row["by_ease"]


def fit_ranker(rows: list[dict], features: tuple[str, ...], trees: tuple[int, int]):
    """Gradient-boosted trees (iterations, leaves) on the rows' named features, predicting their labels."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    columns = [ALL_FEATURES.index(f) for f in features]
    x = np.concatenate([r["features"][kept(r, features)][:, columns] for r in rows])
    y = np.concatenate([r["labels"][kept(r, features)] for r in rows])
    if y.min() == y.max():
        raise ValueError("the ranker's training rows hold one label only: nothing to learn from")
    model = HistGradientBoostingClassifier(max_iter=trees[0], max_leaf_nodes=trees[1], learning_rate=0.05,
                                           min_samples_leaf=100, l2_regularization=1.0, early_stopping=False,
                                           random_state=0)
    return model.fit(x, y), columns


def tuned_on(train, item_ids: np.ndarray, texts: list[str], cache_dir: Path) -> np.ndarray:
    """The catalog's vectors (one per item id and its text, in order) from the base encoder fine-tuned with
    `make finetune`'s recipe (training.finetune: co-liked neighbours, contrastive) on `train` alone: a warm fine-tune that never saw
    the targets it is measured on. Cached in `cache_dir` under the digest of the data, the texts and the recipe
    (~25 min each on a 2-core CPU)."""
    import hashlib
    from dataclasses import asdict

    from bert_recsys.training.finetune import Recipe, TextEncoder, cooccurrence_pairs, train as fine_tune

    recipe = Recipe()
    digest = hashlib.sha256(json.dumps([asdict(recipe), texts, str(settings.default_model_dir())]).encode())
    for column in (item_ids, train.user, train.item, train.rating, train.time):
        digest.update(np.ascontiguousarray(column).tobytes())
    path = cache_dir / f"tuned-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        log.info("fine-tuned vectors from %s", path)
        return np.load(path)
    pairs = cooccurrence_pairs(train, recipe.min_cooccurrence, recipe.neighbours)
    log.info("fine-tuning on %d ratings: %d items with co-liked neighbours", len(train), len(pairs.neighbours))
    encoder = TextEncoder(settings.default_model_dir(), recipe.max_length)
    fine_tune(encoder, dict(zip(item_ids.tolist(), texts)), pairs, recipe, None)
    vectors = encoder.embed(texts, label="catalog, fine-tuned")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, vectors)
    partial.replace(path)
    return vectors


def ranker_scores(below: list[dict], rows: list[dict], item_ids: np.ndarray, n_items: int,
                  families: dict[str, tuple[str, ...]] = RANKER_FEATURES,
                  trees_grid: dict[str, tuple[int, int]] = RANKER_TREES) -> dict[str, dict]:
    """recall@10 and nDCG@10 of each ranker ("family | base | trees": the families' features, e.g. "ranker" with
    text, "ranker without text" without), trained on `below` and measured on `rows` (items outside a user's
    candidates rank last; the rankers without text see EASE^R's candidates only)."""
    figures = {}
    for trees_name, trees in trees_grid.items():
        for family, features in families.items():
            model, columns = fit_ranker(below, features, trees)
            per_user = []
            for r in rows:
                if not len(r["candidates"]):  # no liked item: EASE^R's all-zero scores, as `scores` ranks them
                    per_user.append(top_metrics(np.zeros(len(item_ids), dtype=np.float32), r["seen"], item_ids,
                                                r["truths"], n_items, r["n_seen"]))
                    continue
                total = np.full(len(item_ids), -1e9)
                own = kept(r, features)
                total[r["candidates"][own]] = model.predict_proba(r["features"][own][:, columns])[:, 1]
                per_user.append(top_metrics(total, r["seen"], item_ids, r["truths"], n_items, r["n_seen"]))
            figures[f"{family} | base | {trees_name}"] = mean_metrics(per_user)
    return figures


def blend_summary(validation: dict[str, dict], test: dict[str, dict]) -> list[dict]:
    """Per family: the base encoder's setting chosen on validation and its test figure, and the best on test
    itself (any encoder: a bound), each as recall@10 and its change over EASE^R alone on the same split."""
    rows = []
    for family in dict.fromkeys(name.split(" | ")[0] for name in validation if name != "ease"):
        members = [n for n in validation if n.split(" | ")[0] == family]
        base = [n for n in members if n.split(" | ")[1] == "base"]
        chosen = max(base, key=lambda n: validation[n]["recall@10"])
        bound = max(members, key=lambda n: test[n]["recall@10"])
        rows.append({"family": family, "chosen": chosen,
                     "validation": validation[chosen]["recall@10"] / validation["ease"]["recall@10"] - 1,
                     "test_recall@10": test[chosen]["recall@10"],
                     "test": test[chosen]["recall@10"] / test["ease"]["recall@10"] - 1,
                     "best_on_test": bound, "best_test": test[bound]["recall@10"] / test["ease"]["recall@10"] - 1})
    return rows


def embed(directory: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoTokenizer

    from bert_recsys.contracts.manifest import Manifest
    from bert_recsys.export.runners import embed_texts, runner_for

    manifest = Manifest.read(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory.parent / "tokenizer")
    return embed_texts(runner_for(directory, manifest), tokenizer, texts, manifest.encoder.max_length, 32,
                       progress=f"embedding with {directory}")


def plot(report: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, split in zip(axes, ("validation", "test")):
        ease = report["splits"][split]["ease"]["recall@10"]
        ax.axhline(ease, color="grey", linestyle="--", label="EASE^R alone")
        ridge = report["splits"][split]["ridge"]
        alphas = sorted(float(a) for a in ridge)
        ax.plot(alphas, [ridge[f"{a:g}"]["recall@10"] for a in alphas], color="grey", marker=".",
                label="EASE^R alone at lambda + alpha (control)")
        for encoder, rows in report["splits"][split]["side"].items():
            alphas = sorted(float(a) for a in rows)
            ax.plot(alphas, [rows[f"{a:g}"]["recall@10"] for a in alphas], marker="o", label=f"+ {encoder} text")
        ax.set_xscale("log")
        ax.set_xlabel("alpha (weight of the text cosines in the Gram matrix)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"{split} ({report['splits'][split]['ease']['users']} users)")
        ax.legend(fontsize=8)
    fig.suptitle(f"EASE^R with item text as side information, warm items\n{report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fine_tuned_ranker(trees_name: str, rows: dict[str, list[dict]], item_ids: np.ndarray, n_items: int,
                      test: dict) -> dict:
    """The ranker chosen on validation (its trees) with a warm fine-tune's text features beside the base
    encoder's: each split's `rows` hold the features of an encoder fine-tuned on that split's training part alone
    (`tuned_on`); the trees learn from the validation rows and are measured on the test rows (`item_ids`: the test
    scorer's). No setting is chosen here."""
    families = {"ranker + fine-tuned text": ALL_FEATURES, "ranker, fine-tuned text only": CF_FEATURES + TUNED_FEATURES}
    figures = ranker_scores(rows["validation"], rows["test"], item_ids, n_items, families,
                            {trees_name: RANKER_TREES[trees_name]})
    ease = test["blends"]["ease"]["recall@10"]
    control = test["blends"][f"ranker without text | base | {trees_name}"]["recall@10"]
    out = {}
    for name, row in figures.items():
        out[name] = row | {"vs_ease": row["recall@10"] / ease - 1, "vs_without_text": row["recall@10"] / control - 1}
        print(f"{name}: test recall@10 {row['recall@10']:.4f}, {100 * out[name]['vs_ease']:+.1f}% over EASE^R alone, "
              f"{100 * out[name]['vs_without_text']:+.1f}% over the same trees without text")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench warm-content", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a catalog directory (MovieLens format with overviews.csv, or items.csv)")
    parser.add_argument("--variant", default="onnx-int8", help="the exported variant whose vectors are used")
    parser.add_argument("--tuned", type=Path, default=None,
                        help="the warm fine-tune's export folder (default: build/evaluate/export-rec/warm/VARIANT)")
    parser.add_argument("--alphas", default="3,10,30,100,300")
    parser.add_argument("--template", default="rich")
    parser.add_argument("--no-blends", action="store_true", help="only the side-information family")
    parser.add_argument("--fine-tune-splits", action="store_true",
                        help="also fine-tune the encoder on the validation and the test split's training parts "
                             "(make finetune's recipe, ~25 min each on 2 cores, cached under build/warm_content) and "
                             "add its text features to the ranker chosen on validation; measured on test")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "warm_content.json")
    args = parser.parse_args(argv)
    logs.configure()
    from bert_recsys.client.catalog import load_catalog
    from bert_recsys.client.evaluate import ease_lambda
    from bert_recsys.client.item_text import template
    from bert_recsys.client.protocols import time_split
    from bert_recsys.client.scorers import EaseScorer
    from bert_recsys.contracts.machine import machine

    alphas = [float(a) for a in args.alphas.split(",")]
    if not alphas or min(alphas) <= 0:
        parser.error("--alphas: positive weights, e.g. 3,10,30")
    catalog = load_catalog(args.data)
    column = {item.item_id: c for c, item in enumerate(catalog.items)}
    n_items = len(catalog.items)
    texts = template(args.template).render_all(catalog.items)
    encoders = {"base": settings.EXPORT_DIR / args.variant}
    tuned = args.tuned or settings.BUILD_DIR / "evaluate" / "export-rec" / "warm" / args.variant
    if (tuned / "manifest.json").exists():
        encoders["fine-tuned (warm)"] = tuned
    else:
        log.warning("no warm fine-tune at %s (make evaluate makes it): the base encoder only", tuned)
    started = time.perf_counter()
    vectors = {name: embed(path, texts) for name, path in encoders.items()}
    log.info("%d items embedded by %d encoders in %.0f s", len(texts), len(vectors), time.perf_counter() - started)

    history, test_truth = time_split(catalog.interactions)
    inner, validation_truth = time_split(history)
    lam, _ = ease_lambda(history)
    log.info("EASE^R lambda %g (chosen on the history's time split)", lam)
    report = {"machine": machine(), "data": str(args.data), "variant": args.variant, "template": args.template,
              "lambda": lam, "protocol": "per-user time split, last 20% of each user's ratings; positives rating >= 4; "
              "validation = the same split inside the history", "splits": {}}
    def unit_of(v, scorer):  # the vectors of the items `scorer` scores, centred on them
        return centred_unit(v[[column[int(i)] for i in scorer.item_ids]])

    def base_unit(scorer):
        return unit_of(vectors["base"], scorer)

    tuned = {}  # split -> the catalog's vectors from an encoder fine-tuned on that split's training part alone
    if args.fine_tune_splits and not args.no_blends:
        item_ids = np.array([item.item_id for item in catalog.items])
        tuned = {split: tuned_on(train, item_ids, texts, settings.BUILD_DIR / "warm_content")
                 for split, train in (("validation", inner), ("test", history))}

    if not args.no_blends:  # the rankers' training rows for validation: the inner split, cut once more
        below_train, below_truth = time_split(inner)
        below_ease = EaseScorer(below_train, lam)
        ranker_below = ranker_rows(below_ease, below_train, below_truth, base_unit(below_ease))
    rows_at = {}
    for split, train, truth in (("validation", inner, validation_truth), ("test", history, test_truth)):
        ease = EaseScorer(train, lam)  # fitted once: the baseline here, and the blends' CF channel below
        figures = {"ease": scores(ease, train, truth, n_items), "side": {}, "ridge": {}}
        log.info("%s: EASE^R alone recall@10 %.4f (%d users)", split, figures["ease"]["recall@10"], figures["ease"]["users"])
        for alpha in alphas:
            row = scores(EaseScorer(train, lam + alpha), train, truth, n_items)
            row["vs_ease"] = row["recall@10"] / figures["ease"]["recall@10"] - 1
            figures["ridge"][f"{alpha:g}"] = row
            log.info("%s: EASE^R alone at lambda %g + %g (the control): recall@10 %.4f", split, lam, alpha, row["recall@10"])
        for name, v in vectors.items():
            figures["side"][name] = {}
            for alpha in alphas:
                # S over the items EASE^R scores (those with a training positive), centred on their mean.
                side = lambda scored, v=v, alpha=alpha: alpha * centred_cosines(  # noqa: E731
                    v[[column[int(i)] for i in scored]], np.arange(len(scored)))
                row = scores(EaseScorer(train, lam, side=side), train, truth, n_items)
                row["vs_ease"] = row["recall@10"] / figures["ease"]["recall@10"] - 1
                figures["side"][name][f"{alpha:g}"] = row
                log.info("%s: + %s text, alpha %g: recall@10 %.4f (%+.1f%%)", split, name, alpha, row["recall@10"],
                         100 * row["vs_ease"])
        if not args.no_blends:
            units = {name: unit_of(v, ease) for name, v in vectors.items()}
            figures["blends"] = blend_scores(ease, train, truth, n_items, units, units["base"])
            rows = rows_at[split] = ranker_rows(ease, train, truth, base_unit(ease),
                                                unit_of(tuned[split], ease) if tuned else None)
            figures["blends"] |= ranker_scores(ranker_below, rows, ease.item_ids, n_items)
            ranker_below = rows  # the test split's rankers learn from the validation split
            test_items = ease.item_ids
            log.info("%s: %d blends measured", split, len(figures["blends"]) - 1)
        report["splits"][split] = figures
    base_validation = report["splits"]["validation"]["side"]["base"]
    chosen = max(base_validation, key=lambda a: base_validation[a]["recall@10"])
    report["chosen"] = {"encoder": "base", "alpha": float(chosen),
                        "validation": base_validation[chosen], "test": report["splits"]["test"]["side"]["base"][chosen]}

    print(f"\nEASE^R (lambda {lam:g}) with the {args.template} text's cosines as side information, warm items; "
          f"{args.variant} vectors; {report['machine']}")
    print(f"{'system':<40}{'validation r@10':>16}{'test r@10':>11}{'test nDCG@10':>14}{'test vs EASE':>14}")
    val, test = report["splits"]["validation"], report["splits"]["test"]
    print(f"{'EASE^R alone':<40}{val['ease']['recall@10']:>16.4f}{test['ease']['recall@10']:>11.4f}"
          f"{test['ease']['ndcg@10']:>14.4f}{'':>14}")
    for alpha in val["ridge"]:
        v, t = val["ridge"][alpha], test["ridge"][alpha]
        print(f"{f'EASE^R alone, lambda {lam:g} + {alpha} (control)':<40}{v['recall@10']:>16.4f}{t['recall@10']:>11.4f}"
              f"{t['ndcg@10']:>14.4f}{100 * t['vs_ease']:>+13.1f}%")
    for name in vectors:
        for alpha in val["side"][name]:
            v, t = val["side"][name][alpha], test["side"][name][alpha]
            mark = " <- chosen on validation" if name == "base" and alpha == chosen else ""
            print(f"{f'+ {name}, alpha {alpha}':<40}{v['recall@10']:>16.4f}{t['recall@10']:>11.4f}{t['ndcg@10']:>14.4f}"
                  f"{100 * t['vs_ease']:>+13.1f}%{mark}")
    best_test = max(((n, a, r) for n, rows in test["side"].items() for a, r in rows.items()), key=lambda x: x[2]["recall@10"])
    control = test["ridge"][chosen]["recall@10"]
    report["chosen"]["test_vs_control"] = report["chosen"]["test"]["recall@10"] / control - 1
    print(f"chosen on validation: base text, alpha {chosen}: {100 * report['chosen']['test']['vs_ease']:+.1f}% on test "
          f"({100 * report['chosen']['test_vs_control']:+.1f}% over its control, EASE^R at lambda {lam + float(chosen):g}); "
          f"the best on test itself ({best_test[0]}, alpha {best_test[1]}): {100 * best_test[2]['vs_ease']:+.1f}%")
    if not args.no_blends:
        report["blend_summary"] = blend_summary(val["blends"], test["blends"])
        print("\nBlends after EASE^R (z-scored channels), recall@10 against EASE^R alone on the same split; the base "
              "encoder's setting chosen on validation, and the best on test itself (a bound)")
        print(f"{'family':<22}{'chosen on validation':<46}{'val':>8}{'test':>8}  {'best on test (bound)':<66}{'test':>8}")
        for row in report["blend_summary"]:
            print(f"{row['family']:<22}{row['chosen'].split(' | ', 2)[2]:<46}{100 * row['validation']:>+7.1f}%"
                  f"{100 * row['test']:>+7.1f}%  {' | '.join(row['best_on_test'].split(' | ')[1:]):<66}"
                  f"{100 * row['best_test']:>+7.1f}%")
        ranker = next(row for row in report["blend_summary"] if row["family"] == "ranker")
        control = test["blends"][ranker["chosen"].replace("ranker |", "ranker without text |")]["recall@10"]
        report["ranker_vs_without_text"] = ranker["test_recall@10"] / control - 1
        print(f"the ranker chosen on validation against the same trees without the text features, on test: "
              f"{100 * report['ranker_vs_without_text']:+.1f}% ({ranker['test_recall@10']:.4f} against {control:.4f})")
        if tuned:
            report["fine_tuned_ranker"] = fine_tuned_ranker(ranker["chosen"].split(" | ")[2], rows_at, test_items,
                                                            n_items, test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    image = plot(report, args.out.with_suffix(".png"))
    print(f"written {args.out} and {image}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
