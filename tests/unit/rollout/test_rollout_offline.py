"""The rollout's checks and bookkeeping that need no server: stage refusals, metric windows, log reasons."""
from __future__ import annotations

import json
import shutil

import pytest

from bert_recsys import settings
from bert_recsys.model_repository.render import build_repository
from bert_recsys.rollout.steps import LiveRepository, RolloutRefused, RolloutSettings, _log_tail, stage, status, traffic

S = settings.SETTINGS


@pytest.fixture
def live(export_dir, tmp_path):
    return LiveRepository(build_repository(S, export_dir, "onnx-int8", "embedded", tmp_path / "live"), S)


def copy_export(export_dir, tmp_path, edit) -> object:
    target = shutil.copytree(export_dir / "onnx-fp32", tmp_path / "candidate")
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_stage_adds_the_next_version_beside_the_stable_one(live, export_dir, tmp_path):
    staging, version = stage(live, export_dir / "onnx-fp32", tmp_path / "work", RolloutSettings())
    assert version == 2
    staged = LiveRepository(staging, S)
    assert (staged.stable, staged.versions, staged.canary) == (1, [1, 2], 2)
    assert staged.manifest(2).variant == "onnx-fp32" and staged.manifest(1).variant == "onnx-int8"
    assert (staging / "embed_v2" / "config.pbtxt").exists() and (staging / "score_v1" / "config.pbtxt").exists()
    assert live.versions == [1] and not (live.path / "embed_v2").exists()  # nothing live changed


@pytest.mark.parametrize("edit, refusal", [
    (lambda m: m["gate"].update(passed=False, failures=["spearman ratio 0.9 < 0.998"]), "did not pass the export gate"),
    (lambda m: m["tokenizer"].update(sha256="0" * 64), "another tokenizer"),
    (lambda m: m["encoder"].update(dim=768), "disagree"),
    (lambda m: m["artifact"].update(sha256="0" * 64), "sha256 differs"),
])
def test_stage_refuses_an_export_that_cannot_serve_beside_the_stable_one(live, export_dir, tmp_path, edit, refusal):
    with pytest.raises(RolloutRefused, match=refusal):
        stage(live, copy_export(export_dir, tmp_path, edit), tmp_path / "work", RolloutSettings())


def test_stage_refuses_while_a_canary_runs(live, export_dir, tmp_path):
    staging, _ = stage(live, export_dir / "onnx-fp32", tmp_path / "work", RolloutSettings())
    with pytest.raises(RolloutRefused, match="already a canary"):
        stage(LiveRepository(staging, S), export_dir / "onnx-fp32", tmp_path / "work2", RolloutSettings())


def test_status_without_a_server_lists_versions_and_roles(live, export_dir, tmp_path):
    staging, _ = stage(live, export_dir / "onnx-fp32", tmp_path / "work", RolloutSettings())
    shown = status(LiveRepository(staging, S))
    assert (shown["stable"], shown["canary"]) == (1, 2)
    assert shown["versions"][1]["role"] == "stable" and shown["versions"][2]["role"] == "canary"
    assert shown["versions"][1]["served_by"] == ["embed", "score", "embed_v1", "score_v1"]
    assert shown["versions"][2]["served_by"] == ["embed_v2", "score_v2"]


def test_traffic_is_the_difference_between_two_metric_reads():
    before = {("nv_inference_request_success", "embed"): 100, ("nv_inference_request_failure", "embed"): 1,
              ("nv_inference_request_duration_us", "embed"): 500_000}
    after = {("nv_inference_request_success", "embed"): 190, ("nv_inference_request_failure", "embed"): 11,
             ("nv_inference_request_duration_us", "embed"): 1_000_000, ("nv_inference_request_success", "score"): 7}
    window = traffic(before, after, ["embed"])
    assert (window.requests, window.failures) == (100, 10)
    assert window.failure_rate == pytest.approx(0.1) and window.mean_ms == pytest.approx(5.0)
    assert traffic(before, after, ["score"]).requests == 7
    assert traffic(before, before, ["embed"]).to_json() == {"models": ["embed"], "requests": 0, "failures": 0,
                                                            "failure_rate": 0.0, "mean_ms": 0.0}


