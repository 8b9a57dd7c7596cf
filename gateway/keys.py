"""API keys, stored hashed: a key file holds `name:sha256-hex` lines; plaintext keys from the environment are
hashed at start and never kept. A presented key is hashed and looked up; nothing compares secrets directly."""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


class KeyFileError(ValueError):
    """A key file that is missing or has a malformed line (the message names the file and line)."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, hashes: dict[str, str]):
        """`hashes`: sha256 hex -> key name (the name is what logs and metrics show, never the key)."""
        self._names = dict(hashes)

    @classmethod
    def from_plaintext(cls, keys: tuple[str, ...] | list[str]) -> "KeyStore":
        return cls({key_hash(k): f"key{i + 1}" for i, k in enumerate(keys)})

    @classmethod
    def from_file(cls, path: Path) -> "KeyStore":
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as error:
            raise KeyFileError(f"{path}: {error.strerror or error}") from None
        hashes = {}
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, digest = line.partition(":")
            digest = digest.strip().lower()
            if not name.strip() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise KeyFileError(f"{path}:{number}: expected `name:sha256-hex` (64 hex digits)")
            hashes[digest] = name.strip()
        return cls(hashes)

    def __len__(self) -> int:
        return len(self._names)

    def name_of(self, presented: str | None) -> str | None:
        """The key's name, or None for a missing or unknown key."""
        if not presented:
            return None
        digest = key_hash(presented)
        for known, name in self._names.items():  # constant-time per comparison; a handful of keys
            if hmac.compare_digest(known, digest):
                return name
        return None
