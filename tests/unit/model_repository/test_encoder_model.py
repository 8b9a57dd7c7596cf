"""The embedded encoder model's execute(), outside Triton: requests carrying TEXT and requests carrying token ids in
one batch, with bad ones among them. Triton's Python-backend module is replaced by a small stand-in (requests with
named input tensors, responses with tensors or an error), the tokenizer is the real one, and the engine is a
stand-in that returns, per row, the sum and the count of the token ids it is given (padding dropped)."""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.model_repository.render import MODELS_SOURCE


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class Request:
    def __init__(self, **inputs):
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items()}


class Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors, error


class TritonError(Exception):
    INVALID_ARG = 3

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message, self.code = message, code


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoTokenizer

    stub = types.SimpleNamespace(Tensor=Tensor, InferenceResponse=Response, TritonError=TritonError,
                                 get_input_tensor_by_name=lambda request, name: request.inputs.get(name))
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = stub
    try:
        version = tmp_path_factory.mktemp("encoder") / "1"
        version.mkdir()
        AutoTokenizer.from_pretrained(settings.default_model_dir()).save_pretrained(version)
        (version / "tokenizer_model.py").write_text((MODELS_SOURCE / "tokenizer" / "model.py").read_text())
        spec = importlib.util.spec_from_file_location("encoder_model_under_test",
                                                      MODELS_SOURCE / "encoder_embedded" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        encoder = module.TritonPythonModel.__new__(module.TritonPythonModel)
        encoder.input_names, encoder.output_name = ("input_ids", "attention_mask"), "embedding"
        encoder.null_dim, encoder.times_file, encoder.times = 0, None, []
        spec = importlib.util.spec_from_file_location("tokenizer_model_v1", version / "tokenizer_model.py")
        encoder.tokenizer_model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(encoder.tokenizer_model)
        params = {"max_length": "256", "pad_to_multiple_of": "8", "max_text_chars": "1000", "text_input": "TEXT"}
        encoder.text = encoder.tokenizer_model.TextTokenizer(params, version)
        encoder.calls = []

        def engine(ids, mask):
            encoder.calls.append(ids.shape)
            return np.stack([(ids * mask).sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)

        encoder.engine = engine
        yield encoder
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved


def texts(*values):
    return np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=object)


def ids_of(model, *values):
    encodings = [model.text.tokenizer.encode(v) for v in values]
    width = max(len(e.ids) for e in encodings) + 5  # padded wider than needed, as a tokenizer step may send
    ids = np.zeros((len(values), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)], mask[row, : len(e.ids)] = e.ids, 1
    return ids, mask


def expected(model, *values):
    return np.array([[sum(e.ids), len(e.ids)] for e in (model.text.tokenizer.encode(v) for v in values)], dtype=np.float32)


def test_text_and_token_id_requests_in_one_batch_each_get_their_own_rows(model):
    ids, mask = ids_of(model, "an id request", "with two rows of different length, longer")
    requests = [Request(TEXT=texts("a short text")), Request(input_ids=ids, attention_mask=mask),
                Request(TEXT=texts("two texts in one request", "the second, somewhat longer than the first one")),
                Request(TEXT=texts("and one more"))]
    model.calls.clear()
    responses = model.execute(requests)
    assert all(r.error is None for r in responses)
    outputs = [r.output_tensors[0].as_numpy() for r in responses]
    assert [r.output_tensors[0].name for r in responses] == ["embedding"] * 4
    np.testing.assert_array_equal(outputs[0], expected(model, "a short text"))
    np.testing.assert_array_equal(outputs[1], expected(model, "an id request", "with two rows of different length, longer"))
    np.testing.assert_array_equal(outputs[2], expected(model, "two texts in one request",
                                                       "the second, somewhat longer than the first one"))
    np.testing.assert_array_equal(outputs[3], expected(model, "and one more"))
    # The four text rows were tokenized together, to one length: one engine call for them; the id request's rows go
    # in their own call, or in the same one if their width happens to match.
    assert sorted(shape[0] for shape in model.calls) in ([2, 4], [6])


@pytest.mark.parametrize("bad, message", [
    (texts(b"\xff\xfe broken"), "not valid UTF-8"),
    (texts("   "), "empty or only whitespace"),
    (texts("x" * 1001), "the limit is 1000"),
    (np.zeros((0, 1), dtype=object), "holds no text"),
])
def test_a_bad_text_request_fails_alone(model, bad, message):
    ids, mask = ids_of(model, "a good id request")
    responses = model.execute([Request(TEXT=texts("good text")), Request(TEXT=bad),
                               Request(input_ids=ids, attention_mask=mask)])
    assert responses[1].output_tensors is None and message in responses[1].error.message
    assert responses[1].error.code == TritonError.INVALID_ARG
    np.testing.assert_array_equal(responses[0].output_tensors[0].as_numpy(), expected(model, "good text"))
    np.testing.assert_array_equal(responses[2].output_tensors[0].as_numpy(), expected(model, "a good id request"))


def test_only_bad_text_or_half_the_ids_is_a_clear_error_and_the_engine_is_not_called(model):
    ids, mask = ids_of(model, "x")
    model.calls.clear()
    responses = model.execute([Request(TEXT=texts(b"")), Request(attention_mask=mask)])
    assert "empty or only whitespace" in responses[0].error.message
    assert responses[1].error.message == "send TEXT or input_ids and attention_mask"
    assert model.calls == []
