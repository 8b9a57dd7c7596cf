"""Catalogs and interactions, read defensively through one interface: a malformed row is reported with its file
and line and skipped, everything else is still used; a file that cannot be read as a whole (missing, not UTF-8,
a required column missing) raises `CatalogError` naming the file and the line.

Two formats, told apart by the files a directory holds (`load_catalog`):

MovieLens (`MovieLensReader`)
    movies.csv        movieId,title,genres                      (genres `|`-separated)
    ratings.csv       userId,movieId,rating,timestamp
    overviews.csv     movieId,overview[,tagline][,keywords]     optional; keywords `|`-separated, other columns
                                                                 (tmdbId, title...) are ignored
Items (`ItemsReader`), for any catalog
    items.csv         item_id,title,text,categories[,created_at] (categories `|`-separated)
    interactions.csv  user_id,item_id,timestamp[,rating][,weight]

Ids are integers. Timestamps are epoch seconds or ISO 8601 dates/times (UTC unless they say otherwise).
Without a rating, an interaction is a positive: rating `IMPLICIT_POSITIVE`, or 0 where `weight` <= 0.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np

NO_GENRES = "(no genres listed)"
# Every file a catalog directory may hold: their sha256 together are the data's identity (contracts.digest).
CATALOG_FILES = ("movies.csv", "ratings.csv", "overviews.csv", "items.csv", "interactions.csv")
IMPLICIT_POSITIVE = 5.0


@dataclass(frozen=True)
class Item:
    item_id: int
    title: str
    categories: tuple[str, ...] = ()
    description: str = ""            # the overview (MovieLens overviews.csv) or the `text` column (items.csv)
    tagline: str = ""
    keywords: tuple[str, ...] = ()
    created_at: int | None = None    # epoch seconds, where the catalog says


@dataclass(frozen=True)
class RowError:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class CatalogError(ValueError):
    """A catalog file that cannot be used at all: missing, not UTF-8, or without a required column. The message
    names the file and the line."""

    def __init__(self, path: Path | str, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")


@dataclass
class Interactions:
    """Columnar interactions, sorted by (user, time)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask: np.ndarray) -> "Interactions":
        return Interactions(self.user[mask], self.item[mask], self.rating[mask], self.time[mask])

    @classmethod
    def from_rows(cls, users, items, ratings, times) -> "Interactions":
        order = np.lexsort((np.asarray(times, dtype=np.int64), np.asarray(users, dtype=np.int64)))
        return cls(np.asarray(users, dtype=np.int64)[order], np.asarray(items, dtype=np.int64)[order],
                   np.asarray(ratings, dtype=np.float32)[order], np.asarray(times, dtype=np.int64)[order])


@dataclass
class Catalog:
    """What a reader returns: the items, their interactions, and every row it skipped (with file and line)."""

    items: list[Item]
    interactions: Interactions
    errors: list[RowError] = field(default_factory=list)
    source: str = ""
    format: str = ""

    @property
    def with_description(self) -> int:
        return sum(1 for item in self.items if item.description)


class CatalogReader(Protocol):
    format: str

    def can_read(self, directory: Path) -> bool: ...

    def read(self, directory: Path) -> Catalog: ...


# ---- reading CSV files -----------------------------------------------------------------------------------
def _decoded(path: Path) -> str:
    """The file as text, or CatalogError with the line of the first byte that is not UTF-8."""
    if not path.exists():
        raise CatalogError(path, None, "not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise CatalogError(path, line, f"not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}): "
                                       "save the file as UTF-8") from None


