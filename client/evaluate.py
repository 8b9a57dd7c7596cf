"""bert-recsys evaluate server DATA_DIR: offline quality of the recommender, and of the BERT behind it, through Triton.

Three protocols (client.protocols), each on a split no setting was chosen on:

    warm       per user, the last 20% of ratings by time are the test part; positives are ratings >= 4. The
               recommender (co-occurrence, popularity, profiles) is fitted on the history part only. Systems:
               the recommender, each channel alone, its ablations, popularity, random, and EASE^R.
    cold       (primary for text) item cold start: a random 20% of the catalog hidden from training, on
               --seeds seeds; each test user ranks the hidden items. Systems: random, genres, TF-IDF on the title
               text and on the rich text, popularity, and the encoders' content channels (client.coldstart).
    temporal   (secondary) one global cutoff: cold items, warm items and cold users scored apart, with their
               population sizes (a warning under 100 users).

Encoders: the general one (`embed`), and the recommendation encoder (`rec_embed`) where the repository serves a
version trained for the split at hand (`trained_split` = cold:<seed>, warm or temporal; see training.finetune):
a version trained on the test part is never used. The catalog is embedded through Triton, with a progress bar.

Prints JSON on stdout, a readable table on stderr, and writes the JSON and a plot to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bert_recsys.contracts.protocol import Protocol
from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.client.catalog import CATALOG_FILES, Catalog, load_catalog
from bert_recsys.client.coldstart import EncodedCatalog, item_cold_start, temporal
from bert_recsys.client.index import IndexSettings, build_catalog_index
from bert_recsys.client.item_text import DEFAULT_TEMPLATE, TemplateUse, TextTemplate
from bert_recsys.client.item_text import template as text_template
from bert_recsys.client.protocols import TEST_FRACTION, parse_split, time_split
from bert_recsys.client.recall import RecallChannel
from bert_recsys.client.recommend import Recommender, RecommenderSettings, TasteIndex
from bert_recsys.client.scorers import EaseScorer, histories, rank
from bert_recsys.client.triton import TritonClient
from bert_recsys.contracts.digest import directory_files, files_identity

log = logs.get("client")
PROTOCOLS = ("warm", "cold", "temporal")
EASE_LAMBDAS = (100.0, 300.0, 1000.0, 3000.0)


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


def list_metrics(lists: list[list[int]], vectors_of, popularity: dict[int, float], n_items: int) -> dict:
    recommended = {i for ranked in lists for i in ranked[:10]}
    diversities, novelties = [], []
    for ranked in lists:
        top = ranked[:10]
        if len(top) > 1:
            v = vectors_of(top)
            sim = v @ v.T
            diversities.append(1 - (sim.sum() - len(top)) / (len(top) * (len(top) - 1)))
        novelties.extend(-math.log2(popularity.get(i, 0.5 / n_items) or 0.5 / n_items) for i in top)
    return {"coverage": len(recommended) / n_items, "diversity": float(np.mean(diversities)) if diversities else 0.0,
            "novelty": float(np.mean(novelties)) if novelties else 0.0}


def summarise(per_user, lists, vectors_of, popularity, n_items) -> dict:
    summary = {k: float(np.mean([m[k] for m in per_user])) for k in per_user[0]}
    for k in ("recall@10", "ndcg@10"):
        values = [m[k] for m in per_user]
        summary[f"{k}_se"] = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    summary["users"] = len(per_user)
    summary.update(list_metrics(lists, vectors_of, popularity, n_items))
    return summary


# ---- encoders through Triton ------------------------------------------------------------------------------
def unusable_version(export: dict, data_sha256: str, template: str) -> str | None:
    """Why a recommendation encoder version (its export_* parameters) may not be evaluated on this data, or None.
    It must say which split it was trained for, on these very files, from these item texts."""
    if not export.get("export_trained_split"):
        return "no trained_split: not a recommendation fine-tune"
    if export.get("export_trained_data_sha256") != data_sha256:
        return "trained on other data than this directory's"
    if export.get("export_trained_template") != template:
        return f"trained on template {export.get('export_trained_template')}, not {template}"
    return None


class Encoders:
    """The general encoder and, where served, the recommendation encoder's versions by the split each was trained
    for; catalogs embedded through Triton once per (encoder, version, template)."""

    def __init__(self, client: TritonClient, rec_client: TritonClient | None, catalog: Catalog, data_sha256: str,
                 template: TextTemplate):
        self.client, self.rec_client, self.catalog = client, rec_client, catalog
        self.template = template
        self.data_sha256 = data_sha256
        self.rec_versions: dict[str, int] = {}
        self.rec_refused: dict[int, str] = {}
        if rec_client is not None:
            view = rec_client.serving_view(max_age_s=0)
            for version in view.versions:
                export = view.export(version)
                trained = export.get("export_trained_split")
                why = self._mismatch(export)
                if why:
                    self.rec_refused[version] = why
                elif trained:
                    self.rec_versions[parse_split(trained)] = version
            log.info("recommendation encoder versions by trained split: %s%s", self.rec_versions or "none",
                     f"; not used: {self.rec_refused}" if self.rec_refused else "")

    def _mismatch(self, export: dict) -> str | None:
        return unusable_version(export, self.data_sha256, self.template.identity)

    def embed(self, client: TritonClient, texts: list[str], version: int | None, label: str) -> tuple[np.ndarray, dict]:
        encoder = client.encoder_info(version)
        started = time.perf_counter()
        vectors = client.embed_many(texts, progress=label, encoder_version=int(encoder["export_version"]))
        seconds = time.perf_counter() - started
        log.info("%s: %d texts through Triton in %.1f s (%.0f texts/s)", label, len(texts), seconds, len(texts) / seconds)
        return vectors, encoder | {"embed_seconds": round(seconds, 2)}

    @staticmethod
    def profile_score(client: TritonClient, version: int):
        """(profile text, candidate vectors [n, D]) -> cosines, from Triton's `score` pinned to `version`."""
        scores = client.settings.tensors.scores

        def score(text: str, candidates: np.ndarray) -> np.ndarray:
            return client.score([text], candidates[None], outputs=[scores], encoder_version=version)[scores][0]

        return score

    def base(self, texts: list[str], name: str = "base", profile: bool = True) -> EncodedCatalog:
        vectors, encoder = self.embed(self.client, texts, None, f"{name}: embedding the catalog")
        version = int(encoder["export_version"])
        return EncodedCatalog(name, vectors, encoder, self.profile_score(self.client, version) if profile else None)

    def fine_tuned(self, split: str, texts: list[str]) -> EncodedCatalog | None:
        version = self.rec_versions.get(split)
        if version is None:
            return None
        vectors, encoder = self.embed(self.rec_client, texts, version, f"fine-tuned (v{version}, trained for {split})")
        return EncodedCatalog("fine-tuned", vectors, encoder, self.profile_score(self.rec_client, version))


