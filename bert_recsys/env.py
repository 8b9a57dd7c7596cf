"""Every environment variable the project reads, in one registry: its name, type, default and meaning.

Nothing is read at import. A variable is read when a command asks for it (`TRITON_HTTP_PORT.get()`), so a
changed environment is seen by the next settings object, and a bad value is a `SettingsError` naming the variable
and the value, raised by the command that needs it (`bert-recsys` turns it into one line and exit code 2).

docs/environment.md is generated from this registry (`bert-recsys env --markdown`); a test keeps it current.
`bert-recsys env` shows what each variable is now.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class SettingsError(ValueError):
    """An environment variable holds a value its command cannot use."""

    def __init__(self, name: str, value: str, reason: str):
        super().__init__(f"{name}={value!r}: {reason}")
        self.name, self.value, self.reason = name, value, reason


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Var:
    """One environment variable. `default` is the value when it is unset (or, for paths and numbers, empty); a
    callable default is computed when read, and `default_text` says what it is in the docs."""

    name: str
    kind: str                     # str, int, float, bool, port, path, choice
    default: object
    meaning: str
    section: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    default_text: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"{self.name}: a choice needs its choices")

    def raw(self) -> str | None:
        return os.environ.get(self.name)

    def is_set(self) -> bool:
        return self.raw() is not None

    def get(self):
        """The value now: parsed from the environment, or the default. Raises SettingsError on a bad value."""
        raw = self.raw()
        if raw is None or (raw.strip() == "" and self.kind != "str"):
            return self.default() if callable(self.default) else self.default
        return KINDS[self.kind](self, raw)

    def documented_default(self) -> str:
        if self.default_text:
            return self.default_text
        if self.default is None:
            return "unset"
        if self.default == "":
            return '""'
        if self.kind == "bool":
            return "true" if self.default else "false"
        return str(self.default)

    def type_text(self) -> str:
        if self.kind == "choice":
            return " \\| ".join(self.choices)
        if self.kind in ("int", "float") and (self.minimum is not None or self.maximum is not None):
            low = "" if self.minimum is None else f">= {self.minimum:g}"
            high = "" if self.maximum is None else f"<= {self.maximum:g}"
            return f"{self.kind} {' '.join(p for p in (low, high) if p)}"
        return self.kind


def _number(var: Var, raw: str, cast):
    try:
        value = cast(raw.strip())
    except ValueError:
        raise SettingsError(var.name, raw, f"not {'an integer' if cast is int else 'a number'}") from None
    if var.minimum is not None and value < var.minimum:
        raise SettingsError(var.name, raw, f"must be >= {var.minimum:g}")
    if var.maximum is not None and value > var.maximum:
        raise SettingsError(var.name, raw, f"must be <= {var.maximum:g}")
    return value


def _bool(var: Var, raw: str) -> bool:
    text = raw.strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise SettingsError(var.name, raw, f"not a boolean (one of {', '.join(TRUE + FALSE)})")


def _port(var: Var, raw: str) -> int:
    value = _number(var, raw, int)
    if not 0 < value < 65536:
        raise SettingsError(var.name, raw, "a port must be within 1..65535")
    return value


def _choice(var: Var, raw: str) -> str:
    text = raw.strip()
    for choice in var.choices:
        if text.lower() == choice.lower():
            return choice
    raise SettingsError(var.name, raw, f"choose from {', '.join(var.choices)}")


KINDS: dict[str, Callable[[Var, str], object]] = {
    "str": lambda var, raw: raw,
    "int": lambda var, raw: _number(var, raw, int),
    "float": lambda var, raw: _number(var, raw, float),
    "bool": _bool,
    "port": _port,
    "path": lambda var, raw: Path(raw).expanduser(),
    "choice": _choice,
}


def _checkout() -> Path | None:
    """The checkout this package runs from (the Makefile beside it), or None when installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "Makefile").is_file() and (root / "bert_recsys").is_dir() else None