def _rows(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """-> (columns found, iterator of (line where the record starts, {column: value})). A record with another
    number of fields than the header is yielded as (line, None)."""
    reader = csv.reader(io.StringIO(_decoded(path), newline=""))
    header = [h.strip() for h in next(reader, [])]
    if not header:
        raise CatalogError(path, 1, "empty file: expected a header line")
    missing = [c for c in required if c not in header]
    if missing:
        raise CatalogError(path, 1, f"missing column(s) {', '.join(missing)} (header: {','.join(header)}; "
                                    f"required: {','.join(required)})")
    wanted = [c for c in (*required, *optional) if c in header]
    position = {c: header.index(c) for c in wanted}

    def records():
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield start, f"unreadable CSV ({error})"
                continue
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                yield start, f"expected {len(header)} fields, got {len(row)}"
                continue
            yield start, {c: row[i] for c, i in position.items()}

    return set(wanted), records()


def _int(value: str, what: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an integer") from None


def parse_time(value: str) -> int:
    """Epoch seconds (an integer) or an ISO 8601 date or date-time, UTC unless it carries an offset."""
    value = value.strip()
    try:
        return int(value)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp {value!r} is neither epoch seconds nor an ISO 8601 date") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return int(stamp.timestamp())


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split("|") if part.strip())


# ---- items -----------------------------------------------------------------------------------------------
def _read_items(path: Path, id_column: str, columns: dict[str, str]) -> tuple[list[Item], list[RowError]]:
    """`columns` maps Item fields to this format's column names (title, categories, and optionally
    description, created_at)."""
    required = (id_column, columns["title"], columns["categories"], *([columns["description"]] if "description" in columns else ()))
    optional = tuple(v for k, v in columns.items() if k == "created_at")
    found, records = _rows(path, required, optional)
    items, errors, seen = [], [], set()
    for line, row in records:
        if not isinstance(row, dict):
            errors.append(RowError(path.name, line, row))
            continue
        try:
            item_id = _int(row[id_column], id_column)
            created = parse_time(row[columns["created_at"]]) if columns.get("created_at") in found and row[columns["created_at"]].strip() else None
        except ValueError as error:
            errors.append(RowError(path.name, line, str(error)))
            continue
        title = row[columns["title"]].strip()
        if not title:
            errors.append(RowError(path.name, line, "empty title"))
            continue
        if item_id in seen:
            errors.append(RowError(path.name, line, f"duplicate {id_column} {item_id}"))
            continue
        seen.add(item_id)
        categories = tuple(c for c in _split(row[columns["categories"]]) if c != NO_GENRES)
        description = row[columns["description"]].strip() if "description" in columns else ""
        items.append(Item(item_id, title, categories, description=description, created_at=created))
    return items, errors


def read_interactions(path: Path, known_items: set[int] | None = None, *, user_column: str = "userId",
                      item_column: str = "movieId", rating_column: str | None = "rating",
                      time_column: str = "timestamp") -> tuple[Interactions, list[RowError]]:
    """Interactions sorted by (user, time). With `rating_column` None, the file's `rating` column is optional and
    a `weight` column may stand in for it (see the module's doc)."""
    explicit = rating_column is not None
    required = (user_column, item_column, *((rating_column,) if explicit else ()), time_column)
    found, records = _rows(path, required, () if explicit else ("rating", "weight"))
    users, items, ratings, times, errors = [], [], [], [], []
    for line, row in records:
        if not isinstance(row, dict):
            errors.append(RowError(path.name, line, row))
            continue
        try:
            user, item, stamp = _int(row[user_column], user_column), _int(row[item_column], item_column), parse_time(row[time_column])
            if explicit or "rating" in found:
                rating = float(row[rating_column or "rating"])
            elif "weight" in found:
                rating = IMPLICIT_POSITIVE if float(row["weight"]) > 0 else 0.0
            else:
                rating = IMPLICIT_POSITIVE
            if not np.isfinite(rating):
                raise ValueError(f"rating {rating} is not a finite number")
        except (ValueError, IndexError) as error:
            errors.append(RowError(path.name, line, str(error)))
            continue
        if known_items is not None and item not in known_items:
            errors.append(RowError(path.name, line, f"{item_column} {item} is not in the catalog"))
            continue
        users.append(user), items.append(item), ratings.append(rating), times.append(stamp)
    return Interactions.from_rows(users, items, ratings, times), errors


# ---- MovieLens -------------------------------------------------------------------------------------------
def read_items(path: Path) -> tuple[list[Item], list[RowError]]:
    """MovieLens movies.csv."""
    return _read_items(path, "movieId", {"title": "title", "categories": "genres"})


def read_overviews(path: Path, items: list[Item]) -> tuple[list[Item], list[RowError]]:
    """MovieLens items enriched from overviews.csv (movieId,overview[,tagline][,keywords]); items it does not
    mention keep their title and genres only."""
    found, records = _rows(path, ("movieId", "overview"), ("tagline", "keywords"))
    by_id = {item.item_id: item for item in items}
    enriched: dict[int, Item] = {}
    errors = []
    for line, row in records:
        if not isinstance(row, dict):
            errors.append(RowError(path.name, line, row))
            continue
        try:
            item_id = _int(row["movieId"], "movieId")
        except ValueError as error:
            errors.append(RowError(path.name, line, str(error)))
            continue
        if item_id not in by_id:
            errors.append(RowError(path.name, line, f"movieId {item_id} is not in movies.csv"))
            continue
        if item_id in enriched:
            errors.append(RowError(path.name, line, f"duplicate movieId {item_id}"))
            continue
        enriched[item_id] = Item(
            item_id, by_id[item_id].title, by_id[item_id].categories,
            description=" ".join(row["overview"].split()),
            tagline=" ".join(row.get("tagline", "").split()),
            keywords=tuple(k.lower() for k in _split(row.get("keywords", ""))))
    return [enriched.get(item.item_id, item) for item in items], errors


class MovieLensReader:
    format = "movielens"

    def can_read(self, directory: Path) -> bool:
        return (Path(directory) / "movies.csv").exists()

    def read(self, directory: Path) -> Catalog:
        directory = Path(directory)
        items, errors = read_items(directory / "movies.csv")
        if (directory / "overviews.csv").exists():
            items, overview_errors = read_overviews(directory / "overviews.csv", items)
            errors += overview_errors
        interactions, rating_errors = read_interactions(directory / "ratings.csv", {i.item_id for i in items})
        return Catalog(items, interactions, errors + rating_errors, str(directory), self.format)


class ItemsReader:
    format = "items"

    def can_read(self, directory: Path) -> bool:
        return (Path(directory) / "items.csv").exists()

    def read(self, directory: Path) -> Catalog:
        directory = Path(directory)
        items, errors = _read_items(directory / "items.csv", "item_id", {
            "title": "title", "categories": "categories", "description": "text", "created_at": "created_at"})
        interactions, interaction_errors = read_interactions(
            directory / "interactions.csv", {i.item_id for i in items}, user_column="user_id", item_column="item_id",
            rating_column=None)
        return Catalog(items, interactions, errors + interaction_errors, str(directory), self.format)


READERS: tuple[CatalogReader, ...] = (ItemsReader(), MovieLensReader())


def load_catalog(directory: Path) -> Catalog:
    """The catalog in `directory`, in whichever format its files say (items.csv, else movies.csv)."""
    directory = Path(directory)
    for reader in READERS:
        if reader.can_read(directory):
            return reader.read(directory)
    raise CatalogError(directory, None, "not a catalog directory: expected items.csv + interactions.csv, or "
                                        "MovieLens movies.csv + ratings.csv (optionally overviews.csv)")