def test_the_refusal_quotes_the_servers_reason(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("I1123 starting\n"
                   "| encoder    | 2       | UNAVAILABLE: Internal: RuntimeError: a bug shipped in the new model.py |\n"
                   "| tokenizer  | 1       | READY |\n"
                   "error: creating server: Internal - failed to load all models\n")
    assert _log_tail(log) == "encoder | 2 | UNAVAILABLE: Internal: RuntimeError: a bug shipped in the new model.py"


def test_the_rollout_keeps_the_runtime_the_live_encoder_runs(export_dir, tmp_path):
    from bert_recsys.contracts.runtime import Runtime

    native = LiveRepository(build_repository(S, export_dir, "onnx-fp32", "native", tmp_path / "native"), S)
    assert native.runtime is Runtime.NATIVE
    staging, version = stage(native, export_dir / "onnx-fp16", tmp_path / "work", RolloutSettings())
    staged = LiveRepository(staging, S)
    assert staged.runtime is Runtime.NATIVE and staged.encoder_config.platform == "onnxruntime_onnx"
    assert staged.versions == [1, version]
    # Asked for explicitly, another runtime is rendered instead.
    embedded, _ = stage(native, export_dir / "onnx-fp16", tmp_path / "work2", RolloutSettings(runtime="embedded"))
    assert LiveRepository(embedded, S).runtime is Runtime.EMBEDDED


@pytest.mark.parametrize("live_tokenizes", [True, False])
def test_the_rollout_keeps_whether_the_live_encoder_takes_text_whatever_the_setting_now(export_dir, tmp_path,
                                                                                        live_tokenizes):
    """A rollout swaps in the encoder and its pinned ensembles, and leaves the public ones as they are: the new
    encoder must take what they send it, even when ENCODER_TOKENIZES changed since the repository was built."""
    from dataclasses import replace

    def tokenizing(value):
        return replace(S, instances=replace(S.instances, encoder_tokenizes=value))

    built = build_repository(tokenizing(live_tokenizes), export_dir, "onnx-int8", "embedded", tmp_path / "live")
    live = LiveRepository(built, tokenizing(not live_tokenizes))
    assert live.encoder_takes_text is live_tokenizes
    staging, version = stage(live, export_dir / "onnx-fp32", tmp_path / "work", RolloutSettings())
    staged = LiveRepository(staging, S)
    assert staged.encoder_takes_text is live_tokenizes
    pinned = staged.config(f"embed_v{version}").ensemble_scheduling.step
    assert [step.model_name for step in pinned] == (["encoder"] if live_tokenizes else ["tokenizer", "encoder"])
    assert (staging / "encoder" / str(version) / "tokenizer_model.py").exists() is live_tokenizes
    if live_tokenizes:  # the native runtime's encoder takes token ids: the live `embed` would send it text
        with pytest.raises(RolloutRefused, match="takes the text, and the native runtime would render one that takes "
                                                 "token ids.*public ensembles would break"):
            stage(live, export_dir / "onnx-fp16", tmp_path / "work2", RolloutSettings(runtime="native"))
        assert live.versions == [1] and not (tmp_path / "work2" / "staging").exists()


def test_a_rollout_of_the_rec_family_stages_only_rec_models(export_dir, tmp_path):
    """Two families in one live repository (embed and rec_embed): staging a new rec_encoder version renders the rec
    family alone, and the general family's models are neither staged nor changed."""
    rec = S.for_family("rec")
    path = build_repository(S, export_dir, "onnx-int8", "embedded", tmp_path / "live")
    build_repository(rec, export_dir, "onnx-int8", "embedded", path)
    general_config = (path / "encoder" / "config.pbtxt").read_text()
    live = LiveRepository(path, rec)
    assert (live.stable, live.versions) == (1, [1])
    staging, version = stage(live, export_dir / "onnx-fp32", tmp_path / "work", RolloutSettings())
    staged = {p.name for p in staging.iterdir()}
    assert version == 2 and {"rec_embed_v2", "rec_encoder", "rec_embed", "rec_tokenizer"} <= staged
    assert not staged & {"embed", "encoder", "tokenizer", "score"}
    assert LiveRepository(staging, rec).manifest(2).variant == "onnx-fp32"
    assert (path / "encoder" / "config.pbtxt").read_text() == general_config
    assert LiveRepository(path, S).versions == [1] and status(LiveRepository(path, rec))


def test_the_canary_embeds_the_catalog_before_its_window_or_is_judged_unhealthy(tmp_path):
    """rollout.steps.canary_index: the canary's catalog index is published beside the current one (not switched);
    a canary that fails the embedding gets an unhealthy verdict naming why, and nothing is published."""
    from types import SimpleNamespace

    import numpy as np

    from bert_recsys.client.errors import ServingError
    from bert_recsys.client.index import IndexStore, ItemIndex
    from bert_recsys.rollout.steps import canary_index

    class Admin:
        def metrics(self):  # one failed embedding call on the canary between the two reads
            self.reads = getattr(self, "reads", 0) + 1
            failed = self.reads - 1
            return {("nv_inference_request_failure", "embed_v2"): float(failed)}

    class Client:
        fail = True

        def encoder_info(self, version=None):
            return {"export_version": str(version), "export_variant": "onnx-fp32", "export_manifest_sha256": "b" * 64}

        def embed_many(self, texts, **_):
            if self.fail:
                raise ServingError("infer embed_v2: INTERNAL: this canary fails every call")
            return np.eye(len(texts), 4, dtype=np.float32) + 0.5

    store = IndexStore(tmp_path / "indexes")
    current = ItemIndex(np.array([1, 2, 3]), np.eye(3, 4, dtype=np.float32),
                        {"export_version": "1", "export_manifest_sha256": "a" * 64}, texts=["a", "b", "c"])
    store.switch(store.publish(current))
    live = SimpleNamespace(settings=settings.SETTINGS, stable=1)
    name, verdict = canary_index(live, Admin(), Client(), store, 2)
    assert name is None and not verdict["healthy"]
    assert verdict["reasons"] == ["the canary could not embed the catalog index: infer embed_v2: INTERNAL: this "
                                  "canary fails every call"]
    assert verdict["canary"]["failures"] == 1 and store.names() == [store.current_name()]
    client = Client()
    client.fail = False
    name, verdict = canary_index(live, Admin(), client, store, 2)
    assert verdict is None and name == store.find(2, "b" * 64) and store.current_name() != name
    assert store.load(name).texts == ["a", "b", "c"]
