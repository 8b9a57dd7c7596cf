"""bert-recsys demo (`make demo`): the whole flow once, for real.

the catalog (`bert-recsys data`: --data, the data beside the checkout, the cache, or a verified download) ->
export of the served variant (reused while up to date) -> model repository -> tritonserver on loopback ->
recommendations for a MovieLens user through the real ensembles -> one call through the HTTP gateway (the
curl command is printed) -> stop the server. --no-build serves the repository as it is.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from bert_recsys.contracts.protocol import Protocol
from bert_recsys import settings
from bert_recsys.server.launcher import ServerError, TritonServer, free_port, on_free_ports


def gateway_call(server_settings) -> None:
    """One OpenAI-style embeddings call through the gateway (gateway/), as `make gateway` would serve it."""
    import json
    import secrets
    import urllib.request

    from bert_recsys.client.triton import TritonClient
    from bert_recsys.gateway.app import create_app
    from bert_recsys.gateway.background import BackgroundGateway
    from bert_recsys.gateway.config import GatewaySettings
    from bert_recsys.gateway.keys import KeyStore
    from bert_recsys.client.tokens import TokenCounter

    key = secrets.token_urlsafe(16)
    config = GatewaySettings(port=free_port(), triton_url=server_settings.grpc_url)
    tokens = TokenCounter(config.tokenizer_file) if config.tokenizer_file.exists() else None
    with TritonClient(server_settings.grpc_url, settings=replace(settings.SETTINGS, server=server_settings)) as client:
        with BackgroundGateway(create_app(config, client, KeyStore.from_plaintext([key]), tokens), config.port) as gateway:
            body = {"model": "embed", "input": "A heartwarming animated adventure about toys that come alive."}
            print(f"\n[demo] the gateway (`make gateway`), called as any OpenAI-compatible client would:\n"
                  f"  curl -s {gateway.url}/v1/embeddings -H 'Authorization: Bearer {key}' "
                  f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'")
            request = urllib.request.Request(f"{gateway.url}/v1/embeddings", data=json.dumps(body).encode(), method="POST",
                                             headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            vector = answer["data"][0]["embedding"]
            print(f"[demo] -> HTTP {response.status}: {len(vector)} floats [{vector[0]:.4f}, {vector[1]:.4f}, ...], "
                  f"usage {answer['usage']['prompt_tokens']} tokens")


def build(variant: str, runtime: str, repository: Path) -> int:
    """Exports `variant` (reused while up to date) and renders the repository for it: what `make repository` runs."""
    from bert_recsys.export.__main__ import main as export_main
    from bert_recsys.model_repository.__main__ import main as repository_main

    code = export_main(["--variants", variant])
    return code or repository_main(["build", "--variant", variant, "--runtime", runtime, "--out", str(repository)])


def main(argv=None) -> int:
    from bert_recsys import demo_data, env
    from bert_recsys.server import choice

    parser = argparse.ArgumentParser(prog="bert-recsys demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=settings.MODEL_REPOSITORY_DIR)
    parser.add_argument("--data", type=Path, default=None,
                        help="MovieLens-format directory (default: found or fetched as `bert-recsys data` does)")
    parser.add_argument("--variant", default=None,
                        help=f"the variant to serve (default: the one tuned on this machine, else {choice.DEFAULT_VARIANT})")
    parser.add_argument("--runtime", default="embedded", help="embedded, native or torch (bert-recsys repository)")
    parser.add_argument("--no-build", action="store_true", help="serve --repository as it is: no export, no render")
    parser.add_argument("--user", type=int, default=None, help="MovieLens userId (default: one with a long history)")
    parser.add_argument("--protocol", type=Protocol.parse, choices=list(Protocol), default=Protocol.GRPC)
    args = parser.parse_args(argv)

    try:
        data = demo_data.with_overviews(demo_data.resolve(args.data), demo_data.overviews_file(env.OVERVIEWS.get()))
    except demo_data.DataUnavailable as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    if not args.no_build:
        variant = args.variant or choice.variant_to_serve(settings.BUILD_DIR, settings.EXPORT_DIR)
        print(f"[demo] data {data}; serving {variant} ({args.runtime} runtime)")
        code = build(variant, args.runtime, args.repository)
        if code:
            return code
    from bert_recsys.client.demo_flow import run_demo

    server_settings = on_free_ports(settings.SETTINGS.server)
    started = time.perf_counter()
    try:
        with TritonServer(args.repository, server_settings, log_file=settings.BUILD_DIR / "demo_triton.log"):
            print(f"[demo] tritonserver ready in {time.perf_counter() - started:.1f} s on {server_settings.host} "
                  f"(gRPC {server_settings.grpc_port}, HTTP {server_settings.http_port})")
            run_demo(server_settings, args.protocol, data, args.user)
            gateway_call(server_settings)
    except ServerError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    print("[demo] server stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
