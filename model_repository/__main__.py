"""python -m model_repository: render the Triton model repository from an exported variant.

    python -m model_repository build --variant onnx-int8                 # embedded runtime (this machine)
    python -m model_repository build --variant trt-fp16 --runtime native  # NGC container
    python -m model_repository show --variant onnx-fp16 --runtime native  # print the configs only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import logs
import settings
from contracts.manifest import Manifest, ManifestError
from contracts.runtime import Runtime
from model_repository.render import build_repository, render_configs, to_pbtxt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_repository", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "show"))
    parser.add_argument("--variant", default="onnx-int8", help="exported variant to serve (default: %(default)s)")
    parser.add_argument("--runtime", type=Runtime.parse, choices=list(Runtime), default=Runtime.EMBEDDED)
    parser.add_argument("--export-dir", type=Path, default=settings.EXPORT_DIR)
    parser.add_argument("--out", type=Path, default=settings.MODEL_REPOSITORY_DIR)
    parser.add_argument("--version", type=int, default=1, help="model version directory (default: %(default)s)")
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
        out = build_repository(chosen, args.export_dir, args.variant, args.runtime, args.out, args.version)
    except (ManifestError, FileNotFoundError, ValueError) as error:
        print(f"model_repository: error: {error}", file=sys.stderr)
        return 2
    logs.get("model_repository").info("%s repository for %s (version %d) at %s", args.runtime, args.variant, args.version, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
