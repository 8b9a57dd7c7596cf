"""Triton Python-backend model `encoder` (torch runtime): encoders/torch_bert.py, copied beside this file.

input_ids, attention_mask (INT64 [batch, seq]) -> embedding (FP32 [batch, dim], pooled + L2-normalized).

Where it runs comes from the instance group the renderer wrote: KIND_GPU -> the instance's GPU, the variant's
precision (FP16 for torch-fp16) and, unless the `cuda_graphs` parameter is "false", one CUDA graph per
(batch, sequence) bucket, all captured here at load. KIND_CPU -> FP32 on the CPU, eagerly (a torch-fp16
artifact is computed in FP32 there: the CPU has no fast FP16). Tensors cross the stub by DLPack both ways:
no numpy on the hot path (numpy 2 breaks the stub's numpy outputs on some images).
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack


def _invalid(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)


def _import_beside(version_dir, name):
    """The module file copied next to this one, under a name unique to this version."""
    spec = importlib.util.spec_from_file_location(f"{name}_v{version_dir.name}", version_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = (params["ids_input"], params["mask_input"])
        self.output_name = params["embedding_output"]
        self.max_length = int(params["max_length"])
        self.logger = pb_utils.Logger
        bert = _import_beside(version_dir, "torch_bert")

        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
            torch.cuda.set_device(self.device)
            dtype = None  # the variant's own precision
        else:
            self.device = torch.device("cpu")
            threads = int(params.get("cpu_threads", "0") or 0)
            if threads > 0:
                torch.set_num_threads(threads)
            dtype = torch.float32
        self.model = bert.load(version_dir / params["artifact"], self.device, dtype)
        self.run = self.model
        if self.device.type == "cuda" and params.get("cuda_graphs", "true") == "true":
            self.run = bert.GraphedEncoder(self.model, self.device, int(config["max_batch_size"]), self.max_length,
                                           log=self.logger.log_info)
        self.logger.log_info(f"torch encoder on {self.device}, "
                             f"{next(iter(self.model.buffers())).dtype}, graphs={self.run is not self.model}")

    def _inputs(self, request):
        ids, mask = (from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
                     for name in self.input_names)
        if ids.shape != mask.shape:
            return None, f"{self.input_names[0]} {tuple(ids.shape)} and {self.input_names[1]} {tuple(mask.shape)} differ"
        if ids.shape[1] > self.max_length:
            return None, f"{ids.shape[1]} tokens; this encoder takes at most {self.max_length}"
        return (ids, mask), None

    def execute(self, requests):
        responses = [None] * len(requests)
        good, batch = [], []
        for index, request in enumerate(requests):
            tensors, problem = self._inputs(request)
            if problem:
                responses[index] = _invalid(problem)
            else:
                good.append(index)
                batch.append(tensors)
        if not batch:
            return responses
        # One forward for every request of the dynamic batch: shorter ones are padded with masked tokens,
        # which pooling ignores. A single request (the usual case at low load) is used as it came.
        if len(batch) == 1:
            ids, mask = batch[0]
        else:
            width = max(ids.shape[1] for ids, _ in batch)
            ids = torch.zeros(sum(ids.shape[0] for ids, _ in batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            start = 0
            for request_ids, request_mask in batch:
                end = start + request_ids.shape[0]
                ids[start:end, : request_ids.shape[1]] = request_ids
                mask[start:end, : request_mask.shape[1]] = request_mask
                start = end
        with torch.inference_mode():
            # Token ids are small: a plain copy to the GPU (pinning them first would cost more than it saves).
            embeddings = self.run(ids.to(self.device), mask.to(self.device)).float().cpu()
        start = 0
        for index, (request_ids, _) in zip(good, batch):
            end = start + request_ids.shape[0]
            out = pb_utils.Tensor.from_dlpack(self.output_name, to_dlpack(embeddings[start:end].contiguous()))
            responses[index] = pb_utils.InferenceResponse(output_tensors=[out])
            start = end
        return responses
