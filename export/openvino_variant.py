"""The OpenVINO variants: IR (model.xml, weights in model.bin) converted from the plain torch ONNX export (OpenVINO
reads it, not the ORT-fused graph), run by OpenVINO's CPU plugin. Pooling and L2 normalization are in the graph.

    ov-fp32   as converted, run at inference precision f32 (OpenVINO would pick bf16 by itself on a CPU with AMX
              or AVX512-BF16, so the precision is always set, in the gate and in serving)
    ov-int8   NNCF post-training static INT8 (ModelType.TRANSFORMER, SmoothQuant at NNCF's default alpha),
              calibrated on in-domain unlabeled training text; pooling and normalization stay FP32 (ignored scope),
              as do the FFN output projections of `fp32_layers` and the attention core: NNCF would quantize the
              query and key that enter ScaledDotProductAttention, and the CPU plugin's attention then gives a text
              another vector once a single padded position sits beside it (min cosine 0.99786 alone vs padded by
              one token or by 112: the same). With the attention core FP32 a text's vector is the same at any
              padding and in any batch (1.000000), and all the projections and the FFN are still INT8.

    ov-bf16   the FP32 IR run at inference precision bf16: built only where the CPU computes BF16 natively
              (OpenVINO reports "BF16" among its optimization capabilities); skipped elsewhere.
    ov-int8-bf16  ov-int8's recipe, with the ops left unquantized computed in bf16: built where ov-bf16 is. A
              variant for speed, so its FP32 layers were chosen as the fastest candidate keeping >= 0.9985 on the
              selection half (same machine, bf16): layer 0's FFN output FP32 1.00025, 165.7 ms at b32/s128; none
              FP32 1.00005, 160.3 ms (chosen). The INT8 attention core would be 156.7 ms, and so is
              sentence-transformers' OpenVINO static INT8 (model only, 25 interleaved rounds, one run).

The attention core stays FP32 by construction: what a vector is must not depend on padding, whatever the
calibration's scales. With INT8 query and key, invariance held or broke with the scales: SmoothQuant off 0.99786,
on 0.99981 (gate set, alone vs batched). The rest of ov-int8's recipe was chosen on the *selection* half of STS-B dev
(export.gate.sts_half; 742 pairs), Spearman ratio to OpenVINO FP32, 512 calibration texts in padded batches of 16
(all-MiniLM-L6-v2; 2-core AMD EPYC with AVX512-VNNI and AVX512-BF16, OpenVINO 2026.4, NNCF 3.4):
    attention core INT8 (the recipe before), layer 0 FFN output FP32, SmoothQuant off: 0.99873;
    attention core FP32, SmoothQuant off: layer 0 FP32 0.99751, none FP32 0.99659, layers 0 and 5 0.99753;
    attention core FP32, SmoothQuant on: none FP32 0.99945; layer 0 FP32 1.00011 (chosen: the highest).
    Confirmation half, looked at after the choice: 1.00001. Speed at b32/s128 is the same with the core INT8 or
    FP32 within this machine's noise (187/179 ms against 190/214 ms, two rounds, interleaved).

Serving reads the precision from the manifest (details.openvino.inference_precision): the Python-backend encoder
(model_repository/models/encoder_openvino) sets it; Triton's native `openvino` backend has only HINT_BF16.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bert_recsys.contracts.manifest import ArtifactFile, Precision

WEIGHTS = "model.bin"
INFERENCE_PRECISION = {Precision.FP32: "f32", Precision.INT8: "f32", Precision.BF16: "bf16"}
# Never quantized: mean pooling, its division by the token count, and the L2 normalization.
POOLING_SCOPE = ".*/pool/.*"
# Never quantized either: the attention core, whose INT8 query and key make a vector depend on padding.
ATTENTION_TYPES = ("ScaledDotProductAttention",)


class OpenVinoUnavailable(RuntimeError):
    """This machine cannot build or gate the variant (no native BF16): the variant is skipped, not failed."""


def version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def capabilities() -> list[str]:
    """What OpenVINO's CPU plugin can compute natively here: e.g. FP32, BF16, INT8 (AMX shows as BF16 + INT8)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def inference_precision(precision: Precision | str, override: str | None = None) -> str:
    """What the CPU plugin is told to compute in (f32 or bf16): `override` where a variant or manifest names one."""
    if override is not None:
        if override not in ("f32", "bf16"):
            raise ValueError(f"OpenVINO inference precision {override!r}: expected f32 or bf16")
        return override
    return INFERENCE_PRECISION[Precision(precision)]


