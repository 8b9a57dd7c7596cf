"""Client pieces that need no server: catalog parsing, the index's encoder guard, retries, the split."""
import time

import numpy as np
import pytest

from bert_recsys.client.catalog import read_interactions, read_items
from bert_recsys.client.evaluate import ranking_metrics
from bert_recsys.client.protocols import time_split
from bert_recsys.client.item_text import template
from bert_recsys.client.index import EncoderMismatch, IndexSettings, ItemIndex
from bert_recsys.client.triton import RetryPolicy, ServingError, TritonClient
from bert_recsys.server.launcher import free_port

ENCODER_A = {"export_variant": "onnx-int8", "export_manifest_sha256": "a" * 64}
ENCODER_B = {"export_variant": "onnx-fp32", "export_manifest_sha256": "b" * 64}


def test_malformed_catalog_rows_are_reported_by_line_and_the_rest_is_kept(tmp_path):
    movies = tmp_path / "movies.csv"
    movies.write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\nx,Bad Id,Drama\n'
                      '2,"Heat, The (1995)",Action|Crime\n3,,Drama\n1,Duplicate,Drama\n4,Only two fields\n'
                      '5,No Genres (2000),(no genres listed)\n')
    items, errors = read_items(movies)
    assert [i.item_id for i in items] == [1, 2, 5]
    assert items[1].title == "Heat, The (1995)" and items[2].categories == ()
    assert template("title").render(items[0]) == "Toy Story (1995). Genres: Adventure, Animation"
    assert [(e.line, e.reason.split()[0]) for e in errors] == [(3, "movieId"), (5, "empty"), (6, "duplicate"), (7, "expected")]
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n1,1,4.0,20\n1,2,five,30\n2,99,3.0,10\n1,5,3.5,10\n")
    data, rating_errors = read_interactions(ratings, {1, 2, 5})
    assert data.item.tolist() == [5, 1]  # sorted by time within the user
    assert [e.line for e in rating_errors] == [3, 4]


def test_index_refuses_queries_from_another_encoder_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ItemIndex(np.arange(1000, 1200), vectors, ENCODER_A)
    ids, scores = index.search(vectors[:3], 5, ENCODER_A)
    assert ids[:, 0].tolist() == [1000, 1001, 1002] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(EncoderMismatch, match="re-index"):
        index.search(vectors[:1], 5, ENCODER_B)
    index.save(tmp_path / "idx")
    loaded = ItemIndex.load(tmp_path / "idx")
    assert loaded.encoder == ENCODER_A and loaded.search(vectors[:1], 1, ENCODER_A)[0][0, 0] == 1000


@pytest.mark.parametrize("kind, options", [("hnsw", {"hnsw_ef_search": 128}), ("ivf", {"ivf_probe": 16})])
def test_approximate_indexes_agree_with_exact_search(kind, options):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(100, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 100, 5000)] + 0.3 * rng.normal(size=(5000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = ItemIndex(np.arange(5000), vectors, ENCODER_A, IndexSettings(kind="flat"))
    approx = ItemIndex(np.arange(5000), vectors, ENCODER_A, IndexSettings(kind=kind, **options))
    assert approx.kind == kind
    queries = vectors[:50] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    e, _ = exact.search(queries, 10, ENCODER_A)
    a, _ = approx.search(queries, 10, ENCODER_A)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(e, a)])
    assert recall >= 0.9


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_down_server_gets_bounded_retries_then_a_clear_error(protocol):
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=1.0)
    client = TritonClient(f"127.0.0.1:{free_port()}", protocol=protocol, retry=policy, timeout_s=2)
    started = time.perf_counter()
    with pytest.raises(ServingError, match="after 3 attempts"):
        client.embed(["hello"])
    assert time.perf_counter() - started >= 0.1 + 0.2  # the two back-offs were taken


def test_time_split_never_leaks_test_positives_into_history(tmp_path):
    ratings = tmp_path / "ratings.csv"
    rows = ["userId,movieId,rating,timestamp"]
    for user in (1, 2):
        rows += [f"{user},{item},{4.5 if item % 2 else 2.0},{100 + item}" for item in range(10)]
    rows.append("3,1,5.0,1")  # a single interaction stays in history
    ratings.write_text("\n".join(rows) + "\n")
    data, _ = read_interactions(ratings)
    history, truth = time_split(data)
    assert truth == {1: {9}, 2: {9}}  # the last 20%: items 8 (2.0, not positive) and 9
    for user, items in truth.items():
        mine = history.take(history.user == user)
        assert not set(mine.item.tolist()) & items
        assert mine.time.max() < 100 + 8
    assert 3 in set(history.user.tolist()) and 3 not in truth


