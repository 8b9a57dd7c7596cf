"""Catalog and interactions in MovieLens format, read defensively: a malformed row is reported with its
line number and skipped, and everything else is still used.

movies.csv: movieId,title,genres (genres pipe-separated); ratings.csv: userId,movieId,rating,timestamp.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class Item:
    item_id: int
    title: str
    categories: tuple[str, ...]

    @property
    def text(self) -> str:
        """What the encoder sees: the title (with year) and the genres."""
        genres = ", ".join(self.categories)
        return f"{self.title}. Genres: {genres}" if genres else self.title


@dataclass(frozen=True)
class RowError:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Interactions:
    """Columnar ratings, sorted by (user, time)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    time: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask: np.ndarray) -> "Interactions":
        return Interactions(self.user[mask], self.item[mask], self.rating[mask], self.time[mask])


def read_items(path: Path) -> tuple[list[Item], list[RowError]]:
    items, errors, seen = [], [], set()
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["movieId", "title", "genres"]:
            raise ValueError(f"{path}: expected header movieId,title,genres, got {header}")
        for row in reader:
            line = reader.line_num
            if len(row) != 3:
                errors.append(RowError(path.name, line, f"expected 3 fields, got {len(row)}"))
                continue
            raw_id, title, genres = row
            try:
                item_id = int(raw_id)
            except ValueError:
                errors.append(RowError(path.name, line, f"movieId {raw_id!r} is not an integer"))
                continue
            if not title.strip():
                errors.append(RowError(path.name, line, "empty title"))
                continue
            if item_id in seen:
                errors.append(RowError(path.name, line, f"duplicate movieId {item_id}"))
                continue
            seen.add(item_id)
            categories = tuple(g for g in genres.split("|") if g and g != NO_GENRES)
            items.append(Item(item_id, title.strip(), categories))
    return items, errors


def read_interactions(path: Path, known_items: set[int] | None = None) -> tuple[Interactions, list[RowError]]:
    users, items, ratings, times, errors = [], [], [], [], []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or header[:4] != ["userId", "movieId", "rating", "timestamp"]:
            raise ValueError(f"{path}: expected header userId,movieId,rating,timestamp, got {header}")
        for row in reader:
            try:
                user, item, rating, stamp = int(row[0]), int(row[1]), float(row[2]), int(row[3])
            except (ValueError, IndexError):
                errors.append(RowError(path.name, reader.line_num, f"malformed row {row!r}"))
                continue
            if known_items is not None and item not in known_items:
                errors.append(RowError(path.name, reader.line_num, f"movieId {item} is not in the catalog"))
                continue
            users.append(user), items.append(item), ratings.append(rating), times.append(stamp)
    order = np.lexsort((np.asarray(times), np.asarray(users)))
    data = Interactions(np.asarray(users, dtype=np.int64)[order], np.asarray(items, dtype=np.int64)[order],
                        np.asarray(ratings, dtype=np.float32)[order], np.asarray(times, dtype=np.int64)[order])
    return data, errors


def load_movielens(directory: Path) -> tuple[list[Item], Interactions, list[RowError]]:
    directory = Path(directory)
    for name in ("movies.csv", "ratings.csv"):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} not found: DATA must be a MovieLens-format directory")
    items, item_errors = read_items(directory / "movies.csv")
    interactions, rating_errors = read_interactions(directory / "ratings.csv", {i.item_id for i in items})
    return items, interactions, item_errors + rating_errors
