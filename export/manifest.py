"""The manifest: one JSON file beside every artifact, saying exactly what it is and how it was checked.

It travels into the model repository with the version, so "what exactly is serving" has an answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from export.source import file_sha256

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}: export the variant first")
    return json.loads(path.read_text())


def artifact_problems(directory: Path) -> list[str]:
    """Empty when the artifact beside the manifest is the one the manifest describes."""
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, json.JSONDecodeError) as error:
        return [str(error)]
    artifact = Path(directory) / manifest["artifact"]["file"]
    if not artifact.exists():
        return [f"artifact {artifact} is missing"]
    problems = []
    if artifact.stat().st_size != manifest["artifact"]["bytes"]:
        problems.append(f"{artifact.name} is {artifact.stat().st_size} bytes, manifest says {manifest['artifact']['bytes']}")
    if file_sha256(artifact) != manifest["artifact"]["sha256"]:
        problems.append(f"{artifact.name} sha256 differs from the manifest")
    return problems