# ---- warm -------------------------------------------------------------------------------------------------
def ease_lambda(history, positive: float = 4.0) -> tuple[float, dict]:
    """EASE^R's lambda, chosen on a per-user time split inside the history part (never the test part)."""
    inner, truth = time_split(history)
    users = histories(inner)
    figures = {}
    for lam in EASE_LAMBDAS:
        scorer = EaseScorer(inner, lam, positive)
        recalls = []
        for user, positives in truth.items():
            if user not in users:
                continue
            seen = set(users[user].items.tolist())
            candidates = scorer.item_ids[~np.isin(scorer.item_ids, list(seen))]
            top = rank(scorer, users[user], candidates, 10)
            recalls.append(len(set(top.tolist()) & positives) / len(positives))
        figures[lam] = float(np.mean(recalls))
    best = max(figures, key=figures.get)
    return best, {"chosen": best, "validation_recall@10": figures, "validation": "per-user time split of the history"}


def warm(catalog: Catalog, index, client: TritonClient, max_users: int | None, ablations: bool,
         use_triton_score: bool = True, rec: tuple | None = None) -> dict:
    """The recommender on the per-user time split, with per-channel systems and baselines. `rec` = (index,
    client) of the recommendation encoder trained for the warm split, where served."""
    items, interactions = catalog.items, catalog.interactions
    history, truth = time_split(interactions)
    log.info("warm: %d items, %d interactions, %d users with test positives", len(items), len(interactions), len(truth))
    # EASE^R's lambda, chosen on the history part, serves both the baseline and the recommender's CF channel.
    lam, choice = ease_lambda(history)
    fitted_with = RecommenderSettings(ease_lambda=lam)
    recommender = Recommender(items, index, history, client, fitted_with)
    n_items = len(items)
    popularity_counts = recommender.popularity / max(recommender.popularity.sum(), 1)
    popularity = {int(i): float(p) for i, p in zip(recommender.item_ids, popularity_counts)}
    pop_order = [int(i) for i in recommender.item_ids[np.argsort(-recommender.popularity, kind="stable")]]
    rng = np.random.default_rng(0)
    users = sorted(truth)[:max_users] if max_users else sorted(truth)
    C = RecallChannel
    every = tuple(C)
    score = use_triton_score
    systems = {"recommender": (recommender, dict(channels=every, use_triton_score=score))}
    if rec is not None:
        systems["recommender (fine-tuned)"] = (Recommender(items, index, history, client, fitted_with, taste=TasteIndex(*rec)),
                                               dict(channels=every, use_triton_score=score))
    if ablations:
        systems.update({
            "- semantic/item2item (no BERT channel)": (recommender, dict(channels=(C.COOCCURRENCE, C.POPULARITY),
                                                                         use_triton_score=False)),
            "- triton profile score": (recommender, dict(channels=every, use_triton_score=False)),
            "- cooccurrence": (recommender, dict(channels=tuple(c for c in every if c != C.COOCCURRENCE),
                                                 use_triton_score=score)),
            **{f"{c.value} only": (recommender, dict(channels=(c,), use_triton_score=False)) for c in every},
        })
        if rec is not None:
            fine = systems["recommender (fine-tuned)"][0]
            systems["fine-tuned semantic only"] = (fine, dict(channels=(C.SEMANTIC,), use_triton_score=False))
    results = {}
    for name, (system, options) in systems.items():
        per_user, lists = [], []
        t0 = time.perf_counter()
        for user in users:
            _, recs = system.recommend(user, n=50, diversify=False, **options)
            ranked = [r["item_id"] for r in recs]
            per_user.append(ranking_metrics(ranked, truth[user], n_items, len(system.profile(user).history)))
            lists.append(ranked)
        results[name] = summarise(per_user, lists, system.index.vectors_of, popularity, n_items)
        results[name]["seconds_per_user"] = (time.perf_counter() - t0) / len(users)
        log.info("warm: %s recall@10 %.4f", name, results[name]["recall@10"])
    ease = EaseScorer(history, lam)
    known = histories(history)
    for name in ("popularity", "random", "ease"):
        per_user, lists = [], []
        for user in users:
            seen = set(int(i) for i in recommender.profile(user).history)
            if name == "popularity":
                ranked = [i for i in pop_order if i not in seen][:50]
            elif name == "ease":
                candidates = ease.item_ids[~np.isin(ease.item_ids, list(seen))]
                ranked = [int(i) for i in rank(ease, known[user], candidates, 50)] if user in known else []
            else:
                pool = [int(i) for i in rng.choice(recommender.item_ids, 50 + len(seen), replace=False) if int(i) not in seen]
                ranked = pool[:50]
            per_user.append(ranking_metrics(ranked, truth[user], n_items, len(seen)))
            lists.append(ranked)
        results[name] = summarise(per_user, lists, index.vectors_of, popularity, n_items)
    results["ease"]["lambda"] = choice
    rec10 = {name: r["recall@10"] for name, r in results.items()}
    no_bert = rec10.get("- semantic/item2item (no BERT channel)")
    served = "recommender (fine-tuned)" if "recommender (fine-tuned)" in rec10 else "recommender"
    return {"users": len(users), "split": f"per-user time split, last {TEST_FRACTION:.0%} of each user's ratings; "
            "positives = rating >= 4", "results": results,
            "recall@10_vs_popularity": rec10["recommender"] / rec10["popularity"] if rec10["popularity"] else None,
            "served": served, "served_vs_ease": rec10[served] / rec10["ease"] if rec10["ease"] else None,
            "bert_channels_add": rec10[served] / no_bert - 1 if no_bert else None}


