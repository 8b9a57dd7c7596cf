"""A plain BERT sentence encoder in torch: the code the `torch` runtime serves and the export gates.

One file, importing only torch, safetensors and the standard library: the model repository renderer copies it
beside the torch encoder's model.py, so the Triton stub runs exactly what `bert-recsys export` checked against
PyTorch FP32 (transformers). No transformers at serving time, and nothing that runs code on load: weights and
config come from one safetensors file (`model.safetensors`), the config as JSON in its metadata.

(input_ids, attention_mask) INT64 [batch, seq] -> embedding FP32 [batch, dim], pooled and L2-normalized.
Attention is `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA), Q, K and V are one
matmul, and pooling and normalization run in FP32 whatever the weights' precision.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

FORMAT = "bert-recsys-torch-bert/1"   # metadata["format"]: what this module reads
ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class WeightsError(ValueError):
    """A weights file this module cannot serve: another format, a missing tensor, a shape that does not fit."""


@dataclass(frozen=True)
class BertConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    vocab: int
    max_positions: int
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    pooling: str = "mean"          # "mean" (over the mask) or "cls"

    def __post_init__(self):
        if self.hidden % self.heads:
            raise WeightsError(f"hidden size {self.hidden} is not a multiple of {self.heads} heads")
        if self.activation not in ACTIVATIONS:
            raise WeightsError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.pooling not in ("mean", "cls"):
            raise WeightsError(f"pooling {self.pooling!r} is not mean or cls")

    def to_metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "config": json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> "BertConfig":
        metadata = metadata or {}
        if metadata.get("format") != FORMAT:
            raise WeightsError(f"weights of format {metadata.get('format')!r}; this code reads {FORMAT}")
        try:
            return cls(**json.loads(metadata["config"]))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise WeightsError(f"unreadable config in the weights' metadata: {error}") from None


def tensor_shapes(c: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the weights file must hold, with its shape."""
    shapes = {"embeddings.word": (c.vocab, c.hidden),
              # Position embeddings with token type 0 folded in (the ensembles never send token types).
              "embeddings.position": (c.max_positions, c.hidden),
              "embeddings.norm.weight": (c.hidden,), "embeddings.norm.bias": (c.hidden,)}
    for i in range(c.layers):
        p = f"layers.{i}."
        shapes.update({p + "qkv.weight": (3 * c.hidden, c.hidden), p + "qkv.bias": (3 * c.hidden,),
                       p + "attn_out.weight": (c.hidden, c.hidden), p + "attn_out.bias": (c.hidden,),
                       p + "attn_norm.weight": (c.hidden,), p + "attn_norm.bias": (c.hidden,),
                       p + "ffn_in.weight": (c.intermediate, c.hidden), p + "ffn_in.bias": (c.intermediate,),
                       p + "ffn_out.weight": (c.hidden, c.intermediate), p + "ffn_out.bias": (c.hidden,),
                       p + "ffn_norm.weight": (c.hidden,), p + "ffn_norm.bias": (c.hidden,)})
    return shapes


