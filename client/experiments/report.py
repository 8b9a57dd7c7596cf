"""The experiment report, from the event store: per arm impressions, CTR, conversion rate, per-position CTR,
coverage and category mix, each arm against the control with intervals, lift, the always-valid test and the
users still needed; Markdown, JSON and plots."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from bert_recsys.client.experiments.design import Experiment
from bert_recsys.client.experiments.events import EventStore, Slots
from bert_recsys.client.experiments.stats import RatioStats, compare, wilson

METRIC_COLUMN = {"ctr": "clicked", "conversion_rate": "converted"}


def per_user(slots: Slots, column: str) -> RatioStats:
    """Per-user sums of `column` (clicks or conversions) over per-user shown items."""
    if not len(slots):
        return RatioStats(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    _, user = np.unique(slots.user_id.astype(str), return_inverse=True)
    y = np.bincount(user).astype(np.float64)
    x = np.bincount(user, weights=getattr(slots, column).astype(np.float64))
    return RatioStats.of(x, y)


def arm_summary(slots: Slots, categories: dict[int, str] | None, catalog_size: int | None, positions: int) -> dict:
    ctr, conv = per_user(slots, "clicked"), per_user(slots, "converted")
    by_position = []
    for p in range(positions):
        at = slots.position == p
        shown, clicks = int(at.sum()), int(slots.clicked[at].sum())
        low, high = wilson(clicks, shown)
        by_position.append({"position": p + 1, "shown": shown, "clicks": clicks,
                            "ctr": clicks / shown if shown else 0.0, "ci95": [low, high]})
    distinct = len(set(slots.item_id.tolist()))
    summary = {
        "users": ctr.n, "impressions": len(set(slots.request_id.tolist())), "shown_items": int(len(slots)),
        "clicks": int(slots.clicked.sum()), "conversions": int(slots.converted.sum()),
        "ctr": ctr.ratio, "ctr_ci95": list(ctr.interval()), "conversion_rate": conv.ratio,
        "conversion_rate_ci95": list(conv.interval()), "distinct_items": distinct,
        "coverage": distinct / catalog_size if catalog_size else None, "ctr_by_position": by_position,
    }
    if categories is not None:
        mix = Counter(categories.get(int(i), "(unknown)") for i in slots.item_id)
        total = sum(mix.values()) or 1
        summary["category_mix"] = {c: n / total for c, n in mix.most_common(8)}
    return summary


def build(store: EventStore, name: str, categories: dict[int, str] | None = None, checkpoints: int = 30) -> dict:
    experiment = store.experiment(name)
    slots = store.slots(name)
    arms = [a.name for a in experiment.arms]
    by_arm = {a: slots.take(slots.arm == a) for a in arms}
    positions = int(slots.position.max()) + 1 if len(slots) else 0
    catalog = experiment.catalog_size or (len(set(slots.item_id.tolist())) or None)
    report = {"experiment": experiment.to_json(), "events": store.counts(), "orphan_actions": store.orphans(),
              "arms": {a: arm_summary(by_arm[a], categories, catalog, positions) for a in arms},
              "comparisons": {}, "sequential": {}}
    control = experiment.control.name
    column = METRIC_COLUMN[experiment.metric]
    for arm in arms[1:]:
        for metric, col in METRIC_COLUMN.items():
            result = compare(per_user(by_arm[control], col), per_user(by_arm[arm], col), experiment.alpha,
                             experiment.mde, experiment.power)
            report["comparisons"].setdefault(arm, {})[metric] = result.to_json()
        report["sequential"][arm] = sequential_path(by_arm[control], by_arm[arm], column, experiment, checkpoints)
    report["primary_metric"] = experiment.metric
    return report


def sequential_path(control: Slots, treatment: Slots, column: str, experiment: Experiment, checkpoints: int) -> list[dict]:
    """The test as it would have read at `checkpoints` moments of the experiment so far (by impression time):
    what the plot shows, and why reading a fixed-horizon p-value at every one of them would mislead."""
    if not len(control) or not len(treatment):
        return []
    times = np.quantile(np.r_[control.ts, treatment.ts], np.linspace(0, 1, checkpoints + 1)[1:])
    path = []
    for t in times:
        a, b = per_user(control.take(control.ts <= t), column), per_user(treatment.take(treatment.ts <= t), column)
        if a.n < 2 or b.n < 2:
            continue
        c = compare(a, b, experiment.alpha, experiment.mde, experiment.power)
        path.append({"ts": float(t), "users": a.n + b.n, "lift": c.lift, "p_always_valid": c.p_always_valid,
                     "p_fixed_horizon": c.p_fixed_horizon})
    return path


# ---- rendering ----------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.2f}%"


def markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    e = report["experiment"]
    lines = [f"# Experiment `{e['name']}`", "", e.get("description") or "",
             f"Arms: {', '.join(a['name'] for a in e['arms'])} (control: {e['arms'][0]['name']}); primary metric "
             f"{e['metric']}; alpha {e['alpha']}; minimum detectable lift {_pct(e['mde'])} at power {e['power']}.",
             f"Events: {report['events']}; clicks or conversions with no impression: {report['orphan_actions']}.", "",
             "| arm | users | lists | shown | clicks | CTR (95% CI) | conversions | conv. rate (95% CI) | coverage |",
             "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for name, a in report["arms"].items():
        lines.append(f"| {name} | {a['users']} | {a['impressions']} | {a['shown_items']} | {a['clicks']} | "
                     f"{_pct(a['ctr'])} ({_pct(a['ctr_ci95'][0])} – {_pct(a['ctr_ci95'][1])}) | {a['conversions']} | "
                     f"{_pct(a['conversion_rate'])} ({_pct(a['conversion_rate_ci95'][0])} – "
                     f"{_pct(a['conversion_rate_ci95'][1])}) | {_pct(a['coverage'])} |")
    lines += ["", "## Against the control", "",
              "| arm | metric | lift (95% CI) | difference, always-valid CI | p always-valid | p fixed-horizon* | "
              "significant | power at MDE now | users/arm for it |", "|---|---|---|---|---:|---:|---|---:|---:|"]
    for arm, metrics in report["comparisons"].items():
        for metric, c in metrics.items():
            needed = c["users_needed_per_arm"]
            lines.append(f"| {arm} | {metric} | {_pct(c['lift'])} ({_pct(c['lift_ci'][0])} – {_pct(c['lift_ci'][1])}) | "
                         f"{c['difference']:+.5f} ({c['difference_ci'][0]:+.5f} – {c['difference_ci'][1]:+.5f}) | "
                         f"{c['p_always_valid']:.4f} | {c['p_fixed_horizon']:.4f} | "
                         f"{'yes' if c['significant'] else 'no'} | {c['power_at_mde']:.2f} | "
                         f"{needed if needed is not None else 'out of reach'} |")
    lines += ["", "\\* valid only when read once, at a sample size fixed in advance; decide on the always-valid p.", "",
              "## CTR by position", "", "| position | " + " | ".join(report["arms"]) + " |",
              "|---:|" + "---:|" * len(report["arms"])]
    positions = max((len(a["ctr_by_position"]) for a in report["arms"].values()), default=0)
    for p in range(positions):
        cells = [_pct(a["ctr_by_position"][p]["ctr"]) if p < len(a["ctr_by_position"]) else "" for a in report["arms"].values()]
        lines.append(f"| {p + 1} | " + " | ".join(cells) + " |")
    if any("category_mix" in a for a in report["arms"].values()):
        lines += ["", "## Category mix of what was shown (first category, top 8)", ""]
        for name, a in report["arms"].items():
            lines.append(f"- {name}: " + ", ".join(f"{c} {_pct(s)}" for c, s in a.get("category_mix", {}).items()))
    for name, path in (plots or {}).items():
        lines += ["", f"![{name}]({path})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> dict[str, str]:
    """Per-position CTR per arm, and the p-values over the experiment's course. -> {title: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    name = report["experiment"]["name"]
    files = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, a in report["arms"].items():
        xs = [p["position"] for p in a["ctr_by_position"]]
        ys = [p["ctr"] for p in a["ctr_by_position"]]
        low = [p["ctr"] - p["ci95"][0] for p in a["ctr_by_position"]]
        high = [p["ci95"][1] - p["ctr"] for p in a["ctr_by_position"]]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=arm)
    ax.set(xlabel="position in the list", ylabel="CTR", title=f"{name}: CTR by position (95% Wilson)")
    ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(out / f"{name}-positions.png", dpi=110), plt.close(fig)
    files["CTR by position"] = f"{name}-positions.png"
    if any(report["sequential"].values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, path in report["sequential"].items():
            users = [p["users"] for p in path]
            ax.plot(users, [p["p_always_valid"] for p in path], label=f"{arm}: always-valid p")
            ax.plot(users, [p["p_fixed_horizon"] for p in path], ls="--", label=f"{arm}: fixed-horizon p")
        ax.axhline(report["experiment"]["alpha"], color="red", lw=0.8, label="alpha")
        ax.set(xscale="linear", yscale="log", xlabel="users so far", ylabel="p-value",
               title=f"{name}: {report['primary_metric']} test as read over time")
        ax.legend(fontsize=8), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / f"{name}-sequential.png", dpi=110), plt.close(fig)
        files["test over time"] = f"{name}-sequential.png"
    return files


def write(report: dict, out: Path, with_plots: bool = True) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = report["experiment"]["name"]
    plots = plot(report, out) if with_plots else {}
    md, js = out / f"{name}.md", out / f"{name}.json"
    md.write_text(markdown(report, plots))
    js.write_text(json.dumps(report, indent=2, default=float))
    return md, js