def require_bf16(variant: str = "ov-bf16") -> None:
    found = capabilities()
    if "BF16" not in found:
        raise OpenVinoUnavailable(f"this CPU computes no BF16 natively (OpenVINO's CPU capabilities: {', '.join(found)}): "
                                  f"{variant} is built only on CPUs with AMX or AVX512-BF16")


def ffn_output_names(layers: tuple[int, ...]) -> list[str]:
    """The FFN down-projection MatMuls of `layers`, as named in the torch ONNX export."""
    return [f"/bert/encoder/layer.{i}/output/dense/MatMul" for i in layers]


def _save(model, xml: Path) -> dict:
    import openvino as ov

    ov.save_model(model, str(xml), compress_to_fp16=False)  # FP32 weights: the precision is the runtime's choice
    return {"openvino": version(), "weights": WEIGHTS}


def convert(raw_onnx: Path, xml: Path) -> dict:
    import openvino as ov

    return _save(ov.convert_model(str(raw_onnx)), xml)


def quantize_int8(raw_onnx: Path, xml: Path, calibration: list[dict[str, np.ndarray]], fp32_layers: tuple[int, ...],
                  smooth_quant: bool = True) -> dict:
    """`calibration`: batches of {input_ids, attention_mask} (export.calibration.calibration_batches). NNCF's
    logger is quieter while it runs, and back as it was after."""
    from bert_recsys.export.onnx_export import quieter

    with quieter("nncf", logging.WARNING):
        return _quantize_int8(raw_onnx, xml, calibration, fp32_layers, smooth_quant)


def _quantize_int8(raw_onnx: Path, xml: Path, calibration: list[dict[str, np.ndarray]], fp32_layers: tuple[int, ...],
                   smooth_quant: bool) -> dict:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = ov.convert_model(str(raw_onnx))
    kept = ffn_output_names(fp32_layers)
    found = {op.get_friendly_name() for op in model.get_ordered_ops()}
    missing = [name for name in kept if name not in found]
    if missing:
        raise ValueError(f"no node {missing[0]!r} in the graph: the torch export's layer names changed")
    attention = [op for op in model.get_ordered_ops() if op.get_type_name() in ATTENTION_TYPES]
    if not attention:
        raise ValueError("OpenVINO found no ScaledDotProductAttention in the graph: the attention would be quantized "
                         "piece by piece, which this recipe was not chosen for")
    advanced = None if smooth_quant else AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))  # -1: SmoothQuant off
    quantized = nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration), advanced_parameters=advanced,
                              ignored_scope=nncf.IgnoredScope(patterns=[POOLING_SCOPE], names=kept,
                                                              types=list(ATTENTION_TYPES)))
    details = _save(quantized, xml)
    details["quantization"] = {"method": "NNCF post-training static (ModelType.TRANSFORMER)", "nncf": nncf.__version__,
                               "calibration_batches": len(calibration),
                               "calibration_texts": int(sum(len(b["input_ids"]) for b in calibration)),
                               "smooth_quant": smooth_quant,
                               "fp32": ["pooling and normalization", f"attention core ({len(attention)} "
                                        "ScaledDotProductAttention)", *(f"layer {i} FFN output" for i in fp32_layers)]}
    return details


def weights_file(xml: Path) -> ArtifactFile:
    return ArtifactFile.of(Path(xml).with_name(WEIGHTS))


def compile_model(xml: Path, precision: str, threads: int = 0, latency: bool = True):
    """The IR compiled for the CPU at `precision` (f32 or bf16). One stream for latency: requests come from
    Triton's batcher one batch at a time per instance."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(str(xml), "CPU", config)


class OpenVinoRunner:
    """The gate's (and the benchmark's) runner: the IR at the variant's inference precision."""

    def __init__(self, xml: Path, precision: Precision | str, threads: int = 0, name: str | None = None,
                 inference: str | None = None):
        self.precision = inference_precision(precision, inference)
        self.compiled = compile_model(xml, self.precision, threads)
        self.request = self.compiled.create_infer_request()
        self.name = name or Path(xml).parent.name

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        outputs = self.request.infer({0: input_ids, 1: attention_mask})
        return np.array(outputs[self.compiled.output(0)], dtype=np.float32)
