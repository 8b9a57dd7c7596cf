"""The tokenizer model's hot-path logic (its TextTokenizer, which the embedded encoder runs too), outside Triton on the
real exported tokenizer."""
import importlib.util
import sys

import pytest

from bert_recsys import settings
from bert_recsys.model_repository.render import MODELS_SOURCE
from bert_recsys.server.launcher import pytriton_root


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sys.path.insert(0, str(pytriton_root() / "backends" / "python"))  # triton_python_backend_utils
    spec = importlib.util.spec_from_file_location("tokenizer_model", MODELS_SOURCE / "tokenizer" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(settings.default_model_dir()).save_pretrained(path)
    model = module.TextTokenizer.__new__(module.TextTokenizer)
    model.max_length = 256
    model.char_budget = model.max_length * module.CHARS_PER_TOKEN_BUDGET
    model.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    model.tokenizer.enable_truncation(max_length=256)
    model.tokenizer.no_padding()
    return model


def full_ids(model, text):
    return model.tokenizer.encode(text).ids


def test_character_budget_keeps_ids_identical(tokenizer_model, sts_dev):
    """Long texts built from real sentences: the cut text yields exactly the ids of the full text."""
    sentences = [s for pair in sts_dev[:400] for s in pair[:2]]
    texts = [" ".join(sentences[i : i + 200]) for i in range(0, 600, 50)]
    assert all(len(t) > tokenizer_model.char_budget for t in texts)
    encoded = tokenizer_model._encode(texts)
    for text, encoding in zip(texts, encoded):
        assert encoding.ids == full_ids(tokenizer_model, text)
        assert len(encoding.ids) == 256


def test_pathological_text_falls_back_to_full_tokenization(tokenizer_model):
    """Runs of spaces carry no tokens: a cut text would be short, so the full text is used instead."""
    text = "start " + " " * 5000 + " ".join(["word"] * 300)
    assert tokenizer_model._encode([text])[0].ids == full_ids(tokenizer_model, text)


def test_cut_never_splits_a_word(tokenizer_model):
    text = "x" * 10 + " " + "y" * 5000
    assert tokenizer_model._cut(text) == "x" * 10
    short = "short text"
    assert tokenizer_model._cut(short) is short
