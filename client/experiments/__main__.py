"""bert-recsys experiments: register an experiment, report on it, or simulate on MovieLens.

    bert-recsys experiments register experiment.json [--db PATH]
    bert-recsys experiments report NAME [--db PATH] [--data MOVIELENS_DIR] [--out DIR] [--format md|json]
    bert-recsys experiments simulate [MOVIELENS_DIR] [--runs N] [--lift 0.1] [--out DIR]

`simulate` needs a running Triton (`bert-recsys serve --free-ports -- bert-recsys experiments simulate`,
which is what `make experiment-sim` runs); it prints one JSON object on stdout and writes the real-arm
replay's report and plots under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.client.catalog import load_catalog
from bert_recsys.client.protocols import future_ratings
from bert_recsys.client.experiments import report as reporting
from bert_recsys.client.experiments.design import Arm, Experiment, ExperimentError
from bert_recsys.client.experiments.events import EventStore
from bert_recsys.client.experiments.simulate import Behaviour, ClickModel, real_lists, replay_into_store, simulate_tests
from bert_recsys.client.index import build_catalog_index
from bert_recsys.client.recall import RecallChannel
from bert_recsys.client.recommend import Recommender
from bert_recsys.client.triton import TritonClient

log = logs.get("client")


def first_categories(data_dir: Path) -> dict[int, str]:
    items = load_catalog(data_dir).items
    return {item.item_id: (item.categories[0] if item.categories else "(none)") for item in items}


def cmd_register(args) -> int:
    experiment = Experiment.parse(Path(args.file).read_text())
    with EventStore(args.db) as store:
        store.register(experiment)
    log.info("experiment %s registered in %s (arms: %s)", experiment.name, args.db,
             ", ".join(a.name for a in experiment.arms))
    return 0


def cmd_report(args) -> int:
    categories = first_categories(args.data) if args.data else None
    with EventStore(args.db) as store:
        report = reporting.build(store, args.name, categories)
    md, js = reporting.write(report, args.out)
    log.info("report: %s, %s", md, js)
    print(md.read_text() if args.format == "md" else js.read_text())
    return 0


REAL_ARMS = Experiment(
    name="channels-abn",
    description="Replayed MovieLens behaviour: the full recommender against itself without the co-occurrence "
                "channel, and without MMR diversification.",
    arms=(Arm("control"),
          Arm("no-cooccurrence", channels=tuple(c for c in RecallChannel if c is not RecallChannel.COOCCURRENCE)),
          Arm("no-mmr", diversify=False)),
    salt="channels-abn-sim")


def cmd_simulate(args) -> int:
    started = time.perf_counter()
    catalog = load_catalog(args.data)
    items, interactions = catalog.items, catalog.interactions
    history, future = future_ratings(interactions)
    users = sorted(future)
    log.info("%d items; %d users with held-out positives to replay", len(items), len(users))
    model = ClickModel()
    with TritonClient(args.url) as client:
        index = build_catalog_index(client, items)
        recommender = Recommender(items, index, history, client)
        lists = {arm.name: real_lists(recommender, arm, users, args.n) for arm in REAL_ARMS.arms}
    behaviours = {name: Behaviour.of(l, future, model, args.n) for name, l in lists.items()}
    result = simulate_tests(behaviours["control"], args.runs, args.lift, args.alpha, reads=args.reads, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "sim-events.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    experiment = replace(REAL_ARMS, catalog_size=len(items))
    with EventStore(db) as store:
        written = replay_into_store(store, experiment, behaviours, args.real_visitors, seed=args.seed)
        report = reporting.build(store, experiment.name, first_categories(args.data))
    md, js = reporting.write(report, out)
    plot_tests(result, out / "simulation.png")
    result.update({
        "click_model": model.__dict__, "data": str(args.data), "list_length": args.n,
        "real_arms": {"experiment": experiment.name, "visitors": args.real_visitors, "events": written,
                      "report": str(md), "arms": {a: {k: r[k] for k in ("users", "ctr", "conversion_rate")}
                                                  for a, r in report["arms"].items()},
                      "comparisons": {a: {m: {k: c[k] for k in ("lift", "lift_ci", "p_always_valid", "significant")}
                                          for m, c in comp.items()} for a, comp in report["comparisons"].items()}},
        "total_seconds": round(time.perf_counter() - started, 1)})
    (out / "simulation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    log.info("A/A false positives %.3f (alpha %.2f); power predicted %.3f, observed %.3f; report %s",
             result["aa_false_positive_rate"], result["alpha"], result["predicted_power"], result["observed_power"], md)
    return 0


def plot_tests(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["A/A always-valid\n(read 20x)", "A/A z-test\n(read once)", "A/A z-test\n(read 20x)",
              "lift: predicted\npower", "lift: observed\npower"]
    values = [result["aa_false_positive_rate"], result["aa_fixed_horizon_z_false_positive_rate_final_read"],
              result["aa_fixed_horizon_z_false_positive_rate_read_every_time"], result["predicted_power"],
              result["observed_power"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, values, color=["tab:green", "tab:gray", "tab:red", "tab:blue", "tab:cyan"])
    ax.axhline(result["alpha"], color="red", lw=0.8, ls="--", label=f"alpha {result['alpha']}")
    for x, v in enumerate(values):
        ax.text(x, v + 0.01, f"{v:.3f}", ha="center", fontsize=9)
    ax.set(ylabel="rate over runs", ylim=(0, 1),
           title=f"{result['runs']} runs x {result['visitors_per_run']} visitors, +{result['injected_lift']:.0%} CTR lift")
    ax.legend()
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("register", help="record an experiment's definition (JSON) in the event store")
    p.add_argument("file", type=Path)
    p.add_argument("--db", type=Path, default=settings.EXPERIMENTS_DB)
    p.set_defaults(run=cmd_register)
    p = sub.add_parser("report", help="per-arm metrics, comparisons and plots for an experiment")
    p.add_argument("name")
    p.add_argument("--db", type=Path, default=settings.EXPERIMENTS_DB)
    p.add_argument("--data", type=Path, default=None, help="MovieLens-format dir: adds the category mix")
    p.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "experiments")
    p.add_argument("--format", choices=("md", "json"), default="md")
    p.set_defaults(run=cmd_report)
    p = sub.add_parser("simulate", help="A/A, injected lift and real arms on replayed MovieLens behaviour")
    p.add_argument("data", type=Path, nargs="?", default=settings.MOVIELENS_DIR)
    p.add_argument("--url", default=None, help="Triton gRPC address (default: from settings)")
    p.add_argument("--runs", type=int, default=400)
    p.add_argument("--lift", type=float, default=0.10, help="injected relative CTR lift (and the planned MDE)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--reads", type=int, default=20, help="times each simulated experiment's test is read")
    p.add_argument("--n", type=int, default=10, help="list length")
    p.add_argument("--real-visitors", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "experiments")
    p.set_defaults(run=cmd_simulate)
    args = parser.parse_args(argv)
    logs.configure()
    if args.command == "simulate" and not args.data.is_dir():
        print(f"no MovieLens directory at {args.data}: pass one (make experiment-sim DATA=dir)", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ExperimentError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