def test_ranking_metrics_on_a_known_list():
    m = ranking_metrics([5, 1, 7], truth={1, 9}, n_items=10, n_seen=2)
    assert m["recall@10"] == 0.5 and m["recall@50"] == 0.5
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    # 6 negatives; item 1 beats 5 of them, item 9 is unranked and ties with the 4 unranked negatives.
    assert m["auc"] == pytest.approx((5 + 0.5 * 4) / (2 * 6))


def test_the_serving_view_reads_versions_from_the_encoder_parameters():
    from bert_recsys.client.triton import InvalidRequest, ServingView

    params = {"export_version": "2", "export_variant": "onnx-int8", "export_v2_variant": "onnx-int8",
              "export_v2_manifest_sha256": "b" * 64, "export_v3_variant": "onnx-fp32", "export_v3_manifest_sha256": "c" * 64}
    view = ServingView.from_config(params, ["3", "2"])  # HTTP gives int64 as strings
    assert (view.stable, view.versions, view.canary) == (2, (2, 3), 3)
    assert view.export() == {"export_variant": "onnx-int8", "export_manifest_sha256": "b" * 64, "export_version": "2"}
    assert view.export(3)["export_variant"] == "onnx-fp32"
    with pytest.raises(InvalidRequest, match="version 4 is not loaded"):
        view.export(4)
    retiring = ServingView.from_config({**params, "export_version": "3"}, [2, 3])
    assert retiring.canary is None  # a version below the stable one is being retired, not a canary
    # A repository from before versioned rendering: one version, plain parameters.
    assert ServingView.from_config({"export_variant": "onnx-fp32"}, []).export() == {"export_variant": "onnx-fp32",
                                                                                     "export_version": "1"}


def test_the_client_routes_a_share_to_the_canary_and_pinned_calls_to_their_version():
    from bert_recsys.client.triton import ServingView, TritonClient

    view = ServingView(stable=2, versions=(2, 3), exports={2: {}, 3: {}})
    always = TritonClient("127.0.0.1:1", canary_share=1.0)
    always._view = (time.monotonic() + 3600, view)  # fresh for the whole test: no server is asked
    assert always._route("embed", None) == ("embed_v3", "embed")  # falls back to `embed` if the canary is gone
    assert always._route("score", 2) == ("score_v2", None)         # pinned: never falls back to another version
    never = TritonClient("127.0.0.1:1", canary_share=0.0)
    assert never._route("embed", None) == ("embed", None)
    some = TritonClient("127.0.0.1:1", canary_share=0.25)
    some._view = always._view
    shares = [some._route("embed", None)[0] == "embed_v3" for _ in range(4000)]
    assert 0.2 < sum(shares) / len(shares) < 0.3
    with pytest.raises(ValueError, match="canary_share"):
        TritonClient("127.0.0.1:1", canary_share=1.5)


def test_many_texts_go_in_batches_of_similar_length_and_come_back_in_input_order(monkeypatch):
    from bert_recsys.client.triton import length_batches

    rng = np.random.default_rng(3)
    texts = ["x" * int(n) for n in rng.integers(1, 300, size=203)]
    batches = length_batches(texts, 64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(203))  # each text exactly once
    assert [len(b) for b in batches] == [64, 64, 64, 11]
    lengths = [[len(texts[i]) for i in b] for b in batches]
    assert all(min(a) >= max(b) for a, b in zip(lengths, lengths[1:]))  # longest first, no overlap
    with pytest.raises(ValueError, match="batch size"):
        length_batches(texts, 0)

    client = TritonClient("127.0.0.1:1")
    sent = []

    def embed(chunk, encoder_version=None):
        sent.append([len(t) for t in chunk])
        return np.array([[len(t), encoder_version or 0] for t in chunk], dtype=np.float32)

    monkeypatch.setattr(client, "embed", embed)
    out = client.embed_many(texts, batch_size=64, concurrency=3, encoder_version=7)
    assert out[:, 0].tolist() == [len(t) for t in texts] and set(out[:, 1]) == {7}
    assert max(max(b) - min(b) for b in sent) < 100  # padding inside a batch is bounded by the length spread
