"""bert-recsys bench gpu: the torch runtime on a GPU, measured in one command that fits one device call.

    bert-recsys bench gpu pack                   # here: build/device/bench, everything the run needs
    bert-recsys bench gpu run --bundle B --out D # on the GPU machine (`make bench-gpu`)
    bert-recsys bench gpu run --smoke ...        # the same code on a CPU, tiny sizes (the CI test)

`run` measures, in this order, and rewrites D/gpu_bench.json after every section (a call that runs out of time
still brings back what it measured); a section that fails records its error and the next one runs:
  machine  GPU, CUDA and torch versions; CPU model and ISA flags
  peak     FP16 tensor-core matmul TFLOP/s measured on this GPU: the denominator of every "fraction of peak"
  gate     torch-fp16 computed here vs PyTorch FP32 reference vectors made by `pack` (transformers, CPU):
           min cosine on the gate sentences and the STS-B dev Spearman ratio
  encoder  encoders/torch_bert.py alone in this process at s128: seq/s over a batch sweep, eager and as a
           CUDA graph, and the fraction of peak
  served   tritonserver with RUNTIME=torch, perf_analyzer over gRPC on `embed` with 128-token texts:
           b1 concurrency 1 (p50, p99), then sentences/s over (batch, concurrency) pairs
  peer     sentence-transformers FP16 `encode` of the same texts, on the same GPU, same run
It needs torch, transformers, sentence-transformers and tokenizers on the machine, the tritonserver and
perf_analyzer of a (repacked) nvidia-pytriton, and nothing of onnx or tritonclient: `pack` renders the model
repository here. docs/gpu.md has the device calls.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings

log = logs.get("loadtest")

BUNDLE = settings.BUILD_DIR / "device" / "bench"
SEQ = 128
# Serving settings for a GPU: big dynamic batches at the encoder, a short wait to fill them, and tokenizer
# instances enough that tokenization does not bind (16 cores on the lent machine).
GPU_SERVING = replace(
    settings.SETTINGS,
    batching=replace(settings.SETTINGS.batching, max_batch_size=256, encoder_queue_delay_us=200),
    instances=replace(settings.SETTINGS.instances, tokenizer=8, encoder_device="gpu"),
)


# ---- pack (here) ---------------------------------------------------------------------------------------
def s128_texts(tokenizer, sentences: list[str], count: int) -> list[str]:
    """`count` texts of SEQ tokens (specials included): text i is the run of real sentences from sentence i on,
    cut to length, so they differ while count <= len(sentences)."""
    texts = []
    for first in range(count):
        ids: list[int] = []
        index = first
        while len(ids) < SEQ - 2:
            ids += tokenizer(sentences[index % len(sentences)], add_special_tokens=False)["input_ids"]
            index += 1
        texts.append(tokenizer.decode(ids[: SEQ - 2]))
    return texts


def stage_package(dest: Path) -> Path:
    """The package as a wheel lays it out (pyproject.toml's package-dir: client/ -> bert_recsys/client), copied
    under dest: the device has no editable install of the checkout, so PYTHONPATH=dest finds bert_recsys."""
    import tomllib

    mapping = tomllib.loads((settings.REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(mapping.items()):
        shutil.copytree(settings.REPO_ROOT / folder, dest / package.replace(".", "/"), ignore=skip, dirs_exist_ok=True)
    return dest


def pack(args) -> int:
    """Renders the GPU repository (torch-fp16) and writes the reference vectors and texts, under args.out."""
    from transformers import AutoTokenizer

    from bert_recsys.export.gate import load_gate_sentences, load_sts
    from bert_recsys.export.onnx_export import load_torch_encoder
    from bert_recsys.export.runners import TorchRunner, embed_texts
    from bert_recsys.export.source import load_source
    from bert_recsys.model_repository.render import build_repository

    out = Path(args.out)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    serving = GPU_SERVING if not args.cpu else replace(
        settings.SETTINGS, instances=replace(settings.SETTINGS.instances, encoder_device="cpu"))
    build_repository(serving, settings.EXPORT_DIR, args.variant, "torch", staging / "repository")
    log.info("rendered the %s repository for the %s", args.variant, serving.instances.encoder_device)
    shutil.copytree(settings.EXPORT_DIR / "tokenizer", staging / "tokenizer")
    stage_package(staging / "site")  # PYTHONPATH on the device (docs/gpu.md)

    tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
    source = load_source(settings.default_model_dir())
    reference = TorchRunner(load_torch_encoder(source))
    gate = load_gate_sentences()[0]
    pairs = load_sts(settings.STSB_DEV)[: args.sts_pairs] if settings.STSB_DEV.exists() else []
    firsts, seconds = [p[0] for p in pairs], [p[1] for p in pairs]
    log.info("PyTorch FP32 reference vectors: %d gate sentences, %d STS-B dev pairs", len(gate), len(pairs))
    embed = lambda texts: embed_texts(reference, tokenizer, texts, source.max_length)  # noqa: E731
    np.savez_compressed(staging / "reference.npz", gate=embed(gate), sts_a=embed(firsts) if pairs else np.zeros((0, 1)),
                        sts_b=embed(seconds) if pairs else np.zeros((0, 1)),
                        gold=np.array([p[2] for p in pairs], dtype=np.float32))
    sentences = firsts + seconds or gate
    texts = s128_texts(tokenizer, sentences, args.texts)
    (staging / "texts.json").write_text(json.dumps({"gate": gate, "sts_a": firsts, "sts_b": seconds, "s128": texts}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("packed %s: %.1f MB", out, size / 1e6)
    print(out)
    return 0


def pack_triton(args) -> int:
    """build/device/triton.tar.xz: nvidia-pytriton's tritonserver cut to what a Python 3.12 machine needs (the
    3.12 stub only, no libpython3.13, an empty `pytriton/__init__.py` so nothing of its client is imported),
    perf_analyzer, and numpy<2 for the stubs (numpy 2 breaks the stub's BYTES tensors). The lent GPU machine
    has no network: this travels in one device call, the bench bundle in the next (64 MiB each)."""
    import subprocess
    import tarfile

    import pytriton

    site_packages = Path(pytriton.__file__).resolve().parents[1]
    root = site_packages / "pytriton" / "tritonserver"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    numpy_dir = out.parent / "numpy-cp312"
    if not (numpy_dir / "numpy").is_dir():
        wheels = out.parent / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "numpy==1.26.4", "--only-binary=:all:",
                        "--python-version", args.python, "--platform", "manylinux_2_17_x86_64", "--no-deps",
                        "-d", str(wheels)], check=True)
        import zipfile

        with zipfile.ZipFile(next(wheels.glob("numpy-1.26.4-*.whl"))) as wheel:
            wheel.extractall(numpy_dir)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = info.name
        if "__pycache__" in name or "libpython3-" in name:
            return None
        if "/python_backend_stubs/" in name and f"/python_backend_stubs/{args.python}" not in name:
            return None
        return info

    partial = out.with_suffix(".partial")
    with tarfile.open(partial, "w:xz", preset=6) as tar:
        empty = tarfile.TarInfo("triton/site/pytriton/__init__.py")
        tar.addfile(empty)
        for part in ("bin", "backends", "caches", "python_backend_stubs"):
            tar.add(root / part, f"triton/site/pytriton/tritonserver/{part}", filter=keep)
        tar.add(site_packages / "nvidia_pytriton.libs", "triton/site/nvidia_pytriton.libs", filter=keep)
        tar.add(Path(sys.executable).parent / "perf_analyzer", "triton/bin/perf_analyzer")
        tar.add(numpy_dir, "triton/stub-site", filter=keep)
    os.replace(partial, out)
    size = out.stat().st_size
    log.info("packed %s: %.1f MiB", out, size / 2**20)
    if size > 60 * 2**20:
        raise SystemExit(f"{out} is {size / 2**20:.1f} MiB: over what one device call carries")
    print(out)
    return 0


# ---- run (there) ---------------------------------------------------------------------------------------
class Results:
    """The JSON file, rewritten whole after every section."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, measure) -> dict | None:
        log.info("%s ...", name)
        started = time.perf_counter()
        try:
            result = measure()
        except Exception as error:  # one broken section must not cost the others' figures
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
            log.error("%s failed: %s", name, result["error"])
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.data["sections"][name] = result
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=2))
        os.replace(partial, self.path)
        log.info("%s done in %.1f s", name, result["seconds"])
        return None if "error" in result else result


