"""One way to hash a file, for every stage that pins or checks one (artifacts, manifests, index files, data)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The file's sha256, hex, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def files_identity(files: dict[str, str]) -> str:
    """One sha256 for a set of files given as {name: sha256}: what a model was trained on, say."""
    return hashlib.sha256(json.dumps(dict(sorted(files.items()))).encode()).hexdigest()


def directory_files(directory: Path, names: tuple[str, ...]) -> dict[str, str]:
    """{name: sha256} of the files among `names` that `directory` holds (links resolved)."""
    return {name: file_sha256(Path(directory) / name) for name in names if (Path(directory) / name).exists()}
