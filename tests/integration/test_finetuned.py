"""The recommendation encoder end to end on a small slice: fine-tuned without a split's hidden items (a few steps:
the point is the path, not the quality), gated, exported, served as `rec_embed` beside `embed` by the real
tritonserver, and used by the evaluation for that split only."""
import json

import numpy as np
import pytest

from bert_recsys import settings
from tests.conftest import client_for


@pytest.fixture(scope="module")
def small_slice(movielens_slice, tmp_path_factory):
    """The slice's first 500 movies and their ratings: the fine-tune embeds the catalog twice for its gate."""
    target = tmp_path_factory.mktemp("small-slice")
    movies = (movielens_slice / "movies.csv").read_text().splitlines()[:501]
    (target / "movies.csv").write_text("\n".join(movies) + "\n")
    keep = {line.split(",", 1)[0] for line in movies[1:]}
    ratings = (movielens_slice / "ratings.csv").read_text().splitlines()
    (target / "ratings.csv").write_text("\n".join([ratings[0]] + [r for r in ratings[1:] if r.split(",")[1] in keep]) + "\n")
    return target


@pytest.fixture(scope="module")
def fine_tuned(small_slice, tmp_path_factory):
    from bert_recsys.export.pipeline import ExportOptions, run_export
    from bert_recsys.export.variants import parse_variants
    from bert_recsys.training.finetune import Recipe, finetune

    work = tmp_path_factory.mktemp("finetuned")
    lineage = finetune(small_slice, work / "model", Recipe(steps=4, batch=8), split="cold:0", general=False)
    options = ExportOptions(model_dir=work / "model", out_dir=work / "export", variants=parse_variants("onnx-fp32"),
                            variants_named=True)
    outcomes = run_export(options)
    gate = lineage["recommendation_gate"]
    if not gate["passed"]:  # four steps rarely beat the base model: the export refuses it, naming the gate
        assert [o.status.value for o in outcomes] == ["refused"] and "recommendation gate failed" in outcomes[0].detail
        # From here on the path is under test, not the quality: the lineage says "passed", as a real fine-tune's does.
        path = work / "model" / "finetune.json"
        path.write_text(json.dumps({**lineage, "recommendation_gate": {**gate, "passed": True}}))
        outcomes = run_export(options)
    assert all(o.ok for o in outcomes), [(o.variant, o.status, o.detail) for o in outcomes]
    return work, lineage


def test_the_fine_tune_never_saw_the_hidden_items_and_says_what_it_was_trained_for(fine_tuned, small_slice):
    from bert_recsys.client.catalog import load_catalog
    from bert_recsys.client.protocols import ItemHoldout, item_holdout

    work, lineage = fine_tuned
    assert lineage["split"]["name"] == "cold:0" and lineage["template"].startswith("rich@")
    assert lineage["recommendation_gate"]["metric"] == "ndcg@10" and "passed" in lineage["recommendation_gate"]
    catalog = load_catalog(small_slice)
    hidden = item_holdout(np.array([i.item_id for i in catalog.items]), catalog.interactions, ItemHoldout(0)).hidden
    assert lineage["split"]["excluded_items"] == len(hidden)
    manifest = json.loads((work / "export" / "onnx-fp32" / "manifest.json").read_text())
    assert manifest["lineage"]["split"]["name"] == "cold:0"  # the lineage travels into every manifest


def test_rec_embed_is_served_beside_embed_and_used_for_its_split_only(fine_tuned, export_dir, small_slice, tmp_path):
    from bert_recsys.client.evaluate import evaluate
    from bert_recsys.client.triton import TritonClient
    from bert_recsys.model_repository.render import build_repository
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    work, _ = fine_tuned
    repository = build_repository(settings.SETTINGS, export_dir, "onnx-int8", "embedded", tmp_path / "repository")
    build_repository(settings.SETTINGS.for_family("rec"), work / "export", "onnx-fp32", "embedded", repository)
    server = on_free_ports(settings.SETTINGS.server)
    with TritonServer(repository, server, log_file=tmp_path / "triton.log") as triton:
        client = client_for(triton, "grpc")
        rec = TritonClient(server.grpc_url, settings=client.settings.for_family("rec"))
        general, tuned = client.embed(["a space opera"]), rec.embed(["a space opera"])
        assert general.shape == tuned.shape == (1, 384) and float((general @ tuned.T)[0, 0]) < 0.99999  # two encoders
        assert rec.encoder_info()["export_trained_split"] == "cold:0"
        report = evaluate(small_slice, client, max_users=15, ablations=False, protocols=("cold", "warm"),
                          seeds=(0, 1), rec_client=rec)
        rec.close()
        client.close()
    assert report["recommendation_encoder"]["versions"] == {"cold:0": 1}
    assert report["cold"]["fine_tuned_seeds"] == [0]  # seed 1's hidden items were in its training part
    systems = report["cold"]["systems"]
    assert len(systems["content: base + fine-tuned taste"]["per_seed"]) == 1
    assert len(systems["content: base (+ base taste)"]["per_seed"]) == 2
    assert "recommender (fine-tuned)" not in report["results"]  # no version was trained for the warm split