# ---- the whole evaluation ---------------------------------------------------------------------------------
def count_tokens(texts: list[str], tokenizer_file: Path | None) -> int | None:
    """Tokens the served tokenizer makes of `texts` (padding aside), or None without its tokenizer.json."""
    if tokenizer_file is None or not Path(tokenizer_file).exists():
        return None
    from bert_recsys.client.tokens import TokenCounter

    return TokenCounter(tokenizer_file).count(list(texts))


def evaluate(data_dir: Path, client: TritonClient, max_users: int | None = None, use_triton_score: bool = True,
             ablations: bool = True, protocols: tuple[str, ...] = ("warm",), seeds: tuple[int, ...] = (0, 1, 2),
             template: str = DEFAULT_TEMPLATE, rec_client: TritonClient | None = None,
             tokenizer_file: Path | None = None) -> dict:
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}")
    catalog = load_catalog(data_dir)
    for error in catalog.errors[:10]:
        log.warning("skipped %s", error)
    chosen = text_template(template)
    use = TemplateUse.of(chosen, catalog.items)
    log.info("%d items (%d with a description, %d fall back to title and categories: template %s), %d interactions",
             use.items, use.with_description, use.fallback, use.template, len(catalog.interactions))
    data_sha256 = files_identity(directory_files(data_dir, CATALOG_FILES))
    encoders = Encoders(client, rec_client, catalog, data_sha256, chosen)
    report: dict = {"data": str(data_dir), "data_sha256": data_sha256, "format": catalog.format,
                    "skipped_rows": len(catalog.errors), "item_text": use.as_dict(), "protocols": list(protocols)}
    # The served index: the catalog through `embed`, centred on its mean (IndexSettings.centre).
    started = time.perf_counter()
    index = build_catalog_index(client, catalog.items, chosen, IndexSettings(centre=True))
    seconds = time.perf_counter() - started
    tokens = count_tokens(index.texts, tokenizer_file)
    report["catalog_embedding"] = {"items": len(index), "seconds": round(seconds, 1), "items_per_s": len(index) / seconds,
                                   "tokens": tokens, "tokens_per_s": tokens / seconds if tokens else None,
                                   "encoder": index.encoder}
    log.info("catalog of %d items (%s tokens) embedded through Triton and indexed in %.1f s: %.0f items/s%s (%s, %s)",
             len(index), tokens or "?", seconds, len(index) / seconds, f", {tokens / seconds:.0f} tokens/s" if tokens else "",
             index.kind, index.encoder.get("export_variant"))
    report["encoder"] = index.encoder
    report["recommendation_encoder"] = {"versions": {s: v for s, v in encoders.rec_versions.items()},
                                        "not_used": encoders.rec_refused, "served": rec_client is not None}
    rich = chosen.render_all(catalog.items)
    title = text_template("title").render_all(catalog.items)
    texts = {"title": title, "rich": rich, "rich-keywords": text_template("rich-keywords").render_all(catalog.items)}
    if "cold" in protocols or "temporal" in protocols:
        base = EncodedCatalog("base", index.raw_vectors, index.encoder,
                              encoders.profile_score(client, int(index.encoder["export_version"])))
        base_title = encoders.base(title, "base (title text)", profile=False)
    if "cold" in protocols:
        fine = {s: f for s in seeds if (f := encoders.fine_tuned(f"cold:{s}", rich)) is not None}
        report["cold"] = item_cold_start(catalog, [base, base_title], texts, tuple(seeds), fine, max_users)
        report["cold"]["fine_tuned_seeds"] = sorted(fine)
    if "warm" in protocols:
        rec = None
        version = encoders.rec_versions.get("warm")
        if version is not None:
            rec_index = build_catalog_index(rec_client, catalog.items, chosen, IndexSettings(centre=True),
                                            encoder_version=version)
            rec = (rec_index, rec_client)
        report.update(warm(catalog, index, client, max_users, ablations, use_triton_score, rec))
    if "temporal" in protocols:
        fine = encoders.fine_tuned("temporal", rich)
        result = temporal(catalog, [base], texts, fine, max_users)
        split = result.pop("split")
        if split.warm_items:
            recommender = Recommender(catalog.items, index, split.train, client)
            users = sorted(split.warm_items)[:max_users] if max_users else sorted(split.warm_items)
            per_user = []
            for user in users:
                _, recs = recommender.recommend(user, n=50, diversify=False)
                per_user.append(ranking_metrics([r["item_id"] for r in recs], split.warm_items[user], len(catalog.items),
                                                len(recommender.profile(user).history)))
            result["segments"]["warm_items"] = {"recommender": {
                k: float(np.mean([m[k] for m in per_user])) for k in per_user[0]} | {"users": len(per_user)}}
        report["temporal"] = result
    return report