def _build_dir() -> Path:
    root = _checkout()
    return root / "build" if root else Path.cwd() / "build"


def _shared_data_dir() -> Path:
    root = _checkout()
    return root.parent / "shared" / "data" if root else Path.cwd() / "shared" / "data"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bert-recsys"


REGISTRY: dict[str, Var] = {}


def var(name: str, kind: str, default, meaning: str, section: str, **options) -> Var:
    if name in REGISTRY:
        raise ValueError(f"{name} is registered twice")
    REGISTRY[name] = entry = Var(name, kind, default, meaning, section, **options)
    return entry


# Paths
BUILD_DIR = var("BUILD_DIR", "path", _build_dir, "where exports, repositories, reports and state are written",
                "paths", default_text="build/ in a checkout; ./build where the package is installed")
SHARED_DATA_DIR = var("SHARED_DATA_DIR", "path", _shared_data_dir,
                      "the data sets the tests, benchmarks and evaluation read (STS-B, SciFact, MovieLens, overviews)",
                      "paths", default_text="../shared/data beside a checkout; ./shared/data where installed")
# tritonserver
TRITON_HOST = var("TRITON_HOST", "str", "127.0.0.1", "tritonserver's address: bind address of `serve`, and where "
                  "clients connect", "server")
TRITON_HTTP_PORT = var("TRITON_HTTP_PORT", "port", 8000, "tritonserver's HTTP port", "server")
TRITON_GRPC_PORT = var("TRITON_GRPC_PORT", "port", 8001, "tritonserver's gRPC port", "server")
TRITON_METRICS_PORT = var("TRITON_METRICS_PORT", "port", 8002, "tritonserver's Prometheus metrics port", "server")
TRITON_ADMIN_KEY = var("TRITON_ADMIN_KEY", "str", "", "the key guarding model control and the repository API "
                       "(Triton's restricted APIs); empty: a key is made up per start", "server")
TOKENIZER_INSTANCES = var("TOKENIZER_INSTANCES", "int", 2, "instances of the Python tokenizer model (more on a GPU "
                          "machine)", "server", minimum=1)
ENCODER_INTRA_OP_SPINNING = var("ENCODER_INTRA_OP_SPINNING", "bool", True, "ONNX Runtime's intra-op threads "
                                "spin-wait between runs (fastest when the encoder has the cores to itself)", "server")
ENCODER_TOKENIZES = var("ENCODER_TOKENIZES", "bool", True, "the embedded runtime's encoder is sent the text and "
                        "tokenizes it itself: `embed` and `score` run one Python stub before the model instead of two "
                        "(false: the tokenizer model first, as on the native and torch runtimes)", "server")
ENCODER_DEVICE = var("ENCODER_DEVICE", "choice", "auto", "where the torch runtime's encoder runs: auto = gpu when "
                     "torch sees CUDA where the repository is rendered", "server", choices=("auto", "gpu", "cpu"))
ENCODER_CUDA_GRAPHS = var("ENCODER_CUDA_GRAPHS", "bool", True, "the torch runtime on CUDA replays one CUDA graph per "
                          "(batch, sequence) bucket; false runs eagerly", "server")
TRITON_STUB_NO_PYCACHE = var("TRITON_STUB_NO_PYCACHE", "bool", False, "set by the launcher for Triton's Python stubs: "
                             "no __pycache__ in the repository (poll mode would reload on it)", "server")
# Logging
LOG_LEVEL = var("LOG_LEVEL", "choice", "INFO", "the threshold of every command's log lines on stderr", "logging",
                choices=("DEBUG", "INFO", "WARNING", "ERROR"))
# Demo data
DEMO_DATA_URL = var("DEMO_DATA_URL", "str", "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
                    "where the demo downloads ml-latest-small from (checked against pinned sha256s)", "demo")
