"""Both catalog formats through one reader interface, rich item text and its templates, and bad input: a bad row
is reported with file and line and the rest used; a file that cannot be used names the file and the line."""
import numpy as np
import pytest

from bert_recsys.client.catalog import CatalogError, IMPLICIT_POSITIVE, Item, load_catalog
from bert_recsys.client.index import ItemIndex, TemplateMismatch
from bert_recsys.client.item_text import DEFAULT_TEMPLATE, TEMPLATES, TemplateUse, TextTemplate, template

ENCODER = {"export_variant": "onnx-int8", "export_manifest_sha256": "a" * 64, "export_version": "1"}


def movielens(tmp_path, overviews: str | None = None):
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,Jumanji (1995),Adventure|Fantasy\n"
        "3,Heat (1995),(no genres listed)\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,5.0,20\n2,3,3.0,5\n")
    if overviews is not None:
        (tmp_path / "overviews.csv").write_text(overviews)
    return tmp_path


def test_movielens_with_overviews_gets_rich_text_and_counts_the_fallbacks(tmp_path):
    movielens(tmp_path, 'movieId,tmdbId,overview,tagline,keywords\n'
                        '1,862,"Woody, a cowboy doll, is jealous.\nBuzz arrives.",,toy|Rivalry|toy\n'
                        '2,8844,A board game comes alive.,Roll the dice!,board game\n'
                        'x,1,bad id,,\n'
                        '99,1,not in movies.csv,,\n')
    catalog = load_catalog(tmp_path)
    assert catalog.format == "movielens" and [i.item_id for i in catalog.items] == [1, 2, 3]
    toy, jumanji, heat = catalog.items
    assert toy.description == "Woody, a cowboy doll, is jealous. Buzz arrives." and toy.keywords == ("toy", "rivalry", "toy")
    assert heat.description == "" and heat.categories == ()
    assert [(e.file, e.line) for e in catalog.errors] == [("overviews.csv", 5), ("overviews.csv", 6)]
    rich = template("rich")
    assert rich.render(jumanji) == "Jumanji (1995). Genres: Adventure, Fantasy. Roll the dice! A board game comes alive."
    assert rich.render(heat) == "Heat (1995)"  # no overview: the title (and genres, where it has them)
    assert template("title").render(toy) == "Toy Story (1995). Genres: Adventure, Animation"
    assert template("rich-keywords").render(toy).endswith("Buzz arrives. Keywords: toy, rivalry, toy")
    use = TemplateUse.of(rich, catalog.items)
    assert (use.items, use.with_description, use.fallback) == (3, 2, 1)
    assert TemplateUse.of(template("title"), catalog.items).with_description == 0


def test_the_items_format_reads_through_the_same_interface(tmp_path):
    (tmp_path / "items.csv").write_text(
        "item_id,title,text,categories,created_at\n"
        "10,Blue kettle,A 1.7 l enamel kettle.,Kitchen|Enamel,2024-03-01\n"
        "11,Red kettle,,Kitchen,1711929600\n"
        "12,,no title,Kitchen,\n"
        "13,Lamp,A lamp.,Home,yesterday\n")
    (tmp_path / "interactions.csv").write_text(
        "user_id,item_id,timestamp,weight\n7,10,2024-03-02T10:00:00Z,1\n7,11,1711929700,0\n8,99,1711929700,1\n"
        "8,10,soon,1\n")
    catalog = load_catalog(tmp_path)
    assert catalog.format == "items" and [i.item_id for i in catalog.items] == [10, 11]
    kettle = catalog.items[0]
    assert kettle.description == "A 1.7 l enamel kettle." and kettle.created_at == 1709251200
    assert template("rich").render(kettle) == "Blue kettle. Genres: Kitchen, Enamel. A 1.7 l enamel kettle."
    assert [(e.file, e.line) for e in catalog.errors] == [("items.csv", 4), ("items.csv", 5),
                                                            ("interactions.csv", 4), ("interactions.csv", 5)]
    data = catalog.interactions
    assert data.user.tolist() == [7, 7] and data.rating.tolist() == [IMPLICIT_POSITIVE, 0.0]


