"""bert-recsys repository: render the Triton model repository from an exported variant.

    bert-recsys repository build --variant onnx-int8                 # embedded runtime (this machine)
    bert-recsys repository build --variant trt-fp16 --runtime native  # NGC container
    bert-recsys repository show --variant onnx-fp16 --runtime native  # print the configs only

`build` also serves the recommendation encoder (the "rec" family: rec_embed, rec_score) beside the general one
when build/export-rec holds the same variant (training.finetune, then export --out build/export-rec);
`--family rec` builds that family alone into an existing repository, `--rec-export-dir none` leaves it out.
Models of a family that is not being built stay as they are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.contracts.manifest import Manifest, ManifestError
from bert_recsys.contracts.runtime import Runtime
from bert_recsys.model_repository.render import build_repository, remove_family, render_configs, to_pbtxt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys repository", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "show"))
    parser.add_argument("--variant", default="onnx-int8", help="exported variant to serve (default: %(default)s)")
    parser.add_argument("--runtime", type=Runtime.parse, choices=list(Runtime), default=Runtime.EMBEDDED)
    parser.add_argument("--export-dir", type=Path, default=settings.EXPORT_DIR)
    parser.add_argument("--out", type=Path, default=settings.MODEL_REPOSITORY_DIR)
    parser.add_argument("--version", type=int, default=1, help="model version directory (default: %(default)s)")
    parser.add_argument("--family", choices=[f for f in settings.FAMILIES if f], default=None,
                        help="build only this family's models, from --export-dir, into the repository at --out")
    parser.add_argument("--rec-export-dir", default=str(settings.REC_EXPORT_DIR),
                        help="where the recommendation encoder was exported ('none': leave it out)")
    batching = settings.SETTINGS.batching
    parser.add_argument("--max-queue-size", type=int, default=batching.max_queue_size,
                        help="backpressure: reject (UNAVAILABLE/503) beyond this many queued requests per model; 0 = unbounded")
    parser.add_argument("--queue-timeout-ms", type=float, default=batching.queue_timeout_us / 1000,
                        help="backpressure: reject requests queued longer than this; 0 = no timeout")
    args = parser.parse_args(argv)
    logs.configure()
    from dataclasses import replace

    chosen = replace(settings.SETTINGS, batching=replace(
        batching, max_queue_size=args.max_queue_size, queue_timeout_us=int(args.queue_timeout_ms * 1000)))
    try:
        if args.command == "show":
            manifest = Manifest.read(args.export_dir / args.variant)
            for name, config in render_configs(chosen, manifest, args.runtime).items():
                print(f"# ---- {name}/config.pbtxt\n{to_pbtxt(config)}")
            return 0
        log = logs.get("model_repository")
        if args.family:
            out = build_repository(chosen.for_family(args.family), args.export_dir, args.variant, args.runtime, args.out,
                                   args.version)
            log.info("%s family %r for %s (version %d) at %s", args.runtime, args.family, args.variant, args.version, out)
            return 0
        out = build_repository(chosen, args.export_dir, args.variant, args.runtime, args.out, args.version)
        log.info("%s repository for %s (version %d) at %s", args.runtime, args.variant, args.version, out)
        rec = Path(args.rec_export_dir) if args.rec_export_dir.lower() != "none" else None
        if rec is not None and Manifest.exists(rec / args.variant):
            build_repository(chosen.for_family("rec"), rec, args.variant, args.runtime, args.out, args.version)
            log.info("and the recommendation encoder (rec_embed, rec_score) from %s", rec / args.variant)
        else:
            removed = remove_family(chosen.for_family("rec"), args.out)
            log.info("no recommendation encoder%s: rec_embed is not served (make finetune builds it)%s",
                     f" at {rec / args.variant}" if rec else "", f"; removed {', '.join(removed)}" if removed else "")
    except (ManifestError, FileNotFoundError, ValueError) as error:
        print(f"model_repository: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
