"""Code shape figures for refactoring notes: the longest function and class per package, and which modules
read an export manifest (manifest.json) themselves.

    python scripts/code_shape.py client rollout
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bert_recsys", "contracts", "encoders", "export", "model_repository", "server", "client", "rollout", "gateway", "training",
            "loadtest", "bench")


def modules(package: str) -> list[Path]:
    path = ROOT / package
    return [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "models" not in p.parts or package != "model_repository")


def longest(package: str) -> dict:
    best = {"function": ("", 0), "class": ("", 0)}
    for module in modules(package):
        for node in ast.walk(ast.parse(module.read_text())):
            kind = "class" if isinstance(node, ast.ClassDef) else "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if kind:
                lines = node.end_lineno - node.lineno + 1
                if lines > best[kind][1]:
                    best[kind] = (f"{module.relative_to(ROOT)}::{node.name}", lines)
    return best


# Reading manifest.json without going through the contract: the file name, or the JSON parsed by hand.
DIRECT = re.compile(r"manifest\.json\"?\)?\.read_text|json\.loads\([^)]*manifest|\"manifest\.json\"")


def manifest_readers() -> list[str]:
    found = []
    for package in PACKAGES:
        for module in modules(package) if (ROOT / package).exists() else []:
            if module.name == "manifest.py":
                continue  # the contract itself
            if DIRECT.search(module.read_text()):
                found.append(str(module.relative_to(ROOT)))
    return found


def main(packages: list[str]) -> None:
    for package in packages or ["client", "rollout"]:
        best = longest(package)
        for kind, (name, lines) in best.items():
            print(f"{package:10s} longest {kind:8s} {lines:4d} lines  {name}")
    readers = manifest_readers()
    print(f"modules that read manifest.json directly: {len(readers)}  {' '.join(readers)}")


if __name__ == "__main__":
    main(sys.argv[1:])
