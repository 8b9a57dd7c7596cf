"""bert-recsys rollout: put a new export into production on a live tritonserver, or see what is serving.

    bert-recsys rollout run build/export/onnx-fp32      # stage, validate, swap in, canary, promote or roll back
    bert-recsys rollout status                          # versions, manifests, readiness, traffic shares
    bert-recsys rollout promote | rollback              # finish a rollout by hand (e.g. after a crash)

The server is found through settings.ServerSettings (TRITON_HOST, TRITON_GRPC_PORT, TRITON_METRICS_PORT), or
given as one `--replica GRPC_HOST:PORT,METRICS_HOST:PORT` per server sharing the repository (scale-out: each
load goes to one replica at a time); the admin key through TRITON_ADMIN_KEY or build/admin_key (written by
`make serve`). Exit status: 0 promoted
(or status shown), 2 refused before any traffic, 3 rolled back after the canary, 1 other errors.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from bert_recsys import logs
from bert_recsys import settings
from bert_recsys.client.experiments.events import EventStore
from bert_recsys.client.index import IndexStore
from bert_recsys.client.triton import TritonClient
from bert_recsys.rollout.admin import replicas_from_file
from bert_recsys.rollout.policy import Outcome
from bert_recsys.rollout.steps import (LiveRepository, Replica, RolloutRefused, RolloutSettings, TritonAdmin, promote, roll_back, run,
                                       status)


def admin_key() -> str:
    key = settings.SETTINGS.server.admin_key
    key_file = settings.BUILD_DIR / "admin_key"
    if not key and key_file.exists():
        key = key_file.read_text().strip()
    if not key:
        raise SystemExit("rollout: no admin key: set TRITON_ADMIN_KEY or start the server with `make serve`")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=settings.MODEL_REPOSITORY_DIR, help="the live repository")
    parser.add_argument("--replica", action="append", default=[], metavar="GRPC_HOST:PORT,METRICS_HOST:PORT",
                        help="a server of the live repository (repeat for each replica; default: settings)")
    parser.add_argument("--replicas-file", type=Path, default=None,
                        help="re-read before every step: one GRPC_HOST:PORT,METRICS_HOST:PORT per line (k8s/rollout.sh)")
    parser.add_argument("--index-store", type=Path, default=None,
                        help="catalog IndexStore to re-embed with the new version and switch with it")
    parser.add_argument("--family", choices=[f or "general" for f in settings.FAMILIES], default="general",
                        help="which encoder: general (embed, score) or rec (rec_embed, rec_score: make finetune)")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="roll out one exported variant directory")
    run_parser.add_argument("export", type=Path, help="an export variant directory (with manifest.json)")
    for field in fields(RolloutSettings):
        run_parser.add_argument(f"--{field.name.replace('_', '-')}", default=field.default,
                                type=float if field.default is None else type(field.default))
    run_parser.add_argument("--events", type=Path, default=None,
                            help="the experiment event store (SQLite) the conversion check reads")
    status_parser = commands.add_parser("status", help="what is serving")
    status_parser.add_argument("--window", type=float, default=5.0, help="seconds of traffic to measure shares over")
    commands.add_parser("promote", help="promote the running canary")
    commands.add_parser("rollback", help="roll the running canary back")
    args = parser.parse_args(argv)
    logs.configure()

    s = settings.SETTINGS.server
    family = settings.SETTINGS.for_family("" if args.family == "general" else args.family)
    live = LiveRepository(args.repository, family)
    replicas = [Replica(*spec.split(",", 1)) for spec in args.replica] or [Replica(s.grpc_url, f"{s.host}:{s.metrics_port}")]
    if args.replicas_file:
        admin = TritonAdmin([], admin_key(), s.admin_header, discover=replicas_from_file(args.replicas_file))
    else:
        admin = TritonAdmin(replicas, admin_key(), s.admin_header)
    store = IndexStore(args.index_store) if args.index_store else None
    try:
        if args.command == "status":
            print(json.dumps(status(live, admin, args.window, store), indent=2))
            return 0
        if args.command in ("promote", "rollback"):
            with live.lock():
                # Both keep the runtime the live encoder already runs (read from its config).
                if args.command == "promote":
                    promote(live, admin, RolloutSettings(), store, None)
                else:
                    roll_back(live, admin, RolloutSettings(), store)
            return 0
        rollout = RolloutSettings(**{f.name: getattr(args, f.name) for f in fields(RolloutSettings)})
        client = TritonClient(s.grpc_url, settings=family) if store is not None else None
        events = EventStore(args.events) if args.events else None
        report = run(live, admin, args.export, rollout, store=store, client=client, events=events)
        print(json.dumps(report, indent=2))
        return 0 if report["outcome"] is Outcome.PROMOTED else 3
    except RolloutRefused as error:
        print(f"rollout: refused: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