def test_implicit_interactions_without_rating_or_weight_are_positives(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title,text,categories\n1,A,,x\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n1,1,5,3.5\n")
    assert load_catalog(tmp_path).interactions.rating.tolist() == [3.5]
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\n1,1,5\n")
    assert load_catalog(tmp_path).interactions.rating.tolist() == [IMPLICIT_POSITIVE]


@pytest.mark.parametrize("name, content, line, words", [
    ("items.csv", "item_id,title,categories\n1,A,x\n", 1, "missing column(s) text"),
    ("interactions.csv", "user_id,item_id\n1,1\n", 1, "missing column(s) timestamp"),
    ("items.csv", b"item_id,title,text,categories\n1,A,ok,x\n2,B,caf\xe9,x\n", 3, "not UTF-8"),
    ("items.csv", "", 1, "empty file"),
])
def test_unusable_files_name_the_file_and_the_line(tmp_path, name, content, line, words):
    (tmp_path / "items.csv").write_text("item_id,title,text,categories\n1,A,,x\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\n1,1,5\n")
    target = tmp_path / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CatalogError) as caught:
        load_catalog(tmp_path)
    assert caught.value.path == str(target) and caught.value.line == line and words in caught.value.reason
    assert str(caught.value).startswith(f"{target}:{line}: ")


def test_a_malformed_overviews_file_is_refused_whole(tmp_path):
    movielens(tmp_path, "movieId,tagline\n1,x\n")
    with pytest.raises(CatalogError, match=r"overviews.csv:1: missing column\(s\) overview"):
        load_catalog(tmp_path)
    (tmp_path / "overviews.csv").write_bytes(b"movieId,overview\n1,ok\n2,caf\xe9\n")
    with pytest.raises(CatalogError, match=r"overviews.csv:3: not UTF-8"):
        load_catalog(tmp_path)


def test_a_directory_in_no_known_format_is_refused(tmp_path):
    with pytest.raises(CatalogError, match="not a catalog directory"):
        load_catalog(tmp_path)


def test_template_identity_covers_the_definition_and_the_index_refuses_another():
    rich = TEMPLATES["rich"]
    assert rich.identity.startswith("rich@") and rich.identity != TEMPLATES["rich-keywords"].identity
    edited = TextTemplate("rich", ("title", "description"))
    assert edited.identity != rich.identity  # same name, other definition: another identity
    assert DEFAULT_TEMPLATE in TEMPLATES
    with pytest.raises(ValueError, match="parts must start with 'title'"):
        TextTemplate("odd", ("description",))
    with pytest.raises(ValueError, match="unknown item text template"):
        template("nope")
    vectors = np.eye(4, dtype=np.float32)
    index = ItemIndex(np.arange(4), vectors, ENCODER, template=rich.identity)
    index.check_template(rich.identity)
    with pytest.raises(TemplateMismatch) as caught:
        index.check_template(TEMPLATES["title"].identity)
    assert rich.identity in str(caught.value) and TEMPLATES["title"].identity in str(caught.value)


def test_a_saved_index_from_another_template_is_refused_on_load(tmp_path):
    rich, title = TEMPLATES["rich"].identity, TEMPLATES["title"].identity
    ItemIndex(np.arange(3), np.eye(3, dtype=np.float32), ENCODER, template=rich, texts=["a", "b", "c"]).save(tmp_path)
    assert ItemIndex.load(tmp_path, rich).template == rich
    with pytest.raises(TemplateMismatch, match=f"{rich}.*{title}"):
        ItemIndex.load(tmp_path, title)


def test_items_added_live_are_searchable_centred_and_survive_a_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    common = np.ones(8, dtype=np.float32)
    raw = rng.normal(size=(50, 8)).astype(np.float32) * 0.3 + common
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    from bert_recsys.client.index import IndexSettings

    index = ItemIndex(np.arange(50), raw, ENCODER, IndexSettings(centre=True), texts=[str(i) for i in range(50)])
    mean_cosine = lambda v: float((v @ v.T)[np.triu_indices(len(v), 1)].mean())  # noqa: E731
    assert mean_cosine(raw) > 0.5 and abs(mean_cosine(index.vectors)) < 0.1  # the common direction is gone
    new = raw[7] + 0.01 * rng.normal(size=8).astype(np.float32)
    index.add([1000], new[None], ["new"])
    ids, _ = index.search(index.transform(new[None]), 2, ENCODER)
    assert set(ids[0].tolist()) == {1000, 7}
    with pytest.raises(ValueError, match="already in the index"):
        index.add([1000], new[None], ["again"])
    with pytest.raises(ValueError, match="NaN"):
        index.add([1001], np.full((1, 8), np.nan, dtype=np.float32), ["nan"])
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path)
    assert len(loaded) == 51 and loaded.texts[-1] == "new"
    np.testing.assert_allclose(loaded.centre, index.centre)
    np.testing.assert_allclose(loaded.vectors_of([1000]), index.vectors_of([1000]), atol=1e-6)


def test_item_defaults_keep_a_title_only_item_valid():
    item = Item(5, "Plain")
    assert template("rich").render(item) == "Plain" and template("title").render(item) == "Plain"
