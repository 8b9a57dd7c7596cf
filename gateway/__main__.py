"""bert-recsys gateway: the HTTP gateway beside a running tritonserver (`make serve`); see gateway/config.py for
its environment variables. Loopback by default."""
from __future__ import annotations

import argparse
import signal
import sys

import uvicorn

from bert_recsys import logs
from bert_recsys.client.experiments import EventStore, Experiment, ExperimentError
from bert_recsys.client.triton import TritonClient
from bert_recsys.gateway.app import create_app
from bert_recsys.gateway.config import GatewaySettings
from bert_recsys.gateway.keys import KeyFileError, KeyStore
from bert_recsys.gateway.recommender import load_recommender
from bert_recsys.client.tokens import TokenCounter

log = logs.get("gateway")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys gateway", description=__doc__)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    logs.configure()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        config = GatewaySettings.from_env(**overrides)
        keys = KeyStore.from_file(config.key_file) if config.key_file else KeyStore.from_plaintext(config.api_keys)
        tokens = TokenCounter(config.tokenizer_file) if config.tokenizer_file.exists() else None
        client = TritonClient(config.triton_url, protocol="grpc")
        recommender = load_recommender(config, client) if config.data_dir else None
        events = EventStore(config.events_db) if config.events_db else None
        experiment = Experiment.parse(config.experiment_file.read_text()) if config.experiment_file else None
        if experiment is not None:
            if recommender is None or events is None:
                raise ExperimentError("GATEWAY_EXPERIMENT needs GATEWAY_DATA (recommendations) and an event store")
            events.register(experiment)
            log.info("experiment %s: arms %s", experiment.name, ", ".join(a.name for a in experiment.arms))
        app = create_app(config, client, keys, tokens, recommender, events=events, experiment=experiment)
    except (ValueError, KeyFileError, OSError) as error:  # ExperimentError is a ValueError
        log.error("%s", error)
        return 2
    if tokens is None:
        log.warning("no served tokenizer at %s: usage.prompt_tokens will be 0", config.tokenizer_file)
    log.info("gateway on http://%s:%d -> Triton %s, %d key(s); SIGTERM drains in-flight requests for up to %.0f s",
             config.host, config.port, config.triton_url, len(keys), config.drain_s)
    # SIGTERM / Ctrl-C: uvicorn closes the listening socket, lets in-flight requests finish (up to drain_s; a
    # response already started is never cut off before then), closes idle keep-alive connections, and then
    # re-raises the signal it caught to the handler it found, ours: a stop asked for is exit status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=config.drain_s)
    except Stopped as stop:
        log.info("%s: stopped accepting, in-flight requests finished or cut at %.0f s", stop, config.drain_s)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal during cleanup: the default action
            signal.signal(signum, signal.SIG_DFL)
        client.close()
        if events is not None:
            events.close()
    log.info("gateway stopped")
    return 0


class Stopped(Exception):
    """SIGTERM or SIGINT, re-raised by uvicorn once it has drained."""


def _stop(signum, _frame):
    raise Stopped(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
