"""Triton Python-backend model `tokenizer`: TEXT (BYTES) -> input_ids, attention_mask (INT64).

Its TextTokenizer is also what the embedded encoder runs when it is sent text (model_repository/render.py: one
stub instead of two on the ensembles' path).

It loads the exported Hugging Face fast tokenizer (`tokenizer.json`, copied next to this file), truncates to
the model's max length and pads every request of a dynamic batch to one common length (rounded up to a
multiple of `pad_to_multiple_of`), so the encoder's batcher can merge them.

Hot-path rules kept here: one `encode_batch` call per execute() (Rust, multi-threaded), no per-request file
I/O or logging, and very long texts are cut to a character budget before tokenizing (exactly: see
`_encode`).
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

# Characters per token can exceed this only for pathological text (long runs of spaces, giant words);
# `_encode` falls back to the full text whenever a cut text did not fill max_length tokens.
CHARS_PER_TOKEN_BUDGET = 12


def _invalid(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)


class TextTokenizer:
    """TEXT tensors of a batch of requests -> one padded (input_ids, attention_mask). The tokenizer model runs it,
    and so does the embedded encoder when it is sent text (it imports this file, copied beside its own)."""

    def __init__(self, params, version_dir):
        self.max_length = int(params["max_length"])
        self.pad_multiple = int(params.get("pad_to_multiple_of", "8"))
        self.max_text_chars = int(params.get("max_text_chars", "100000"))
        self.char_budget = self.max_length * CHARS_PER_TOKEN_BUDGET
        self.input_name = params["text_input"]

        self.tokenizer = Tokenizer.from_file(str(Path(version_dir) / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.no_padding()  # we pad ourselves, once per batch
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self._encode(["warm up the tokenizer"])  # the first request should not pay for lazy init

    def _cut(self, text):
        """Cut at the last whitespace inside the character budget, so no word is split."""
        if len(text) <= self.char_budget:
            return text
        head = text[: self.char_budget]
        space = head.rfind(" ")
        return head[:space] if space > 0 else head

    def _encode(self, texts):
        cut = [self._cut(t) for t in texts]
        # One text: encode() in this thread, not encode_batch's thread pool (whose threads wake on the cores the
        # encoder's engine is about to use).
        encodings = [self.tokenizer.encode(cut[0])] if len(cut) == 1 else self.tokenizer.encode_batch(cut)
        # A cut text that did not fill max_length tokens may have lost tokens: redo those in full.
        redo = [i for i, (t, c, e) in enumerate(zip(texts, cut, encodings)) if c is not t and len(e.ids) < self.max_length]
        if redo:
            for i, e in zip(redo, self.tokenizer.encode_batch([texts[i] for i in redo])):
                encodings[i] = e
        return encodings

    def _decode_texts(self, request):
        """-> (list of str, None) or (None, error message)."""
        raw = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
        if raw.size == 0:
            return None, f"{self.input_name} holds no text"
        texts = []
        for row, value in enumerate(raw):
            if isinstance(value, bytes):
                if len(value) > self.max_text_chars * 4:
                    return None, f"{self.input_name}[{row}] is {len(value)} bytes; the limit is {self.max_text_chars} characters"
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    return None, f"{self.input_name}[{row}] is not valid UTF-8 ({error.reason} at byte {error.start})"
            text = str(value)
            if not text.strip():
                return None, f"{self.input_name}[{row}] is empty or only whitespace"
            if len(text) > self.max_text_chars:
                return None, f"{self.input_name}[{row}] has {len(text)} characters; the limit is {self.max_text_chars}"
            texts.append(text)
        return texts, None

    def tokenize(self, requests):
        """-> (ids, mask, owners, errors): the valid requests' texts tokenized together and padded to one length
        (the longest, rounded up to a multiple of `pad_to_multiple_of`); owners[row] = the index of the request
        the row belongs to; errors[i] = request i's error message, or None. ids and mask are None when no request
        had valid text."""
        errors = [None] * len(requests)
        texts, owners = [], []
        for index, request in enumerate(requests):
            request_texts, errors[index] = self._decode_texts(request)
            if request_texts:
                texts.extend(request_texts)
                owners.extend([index] * len(request_texts))
        if not texts:
            return None, None, np.asarray(owners, dtype=np.int64), errors
        encodings = self._encode(texts)
        longest = max(len(e.ids) for e in encodings)
        length = min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_length)
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        return ids, mask, np.asarray(owners, dtype=np.int64), errors


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.text = TextTokenizer(params, Path(args["model_repository"]) / args["model_version"])
        self.output_names = (params["ids_output"], params["mask_output"])

    def execute(self, requests):
        ids, mask, owners, errors = self.text.tokenize(requests)
        responses = []
        for index, error in enumerate(errors):
            if error:
                responses.append(_invalid(error))
                continue
            rows = owners == index
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.output_names[0], ids[rows]),
                pb_utils.Tensor(self.output_names[1], mask[rows]),
            ]))
        return responses