DEMO_DATA_CACHE = var("DEMO_DATA_CACHE", "path", _cache_dir, "where the verified download is kept", "demo",
                      default_text="$XDG_CACHE_HOME/bert-recsys, else ~/.cache/bert-recsys")
DEMO_DOWNLOAD = var("DEMO_DOWNLOAD", "bool", True, "false: never download the demo's data", "demo")
OVERVIEWS = var("OVERVIEWS", "str", None, "an overviews.csv to add as rich item text, or none (default: the TMDB "
                "overviews beside the checkout, where present)", "demo")
# Gateway
GATEWAY_HOST = var("GATEWAY_HOST", "str", "127.0.0.1", "the gateway's bind address (loopback unless asked)", "gateway")
GATEWAY_PORT = var("GATEWAY_PORT", "port", 8080, "the gateway's port", "gateway")
GATEWAY_API_KEYS = var("GATEWAY_API_KEYS", "str", "", "plaintext keys, comma-separated, hashed at start (used when no "
                       "key file is given)", "gateway")
GATEWAY_KEY_FILE = var("GATEWAY_KEY_FILE", "path", None, 'one "name:sha256-hex" per line (keys are never stored in '
                       "the clear)", "gateway")
GATEWAY_RATE_RPS = var("GATEWAY_RATE_RPS", "float", 20.0, "per key: requests per second (token bucket)", "gateway",
                       minimum=0)
GATEWAY_RATE_TEXTS_PER_S = var("GATEWAY_RATE_TEXTS_PER_S", "float", 500.0, "per key: texts per second", "gateway",
                               minimum=0)
GATEWAY_BURST_S = var("GATEWAY_BURST_S", "float", 2.0, "bucket depth, in seconds of the rate", "gateway", minimum=0)
GATEWAY_MAX_BODY_BYTES = var("GATEWAY_MAX_BODY_BYTES", "int", 2_000_000, "largest request body", "gateway",
                             minimum=1024)
GATEWAY_MAX_INPUTS = var("GATEWAY_MAX_INPUTS", "int", 1000, "texts per request", "gateway", minimum=1)
GATEWAY_DRAIN_S = var("GATEWAY_DRAIN_S", "float", 10.0, "on SIGTERM: stop accepting, and give in-flight requests this "
                      "long to finish", "gateway", minimum=0)
GATEWAY_CANARY_SHARE = var("GATEWAY_CANARY_SHARE", "float", 0.1, "the share of embedding and recommendation calls sent "
                           "to a canary encoder version while a rollout has one loaded (recommendations once the "
                           "canary's catalog index is published); a call the canary fails is served by the stable one",
                           "gateway", minimum=0, maximum=1)
GATEWAY_TRITON_URL = var("GATEWAY_TRITON_URL", "str", None, "Triton's gRPC endpoint, host:port", "gateway",
                         default_text="TRITON_HOST:TRITON_GRPC_PORT")
GATEWAY_TRITON_HTTP_URL = var("GATEWAY_TRITON_HTTP_URL", "str", None, "Triton's HTTP endpoint, for /v1/embeddings "
                              "over HTTP", "gateway", default_text="TRITON_HOST:TRITON_HTTP_PORT")
GATEWAY_EMBED_PROTOCOL = var("GATEWAY_EMBED_PROTOCOL", "choice", "http", "how /v1/embeddings reaches Triton",
                             "gateway", choices=("http", "grpc"))
GATEWAY_TOKENIZER_FILE = var("GATEWAY_TOKENIZER_FILE", "path", None, "the served tokenizer.json, for "
                             "usage.prompt_tokens", "gateway",
                             default_text="BUILD_DIR/model_repository/tokenizer/1/tokenizer.json")
GATEWAY_DATA = var("GATEWAY_DATA", "path", None, "a catalog directory: enables the recommendation routes and "
                   "POST /v1/items", "gateway")
