"""The gateway's settings, read from the GATEWAY_* environment variables of the one registry (bert_recsys/env.py,
docs/environment.md) when the gateway starts: never at import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bert_recsys import env, settings
from bert_recsys.contracts.protocol import Protocol


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
    embed_protocol: Protocol = Protocol.HTTP
    # The served tokenizer, for `usage.prompt_tokens` (the same tokenizer.json the `tokenizer` model loads).
    tokenizer_file: Path = field(default_factory=lambda: default_tokenizer_file())
    model: str = field(default_factory=lambda: settings.Settings().models.embed)
    data_dir: Path | None = None
    index_store: Path = field(default_factory=lambda: settings.BUILD_DIR / "catalog_index")
    events_db: Path | None = field(default_factory=lambda: settings.EXPERIMENTS_DB)
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
        object.__setattr__(self, "embed_protocol", Protocol.parse(self.embed_protocol))

    @classmethod
    def from_env(cls, **overrides) -> "GatewaySettings":
        """From the environment (GATEWAY_*), then `overrides`. A bad value raises env.SettingsError naming it."""
        keys = tuple(k.strip() for k in env.GATEWAY_API_KEYS.get().split(",") if k.strip())
        events = env.GATEWAY_EVENTS_DB.get()
        values = dict(
            host=env.GATEWAY_HOST.get(), port=env.GATEWAY_PORT.get(), api_keys=keys, key_file=env.GATEWAY_KEY_FILE.get(),
            rate_rps=env.GATEWAY_RATE_RPS.get(), rate_texts_per_s=env.GATEWAY_RATE_TEXTS_PER_S.get(),
            burst_s=env.GATEWAY_BURST_S.get(), max_body_bytes=env.GATEWAY_MAX_BODY_BYTES.get(),
            max_inputs=env.GATEWAY_MAX_INPUTS.get(),
            triton_url=env.GATEWAY_TRITON_URL.get() or settings.SETTINGS.server.grpc_url,
            triton_http_url=env.GATEWAY_TRITON_HTTP_URL.get() or None,
            embed_protocol=env.GATEWAY_EMBED_PROTOCOL.get(),
            tokenizer_file=env.GATEWAY_TOKENIZER_FILE.get() or default_tokenizer_file(),
            data_dir=env.GATEWAY_DATA.get(),
            index_store=env.GATEWAY_INDEX_STORE.get() or settings.BUILD_DIR / "catalog_index",
            events_db=None if (events or "").strip() == "off" else Path(events) if events else settings.EXPERIMENTS_DB,
            experiment_file=env.GATEWAY_EXPERIMENT.get(),
            drain_s=env.GATEWAY_DRAIN_S.get(),
            canary_share=env.GATEWAY_CANARY_SHARE.get(),
        )
        values.update(overrides)
        return cls(**values)


def default_tokenizer_file() -> Path:
    """The tokenizer.json the local repository's `tokenizer` model loads."""
    return settings.MODEL_REPOSITORY_DIR / "tokenizer" / "1" / "tokenizer.json"
