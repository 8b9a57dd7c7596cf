"""The recommender end to end against the real tritonserver, on a slice of real MovieLens data."""
import json
import subprocess
import sys

import numpy as np
import pytest

from bert_recsys import settings
from bert_recsys.client.catalog import load_catalog
from bert_recsys.client.index import EncoderMismatch, build_catalog_index
from bert_recsys.client.recommend import Recommender
from tests.conftest import client_for


@pytest.fixture(scope="module")
def recommender(triton, movielens_slice):
    client = client_for(triton("onnx-int8"), "grpc")
    catalog = load_catalog(movielens_slice)
    items, interactions, errors = catalog.items, catalog.interactions, catalog.errors
    assert not errors
    index = build_catalog_index(client, items)
    yield Recommender(items, index, interactions, client)
    client.close()


def test_recommendations_are_new_unique_explained_and_capped(recommender):
    user = 1
    profile, recs = recommender.recommend(user, n=10, blocked={1, 2})
    ids = [r["item_id"] for r in recs]
    assert len(ids) == 10 == len(set(ids))
    assert not set(ids) & set(profile.history.tolist()) and not set(ids) & {1, 2}
    assert all(r["why"] for r in recs)
    first_categories = [r["categories"][0] if r["categories"] else "" for r in recs]
    assert max(first_categories.count(c) for c in first_categories) <= recommender.settings.category_cap
    assert profile.top_categories and 1 <= len(profile.interests) <= 3
    np.testing.assert_allclose(np.linalg.norm(profile.interests, axis=1), 1.0, atol=1e-5)


def test_profile_score_comes_from_the_triton_score_ensemble(recommender):
    profile, recs = recommender.recommend(1, n=5)
    expected = recommender.client.embed([profile.text(recommender.items)])[0]
    vectors = recommender.index.vectors_of([r["item_id"] for r in recs])
    np.testing.assert_allclose([r["profile_score"] for r in recs], vectors @ expected, atol=0.05)


def test_unknown_user_gets_the_cold_start_path(recommender):
    profile, recs = recommender.recommend(10**9, n=5)
    assert profile.is_cold and len(recs) == 5
    assert all(r["why"] == "popular right now" for r in recs)


def test_similar_users_and_push(recommender):
    similar = recommender.similar_users(1, k=3)
    assert len(similar) == 3 and all(u != 1 for u, _ in similar)
    assert similar == sorted(similar, key=lambda s: -s[1])
    profile = recommender.profile(1)
    favourite = recommender.items[int(profile.liked[-1])]
    targets = recommender.push_targets(recommender.template.render(favourite), threshold=0.3, max_users=80)
    assert 1 in [u for u, _ in targets] and all(s >= 0.3 for _, s in targets)
    capped = recommender.push_targets(recommender.template.render(favourite), threshold=0.3, pushes_so_far={1: 3}, per_user_cap=3)
    assert 1 not in [u for u, _ in capped]


def test_a_new_item_added_through_triton_is_recommended_within_a_second(triton, movielens_slice):
    """Item cold start, live: a new item (no interaction) is embedded by Triton's `embed`, added to the live index
    with no rebuild or restart, and recommended to the user whose recent likes it resembles, with the reason."""
    import time

    from bert_recsys.client.catalog import Item
    from bert_recsys.client.index import IndexSettings

    client = client_for(triton("onnx-int8"), "grpc")
    catalog = load_catalog(movielens_slice)
    # Only rated movies, so the one added below is the only new item (an unrated movie would compete with it).
    rated = set(catalog.interactions.item.tolist())
    items = [item for item in catalog.items if item.item_id in rated]
    index = build_catalog_index(client, items, settings=IndexSettings(centre=True))
    recommender = Recommender(items, index, catalog.interactions, client)
    user = 1
    liked = recommender.items[int(recommender.profile(user).liked[-1])]
    sequel = Item(10**6, liked.title.replace(" (", " 2 ("), liked.categories)
    assert sequel.item_id not in [r["item_id"] for r in recommender.recommend(user, n=10)[1]]
    started = time.perf_counter()
    recommender.add_item(sequel)
    _, recs = recommender.recommend(user, n=10)
    seconds = time.perf_counter() - started
    placed = [r for r in recs if r["item_id"] == sequel.item_id]
    assert placed, [r["title"] for r in recs]
    assert placed[0]["new"] and placed[0]["why"].startswith("new: because you liked ")
    assert seconds < 1.0, f"adding and recommending took {seconds:.2f} s"
    assert len(index) == len(items) + 1 and index.template == recommender.template.identity
    client.close()


def test_index_from_another_encoder_is_refused(recommender):
    other = dict(recommender.encoder, export_manifest_sha256="0" * 64)
    with pytest.raises(EncoderMismatch):
        recommender.index.search(recommender.index.vectors[:1], 5, other)


