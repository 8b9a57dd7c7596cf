"""A damaged, truncated or foreign index file is a clear IndexFileError naming the file, never a crash in FAISS."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bert_recsys.client.index import IndexFileError, IndexStore, ItemIndex

ENCODER = {"export_version": "1", "export_variant": "onnx-int8", "export_manifest_sha256": "a" * 64}


def make_index(seed: int, n: int = 50, dim: int = 16) -> ItemIndex:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return ItemIndex(np.arange(n) + 100 * seed, vectors, ENCODER, texts=[f"item {i}" for i in range(n)])


@pytest.fixture
def saved(tmp_path):
    make_index(1).save(tmp_path / "mine")
    make_index(2).save(tmp_path / "other")
    return tmp_path / "mine", tmp_path / "other"


def test_a_saved_index_loads_back_whole(saved):
    index = ItemIndex.load(saved[0])
    assert len(index) == 50 and index.texts[3] == "item 3"
    ids, _ = index.search(index.vectors[:1], 1, ENCODER)
    assert ids[0, 0] == index.item_ids[0]


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path):
    path.write_bytes(b"\x00not an array at all" * 10)


@pytest.mark.parametrize("name, damage, says", [
    ("vectors.npy", truncate, "does not match the sha256"),
    ("item_ids.npy", garbage, "does not match the sha256"),
    ("texts.json", truncate, "does not match the sha256"),
    ("vectors.npy", lambda p: p.unlink(), "missing"),
    ("index.json", truncate, "not an index description"),
    ("index.json", lambda p: p.unlink(), "missing"),
])
def test_a_damaged_file_is_named(saved, name, damage, says):
    damage(saved[0] / name)
    with pytest.raises(IndexFileError) as error:
        ItemIndex.load(saved[0])
    assert str(saved[0] / name) in str(error.value) and says in str(error.value)


def test_a_file_from_another_index_is_refused(saved):
    shutil.copyfile(saved[1] / "vectors.npy", saved[0] / "vectors.npy")  # same shape, other vectors
    with pytest.raises(IndexFileError, match="vectors.npy: does not match the sha256 .* another index"):
        ItemIndex.load(saved[0])


def without_checksums(directory):
    meta = json.loads((directory / "index.json").read_text())
    meta.pop("files")
    (directory / "index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name, damage, says", [
    ("vectors.npy", truncate, "not a readable .npy array"),
    ("item_ids.npy", garbage, "not a readable .npy array"),
    ("vectors.npy", lambda p: np.save(p, np.zeros((50, 16, 2), np.float32)), "expected a 2-d floating array"),
    ("vectors.npy", lambda p: np.save(p, np.full((50, 16), np.nan, np.float32)), "NaN or infinite"),
    ("item_ids.npy", lambda p: np.save(p, np.arange(7)), "says 50 items, item_ids.npy holds 7"),
    ("vectors.npy", lambda p: np.save(p, np.ones((50, 8), np.float32)), "vectors of dim 8"),
])
def test_without_checksums_the_shapes_still_guard_faiss(saved, name, damage, says):
    """Indexes written before checksums existed: the content checks still stop bad files before FAISS."""
    without_checksums(saved[0])
    damage(saved[0] / name)
    with pytest.raises(IndexFileError, match=says) as error:
        ItemIndex.load(saved[0])
    assert str(saved[0]) in str(error.value)


def test_a_store_whose_current_index_is_damaged_says_which_file(tmp_path):
    store = IndexStore(tmp_path / "store")
    name = store.publish(make_index(1))
    store.switch(name)
    truncate(tmp_path / "store" / name / "vectors.npy")
    with pytest.raises(IndexFileError, match=f"{name}/vectors.npy"):
        store.load()
