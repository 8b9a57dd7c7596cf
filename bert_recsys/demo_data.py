"""bert-recsys data: the MovieLens directory `make demo` runs on, found or fetched before anything else runs.

    1. DATA=dir, if given: it must hold movies.csv and ratings.csv.
    2. ../shared/data/movielens-latest-small beside the checkout (settings.MOVIELENS_DIR), if present.
    3. The cache (DEMO_DATA_CACHE, default ~/.cache/bert-recsys), if it holds a verified copy.
    4. Otherwise ml-latest-small is downloaded from GroupLens (DEMO_DATA_URL) unless DEMO_DOWNLOAD=0, and every
       file is checked against the sha256 pinned below before the copy is renamed into the cache; a failed or
       tampered download leaves nothing behind.
Rich item text: a directory without an overviews.csv gets one when OVERVIEWS=file names one, or when the TMDB
overviews for ml-latest-small lie beside the checkout (settings.MOVIE_OVERVIEWS): the MovieLens files and the
overviews are then linked side by side into build/data/<name>-overviews/, and that directory is printed (nothing is
copied or changed in either source). OVERVIEWS=none keeps title and genres only.

Prints the directory on stdout; on failure exits 2 with a message that says to pass DATA=.

The data's license (GroupLens, README.txt in the copy): research use; redistribution, transformations included,
only under the same conditions; no commercial use without GroupLens' permission. It is shown on download.

Environment: DEMO_DATA_URL, DEMO_DATA_CACHE, DEMO_DOWNLOAD (0 = never download), OVERVIEWS (a file, or none).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from bert_recsys import env, logs
from bert_recsys import settings
from bert_recsys.contracts.digest import file_sha256

log = logs.get("demo")
URL = env.DEMO_DATA_URL.default  # GroupLens' address of the pinned release
NAME = "movielens-latest-small"
# The 2018 release of ml-latest-small (generated 2018-09-26), file by file: the zip's own bytes (timestamps)
# may change when GroupLens re-packs it; these do not.
PINNED = {
    "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
    "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
    "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d",
    "links.csv": "97ad18e4e56a09363c65676b6cb3482ce3e2cea2372a24620c1599c843325f31",
    "README.txt": "caa1eb1d1d113578e9dbb36b37398404e00f379492b7aa31df0b30c855017095",
}
CONNECT_TIMEOUT_S = 8.0
HOW = ("pass a MovieLens-format directory (movies.csv, ratings.csv): make demo DATA=/path/to/ml-latest-small, "
       "or download it yourself from https://grouplens.org/datasets/movielens/")


class DataUnavailable(RuntimeError):
    """No data to run on; the message says what to do (DATA=)."""


def default_cache() -> Path:
    return env.DEMO_DATA_CACHE.get()


def problems(directory: Path) -> list[str]:
    """What differs from the pinned release: missing files and sha256 mismatches."""
    found = []
    for name, expected in PINNED.items():
        path = directory / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif (actual := file_sha256(path)) != expected:
            found.append(f"{name}: sha256 {actual[:16]}... is not the pinned {expected[:16]}...")
    return found


def license_text(directory: Path) -> str:
    text = (directory / "README.txt").read_text(encoding="utf-8", errors="replace")
    start = text.find("Usage License")
    end = text.find("Citation", start)
    return text[start:end].strip() if start >= 0 else text[:1500]


def download(url: str, target: Path) -> None:
    """Streams `url` into `target`, logging progress."""
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, time.monotonic()
            while block := response.read(1 << 16):
                out.write(block)
                done += len(block)
                if time.monotonic() - last > 2:
                    log.info("downloading %s: %.1f / %.1f MB", url, done / 1e6, total / 1e6)
                    last = time.monotonic()
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DataUnavailable(f"could not download {url}: {getattr(error, 'reason', error)}; {HOW}") from None


def fetch(url: str, cache: Path) -> Path:
    """Downloads, verifies and renames into `cache`/movielens-latest-small; nothing is left on failure."""
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / NAME
    with tempfile.TemporaryDirectory(prefix=".incoming-", dir=cache) as incoming:
        incoming = Path(incoming)
        archive = incoming / "ml-latest-small.zip"
        log.info("no MovieLens data here: downloading ml-latest-small from %s", url)
        download(url, archive)
        unpacked = incoming / NAME
        unpacked.mkdir()
        try:
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.infolist():
                    name = Path(member.filename).name
                    if name in PINNED and not member.is_dir():
                        with zipped.open(member) as source, open(unpacked / name, "wb") as out:
                            shutil.copyfileobj(source, out)
        except zipfile.BadZipFile as error:
            raise DataUnavailable(f"{url} is not a zip archive ({error}); {HOW}") from None
        wrong = problems(unpacked)
        if wrong:
            raise DataUnavailable(f"{url} is not the pinned ml-latest-small release: {'; '.join(wrong)}; {HOW}")
        shutil.rmtree(final, ignore_errors=True)
        unpacked.rename(final)
    print(f"MovieLens ml-latest-small (GroupLens), verified, in {final}. Its license:\n{license_text(final)}\n",
          file=sys.stderr)
    return final


def resolve(data: Path | None, cache: Path | None = None, url: str | None = None, allow_download: bool | None = None) -> Path:
    if data is not None:
        if not (Path(data) / "movies.csv").is_file() or not (Path(data) / "ratings.csv").is_file():
            raise DataUnavailable(f"DATA={data} has no movies.csv and ratings.csv; {HOW}")
        return Path(data)
    if (settings.MOVIELENS_DIR / "movies.csv").is_file():
        return settings.MOVIELENS_DIR
    cache = cache or default_cache()
    if (cache / NAME).is_dir() and not problems(cache / NAME):
        return cache / NAME
    allow_download = env.DEMO_DOWNLOAD.get() if allow_download is None else allow_download
    if not allow_download:
        raise DataUnavailable(f"no MovieLens data at {settings.MOVIELENS_DIR} or in {cache}, and DEMO_DOWNLOAD=0; {HOW}")
    return fetch(url or env.DEMO_DATA_URL.get(), cache)


def with_overviews(directory: Path, overviews: Path | None, out_root: Path | None = None) -> Path:
    """`directory` itself if it has an overviews.csv or `overviews` is None or missing; else a directory under
    `out_root` (build/data) linking the MovieLens files and `overviews` as overviews.csv, rebuilt each time."""
    directory = Path(directory).resolve()
    if (directory / "overviews.csv").exists() or overviews is None or not Path(overviews).is_file():
        return directory
    target = Path(out_root or settings.BUILD_DIR / "data") / f"{directory.name}-overviews"
    incoming = target.with_name(target.name + ".incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    for source in directory.iterdir():
        if source.is_file() and source.suffix in (".csv", ".txt"):
            (incoming / source.name).symlink_to(source.resolve())
    (incoming / "overviews.csv").symlink_to(Path(overviews).resolve())
    shutil.rmtree(target, ignore_errors=True)
    incoming.rename(target)
    log.info("item text: %s with the overviews of %s -> %s", directory, overviews, target)
    return target


def overviews_file(value: str | None) -> Path | None:
    """OVERVIEWS: a file, "none", or unset (the overviews beside the checkout, where present)."""
    if value is not None and value.strip().lower() in ("none", "off", "0", ""):
        return None
    return Path(value) if value else settings.MOVIE_OVERVIEWS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="a MovieLens-format directory (make demo DATA=)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--url", default=None)
    parser.add_argument("--no-download", action="store_true")
    parser.add_argument("--overviews", default=env.OVERVIEWS.get(),
                        help="an overviews.csv to add as rich item text, or 'none' (default: the one beside the checkout)")
    args = parser.parse_args(argv)
    logs.configure()
    try:
        path = resolve(args.data, args.cache, args.url, False if args.no_download else None)
    except DataUnavailable as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    print(with_overviews(path, overviews_file(args.overviews)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
