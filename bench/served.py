"""The one "serve this variant on free ports" of the benchmarks: render the exported variant into a repository of
the benchmark's own, start the real tritonserver on unused loopback ports, yield it, stop it."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bert_recsys import settings
from bert_recsys.settings import Settings


def render(variant: str, out: Path, serving: Settings | None = None, runtime: str = "embedded",
           export_dir: Path | None = None) -> Path:
    """The variant's repository at `out` (rebuilt), rendered with `serving` (default: the settings now)."""
    from bert_recsys.model_repository.render import build_repository

    return build_repository(serving or settings.SETTINGS, export_dir or settings.EXPORT_DIR, variant, runtime, out)


@contextmanager
def serve(repository: Path, log_file: Path, serving: Settings | None = None, admin_key: str | None = None,
          **server_options) -> Iterator:
    """tritonserver on `repository` as it is, on free loopback ports; yields the running TritonServer (its
    `.server` holds the ports and the admin key). admin_key None: one made up for this start."""
    from bert_recsys.server.launcher import TritonServer, on_free_ports

    overrides = {} if admin_key is None else {"admin_key": admin_key}
    ports = on_free_ports((serving or settings.SETTINGS).server, **overrides)
    with TritonServer(repository, ports, log_file=log_file, **server_options) as server:
        yield server


@contextmanager
def serve_variant(variant: str, work: Path, serving: Settings | None = None, runtime: str = "embedded",
                  admin_key: str | None = None, edit: Callable[[Path], None] | None = None,
                  log_name: str = "triton.log", **server_options) -> Iterator:
    """Renders `variant` into work/repository, lets `edit(repository)` change it, and serves it (see serve)."""
    repository = render(variant, Path(work) / "repository", serving, runtime)
    if edit is not None:
        edit(repository)
    with serve(repository, Path(work) / log_name, serving, admin_key, **server_options) as server:
        yield server
