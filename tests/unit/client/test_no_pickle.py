"""Nothing loaded from a model repository or an index can run code: no pickle anywhere on those paths."""
from __future__ import annotations

import re

from bert_recsys import settings
from bert_recsys.model_repository.render import build_repository

UNSAFE = re.compile(r"\bpickle\b|torch\.load|joblib|allow_pickle\s*=\s*True|dill\b|cloudpickle")
# The files that read what a repository or an index holds.
READERS = ["model_repository/models/tokenizer/model.py", "model_repository/models/encoder_embedded/model.py",
           "model_repository/models/encoder_torch/model.py", "encoders/torch_bert.py",
           "model_repository/models/similarity/model.py", "client/index.py", "rollout/repository.py", "rollout/steps.py",
           "rollout/admin.py", "contracts/manifest.py"]


def test_no_reader_of_repository_or_index_files_can_unpickle():
    for path in READERS:
        source = (settings.REPO_ROOT / path).read_text()
        assert not UNSAFE.search(source), f"{path}: {UNSAFE.search(source).group(0)}"


def test_a_built_repository_holds_only_configs_code_onnx_json(export_dir, tmp_path):
    repository = build_repository(settings.SETTINGS, export_dir, "onnx-int8", "embedded", tmp_path / "repository")
    names = {p.name for p in repository.rglob("*") if p.is_file()}
    assert names == {"config.pbtxt", "model.py", "tokenizer_model.py", "model.onnx", "manifest.json", "tokenizer.json",
                     "serving.json"}  # tokenizer_model.py: the tokenizer model's code, beside the encoder that takes text


def test_a_torch_repository_holds_its_model_code_and_safetensors_weights_only(export_dir, tmp_path):
    repository = build_repository(settings.SETTINGS, export_dir, "torch-fp32", "torch", tmp_path / "repository")
    names = {p.name for p in repository.rglob("*") if p.is_file()}
    assert names == {"config.pbtxt", "model.py", "torch_bert.py", "model.safetensors", "manifest.json",
                     "tokenizer.json", "serving.json"}