# ---- output -----------------------------------------------------------------------------------------------
def print_table(report: dict, stream=sys.stderr) -> None:
    use = report.get("item_text", {})
    if use:
        print(f"\nitem text {use['template']}: {use['items']} items, {use['with_description']} with a description, "
              f"{use['fallback_title_and_categories']} on title and categories only", file=stream)
    if "results" in report:
        keys = ["recall@10", "recall@50", "ndcg@10", "auc", "coverage", "diversity", "novelty"]
        print(f"\nwarm ({report['users']} users)\n{'system':<42}" + "".join(f"{k:>11}" for k in keys), file=stream)
        for name, row in report["results"].items():
            print(f"{name:<42}" + "".join(f"{row[k]:>11.4f}" for k in keys), file=stream)
        ratios = [f"recommender recall@10 = {report['recall@10_vs_popularity']:.2f}x popularity"
                  if report.get("recall@10_vs_popularity") else "",
                  f"{report['served']} = {report['served_vs_ease']:.2f}x EASE^R" if report.get("served_vs_ease") else "",
                  f"its BERT channels add {report['bert_channels_add']:+.1%}"
                  if report.get("bert_channels_add") is not None else ""]
        print("; ".join(r for r in ratios if r), file=stream)
    cold = report.get("cold")
    if cold:
        print(f"\nitem cold start, seeds {cold['seeds']} (mean over seeds, +- its standard error; users per seed)",
              file=stream)
        print(f"{'system':<42}{'recall@10':>18}{'recall@50':>18}{'ndcg@10':>18}{'users':>7}", file=stream)
        for name, system in sorted(cold["systems"].items(), key=lambda kv: -kv[1]["pooled"]["ndcg@10"]):
            p = system["pooled"]
            print(f"{name:<42}" + "".join(f"{p[k]:>10.4f} +-{p[k + '_se']:.4f}" for k in ("recall@10", "recall@50", "ndcg@10"))
                  + f"{p['users']:>7}", file=stream)
        h = cold.get("headline")
        if h:
            print(f"{h['served']}: nDCG@10 {h['value']:.4f} = {h['vs_lexical']:.2f}x the best word overlap "
                  f"({h['best_lexical']}, {h['lexical_value']:.4f}) and {h['vs_random']:.1f}x random", file=stream)
    temporal_report = report.get("temporal")
    if temporal_report:
        print(f"\ntemporal (cutoff {temporal_report['cutoff']}): users {temporal_report['populations']}", file=stream)
        for warning in temporal_report["warnings"]:
            print(f"  warning: {warning}", file=stream)
        for segment, systems in temporal_report["segments"].items():
            for name, row in systems.items():
                print(f"  {segment:<12} {name:<40} recall@10 {row['recall@10']:.4f}  ndcg@10 {row['ndcg@10']:.4f}  "
                      f"({row['users']} users)", file=stream)


