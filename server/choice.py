"""Which variant this machine serves: the decision, apart from its measuring (`bert-recsys tune`, in the
checkout's bench area, measures every gated variant through Triton and records the fastest in tune.json).

Which runtime and precision wins depends on the CPU (VNNI, AMX or AVX2 only), so a recorded choice is used only
on the machine it was measured on (same CPU model, ISA flags and core count) and only while its variant is still
exported and gated. Everything here is a pure function of the record, the machine and the exports, but
`served_variant`, which reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

OBJECTIVES = ("throughput", "latency")
# What serves when nothing was tuned on this machine: INT8 in ONNX Runtime, fast on every x86 CPU seen so far.
DEFAULT_VARIANT = "onnx-int8"


def tune_file(build_dir: Path) -> Path:
    return Path(build_dir) / "tune.json"


def choose(rows: list[dict], objective: str = "throughput") -> dict:
    """The fastest row among those whose variant passed its gate. rows: {variant, gate_passed, b1_p50_ms,
    b32_seq_per_s}. Throughput: most b32 sentences/s (b1 p50 breaks ties); latency: lowest b1 p50."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose from {', '.join(OBJECTIVES)}")
    passing = [row for row in rows if row["gate_passed"]]
    if not passing:
        raise ValueError("no measured variant passed its gate: nothing to choose")
    if objective == "throughput":
        return max(passing, key=lambda row: (row["b32_seq_per_s"], -row["b1_p50_ms"]))
    return min(passing, key=lambda row: (row["b1_p50_ms"], -row["b32_seq_per_s"]))


# A sequential row per variant is one server's window on a machine whose speed drifts (on a 2-core AMD EPYC,
# 2026-12-07: onnx-int8 read 1.33x onnx-fp32's b32 throughput in one tune and tied with it in make bench minutes
# later). So every variant within CONTENDERS_WITHIN of the sequential winner is measured again beside it,
# interleaved, and replaces it only when faster by more than the margin.
CONTENDERS_WITHIN, CONTENDERS_MOST = 1.5, 2
# A contender must take less than this share of the winner's time, interleaved, to replace it: a tie keeps the
# sequential winner.
SETTLE_MARGIN = 0.97


def _cost(row: dict, objective: str) -> float:
    """Lower is faster: ms per b32 sentence (throughput) or b1 p50 ms (latency)."""
    return 1000.0 / row["b32_seq_per_s"] if objective == "throughput" else row["b1_p50_ms"]


def contenders(rows: list[dict], best: dict, objective: str = "throughput", within: float = CONTENDERS_WITHIN,
               most: int = CONTENDERS_MOST) -> list[dict]:
    """The gated rows other than `best` whose cost is within `within` x best's, closest first, at most `most`: each
    is duelled against `best`, interleaved, before the choice is written."""
    passing = [row for row in rows if row["gate_passed"] and row is not best]
    close = [row for row in passing if _cost(row, objective) <= within * _cost(best, objective)]
    return sorted(close, key=lambda row: _cost(row, objective))[:most]


def settle(best: str, duels: list[dict], close: int | None = None, margin: float = SETTLE_MARGIN) -> tuple[str, str]:
    """(the variant to serve, why) after the duels: each {variant, best_ms, variant_ms} (medians over interleaved
    rounds, the same calls on both), or {variant, error} for one that could not be run (it cannot win). `close`:
    how many contenders were close enough to duel (default: as many as duels). The contender that beat `best` by
    the most, to under `margin` x its time, replaces it; else `best` stays."""
    close = len(duels) if close is None else close
    if not duels:
        return best, (f"{best}: fastest sequentially, no other within {CONTENDERS_WITHIN}x" if close == 0 else
                      f"{best}: fastest sequentially; {close} close contender(s) not duelled")
    winner, ratio = best, margin
    measured = [duel for duel in duels if "error" not in duel]
    for duel in measured:
        if duel["best_ms"] <= 0 or duel["variant_ms"] <= 0:
            raise ValueError(f"duel of {duel['variant']} against {best}: a median of zero ms is no measurement")
        r = duel["variant_ms"] / duel["best_ms"]
        if r < ratio:
            winner, ratio = duel["variant"], r
    failed = "".join(f"; the duel of {duel['variant']} failed ({duel['error']})" for duel in duels if "error" in duel)
    if winner != best:
        return winner, f"{winner}: {ratio:.3f}x {best}'s time interleaved, though {best} read faster sequentially" + failed
    return best, (f"{best}: fastest sequentially, and no contender beat it by {1 - margin:.0%} interleaved"
                  if measured else f"{best}: fastest sequentially") + failed


def tuned_variant(record: dict | None, machine: dict, exported: set[str]) -> tuple[str | None, str]:
    """(variant to serve, why): the record's choice only for the machine it was measured on, and only while that
    variant is still exported and gated."""
    if record is None:
        return None, "not tuned here yet (bert-recsys tune)"
    if record.get("machine") != machine:
        return None, (f"tuned on {record.get('machine', {}).get('cpu', 'another machine')} "
                      f"{record.get('machine', {}).get('flags')}, this is {machine['cpu']} {machine['flags']}: "
                      "run bert-recsys tune")
    variant = record.get("variant")
    if variant not in exported:
        return None, f"the tuned variant {variant} is no longer exported and gated: run bert-recsys tune"
    return variant, f"tuned {record.get('measured_at', '')}: {variant} ({record.get('objective')})"


def passing_exports(export_dir: Path) -> dict[str, object]:
    """{variant: manifest} of the variants in export_dir that passed their gate and the embedded runtime serves
    (ONNX in ONNX Runtime, OpenVINO IR in OpenVINO)."""
    from bert_recsys.contracts.manifest import Manifest, ManifestError
    from bert_recsys.contracts.runtime import Runtime, runtime_formats

    found = {}
    for directory in sorted(Path(export_dir).iterdir()) if Path(export_dir).is_dir() else []:
        try:
            manifest = Manifest.read(directory)
        except ManifestError:
            continue
        if manifest.format in runtime_formats()[Runtime.EMBEDDED] and manifest.gate.passed:
            found[manifest.variant] = manifest
    return found


def read_record(path: Path) -> dict | None:
    """tune.json, or None where nothing was tuned; a damaged record is an error naming the file."""
    if not Path(path).exists():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable tune record ({error}): delete it or run bert-recsys tune") from error


def variant_to_serve(build_dir: Path, export_dir: Path) -> str:
    """The tuned variant for this machine, else DEFAULT_VARIANT."""
    return served_variant(build_dir, export_dir)[0] or DEFAULT_VARIANT


def print_choice(build_dir: Path, export_dir: Path) -> int:
    """`tune --print-choice`: the tuned variant on stdout (nothing when none holds here), and once something was
    tuned, why on stderr. A damaged record is named, and exit code 2."""
    import sys

    try:
        variant, why, tuned = served_variant(build_dir, export_dir)
    except ValueError as error:
        print(f"bert-recsys: {error}", file=sys.stderr)
        return 2
    if tuned:
        print(f"tune: {why}", file=sys.stderr)
    if variant:
        print(variant)
    return 0


def served_variant(build_dir: Path, export_dir: Path) -> tuple[str | None, str, bool]:
    """(the tuned variant for this machine or None, why, whether anything was tuned at all)."""
    from bert_recsys.contracts.machine import machine_identity

    record = read_record(tune_file(build_dir))
    variant, why = tuned_variant(record, machine_identity(), set(passing_exports(export_dir)))
    return variant, why, record is not None
