"""The live model repository, read and changed only in ways that never leave a half-written model behind.

Every change only *adds* a directory (built aside, renamed into place whole) or *replaces* a config.pbtxt
(os.replace, atomic). Reading goes through the rendered configs and the versions' manifests: the repository
itself says which version is stable, which is a canary, and which runtime serves the encoder.
"""
from __future__ import annotations

import fcntl
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from bert_recsys.contracts.manifest import Manifest
from bert_recsys.contracts.runtime import Runtime
from bert_recsys.model_repository.render import encoder_takes_text, link_or_copy, write_generation
from bert_recsys.rollout.policy import RolloutRefused
from bert_recsys.settings import Settings


@dataclass
class LiveRepository:
    path: Path
    settings: Settings

    def config(self, model: str) -> mc.ModelConfig:
        return text_format.Parse((self.path / model / "config.pbtxt").read_text(), mc.ModelConfig())

    @property
    def encoder_config(self) -> mc.ModelConfig:
        return self.config(self.settings.models.encoder)

    @property
    def runtime(self) -> Runtime:
        """The runtime the live encoder was rendered for: a rollout keeps it."""
        config = self.encoder_config
        declared = config.parameters["runtime"].string_value if "runtime" in config.parameters else ""
        return Runtime.of_encoder_config(config.backend, config.platform, declared)

    @property
    def encoder_takes_text(self) -> bool:
        """Whether the live encoder was rendered to take TEXT (ENCODER_TOKENIZES then): a rollout keeps that too,
        whatever the setting is now, so that the ensembles it leaves in place still match the encoder."""
        return any(tensor.name == self.settings.tensors.text for tensor in self.encoder_config.input)

    @property
    def stable(self) -> int:
        """The version `embed` serves (its encoder step's pinned version): the truth, even mid-promotion."""
        steps = self.config(self.settings.models.embed).ensemble_scheduling.step
        pinned = next(step.model_version for step in steps if step.model_name == self.settings.models.encoder)
        return pinned if pinned > 0 else int(self.encoder_config.parameters["export_version"].string_value or 1)

    @property
    def versions(self) -> list[int]:
        return sorted(self.encoder_config.version_policy.specific.versions) or [self.stable]

    @property
    def canary(self) -> int | None:
        newer = [v for v in self.versions if v > self.stable]
        return max(newer) if newer else None

    def version_dir(self, version: int) -> Path:
        return self.path / self.settings.models.encoder / str(version)

    def manifest(self, version: int) -> Manifest:
        return Manifest.read(self.version_dir(version))

    @contextmanager
    def lock(self):
        """One rollout at a time per repository."""
        with open(self.path.parent / f".{self.path.name}.rollout.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RolloutRefused(f"another rollout holds the lock on {self.path}") from None
            yield

    # ---- rendering aside ------------------------------------------------------------------------------
    def render(self, version_dirs: dict[int, Path], stable: int, runtime: Runtime, out: Path) -> Path:
        """A whole repository for `version_dirs` (version -> directory with manifest and artifact) at `out`."""
        tokenizer_dir = self.path / self.settings.models.tokenizer / "1"
        live_text = self.encoder_takes_text
        serving = replace(self.settings, instances=replace(self.settings.instances, encoder_tokenizes=live_text))
        if encoder_takes_text(serving, runtime) != live_text:
            # The public ensembles stay as they are until promotion: the new encoder must take what they send.
            takes = {True: "takes the text", False: "takes token ids"}
            raise RolloutRefused(f"the live encoder {takes[live_text]}, and the {runtime} runtime would render one that "
                                 f"{takes[not live_text]} (see ENCODER_TOKENIZES in docs/serving.md): the public "
                                 "ensembles would break; serve it from a new repository")
        return write_generation(serving, tokenizer_dir, version_dirs, runtime, out, stable=stable)

    @contextmanager
    def generation(self, versions: list[int], stable: int, runtime: Runtime):
        """Configs for `versions` of this repository, rendered beside it (artifacts are hard links); removed
        after use."""
        target = Path(tempfile.mkdtemp(prefix=".generation-", dir=self.path.parent)) / "repository"
        try:
            yield self.render({v: self.version_dir(v) for v in versions}, stable, runtime, target)
        finally:
            shutil.rmtree(target.parent, ignore_errors=True)


# ---- file transactions ----------------------------------------------------------------------------------
def put_dir(source: Path, target: Path) -> None:
    """Copy a directory beside its target, then rename it into place whole."""
    incoming = target.with_name(f".{target.name}.incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        shutil.copytree(source, incoming, copy_function=lambda a, b: link_or_copy(Path(a), Path(b)))
    except BaseException:  # e.g. the disk filled up: nothing half-copied stays in the live repository
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        incoming.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        incoming.rename(target)


def put_config(source_model_dir: Path, target_model_dir: Path) -> None:
    """Replace one model's config.pbtxt atomically."""
    incoming = target_model_dir / ".config.pbtxt.incoming"
    shutil.copyfile(source_model_dir / "config.pbtxt", incoming)
    incoming.replace(target_model_dir / "config.pbtxt")
