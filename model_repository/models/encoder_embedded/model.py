"""Triton Python-backend model `encoder` (embedded runtime): ONNX Runtime or OpenVINO inside the Python backend.

The pip-installed tritonserver (nvidia-pytriton) has no onnxruntime or openvino backend, so the exported
artifact runs here, in the engine its format calls for: an ONNX graph (onnx-*) in ONNX Runtime, an OpenVINO IR
(ov-*: model.xml + model.bin) in OpenVINO's CPU plugin, at the inference precision its manifest records (f32 or
bf16; OpenVINO would otherwise pick bf16 by itself on AMX CPUs). Each version directory holds its own
manifest.json, so one rollout can move from one engine to the other. In the NGC container the same repository
renders this model for the native `onnxruntime_onnx`, `openvino` or `tensorrt_plan` backends instead (see
model_repository/render.py).

input_ids, attention_mask (INT64 [batch, seq]) -> embedding (FP32 [batch, dim], pooled + L2-normalized;
pooling and normalization are inside the graph).

Or TEXT (BYTES [batch, 1]) -> embedding, when rendered with a `text_input` (ENCODER_TOKENIZES, the default): it
tokenizes itself with the tokenizer model's own code (tokenizer_model.py and tokenizer.json, copied beside this
file), so that `embed` and `score` run one Python stub before the model instead of two. Each request carries
either TEXT or both id tensors; bad text is that request's error alone.
"""
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class OnnxRuntimeEngine:
    def __init__(self, path, params):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # "false": intra-op threads sleep between runs instead of spinning on cores the other stubs need.
        spinning = "1" if params.get("intra_op_spinning", "true") == "true" else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, ids, mask):
        return self.session.run(None, {self.inputs[0]: ids, self.inputs[1]: mask})[0]


class OpenVinoEngine:
    def __init__(self, path, params, precision):
        import openvino as ov

        # One stream: Triton's batcher hands this instance one batch at a time.
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        threads = int(params.get("intra_op_threads", "0"))
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def __call__(self, ids, mask):
        return np.array(self.request.infer({0: ids, 1: mask})[self.output], dtype=np.float32)


def _trim_padding(ids, mask):
    """Drops the columns after the last one any row attends to.

    The tokenizer pads each request to a multiple of 8 tokens, so the dynamic batcher can merge requests of
    similar length. The model does not need those columns: pooling is masked, so the embeddings do not change,
    and their compute is saved (an 18-token text padded to 24 took 3.46 ms instead of 2.72 in ONNX Runtime INT8
    on a 2-core AVX2 EPYC).
    """
    attended = np.flatnonzero(mask.any(axis=0))
    if attended.size == 0 or attended[-1] + 1 == mask.shape[1]:
        return ids, mask
    end = int(attended[-1]) + 1
    return np.ascontiguousarray(ids[:, :end]), np.ascontiguousarray(mask[:, :end])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = (params["ids_input"], params["mask_input"])
        self.output_name = params["embedding_output"]

        # This version's own manifest says what its artifact is (the config's `artifact` is the stable one's).
        manifest = json.loads((version_dir / "manifest.json").read_text())
        artifact = version_dir / manifest["artifact"]["file"]
        if manifest["format"] == "openvino":
            precision = manifest["details"]["openvino"]["inference_precision"]
            self.engine = OpenVinoEngine(artifact, params, precision)
        else:
            self.engine = OnnxRuntimeEngine(artifact, params)
        # Diagnostics only (`bert-recsys bench trace --null-encoder`): zeros instead of the model, to
        # measure what the serving path costs without any model work.
        self.null_dim = int(params.get("diagnostic_null_encoder_dim", "0") or 0)
        # Diagnostics only (`bert-recsys bench trace`): the engine's own time per call, written to this file when
        # the model unloads, to tell the model's time inside the stub from the serving path around it.
        self.times_file = params.get("diagnostic_engine_times_file") or None
        self.times = []
        # Text in: the tokenizer model's TextTokenizer, from the files rendered beside this one.
        self.text = None
        if params.get("text_input"):
            spec = importlib.util.spec_from_file_location(f"tokenizer_model_v{version_dir.name}",
                                                          version_dir / "tokenizer_model.py")
            self.tokenizer_model = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.tokenizer_model)
            self.text = self.tokenizer_model.TextTokenizer(params, version_dir)

    def _run(self, ids, mask):
        if self.null_dim:
            return np.zeros((ids.shape[0], self.null_dim), dtype=np.float32)
        if self.times_file is None:
            return self.engine(ids, mask)
        started = time.perf_counter()
        out = self.engine(ids, mask)
        self.times.append((ids.shape[0], ids.shape[1], time.perf_counter() - started))
        return out

    def finalize(self):
        if self.times_file is not None:  # whole or not at all: a reader never sees half a file
            partial = Path(f"{self.times_file}.{os.getpid()}.partial")
            partial.write_text(json.dumps([list(t) for t in self.times]))
            os.replace(partial, self.times_file)

    def _token_arrays(self, requests):
        """-> (arrays, errors): each request's (ids, mask), or its error message. Requests with text are tokenized
        together (one padded length); the others bring their own ids."""
        arrays, errors = [None] * len(requests), [None] * len(requests)
        with_text = []
        for index, request in enumerate(requests):
            if self.text is not None and pb_utils.get_input_tensor_by_name(request, self.text.input_name) is not None:
                with_text.append(index)
                continue
            tensors = [pb_utils.get_input_tensor_by_name(request, name) for name in self.input_names]
            if any(t is None for t in tensors):
                wanted = " and ".join(self.input_names)
                errors[index] = f"send {self.text.input_name} or {wanted}" if self.text is not None else f"send {wanted}"
            else:
                arrays[index] = tuple(t.as_numpy() for t in tensors)
        if with_text:
            ids, mask, owners, text_errors = self.text.tokenize([requests[i] for i in with_text])
            for position, index in enumerate(with_text):
                if text_errors[position]:
                    errors[index] = text_errors[position]
                else:
                    rows = owners == position
                    arrays[index] = (ids[rows], mask[rows])
        return arrays, errors

    def execute(self, requests):
        arrays, errors = self._token_arrays(requests)
        # Requests of equal shape run in one engine call (the dynamic batcher merges only those for id inputs;
        # text is tokenized to one length); one call per distinct sequence length otherwise.
        outputs = [None] * len(requests)
        by_length = {}
        for index, pair in enumerate(arrays):
            if pair is not None:
                by_length.setdefault(pair[0].shape[1], []).append(index)
        for indices in by_length.values():
            ids, mask = _trim_padding(np.concatenate([arrays[i][0] for i in indices]),
                                      np.concatenate([arrays[i][1] for i in indices]))
            embeddings = self._run(ids, mask)
            start = 0
            for i in indices:
                rows = arrays[i][0].shape[0]
                outputs[i] = embeddings[start : start + rows]
                start += rows
        return [
            self._invalid(error) if error else pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)])
            for out, error in zip(outputs, errors)
        ]

    def _invalid(self, message):
        """INVALID_ARGUMENT, as the tokenizer model answers (taking ids alone, Triton checks the required inputs
        itself, and this is not reached)."""
        if self.text is not None:
            return self.tokenizer_model._invalid(message)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