def test_experiment_arms_change_what_they_name_and_nothing_else(recommender):
    from bert_recsys.client.experiments import Arm, Experiment, ExperimentError, ExperimentRecommender

    version = recommender.index.encoder_version
    experiment = Experiment("arms", (Arm("control"), Arm("semantic", channels=("semantic",), diversify=False),
                                     Arm("pinned", encoder_version=version), Arm("missing", encoder_version=version + 5)))
    served = ExperimentRecommender(recommender, experiment)
    user = sorted(recommender.histories)[0]
    _, control, v = served.recommend_arm(experiment.arm("control"), user, n=8)
    assert v == version and control == recommender.recommend(user, n=8)[1]
    _, semantic, _ = served.recommend_arm(experiment.arm("semantic"), user, n=8)
    assert [r["item_id"] for r in semantic] == [r["item_id"] for r in recommender.recommend(
        user, n=8, channels=("semantic",), diversify=False)[1]]
    assert served.recommend_arm(experiment.arm("pinned"), user, n=8)[1] == control  # the current index's version
    with pytest.raises(ExperimentError, match=f"no catalog index embedded by encoder version {version + 5}"):
        served.recommend_arm(experiment.arm("missing"), user, n=8)
    listed = served.recommend(user, n=4)
    assert listed.arm == experiment.assign(user).name and listed.experiment == "arms" and len(listed.request_id) == 32
    assert listed.impression()["items"] == [r["item_id"] for r in listed.items]


def test_evaluate_cli_prints_json_through_a_served_repository(triton, movielens_slice, tmp_path):
    """`make evaluate`'s client half on a small slice: warm and item cold start (one seed) through Triton, the
    baselines beside the encoder, a table on stderr, the JSON and the plot in --out. Structure and sanity: the
    quality goals are measured by `make evaluate` on the full data, not asserted on 20 users."""
    server = triton("onnx-int8")
    result = subprocess.run(
        [sys.executable, "-m", "bert_recsys.client.evaluate", str(movielens_slice), "--url", server.server.grpc_url,
         "--no-ablations", "--max-users", "20", "--protocols", "warm,cold", "--seeds", "1", "--out", str(tmp_path)],
        cwd=settings.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["users"] == 20 and "recall@10" in report["results"]["popularity"]
    assert {"ease", "random", "recommender"} <= set(report["results"])
    keys = {"recall@10", "recall@50", "ndcg@10", "auc", "coverage", "diversity", "novelty"}
    assert all(keys <= set(row) for row in report["results"].values())
    warm = report["results"]
    assert warm["recommender"]["recall@50"] > warm["random"]["recall@50"] and warm["recommender"]["auc"] > 0.5
    cold = report["cold"]["systems"]
    assert {"random", "genres", "tfidf title", "tfidf rich", "popularity", "base centred semantic",
            "base centred item2item", "base centred profile", "content: base (+ base taste)"} <= set(cold)
    for system in cold.values():
        assert system["pooled"]["users"] <= 20 and 0 <= system["pooled"]["ndcg@10"] <= 1
    assert report["cold"]["headline"]["served"] == "content: base (+ base taste)"
    assert report["item_text"]["items"] == 1500 and report["recommendation_encoder"]["served"] is False
    assert "recall@10" in result.stderr and "item cold start" in result.stderr  # the readable table
    assert (tmp_path / "evaluate.json").exists() and (tmp_path / "evaluate.png").exists()


def test_experiment_simulate_cli_replays_real_lists_and_prints_one_json(triton, movielens_slice, tmp_path):
    """`make experiment-sim`'s command on a small slice: real lists through Triton, A/A and lift runs, and the
    A/B/n replay through the event store with its report and plots."""
    server = triton("onnx-int8")
    result = subprocess.run(
        [sys.executable, "-m", "bert_recsys.client.experiments", "simulate", str(movielens_slice), "--url", server.server.grpc_url,
         "--runs", "20", "--reads", "5", "--real-visitors", "600", "--out", str(tmp_path)],
        cwd=settings.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    for key in ("aa_false_positive_rate", "alpha", "predicted_power", "observed_power"):
        assert 0 <= out[key] <= 1, key
    assert out["runs"] == 20 and out["real_arms"]["events"] > 600
    assert set(out["real_arms"]["arms"]) == {"control", "no-cooccurrence", "no-mmr"}
    assert (tmp_path / "channels-abn.md").exists() and (tmp_path / "simulation.png").exists()
    report = subprocess.run(
        [sys.executable, "-m", "bert_recsys.client.experiments", "report", "channels-abn", "--db", str(tmp_path / "sim-events.sqlite"),
         "--out", str(tmp_path / "again"), "--format", "json"],
        cwd=settings.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["arms"]["control"]["users"] == out["real_arms"]["arms"]["control"]["users"]
    missing = subprocess.run([sys.executable, "-m", "bert_recsys.client.experiments", "report", "nope", "--db",
                              str(tmp_path / "sim-events.sqlite"), "--out", str(tmp_path / "x")],
                             cwd=settings.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no experiment 'nope'" in missing.stderr
