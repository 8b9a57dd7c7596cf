"""`make demo`'s data on a machine without ../shared: fetched from a (fake, loopback) GroupLens and verified
file by file, or a stop in seconds that names DATA=. Never the network."""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from bert_recsys import demo_data
from bert_recsys import settings

SOURCE = settings.MOVIELENS_DIR


def make_zip(path: Path, tamper: bool = False) -> Path:
    if not (SOURCE / "movies.csv").exists():
        pytest.skip(f"MovieLens not found at {SOURCE}")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name in demo_data.PINNED:
            data = (SOURCE / name).read_bytes()
            if tamper and name == "ratings.csv":
                data = data.replace(b"5.0", b"4.5", 1)
            zipped.writestr(f"ml-latest-small/{name}", data)
    return path


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "MOVIELENS_DIR", tmp_path / "no-shared" / "movielens-latest-small")


def serve(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def closed_port() -> int:
    from bert_recsys.server.launcher import free_port

    return free_port()


def test_the_demo_fetches_verifies_and_then_reuses_the_cache(no_shared, tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    make_zip(site / "ml-latest-small.zip")
    server = serve(site)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ml-latest-small.zip"
        path = demo_data.resolve(None, tmp_path / "cache", url, allow_download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert path == tmp_path / "cache" / "movielens-latest-small" and demo_data.problems(path) == []
    assert (path / "ratings.csv").read_bytes() == (SOURCE / "ratings.csv").read_bytes()
    assert "may not use this information for any commercial" in capsys.readouterr().err  # the license, shown
    # The server is gone: the verified copy in the cache is used, no download is tried.
    assert demo_data.resolve(None, tmp_path / "cache", url, allow_download=True) == path


def test_a_tampered_download_is_refused_and_leaves_nothing(no_shared, tmp_path):
    archive = make_zip(tmp_path / "tampered.zip", tamper=True)
    with pytest.raises(demo_data.DataUnavailable, match=r"ratings.csv: sha256 .* DATA="):
        demo_data.resolve(None, tmp_path / "cache", archive.as_uri(), allow_download=True)
    assert list((tmp_path / "cache").iterdir()) == []  # no half copy, no leftover download


def test_no_network_or_no_download_stops_at_once_naming_data(no_shared, tmp_path):
    started = time.monotonic()
    with pytest.raises(demo_data.DataUnavailable, match="could not download .*make demo DATA="):
        demo_data.resolve(None, tmp_path / "cache", f"http://127.0.0.1:{closed_port()}/x.zip", allow_download=True)
    with pytest.raises(demo_data.DataUnavailable, match="DEMO_DOWNLOAD=0.*DATA="):
        demo_data.resolve(None, tmp_path / "cache", allow_download=False)
    with pytest.raises(demo_data.DataUnavailable, match="has no movies.csv"):
        demo_data.resolve(tmp_path / "empty", tmp_path / "cache")
    assert time.monotonic() - started < 10


def test_make_demo_on_a_machine_without_data_stops_before_export_in_seconds(tmp_path):
    """The real `make demo`, as on a fresh clone with no ../shared and no reachable GroupLens."""
    env = {**os.environ, "SHARED_DATA_DIR": str(tmp_path / "nothing"), "BUILD_DIR": str(tmp_path / "build"),
           "DEMO_DATA_CACHE": str(tmp_path / "cache"), "DEMO_DATA_URL": f"http://127.0.0.1:{closed_port()}/x.zip"}
    env.pop("DATA", None)
    started = time.monotonic()
    result = subprocess.run(["make", "--no-print-directory", "demo"], cwd=settings.REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0 and "make demo DATA=" in result.stderr, result.stderr[-2000:]
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (tmp_path / "build" / "export").exists()  # nothing was exported first


def test_overviews_are_linked_beside_the_movielens_files_and_none_keeps_the_titles(tmp_path):
    source = tmp_path / "ml"
    source.mkdir()
    (source / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    (source / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,5.0,1\n")
    overviews = tmp_path / "overviews.csv"
    overviews.write_text("movieId,overview\n1,Toys come alive.\n")
    rich = demo_data.with_overviews(source, overviews, tmp_path / "build")
    assert rich == tmp_path / "build" / "ml-overviews"
    assert sorted(p.name for p in rich.iterdir()) == ["movies.csv", "overviews.csv", "ratings.csv"]
    assert (rich / "overviews.csv").resolve() == overviews.resolve() and not (source / "overviews.csv").exists()
    from bert_recsys.client.catalog import load_catalog

    assert load_catalog(rich).items[0].description == "Toys come alive."
    assert demo_data.with_overviews(source, None, tmp_path / "build") == source.resolve()
    assert demo_data.with_overviews(source, tmp_path / "missing.csv", tmp_path / "build") == source.resolve()
    assert demo_data.overviews_file("none") is None and demo_data.overviews_file(None) == settings.MOVIE_OVERVIEWS
