import json
import shutil

import pytest

from bert_recsys import settings
from bert_recsys.export.source import SourceModelError, directory_sha256, load_source


def test_default_model_is_read_from_its_sentence_transformers_config():
    source = load_source(settings.default_model_dir())
    assert (source.model_type, source.dim, source.max_length, source.pooling) == ("bert", 384, 256, "mean")
    assert (source.num_layers, source.num_heads) == (6, 12)
    assert len(source.sha256) == 64


@pytest.fixture
def model_copy(tmp_path):
    """A copy of the default model without its weights (hard links would do too; configs are all we read)."""
    target = tmp_path / "model"
    shutil.copytree(settings.default_model_dir(), target, ignore=shutil.ignore_patterns("*.safetensors"))
    (target / "model.safetensors").write_bytes(b"not real weights")
    return target


def test_cls_pooling_and_hash_follow_the_files(model_copy):
    before = load_source(model_copy)
    config = model_copy / "1_Pooling" / "config.json"
    data = json.loads(config.read_text())
    data.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    config.write_text(json.dumps(data))
    after = load_source(model_copy)
    assert after.pooling == "cls"
    assert after.sha256 != before.sha256
    assert directory_sha256(model_copy) == after.sha256


def test_unsupported_pooling_is_refused(model_copy):
    config = model_copy / "1_Pooling" / "config.json"
    data = json.loads(config.read_text())
    data.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    config.write_text(json.dumps(data))
    with pytest.raises(SourceModelError, match="unsupported pooling"):
        load_source(model_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(SourceModelError, match="not found"):
        load_source(tmp_path / "nope")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(SourceModelError, match="no config.json"):
        load_source(tmp_path)


def test_non_bert_is_refused(model_copy):
    config = model_copy / "config.json"
    data = json.loads(config.read_text())
    data["model_type"] = "gpt2"
    config.write_text(json.dumps(data))
    with pytest.raises(SourceModelError, match="only BERT"):
        load_source(model_copy)


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(SourceModelError, match="no weights"):
        load_source(model_copy)


def test_max_length_falls_back_to_tokenizer_then_positions(model_copy):
    (model_copy / "sentence_bert_config.json").unlink()
    tokenizer_config = model_copy / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    data["model_max_length"] = 128
    tokenizer_config.write_text(json.dumps(data))
    assert load_source(model_copy).max_length == 128
    data["model_max_length"] = 10**30  # HF's "no limit" sentinel
    tokenizer_config.write_text(json.dumps(data))
    assert load_source(model_copy).max_length == 512
