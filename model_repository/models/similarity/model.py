"""Triton Python-backend model `similarity`: cosine scores of one query embedding against its candidates.

QUERY (FP32 [batch, dim]) + CANDIDATES (FP32 [batch, k, dim]) -> SCORES (FP32 [batch, k]) and
QUERY_EMBEDDING (FP32 [batch, dim], the query passed through).

Passing the query through makes `similarity` the only step that produces the `score` ensemble's outputs:
an ensemble output that also fed a later step can deadlock when a client asks for a subset of outputs.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils


def _invalid(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.query_name = params["query_input"]
        self.candidates_name = params["candidates_input"]
        self.scores_name = params["scores_output"]
        self.passthrough_name = params["query_output"]

    def execute(self, requests):
        responses = []
        for request in requests:
            query = pb_utils.get_input_tensor_by_name(request, self.query_name).as_numpy()
            candidates = pb_utils.get_input_tensor_by_name(request, self.candidates_name).as_numpy()
            if not np.isfinite(candidates).all():
                responses.append(_invalid(f"{self.candidates_name} holds NaN or infinite values"))
                continue
            if candidates.shape[-1] != query.shape[-1]:
                responses.append(_invalid(
                    f"{self.candidates_name} has dim {candidates.shape[-1]}, the encoder's is {query.shape[-1]}"))
                continue
            # Cosine: the query is already L2-normalized; candidates may come from anywhere.
            norms = np.linalg.norm(candidates, axis=-1)
            dots = np.einsum("bkd,bd->bk", candidates, query)
            scores = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.scores_name, scores),
                pb_utils.Tensor(self.passthrough_name, query),
            ]))
        return responses