def plot(report: dict, path: Path) -> Path | None:
    """Cold start nDCG@10 (with standard errors) and warm recall@10, one panel each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    panels = [k for k in ("cold", "results") if report.get(k)]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6), squeeze=False)
    for axis, key in zip(axes[0], panels):
        if key == "cold":
            rows = sorted(report["cold"]["systems"].items(), key=lambda kv: kv[1]["pooled"]["ndcg@10"])
            values = [s["pooled"]["ndcg@10"] for _, s in rows]
            errors = [s["pooled"]["ndcg@10_se"] for _, s in rows]
            title = f"item cold start: nDCG@10 (seeds {report['cold']['seeds']})"
        else:
            rows = sorted(report["results"].items(), key=lambda kv: kv[1]["recall@10"])
            values = [r["recall@10"] for _, r in rows]
            errors = [r.get("recall@10_se", 0.0) for _, r in rows]
            title = f"warm: recall@10 ({report['users']} users)"
        names = [name for name, _ in rows]
        colours = ["tab:orange" if n.startswith(("base", "fine-tuned", "recommender")) else "tab:grey" for n in names]
        axis.barh(names, values, xerr=errors, color=colours)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys evaluate server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=settings.MOVIELENS_DIR)
    parser.add_argument("--url", default=None, help="Triton address (default: from settings)")
    parser.add_argument("--protocol", type=Protocol.parse, choices=list(Protocol), default=Protocol.GRPC)
    parser.add_argument("--protocols", default="warm,cold,temporal", help=f"any of {','.join(PROTOCOLS)}")
    parser.add_argument("--seeds", type=int, default=3, help="item cold-start splits (seeds 0..n-1)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="item text template (client.item_text)")
    parser.add_argument("--max-users", type=int, default=None)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports",
                        help="where evaluate.json and evaluate.png go")
    parser.add_argument("--tokenizer", type=Path, default=settings.MODEL_REPOSITORY_DIR / "tokenizer" / "1" / "tokenizer.json",
                        help="the served tokenizer.json, to count tokens/s (absent: not counted)")
    args = parser.parse_args(argv)
    logs.configure()
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    with TritonClient(args.url, protocol=args.protocol) as client:
        rec_settings = client.settings.for_family("rec")
        rec_client = TritonClient(args.url, protocol=args.protocol, settings=replace(
            rec_settings, server=client.settings.server))
        try:
            if not rec_client.model_ready(rec_settings.models.embed):
                log.info("no %s served: the recommendation encoder is not evaluated", rec_settings.models.embed)
                rec_client.close()
                rec_client = None
            report = evaluate(args.data, client, args.max_users, ablations=not args.no_ablations, protocols=protocols,
                              seeds=tuple(range(args.seeds)), template=args.template, rec_client=rec_client,
                              tokenizer_file=args.tokenizer)
        except ValueError as error:
            print(f"client.evaluate: error: {error}", file=sys.stderr)
            return 2
        finally:
            if rec_client is not None:
                rec_client.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluate.json").write_text(json.dumps(report, indent=2, default=str))
    picture = plot(report, args.out / "evaluate.png")
    print(json.dumps(report, indent=2, default=str))
    print_table(report)
    log.info("written %s%s", args.out / "evaluate.json", f" and {picture}" if picture else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
