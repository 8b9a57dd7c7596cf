"""The gateway's settings, and the one registry of the environment variables it reads.

    GATEWAY_HOST=127.0.0.1         bind address (loopback unless asked)
    GATEWAY_PORT=8080
    GATEWAY_API_KEYS=k1,k2         plaintext keys, hashed at start (used when no key file is given)
    GATEWAY_KEY_FILE=path          one "name:sha256-hex" per line (keys are never stored in the clear)
    GATEWAY_RATE_RPS=20            per key: requests per second (token bucket)
    GATEWAY_RATE_TEXTS_PER_S=500   per key: texts per second
    GATEWAY_BURST_S=2              bucket depth, in seconds of the rate
    GATEWAY_MAX_BODY_BYTES=2000000
    GATEWAY_MAX_INPUTS=1000        texts per request (at most what one key's text bucket holds)
    GATEWAY_DRAIN_S=10             on SIGTERM: stop accepting, and give in-flight requests this long to finish
    GATEWAY_CANARY_SHARE=0.1       the share of /v1/embeddings calls sent to a canary encoder version while a rollout
                                   has one loaded (0: none); a call the canary fails is served by the stable version
    GATEWAY_TRITON_URL=host:port   Triton's gRPC endpoint (default: settings.ServerSettings)
    GATEWAY_TRITON_HTTP_URL=host:port  Triton's HTTP endpoint, for /v1/embeddings when GATEWAY_EMBED_PROTOCOL=http
                                   (default: settings.ServerSettings)
    GATEWAY_EMBED_PROTOCOL=http    how /v1/embeddings reaches Triton: http (keep-alive connections on the event
                                   loop, client/kserve_http.py) or grpc (tritonclient.grpc.aio); `make
                                   bench-gateway` measures both on the machine at hand
    GATEWAY_TOKENIZER_FILE=path    the served tokenizer.json, for usage.prompt_tokens (default: the local repository's)
    GATEWAY_DATA=dir               a catalog directory (MovieLens, or items.csv + interactions.csv): enables the
                                   recommendation routes and POST /v1/items
    GATEWAY_INDEX_STORE=dir        the catalog IndexStore (default build/catalog_index): built through `embed`
                                   when empty; a rollout with --index-store switches it and the gateway follows
    GATEWAY_EVENTS_DB=path         the experiment event store, SQLite (default build/experiments/events.sqlite;
                                   "off": no /v1/events)
    GATEWAY_EXPERIMENT=file.json   an experiment (client/experiments/design.py): recommendations are served by
                                   the user's arm and carry it; registered in the event store at start
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bert_recsys import settings


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    key_file: Path | None = None
    rate_rps: float = 20.0
    rate_texts_per_s: float = 500.0
    burst_s: float = 2.0
    max_body_bytes: int = 2_000_000
    max_inputs: int = 1000
    triton_url: str = field(default_factory=lambda: settings.SETTINGS.server.grpc_url)
    triton_http_url: str | None = None  # None: the http_url of the TritonClient's settings
    embed_protocol: str = "http"
    # The served tokenizer, for `usage.prompt_tokens` (the same tokenizer.json the `tokenizer` model loads).
    tokenizer_file: Path = settings.MODEL_REPOSITORY_DIR / "tokenizer" / "1" / "tokenizer.json"
    model: str = settings.SETTINGS.models.embed
    data_dir: Path | None = None
    index_store: Path = settings.BUILD_DIR / "catalog_index"
    events_db: Path | None = settings.EXPERIMENTS_DB
    experiment_file: Path | None = None
    drain_s: float = 10.0
    canary_share: float = 0.1

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be within 1..65535, not {self.port}")
        if self.rate_rps <= 0 or self.rate_texts_per_s <= 0 or self.burst_s <= 0:
            raise ValueError("rates and the burst must be positive")
        if self.max_body_bytes < 1024 or self.max_inputs < 1:
            raise ValueError("max_body_bytes must be >= 1024 and max_inputs >= 1")
        if not 0.0 <= self.canary_share <= 1.0:
            raise ValueError(f"canary_share must be within [0, 1], not {self.canary_share}")
        if not self.drain_s > 0:
            raise ValueError(f"drain_s must be positive, not {self.drain_s}")
        if self.embed_protocol not in ("http", "grpc"):
            raise ValueError(f"embed_protocol must be http or grpc, not {self.embed_protocol!r}")

    @classmethod
    def from_env(cls, **overrides) -> "GatewaySettings":
        keys = tuple(k.strip() for k in _env("GATEWAY_API_KEYS", "").split(",") if k.strip())
        key_file = _env("GATEWAY_KEY_FILE", "")
        values = dict(
            host=_env("GATEWAY_HOST", "127.0.0.1"), port=int(_env("GATEWAY_PORT", "8080")), api_keys=keys,
            key_file=Path(key_file) if key_file else None,
            rate_rps=float(_env("GATEWAY_RATE_RPS", "20")), rate_texts_per_s=float(_env("GATEWAY_RATE_TEXTS_PER_S", "500")),
            burst_s=float(_env("GATEWAY_BURST_S", "2")), max_body_bytes=int(_env("GATEWAY_MAX_BODY_BYTES", "2000000")),
            max_inputs=int(_env("GATEWAY_MAX_INPUTS", "1000")),
            triton_url=_env("GATEWAY_TRITON_URL", settings.SETTINGS.server.grpc_url),
            triton_http_url=_env("GATEWAY_TRITON_HTTP_URL", "") or None,
            embed_protocol=_env("GATEWAY_EMBED_PROTOCOL", "http"),
            tokenizer_file=Path(_env("GATEWAY_TOKENIZER_FILE", str(settings.MODEL_REPOSITORY_DIR / "tokenizer" / "1" / "tokenizer.json"))),
            data_dir=Path(_env("GATEWAY_DATA", "")) if _env("GATEWAY_DATA", "") else None,
            index_store=Path(_env("GATEWAY_INDEX_STORE", str(settings.BUILD_DIR / "catalog_index"))),
            events_db=None if _env("GATEWAY_EVENTS_DB", "") == "off" else
            Path(_env("GATEWAY_EVENTS_DB", str(settings.EXPERIMENTS_DB))),
            experiment_file=Path(_env("GATEWAY_EXPERIMENT", "")) if _env("GATEWAY_EXPERIMENT", "") else None,
            drain_s=float(_env("GATEWAY_DRAIN_S", "10")),
            canary_share=float(_env("GATEWAY_CANARY_SHARE", "0.1")),
        )
        values.update(overrides)
        return cls(**values)