def synchronize(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(torch, device, call, seconds: float, min_runs: int = 5) -> list[float]:
    """Seconds per call (device-synchronised), after two warm-up calls, for about `seconds`."""
    for _ in range(2):
        call()
    synchronize(torch, device)
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        call()
        synchronize(torch, device)
        times.append(time.perf_counter() - t0)
    return times


def machine_section(torch, device) -> dict:
    from bert_recsys.contracts.machine import machine

    info = {"cpu": machine(), "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    return info


def peak_section(torch, device, smoke: bool) -> dict:
    size = 512 if smoke else 8192
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = timed(torch, device, lambda: a @ b, seconds=0.5 if smoke else 3.0, min_runs=10)
    return {"matmul": f"{size}^3 {dtype}", "tflops": 2 * size**3 / min(times) / 1e12}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (what Spearman's rho needs with tied gold scores)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho without scipy (the lent machine's image may not have it)."""
    return float(np.corrcoef(average_ranks(np.asarray(a)), average_ranks(np.asarray(b)))[0, 1])


def gate_section(torch, device, bundle: Path, model, tokenizer) -> dict:
    """The FP16 gate on the GPU it serves on: vs PyTorch FP32 vectors computed by `pack`."""
    reference = np.load(bundle / "reference.npz")
    texts = json.loads((bundle / "texts.json").read_text())

    def embed(batch: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(batch), 64):
            encoded = tokenizer(batch[start:start + 64], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")
            with torch.inference_mode():
                out.append(model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device)).float().cpu())
        return torch.cat(out).numpy()

    gate = embed(texts["gate"])
    cosines = np.sum(gate * reference["gate"], axis=1)
    result = {"sentences": len(gate), "cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean()),
              "threshold_cosine_min": 0.999, "dtype": str(next(iter(model.buffers())).dtype)}
    if texts["sts_a"]:
        ours = np.sum(embed(texts["sts_a"]) * embed(texts["sts_b"]), axis=1)
        fp32 = np.sum(reference["sts_a"] * reference["sts_b"], axis=1)
        ratio = spearman(ours, reference["gold"]) / spearman(fp32, reference["gold"])
        result.update(sts_pairs=len(ours), spearman_ratio=float(ratio))
    result["passed"] = result["cosine_min"] >= result["threshold_cosine_min"]
    return result


def encoder_section(torch, device, model, batches: list[int], seconds: float, peak_tflops: float | None) -> dict:
    from bert_recsys.encoders import torch_bert

    flops = torch_bert.flops_per_sequence(model.config, SEQ)
    rows = []
    for batch in batches:
        ids = torch.randint(1000, 29000, (batch, SEQ), device=device)
        mask = torch.ones_like(ids)
        row = {"batch": batch}
        with torch.inference_mode():
            eager = statistics.median(timed(torch, device, lambda: model(ids, mask), seconds))
        row["eager_seq_per_s"] = batch / eager
        if device.type == "cuda":
            graph, _ = torch_bert.capture(model, ids, mask)
            row["graph_seq_per_s"] = batch / statistics.median(timed(torch, device, graph.replay, seconds))
        best = max(row.get("graph_seq_per_s", 0), row["eager_seq_per_s"])
        row["tflops"] = best * flops / 1e12
        if peak_tflops:
            row["fraction_of_peak"] = row["tflops"] / peak_tflops
        rows.append(row)
        log.info("encoder b%d: %.0f seq/s", batch, best)
    top = max(rows, key=lambda r: max(r.get("graph_seq_per_s", 0), r["eager_seq_per_s"]))
    return {"seq": SEQ, "gflop_per_sequence": flops / 1e9, "rows": rows, "best": top}


def served_section(bundle: Path, out: Path, perf_analyzer: Path | None, points: list[tuple[int, int]],
                   window_s: float, texts: list[str], stub_pythonpath: str = "") -> dict:
    from bench.perf import run_perf_analyzer
    from bench.served import serve

    started = time.perf_counter()
    paths = (str(Path(stub_pythonpath).resolve()),) if stub_pythonpath else ()
    with serve(bundle / "repository", out / "triton.log", stub_pythonpath=paths) as server:
        ready_s = time.perf_counter() - started
        url = server.server.grpc_url
        data = [{"TEXT": {"content": [text], "shape": [1]}} for text in texts[:256]]
        b1 = run_perf_analyzer(url, "embed", 1, data, 1, window_s, perf_analyzer)
        rows = []
        for batch, concurrency in points:
            row = run_perf_analyzer(url, "embed", batch, data, concurrency, window_s, perf_analyzer)
            row["sentences_per_s"] = row["infer_per_s"]  # perf_analyzer counts inferences = rows of the batch
            rows.append(row)
            log.info("embed b%d c%d: %.0f sentences/s, p50 %.2f ms", batch, concurrency, row["sentences_per_s"],
                     row["p50_ms"])
        # The tokenizer step alone, at the largest point: whether tokenization is what binds `embed`.
        batch, concurrency = max(points)
        tokenizer = run_perf_analyzer(url, settings.SETTINGS.models.tokenizer, batch, data, concurrency, window_s,
                                      perf_analyzer)
        log.info("tokenizer alone b%d c%d: %.0f sentences/s", batch, concurrency, tokenizer["infer_per_s"])
    return {"ready_s": ready_s, "b1": b1, "rows": rows, "best_sentences_per_s": max(r["sentences_per_s"] for r in rows),
            "tokenizer_alone": tokenizer}


def sentence_transformers_dir(torch, bundle: Path, target: Path) -> Path:
    """A sentence-transformers model directory (BERT, mean or CLS pooling, Normalize) with the served weights,
    so the peer computes the same function from the same numbers."""
    from transformers import BertConfig, BertModel

    from bert_recsys.encoders import torch_bert

    config, weights = torch_bert.read(bundle / "repository" / "encoder" / "1" / "model.safetensors")
    hf = BertConfig(vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
                    num_attention_heads=config.heads, intermediate_size=config.intermediate,
                    max_position_embeddings=config.max_positions, layer_norm_eps=config.layer_norm_eps,
                    hidden_act=config.activation)
    model = BertModel(hf, add_pooling_layer=False)
    model.load_state_dict({k: v.float() for k, v in torch_bert.to_transformers_state(weights, config).items()})
    model.save_pretrained(target)
    for file in (bundle / "tokenizer").iterdir():
        shutil.copy(file, target / file.name)
    (target / "1_Pooling").mkdir(exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": config.hidden, "pooling_mode_mean_tokens": config.pooling == "mean",
        "pooling_mode_cls_token": config.pooling == "cls"}))
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    return target


def peer_section(torch, device, bundle: Path, work: Path, texts: list[str], model, tokenizer) -> dict:
    from sentence_transformers import SentenceTransformer

    peer = SentenceTransformer(str(sentence_transformers_dir(torch, bundle, work / "st-model")), device=str(device))
    if device.type == "cuda":
        peer = peer.half()
    peer.encode(texts[:64], batch_size=64, show_progress_bar=False)  # warm-up
    synchronize(torch, device)
    started = time.perf_counter()
    vectors = peer.encode(texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=True,
                          show_progress_bar=False)
    synchronize(torch, device)
    elapsed = time.perf_counter() - started
    encoded = tokenizer(texts[:32], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        ours = model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device)).float().cpu().numpy()
    agreement = float(np.min(np.sum(ours * vectors[:32].astype(np.float32), axis=1)))
    return {"texts": len(texts), "sentences_per_s": len(texts) / elapsed, "batch_size": 256,
            "dtype": "fp16" if device.type == "cuda" else "fp32", "min_cosine_to_torch_runtime": agreement}


def run(args) -> int:
    import torch

    bundle, out = Path(args.bundle), Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:  # said before transformers' import (~10 s on a 2-core CPU)
        raise SystemExit("no CUDA device here: `run --smoke` runs the same code on the CPU at tiny sizes")
    from transformers import AutoTokenizer

    from bert_recsys.encoders import torch_bert

    smoke = args.smoke
    results = Results(out / "gpu_bench.json")
    results.data.update(bundle=str(bundle), smoke=smoke, device=str(device))
    texts = json.loads((bundle / "texts.json").read_text())["s128"]
    tokenizer = AutoTokenizer.from_pretrained(bundle / "tokenizer")
    weights = bundle / "repository" / "encoder" / "1" / "model.safetensors"
    model = torch_bert.load(weights, device, None if device.type == "cuda" else torch.float32)

    results.section("machine", lambda: machine_section(torch, device))
    peak = results.section("peak", lambda: peak_section(torch, device, smoke))
    results.section("gate", lambda: gate_section(torch, device, bundle, model, tokenizer))
    batches = [1, 4] if smoke else [1, 8, 32, 64, 128, 256, 512, 1024]
    results.section("encoder", lambda: encoder_section(torch, device, model, batches, 0.3 if smoke else 2.0,
                                                       peak and peak["tflops"]))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the server's encoder gets the GPU's memory
    points = [(8, 2)] if smoke else [(32, 16), (32, 64), (64, 64), (128, 32)]
    from bert_recsys import env

    chosen = args.perf_analyzer or env.PERF_ANALYZER.get() or shutil.which("perf_analyzer")
    perf_analyzer = Path(chosen) if chosen else None
    results.section("served", lambda: served_section(bundle, out, perf_analyzer, points, 1.0 if smoke else 5.0, texts,
                                                     args.stub_pythonpath))
    model = torch_bert.load(weights, device, None if device.type == "cuda" else torch.float32)
    results.section("peer", lambda: peer_section(torch, device, bundle, out, texts[:64] if smoke else texts * 20,
                                                 model, tokenizer))
    shutil.rmtree(out / "st-model", ignore_errors=True)
    summary = summarize(results.data["sections"])
    results.data["summary"] = summary
    results.section("summary", lambda: dict(summary))
    image = plot(results.data["sections"], out / "gpu_bench.png")
    (out / "gpu_bench.md").write_text("\n".join(["# GPU benchmark", "", *markdown(results.data, image and image.name)]))
    print(json.dumps(summary, indent=2))
    return 0 if all("error" not in s for s in results.data["sections"].values()) else 1


def summarize(sections: dict) -> dict:
    """The issue's goals next to the figures (None where a section failed)."""
    get = lambda name, *keys: _dig(sections.get(name, {}), keys)  # noqa: E731
    encoder_best = get("encoder", "best")
    best_encoder = max(encoder_best.get("graph_seq_per_s", 0), encoder_best.get("eager_seq_per_s", 0)) if encoder_best else None
    return {
        "embed_sentences_per_s": get("served", "best_sentences_per_s"), "goal_embed_sentences_per_s": 50_000,
        "encoder_seq_per_s": best_encoder, "goal_encoder_seq_per_s": 120_000,
        "encoder_fraction_of_peak": encoder_best.get("fraction_of_peak") if encoder_best else None,
        "b1_p50_ms": get("served", "b1", "p50_ms"), "goal_b1_p50_ms": 1.5,
        "tokenizer_sentences_per_s": get("served", "tokenizer_alone", "infer_per_s"),
        "peer_sentence_transformers_per_s": get("peer", "sentences_per_s"),
        "fp16_gate_cosine_min": get("gate", "cosine_min"), "peak_tflops": get("peak", "tflops"),
    }


def plot(sections: dict, path: Path) -> Path | None:
    """Encoder seq/s over the batch sweep (eager, CUDA graph), with embed end to end and the peer as lines."""
    rows = _dig(sections, ("encoder", "rows"))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    batches = [r["batch"] for r in rows]
    ax.plot(batches, [r["eager_seq_per_s"] for r in rows], "o-", label="encoder, eager")
    if all("graph_seq_per_s" in r for r in rows):
        ax.plot(batches, [r["graph_seq_per_s"] for r in rows], "s-", label="encoder, CUDA graph")
    for value, label, style in ((_dig(sections, ("served", "best_sentences_per_s")), "embed end to end (Triton)", "--"),
                                (_dig(sections, ("peer", "sentences_per_s")), "sentence-transformers encode", ":")):
        if value:
            ax.axhline(value, linestyle=style, color="grey" if style == ":" else "black", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (128 tokens)")
    ax.set_ylabel("sequences / s")
    ax.set_title(str(_dig(sections, ("machine", "gpu")) or _dig(sections, ("machine", "cpu"))))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(data: dict, image: str | None = None) -> list[str]:
    """The report's GPU section from one run's JSON."""
    sections, summary = data["sections"], data.get("summary") or summarize(data["sections"])
    machine = sections.get("machine", {})
    fmt = lambda value, spec: "not measured" if value is None else format(value, spec)  # noqa: E731
    lines = [f"Measured {data['started']} on {machine.get('gpu', 'no GPU')} (CUDA {machine.get('cuda')}, torch "
             f"{machine.get('torch')}); host {machine.get('cpu')}." + (" **Smoke run: tiny sizes, not figures.**"
                                                                       if data.get("smoke") else ""), "",
             "| figure | measured | goal |", "|---|---|---|",
             f"| `embed` end to end, sentences/s at 128 tokens | {fmt(summary['embed_sentences_per_s'], ',.0f')} | >= 50,000 |",
             f"| encoder alone, seq/s at 128 tokens | {fmt(summary['encoder_seq_per_s'], ',.0f')} | >= 120,000 |",
             f"| encoder, fraction of measured FP16 peak ({fmt(summary['peak_tflops'], '.0f')} TFLOP/s) | "
             f"{fmt(summary['encoder_fraction_of_peak'], '.1%')} | |",
             f"| `embed` b1 p50 ms | {fmt(summary['b1_p50_ms'], '.2f')} | <= 1.5 |",
             f"| tokenizer step alone, sentences/s | {fmt(summary['tokenizer_sentences_per_s'], ',.0f')} | "
             "above `embed`'s, or it binds |",
             f"| sentence-transformers FP16 `encode`, sentences/s (peer) | "
             f"{fmt(summary['peer_sentence_transformers_per_s'], ',.0f')} | |",
             f"| torch-fp16 on this GPU, min cosine to PyTorch FP32 | {fmt(summary['fp16_gate_cosine_min'], '.6f')} | "
             f">= 0.999 |", ""]
    failed = [f"{name}: {section['error']}" for name, section in sections.items() if "error" in section]
    lines += [f"Failed sections: {'; '.join(failed)}", ""] if failed else []
    return lines + ([f"![GPU throughput]({image})", ""] if image else [])


def _dig(data: dict, keys: tuple):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="render the GPU repository and the reference data (run here)")
    p.add_argument("--variant", default="torch-fp16")
    p.add_argument("--out", type=Path, default=BUNDLE)
    p.add_argument("--texts", type=int, default=1024, help="distinct 128-token texts")
    p.add_argument("--sts-pairs", type=int, default=1500)
    p.add_argument("--cpu", action="store_true", help="render for the CPU (the smoke test)")
    t = commands.add_parser("pack-triton", help="tritonserver + perf_analyzer + numpy<2 for the device (run here)")
    t.add_argument("--out", type=Path, default=BUNDLE.parent / "triton.tar.xz")
    t.add_argument("--python", default="3.12", help="the device's Python (its stub is the one kept)")
    r = commands.add_parser("run", help="measure (on the GPU machine)")
    r.add_argument("--bundle", type=Path, default=BUNDLE)
    r.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "gpu")
    r.add_argument("--perf-analyzer", default=None,
                   help="the binary (default: $PERF_ANALYZER, then PATH, then beside this Python)")
    r.add_argument("--stub-pythonpath", default="", help="put first on the Triton stubs' path (numpy<2)")
    r.add_argument("--smoke", action="store_true", help="tiny sizes; allowed on a CPU")
    args = parser.parse_args(argv)
    logs.configure()
    sys.stdout.reconfigure(line_buffering=True)
    return {"pack": pack, "pack-triton": pack_triton, "run": run}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
