"""training.distill: a student with k of the teacher's layers, trained on real unlabeled text, then gated against
its teacher by the normal export (tiny sizes here: the point is the path, not the student's quality)."""
import json
import subprocess
import sys

import pytest

from bert_recsys import settings
from bert_recsys.export.lineage import SOURCES, read_texts
from bert_recsys.training.distill import choose_layers, kept_layers


def test_kept_layers_are_evenly_spaced_from_the_first():
    assert kept_layers(6, 3) == [0, 2, 4] and kept_layers(6, 2) == [0, 3] and kept_layers(6, 6) == list(range(6))
    assert kept_layers(12, 4) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="between 1 and 6"):
        kept_layers(6, 7)


def test_the_layers_kept_are_those_whose_untrained_student_came_closest_to_the_teacher():
    assert choose_layers({(0, 2, 4): 0.326, (0, 4, 5): 0.715, (1, 3, 5): 0.495}) == [0, 4, 5]
    assert choose_layers({(0, 3): 0.5, (1, 4): 0.5}) == [0, 3]  # a tie: the first listed
    with pytest.raises(ValueError, match="no combination"):
        choose_layers({})


def test_training_text_comes_from_every_source_deduplicated_and_never_from_sts_dev():
    if not (settings.SHARED_DATA_DIR / "scifact-train" / "corpus.jsonl").exists():
        pytest.skip("shared data not here")
    texts, provenance = read_texts(settings.SHARED_DATA_DIR, list(SOURCES), limit=100_000)
    assert set(provenance) == set(SOURCES) and all(p["texts"] > 1000 and len(p["sha256"]) == 64
                                                   for p in provenance.values())
    assert len(texts) == len(set(texts)) == sum(p["texts"] for p in provenance.values())
    from bert_recsys.export.gate import load_sts

    dev = {s for a, b, _ in load_sts(settings.STSB_DEV) for s in (a, b)}
    train_only = set(texts) - dev
    assert len(train_only) > 0.99 * len(texts)  # the few overlaps are identical sentences in both STS-B splits
    assert len(read_texts(settings.SHARED_DATA_DIR, ["movielens"], limit=50)[0]) == 50
    with pytest.raises(ValueError, match="unknown data source"):
        read_texts(settings.SHARED_DATA_DIR, ["wikipedia"], limit=10)


def test_a_distilled_student_trains_then_is_gated_against_its_teacher(export_dir, tmp_path):
    if not settings.STSB_DEV.exists():
        pytest.skip("STS-B dev not here")
    student = tmp_path / "student"
    trained = subprocess.run([sys.executable, "-m", "bert_recsys.training.distill", "--layers", "2", "--max-texts", "240",
                              "--epochs", "2", "--batch", "32", "--max-length", "64", "--probe-texts", "40",
                              "--out", str(student)],
                             cwd=settings.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "step 16/16" in trained.stderr  # progress, with timestamps, on stderr
    lineage = json.loads((student / "distill.json").read_text())
    # --keep auto: all 15 pairs of the 6 layers scored untrained, the closest one kept.
    choice = lineage["layer_choice"]
    assert choice["rule"] == "auto" and choice["texts"] == 40 and len(choice["mean_cosine"]) == 15
    best = max(choice["mean_cosine"], key=choice["mean_cosine"].get)
    assert lineage["layers_kept"] == [int(i) for i in best.split(",")] and lineage["teacher"]["layers"] == 6
    losses = lineage["training"]["losses"]
    assert losses[-1]["mean"] < losses[0]["first"]
    assert lineage["held_out_cosine"]["after"] > lineage["held_out_cosine"]["before"]
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2

    # The normal export gates it against the teacher its lineage names (a small STS-B slice keeps this quick).
    sts = tmp_path / "sts.csv"
    sts.write_text("".join(settings.STSB_DEV.read_text(encoding="utf-8").splitlines(keepends=True)[:200]))
    out = tmp_path / "export"
    exported = subprocess.run([sys.executable, "-m", "bert_recsys.export", "--model", str(student), "--out", str(out),
                               "--variants", "onnx-fp32", "--sts", str(sts), "--no-retrieval"],
                              cwd=settings.REPO_ROOT, capture_output=True, text=True, timeout=600)
    where = out / "onnx-fp32" if exported.returncode == 0 else out / "refused" / "onnx-fp32"
    manifest = json.loads((where / "manifest.json").read_text())
    figures = manifest["gate"]["figures"]
    assert manifest["lineage"] == lineage and manifest["recipe"]["teacher_sha256"] == lineage["teacher"]["sha256"]
    assert manifest["gate"]["thresholds"]["teacher_spearman_ratio"] == 0.985
    assert 0 < figures["spearman_ratio_to_teacher"] < 1.2 and "spearman_ratio_to_teacher_confirmation" in figures
    # A 2-layer student trained on 240 texts for seconds is not the teacher: the gate says so, by the teacher.
    assert (exported.returncode == 1) == (figures["spearman_ratio_to_teacher"] < 0.985)
    if exported.returncode == 1:
        assert "ratio to the teacher" in exported.stdout
