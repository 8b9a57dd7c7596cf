"""What of the TensorRT path runs without TensorRT: profiles, calibration batches, the refusal."""
import pytest

from bert_recsys import settings
from bert_recsys.export.calibration import calibration_batches, read_calibration_texts
from bert_recsys.export.tensorrt_plan import ShapeProfile, TensorRTUnavailable, build_plan, tensorrt_version


def test_default_profile_is_capped_at_max_length():
    profile = ShapeProfile.parse("", max_length=64)
    assert (profile.opt_seq, profile.max_seq) == (64, 64)
    shapes = profile.shapes()
    assert set(shapes) == {"input_ids", "attention_mask"}
    assert shapes["input_ids"] == ((1, 1), (32, 64), (64, 64))


def test_profile_parse_and_manifest():
    profile = ShapeProfile.parse("1,16,128:8,64,256", max_length=256)
    assert profile == ShapeProfile(1, 16, 128, 8, 64, 256)
    assert profile.manifest()["shapes"]["attention_mask"] == [[1, 8], [16, 64], [128, 256]]


@pytest.mark.parametrize("text, message", [
    ("1,2", "bad profile"),
    ("4,2,8:1,2,3", "batch sizes"),
    ("1,2,8:1,300,200", "sequence lengths"),
    ("1,2,8:1,2,512", "exceeds the model's max length"),
])
def test_bad_profiles_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        ShapeProfile.parse(text, max_length=256)


def test_calibration_batches_are_tokenized_sorted_and_capped(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "calibration.txt"
    path.write_text("a much longer calibration sentence with many words in it\n\nshort\nmedium length text\n")
    texts = read_calibration_texts(path)
    assert texts == ["a much longer calibration sentence with many words in it", "short", "medium length text"]
    tokenizer = AutoTokenizer.from_pretrained(settings.default_model_dir())
    batches = calibration_batches(tokenizer, texts, max_length=8, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (1, 8)]  # sorted by length, truncated to 8
    assert all(b["input_ids"].dtype.name == "int64" and b["attention_mask"].shape == b["input_ids"].shape for b in batches)


def test_empty_or_missing_calibration_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_calibration_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no text lines"):
        read_calibration_texts(tmp_path / "empty.txt")


@pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed here")
def test_build_plan_says_clearly_that_tensorrt_is_missing(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="NGC"):
        build_plan(tmp_path / "model.onnx", tmp_path / "model.plan", "fp16", ShapeProfile())
