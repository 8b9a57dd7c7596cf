"""bert-recsys evaluate full DATA: the whole evaluation (`make evaluate`), fine-tuned encoders included.

1. the general encoder, exported as VARIANT (export), is served as `embed`;
2. for each split in --splits (cold:0 .. cold:<seeds-1>, warm), a recommendation encoder is fine-tuned without
   that split's test part (training.finetune --split) and exported as VARIANT: each is reused while its lineage
   still matches (same base model, data files, template and recipe), so a second run costs only the evaluation;
3. one evaluation repository holds `embed` and `rec_embed`, the latter with one version per split
   (build/evaluate/model_repository); each version says which split it was trained for;
4. tritonserver on free ports, then client.evaluate against it: the JSON on stdout and in build/reports/evaluate.json,
   the plot in build/reports/evaluate.png.

Fine-tuning is the long part on a CPU (about 20 minutes per split on 2 cores): --splits none evaluates the
general encoder alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.client.catalog import load_catalog
from bert_recsys.client.item_text import DEFAULT_TEMPLATE, TextTemplate
from bert_recsys.client.item_text import template as text_template
from bert_recsys.client.protocols import parse_split
from bert_recsys.contracts.runtime import Runtime
from bert_recsys.training.finetune import Recipe, data_files, finetune, read_lineage

log = logs.get("training")


def split_dir(split: str) -> str:
    return split.replace(":", "-")


def up_to_date(model_dir: Path, data: Path, split: str, template: str, recipe: Recipe) -> bool:
    """A fine-tune already made from the same base model, data files, template, split and recipe."""
    lineage = read_lineage(model_dir)
    if lineage is None:
        return False
    from bert_recsys.export.source import load_source

    return (lineage.get("split", {}).get("name") == split and lineage.get("template") == template
            and lineage.get("recipe") == asdict(recipe) and lineage["data"]["files"] == data_files(data)
            and lineage["base"]["sha256"] == load_source(settings.default_model_dir()).sha256)


def fine_tuned_exports(data: Path, splits: list[str], variant: str, template: TextTemplate, recipe: Recipe,
                       work: Path) -> dict[str, Path]:
    """{split: exported variant directory} for every split, fine-tuning and exporting what is missing."""
    from bert_recsys.export.pipeline import ExportOptions, run_export
    from bert_recsys.export.variants import parse_variants

    exports = {}
    for n, split in enumerate(splits, 1):
        model_dir = work / "finetuned" / split_dir(split)
        if up_to_date(model_dir, data, split, template.identity, recipe):
            log.info("[%d/%d] fine-tune for %s: up to date (%s)", n, len(splits), split, model_dir)
        else:
            log.info("[%d/%d] fine-tune for %s -> %s", n, len(splits), split, model_dir)
            finetune(data, model_dir, recipe, template, split, general=False)
        out = work / "export-rec" / split_dir(split)
        outcomes = run_export(ExportOptions(model_dir=model_dir, out_dir=out, variants=parse_variants(variant),
                                            variants_named=True, sts_path=settings.STSB_DEV if settings.STSB_DEV.exists() else None))
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(f"the fine-tune for {split} was not exported: "
                               + "; ".join(f"{o.variant}: {o.status} {o.detail}" for o in failed))
        exports[split] = out / variant
    return exports


def build_repository(variant: str, runtime: str, exports: dict[str, Path], out: Path) -> tuple[Path, dict[int, str]]:
    """The general family from build/export, and the rec family with version n = the n-th split."""
    from bert_recsys.model_repository.render import build_repository as build_general
    from bert_recsys.model_repository.render import remove_family, write_generation

    repository = build_general(settings.SETTINGS, settings.EXPORT_DIR, variant, runtime, out)
    versions = {n: split for n, split in enumerate(exports, 1)}
    if exports:
        first = next(iter(exports.values()))
        write_generation(settings.SETTINGS.for_family("rec"), first.parent / "tokenizer",
                         {n: exports[split] for n, split in versions.items()}, runtime, repository, stable=1)
    else:
        remove_family(settings.SETTINGS.for_family("rec"), repository)
    return repository, versions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys evaluate full", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--variant", default="onnx-int8", help="the exported variant both encoders serve")
    parser.add_argument("--runtime", type=Runtime.parse, choices=list(Runtime), default=Runtime.EMBEDDED)
    parser.add_argument("--seeds", type=int, default=3, help="item cold-start splits")
    parser.add_argument("--splits", default=None,
                        help="the fine-tunes to make and serve (default: cold:0..cold:<seeds-1>,warm; none: no fine-tune)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE)
    parser.add_argument("--steps", type=int, default=Recipe().steps, help="fine-tuning steps (the recipe's default)")
    parser.add_argument("--protocols", default="warm,cold,temporal")
    parser.add_argument("--max-users", type=int, default=None)
    parser.add_argument("--work", type=Path, default=settings.BUILD_DIR / "evaluate")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports")
    args = parser.parse_args(argv)
    logs.configure()
    chosen = text_template(args.template)
    if args.splits is None:
        splits = [f"cold:{s}" for s in range(args.seeds)] + ["warm"]
    else:
        splits = [] if args.splits == "none" else [parse_split(s.strip()) for s in args.splits.split(",") if s.strip()]
    started = time.perf_counter()
    try:
        catalog = load_catalog(args.data)
        log.info("%s: %d items, %d interactions (%s format)", args.data, len(catalog.items), len(catalog.interactions),
                 catalog.format)
        recipe = Recipe(steps=args.steps)
        exports = fine_tuned_exports(args.data, splits, args.variant, chosen, recipe, args.work)
        repository, versions = build_repository(args.variant, args.runtime, exports, args.work / "model_repository")
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"training.evaluation: error: {error}", file=sys.stderr)
        return 2
    log.info("evaluation repository %s: rec_embed versions %s (%.0f s so far)", repository, versions or "none",
             time.perf_counter() - started)
    from bert_recsys.client import evaluate
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    server = on_free_ports(settings.SETTINGS.server)
    with TritonServer(repository, server, log_file=args.work / "triton.log"):
        code = evaluate.main([str(args.data), "--url", server.grpc_url, "--protocols", args.protocols, "--seeds",
                              str(args.seeds), "--template", args.template, "--out", str(args.out),
                              "--tokenizer", str(repository / "tokenizer" / "1" / "tokenizer.json"),
                              *(["--max-users", str(args.max_users)] if args.max_users else [])])
    report = args.out / "evaluate.json"
    if code == 0 and report.exists():
        data = json.loads(report.read_text())
        data["fine_tunes"] = {split: str(path) for split, path in exports.items()}
        report.write_text(json.dumps(data, indent=2, default=str))
    log.info("evaluation done in %.0f s", time.perf_counter() - started)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
