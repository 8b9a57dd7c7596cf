"""TensorRT plans (trt-fp16, trt-int8), built with the TensorRT Python API.

TensorRT is only in NVIDIA's NGC containers (docker/); neither our CPU machines nor the lent GPU machine
can install it. So this module is deliberately thin: everything that does not need TensorRT (profiles,
their validation, the plan's manifest fields) is plain Python and unit-tested; `build_plan` and
`TrtRunner` run only where `import tensorrt` works, and were not run in this project's CI.

TensorRT cannot parse ONNX Runtime's fused contrib ops (Attention, SkipLayerNormalization), so plans are
built from the *unfused* export: FP16 from the raw graph, INT8 from a calibrated QDQ copy of it
(explicit quantization, TensorRT 10's supported INT8 path).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bert_recsys.export.onnx_export import INPUT_NAMES, OUTPUT_NAME


class TensorRTUnavailable(RuntimeError):
    pass


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: min/opt/max batch and sequence length for both inputs."""

    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    min_seq: int = 1
    opt_seq: int = 128
    max_seq: int = 256

    @classmethod
    def parse(cls, text: str, max_length: int) -> "ShapeProfile":
        """'BATCH_MIN,OPT,MAX:SEQ_MIN,OPT,MAX', e.g. '1,32,64:1,128,256'. Empty text = defaults capped
        at the model's max length."""
        if not text:
            profile = cls(opt_seq=min(128, max_length), max_seq=max_length)
        else:
            try:
                batch, seq = text.split(":")
                b = [int(x) for x in batch.split(",")]
                s = [int(x) for x in seq.split(",")]
                profile = cls(*b, *s)
            except (ValueError, TypeError):
                raise ValueError(f"bad profile {text!r}; expected 'BMIN,BOPT,BMAX:SMIN,SOPT,SMAX'") from None
        profile.validate(max_length)
        return profile

    def validate(self, max_length: int) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {self}")
        if not 1 <= self.min_seq <= self.opt_seq <= self.max_seq:
            raise ValueError(f"sequence lengths must satisfy 1 <= min <= opt <= max, got {self}")
        if self.max_seq > max_length:
            raise ValueError(f"max_seq {self.max_seq} exceeds the model's max length {max_length}")

    def shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """Per input: (min, opt, max) shapes, as `IOptimizationProfile.set_shape` takes them."""
        dims = ((self.min_batch, self.min_seq), (self.opt_batch, self.opt_seq), (self.max_batch, self.max_seq))
        return {name: dims for name in INPUT_NAMES}

    def manifest(self) -> dict:
        return {"profile": asdict(self), "shapes": {k: [list(s) for s in v] for k, v in self.shapes().items()}}


def build_plan(onnx_path: Path, plan_path: Path, precision: str, profile: ShapeProfile, workspace_gib: float = 4.0) -> dict:
    """Builds and writes a serialized engine. INT8 expects a QDQ ONNX (explicit quantization)."""
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTUnavailable(f"tensorrt is not importable ({error}); build plans in docker/ (NGC image)") from None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines still run non-quantized layers in FP16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    trt_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.shapes().items():
        trt_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a {precision} engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(serialized))
    return {"tensorrt": trt.__version__, "precision": precision, "workspace_gib": workspace_gib, **profile.manifest()}


class TrtRunner:
    """Runs a plan on the GPU for the gate; buffers are torch CUDA tensors."""

    def __init__(self, plan_path: Path, name: str):
        import tensorrt as trt
        import torch

        self._torch = torch
        self.name = name
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        self.context = self.engine.create_execution_context()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        feeds = {INPUT_NAMES[0]: input_ids, INPUT_NAMES[1]: attention_mask}
        device_inputs = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
        for name, tensor in device_inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        output = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(OUTPUT_NAME, output.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return output.cpu().numpy()