class TorchBert(torch.nn.Module):
    """Inference only: no dropout, no token types, no pooler head (sentence-transformers does not use it)."""

    def __init__(self, config: BertConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        expected = tensor_shapes(config)
        missing = sorted(set(expected) - set(weights))
        if missing:
            raise WeightsError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise WeightsError(f"{name} has shape {tuple(weights[name].shape)}, the config needs {shape}")
        self.config = config
        # Plain tensors in a ParameterDict-free dict: buffers move with .to() and are saved by nobody.
        for name in expected:
            self.register_buffer(name.replace(".", "__"), weights[name], persistent=False)
        self._act = ACTIVATIONS[config.activation]

    def _w(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, seq = input_ids.shape
        heads, head_dim = c.heads, c.hidden // c.heads
        x = F.embedding(input_ids, self._w("embeddings.word")) + self._w("embeddings.position")[:seq]
        x = F.layer_norm(x, (c.hidden,), self._w("embeddings.norm.weight"), self._w("embeddings.norm.bias"),
                         c.layer_norm_eps)
        keep = attention_mask.bool()[:, None, None, :]       # [batch, 1, 1, seq]: which keys a query may see
        for i in range(c.layers):
            w = lambda name: self._w(f"layers.{i}.{name}")   # noqa: E731
            qkv = F.linear(x, w("qkv.weight"), w("qkv.bias")).view(batch, seq, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)    # each [batch, heads, seq, head_dim]
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            attended = attended.transpose(1, 2).reshape(batch, seq, c.hidden)
            x = F.layer_norm(x + F.linear(attended, w("attn_out.weight"), w("attn_out.bias")), (c.hidden,),
                             w("attn_norm.weight"), w("attn_norm.bias"), c.layer_norm_eps)
            inner = self._act(F.linear(x, w("ffn_in.weight"), w("ffn_in.bias")))
            x = F.layer_norm(x + F.linear(inner, w("ffn_out.weight"), w("ffn_out.bias")), (c.hidden,),
                             w("ffn_norm.weight"), w("ffn_norm.bias"), c.layer_norm_eps)
        x = x.float()
        if c.pooling == "cls":
            pooled = x[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def from_transformers_state(state: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face `BertModel` state dict (with or without the `bert.` prefix) -> this module's tensors."""
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    get = lambda name: state[name].detach().float()  # noqa: E731
    try:
        out = {"embeddings.word": get("embeddings.word_embeddings.weight"),
               "embeddings.position": get("embeddings.position_embeddings.weight")
               + get("embeddings.token_type_embeddings.weight")[0],
               "embeddings.norm.weight": get("embeddings.LayerNorm.weight"),
               "embeddings.norm.bias": get("embeddings.LayerNorm.bias")}
        for i in range(config.layers):
            hf, p = f"encoder.layer.{i}.", f"layers.{i}."
            attention = hf + "attention.self."
            out[p + "qkv.weight"] = torch.cat([get(attention + n + ".weight") for n in ("query", "key", "value")])
            out[p + "qkv.bias"] = torch.cat([get(attention + n + ".bias") for n in ("query", "key", "value")])
            for ours, theirs in (("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"),
                                 ("ffn_norm", "output.LayerNorm")):
                out[p + ours + ".weight"] = get(hf + theirs + ".weight")
                out[p + ours + ".bias"] = get(hf + theirs + ".bias")
    except KeyError as missing:
        raise WeightsError(f"the BERT state dict lacks {missing}") from None
    return out


def to_transformers_state(weights: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """The inverse, for a Hugging Face `BertModel` (token type embeddings zero: type 0 is folded into positions)."""
    out = {"embeddings.word_embeddings.weight": weights["embeddings.word"],
           "embeddings.position_embeddings.weight": weights["embeddings.position"],
           "embeddings.token_type_embeddings.weight": torch.zeros(2, config.hidden, dtype=weights["embeddings.word"].dtype),
           "embeddings.LayerNorm.weight": weights["embeddings.norm.weight"],
           "embeddings.LayerNorm.bias": weights["embeddings.norm.bias"]}
    for i in range(config.layers):
        hf, p = f"encoder.layer.{i}.", f"layers.{i}."
        for part, name in (("weight", "qkv.weight"), ("bias", "qkv.bias")):
            for chunk, which in zip(weights[p + name].chunk(3), ("query", "key", "value")):
                out[f"{hf}attention.self.{which}.{part}"] = chunk
        for ours, theirs in (("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                             ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"), ("ffn_norm", "output.LayerNorm")):
            for part in ("weight", "bias"):
                out[f"{hf}{theirs}.{part}"] = weights[f"{p}{ours}.{part}"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def read(path) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a weights file, on the CPU, as stored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        config = BertConfig.from_metadata(handle.metadata())
        return config, {name: handle.get_tensor(name) for name in handle.keys()}


def flops_per_sequence(config: BertConfig, seq: int) -> int:
    """Multiply-adds x 2 of one sequence through the encoder: the dense layers, QK^T and AV (embeddings, norms,
    softmax and pooling are a rounding error). For a fraction-of-peak figure."""
    dense = 2 * seq * (4 * config.hidden * config.hidden + 2 * config.hidden * config.intermediate)
    attention = 4 * seq * seq * config.hidden
    return config.layers * (dense + attention)


def save(path, config: BertConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """All tensors in `dtype` (F.layer_norm wants input and affine terms in one dtype; it keeps its statistics
    in FP32 itself)."""
    from safetensors.torch import save_file

    cast = {name: w.to(dtype).contiguous() for name, w in weights.items()}
    save_file(cast, str(path), metadata=config.to_metadata())


def load(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> TorchBert:
    """Reads the weights file onto `device`; `dtype` (default: as stored) is the compute precision."""
    config, weights = read(path)
    weights = {name: w.to(device=device, dtype=dtype or w.dtype) for name, w in weights.items()}
    return TorchBert(config, weights).eval()


# ---- CUDA graphs ------------------------------------------------------------------------------------------
def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, then every multiple of 16, up to and including max_batch: a batch is padded by < 2x when
    small and by < 16 rows when large."""
    sizes = {b for b in (1, 2, 4, 8, 16) if b < max_batch} | set(range(16, max_batch, 16)) | {max_batch}
    return sorted(sizes)


def sequence_buckets(max_length: int, step: int = 16) -> list[int]:
    """Multiples of `step` up to max_length, and max_length itself."""
    return sorted({*range(step, max_length, step), max_length})


def bucket_of(value: int, sizes: list[int]) -> int:
    """The smallest size that holds `value`; ValueError when none does."""
    for size in sizes:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {sizes[-1]}")


def capture(model: TorchBert, ids: torch.Tensor, mask: torch.Tensor, pool=None) -> tuple:
    """(graph, output) of `model` on the static CUDA tensors ids and mask: write new inputs into them, replay,
    read the output. Warmed up on a side stream first, as CUDA graph capture requires."""
    device = ids.device
    with torch.inference_mode():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model(ids, mask)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = model(ids, mask)
    torch.cuda.synchronize(device)
    return graph, out


class GraphedEncoder:
    """One CUDA graph per (batch, sequence) bucket, all captured at construction (the warm-up covers every
    bucket), sharing one memory pool. A call pads its inputs into the bucket's static buffers (padding rows see
    one token, so no attention row is fully masked), replays, and returns a view of the first rows: read it
    before the next call. One caller at a time (one Triton model instance = one thread)."""

    def __init__(self, model: TorchBert, device: torch.device, max_batch: int, max_length: int, log=None):
        self.device = device
        self.batches, self.seqs = batch_buckets(max_batch), sequence_buckets(max_length)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple] = {}
        # Largest first: the shared pool reaches its peak at the first capture and is reused after.
        for batch in reversed(self.batches):
            for seq in reversed(self.seqs):
                ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
                mask = torch.ones(batch, seq, dtype=torch.long, device=device)
                graph, out = capture(model, ids, mask, self.pool)
                self.graphs[(batch, seq)] = (graph, ids, mask, out)
        if log:
            log(f"captured {len(self.graphs)} CUDA graphs: batch {self.batches}, sequence {self.seqs}")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows, seq = input_ids.shape
        graph, ids, mask, out = self.graphs[(bucket_of(rows, self.batches), bucket_of(seq, self.seqs))]
        ids.zero_()
        mask.zero_()
        mask[:, 0] = 1
        ids[:rows, :seq].copy_(input_ids, non_blocking=True)
        mask[:rows, :seq].copy_(attention_mask, non_blocking=True)
        graph.replay()
        return out[:rows]