GATEWAY_INDEX_STORE = var("GATEWAY_INDEX_STORE", "path", None, "the catalog IndexStore, built through `embed` when "
                          "empty", "gateway", default_text="BUILD_DIR/catalog_index")
GATEWAY_EVENTS_DB = var("GATEWAY_EVENTS_DB", "str", None, 'the experiment event store, SQLite ("off": no /v1/events)',
                        "gateway", default_text="BUILD_DIR/experiments/events.sqlite")
GATEWAY_EXPERIMENT = var("GATEWAY_EXPERIMENT", "path", None, "an experiment (JSON): recommendations are served by "
                         "the user's arm", "gateway")
# Load tests and benchmarks (the checkout's bench area)
LOADTEST_PROTOCOL = var("LOADTEST_PROTOCOL", "choice", "http", "how Locust users call", "loadtest",
                        choices=("http", "grpc", "gateway"))
LOADTEST_GRPC_URL = var("LOADTEST_GRPC_URL", "str", None, "Triton's gRPC endpoint for Locust's gRPC users",
                        "loadtest", default_text="TRITON_HOST:TRITON_GRPC_PORT")
LOADTEST_TASKS = var("LOADTEST_TASKS", "str", "embed:6,score:3,recommend:1", "task weights of a Locust user",
                     "loadtest")
LOADTEST_REJECTED_BACKOFF_S = var("LOADTEST_REJECTED_BACKOFF_S", "float", 0.05, "a user's pause after a rejected "
                                  "call", "loadtest", minimum=0)
LOADTEST_CANARY_SHARE = var("LOADTEST_CANARY_SHARE", "float", 0.0, "the share of direct calls sent to a canary",
                            "loadtest", minimum=0, maximum=1)
LOADTEST_THINK_MS = var("LOADTEST_THINK_MS", "float", 0.0, "pause between a user's calls (0: closed loop)",
                        "loadtest", minimum=0)
LOADTEST_GATEWAY_KEY = var("LOADTEST_GATEWAY_KEY", "str", None, "the API key Locust's gateway users send",
                           "loadtest", default_text="the first of GATEWAY_API_KEYS")
LOADTEST_STEP = var("LOADTEST_STEP", "str", None, "a step load shape: users,seconds,max users", "loadtest")
PERF_ANALYZER = var("PERF_ANALYZER", "path", None, "the perf_analyzer binary", "loadtest",
                    default_text="perf_analyzer on PATH, else tritonclient's")


def markdown() -> str:
    """docs/environment.md: the registry as tables, one per section."""
    lines = ["# Environment variables", "",
             "Generated from `bert_recsys/env.py` by `bert-recsys env --markdown`; a test keeps it current. Every",
             "variable is read when a command needs it, never at import: a bad value stops that command with exit code 2",
             "and a message naming the variable and the value.", ""]
    sections = dict.fromkeys(v.section for v in REGISTRY.values())
    for section in sections:
        lines += [f"## {section}", "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        for v in REGISTRY.values():
            if v.section == section:
                lines.append(f"| `{v.name}` | {v.type_text()} | {v.documented_default()} | {v.meaning} |")
        lines.append("")
    return "\n".join(lines)


def current() -> list[tuple[str, str, str]]:
    """(name, value now or its default, "set" / "default" / the error) for every variable."""
    rows = []
    for v in REGISTRY.values():
        try:
            value = v.get()
            state = "set" if v.is_set() else "default"
        except SettingsError as error:
            value, state = v.raw(), f"error: {error.reason}"
        shown = "***" if v.name in ("TRITON_ADMIN_KEY", "GATEWAY_API_KEYS") and value else value
        rows.append((v.name, "" if shown is None else str(shown), state))
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bert-recsys env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print docs/environment.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
        return 0
    rows = current()
    width = max(len(name) for name, _, _ in rows)
    for name, value, state in rows:
        print(f"{name:<{width}}  {value}  ({state})")
    return 1 if any(state.startswith("error") for _, _, state in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
