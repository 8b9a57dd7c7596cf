"""bert-recsys bench peers (`make bench-peers`): the embedding stacks users pick, measured beside ours in one run.

Each peer gets a venv of its own under build/peers/<venv> (pinned by bench/peers/requirements-<venv>.txt; built
once, rebuilt when the file changes) and loads the local model folder offline:
- sentence-transformers: torch, onnx, onnx qint8 (the dynamic-INT8 config for this CPU's ISA), openvino (its
  default precision: BF16 where the CPU computes it), openvino static INT8 (`export_static_quantized_openvino_model`,
  calibrated on STS-B *train*);
- fastembed, on the qint8 ONNX file of the step before;
- infinity-emb as a server, torch and optimum engines (`--pooling-method mean`), over HTTP;
- this project: every gated CPU variant bare, in this process; `embed` over gRPC and the gateway's
  `/v1/embeddings` over HTTP, both serving the variant `make serve` serves here.

Every row is timed the same way: p50 of calls from text to vectors, tokenization included, at b1 (one text of 16
tokens) and b32 (32 distinct texts of 128 tokens), one caller, all of the machine's threads. Quality is scored here
on each peer's own vectors: STS-B dev *confirmation* half Spearman as a ratio to sentence-transformers' torch FP32,
and batch invariance (the gate sentences alone vs in padded batches of 32, min cosine). A peer that cannot be
built or run is listed with why; it never stops the others.

Rows run one after another, minutes apart, and this machine drifts by 10-30% over minutes. So the comparisons the
goals make are measured once more at the end, interleaved, the peer kept loaded (its worker, or its server) and
blocks alternating (50 calls at b1, 6 at b32) so that the drift falls on both alike (`--duel-rounds`, 0: none):
`embed` over gRPC against the fastest in-process peer at b1 and against the fastest peer holding the gates at b32;
the gateway against the faster infinity-emb engine at b32 and at b1.

Writes build/reports/peers.json and peers.png; the table names the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings

log = logs.get("loadtest")
HERE = Path(__file__).resolve().parent
WORK = settings.BUILD_DIR / "peers"
B1_TOKENS, B32_TOKENS, B32 = 16, 128, 32
# The duels: calls per block and the first calls of each block not counted (the other side's threads may still
# spin), per batch; and a pause between blocks so that they go to sleep.
DUEL_BLOCKS = {"b1": (50, 5), "b32": (6, 1)}
DUEL_PAUSE_S = 0.2


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str            # "worker": bench/peers/worker.py in the venv; "infinity": a server; "project": ours
    venv: str = ""
    label: str = ""
    engine: str = ""     # infinity's --engine


PEERS = (
    Peer("st-torch", "worker", "st", "sentence-transformers, torch FP32 (the quality reference)"),
    Peer("st-onnx", "worker", "st", "sentence-transformers, ONNX Runtime FP32"),
    Peer("st-onnx-qint8", "worker", "st", "sentence-transformers, ONNX Runtime dynamic INT8 for this ISA"),
    Peer("st-openvino", "worker", "st", "sentence-transformers, OpenVINO default precision"),
    Peer("st-openvino-int8", "worker", "st", "sentence-transformers, OpenVINO static INT8"),
    Peer("fastembed", "worker", "fastembed", "fastembed on st-onnx-qint8's file"),
    Peer("infinity-torch", "infinity", "infinity", "infinity-emb server, torch engine, HTTP", "torch"),
    Peer("infinity-optimum", "infinity", "infinity", "infinity-emb server, optimum engine, HTTP", "optimum"),
    Peer("project-bare", "project", label="bert-recsys, each gated CPU variant in process"),
    Peer("project-embed", "project", label="bert-recsys `embed` over gRPC (the served variant)"),
    Peer("project-gateway", "project", label="bert-recsys gateway /v1/embeddings over HTTP (the served variant)"),
)
PEER_NAMES = tuple(peer.name for peer in PEERS)


# -- pure parts: texts, parsing, scoring, the table ----------------------------------------------------------------

def texts_of_tokens(tokenizer, paragraphs: list[str], tokens: int, count: int) -> list[str]:
    """`count` distinct texts that tokenize to exactly `tokens` ids (special tokens included), cut from the
    paragraphs joined end to end from a different starting point each."""
    found: list[str] = []
    for start in range(len(paragraphs)):
        joined = " ".join(paragraphs[start:] + paragraphs[:start])
        ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
        for cut in range(tokens - 2, tokens - 6, -1):  # decoding can merge or split a piece: try a little shorter
            text = tokenizer.decode(ids[:cut])
            if len(tokenizer(text)["input_ids"]) == tokens and text not in found:
                found.append(text)
                break
        if len(found) == count:
            return found
    raise ValueError(f"could make only {len(found)} distinct texts of {tokens} tokens from {len(paragraphs)} paragraphs")


def parse_result(text: str) -> dict:
    """A worker's result file: per-call seconds at b1 and b32, versions. Raises ValueError naming what is wrong."""
    try:
        result = json.loads(text)
    except ValueError as error:
        raise ValueError(f"the peer's result is not JSON: {error}") from None
    for key in ("peer", "b1_s", "b32_s", "versions", "details", "load_s"):
        if key not in result:
            raise ValueError(f"the peer's result lacks {key!r}")
    for key in ("b1_s", "b32_s"):
        values = result[key]
        if not values or not all(isinstance(v, (int, float)) and v > 0 for v in values):
            raise ValueError(f"the peer's {key} holds no positive timings: {values!r:.80}")
    return result


def speed(b1_s: list[float], b32_s: list[float]) -> dict:
    b1, b32 = float(np.median(b1_s)), float(np.median(b32_s))
    return {"b1_p50_ms": 1000 * b1, "b32_p50_ms": 1000 * b32, "b32_texts_per_s": B32 / b32,
            "b1_runs": len(b1_s), "b32_runs": len(b32_s)}


def quality(sts: np.ndarray, gate_batched: np.ndarray, gate_alone: np.ndarray, pairs, reference_halves: dict | None
            ) -> dict:
    """STS-B halves' Spearman (and the confirmation half's ratio to the reference), batch invariance."""
    from bert_recsys.export.gate import row_cosines, spearman_by_half

    n = len(pairs)
    halves = spearman_by_half(sts[:n], sts[n:], pairs)
    figures = {"spearman_confirmation": halves["confirmation"], "spearman_selection": halves["selection"],
               "batch_invariance_min_cosine": float(np.min(row_cosines(gate_alone, gate_batched)))}
    if reference_halves:
        figures["spearman_ratio_confirmation"] = halves["confirmation"] / reference_halves["confirmation"]
    return figures


def fastest_holding_gates(rows: list[dict], spearman: float = 0.9985, invariance: float | None = None) -> dict | None:
    """The fastest peer (any row but ours) at b32 among those whose vectors hold the project's gates: the issue's
    STS-B confirmation goal and the gate's batch invariance (export.gate.BATCH_INVARIANCE)."""
    from bert_recsys.export.gate import BATCH_INVARIANCE

    invariance = BATCH_INVARIANCE if invariance is None else invariance
    holding = [row for row in rows if row.get("kind") != "project" and "b32_p50_ms" in row
               and row.get("spearman_ratio_confirmation", 0) >= spearman
               and row.get("batch_invariance_min_cosine", 0) >= invariance]
    return min(holding, key=lambda row: row["b32_p50_ms"]) if holding else None


# The sequential rows drift by 10-30% over minutes (docs/benchmarks.md): which in-process peer is fastest at b1 is
# settled interleaved, among those within this factor of the fastest sequential row (at most this many).
B1_CONTENDERS_WITHIN, B1_CONTENDERS_MOST = 1.5, 3


def in_process_b1_contenders(rows: list[dict], within: float = B1_CONTENDERS_WITHIN,
                             most: int = B1_CONTENDERS_MOST) -> list[dict]:
    """The in-process peers (workers: no server, not ours) whose b1 p50 is within `within` x the fastest's, fastest
    first, at most `most`: each gets a b1 duel, since one sequential row cannot say which is fastest."""
    measured = sorted((row for row in rows if row.get("kind") == "worker" and "b1_p50_ms" in row and "error" not in row),
                      key=lambda row: row["b1_p50_ms"])
    return [row for row in measured if row["b1_p50_ms"] <= within * measured[0]["b1_p50_ms"]][:most] if measured else []


def b1_verdict(duels: list[dict]) -> dict | None:
    """Of `embed`'s b1 duels, the one against the peer that was fastest interleaved, and the largest gap of all
    (the strictest reading): {"peer", "gap_ms", "strictest_peer", "strictest_gap_ms"}; None without one."""
    measured = [d for d in duels if d.get("ours") == "embed" and d.get("batch") == "b1" and "error" not in d]
    if not measured:
        return None
    fastest = min(measured, key=lambda d: d["peer_ms"])
    strictest = max(measured, key=lambda d: d["gap_ms"])
    return {"peer": fastest["peer"], "peer_ms": fastest["peer_ms"], "ours_ms": fastest["ours_ms"],
            "gap_ms": fastest["gap_ms"], "strictest_peer": strictest["peer"], "strictest_gap_ms": strictest["gap_ms"],
            "duels": len(measured)}


def duel_summary(our_blocks: list[list[float]], peer_blocks: list[list[float]], settle: int) -> dict:
    """Interleaved blocks (seconds per call; ours, the peer's) -> medians in ms over all counted calls, the gap, the
    ratio, and each round's medians. A block's first `settle` calls are not counted."""
    if not our_blocks or len(our_blocks) != len(peer_blocks):
        raise ValueError(f"the duel needs as many blocks on each side: {len(our_blocks)} and {len(peer_blocks)}")
    if any(len(block) <= settle for block in our_blocks + peer_blocks):
        raise ValueError(f"every block needs more than the {settle} calls left out")
    ours = [t for block in our_blocks for t in block[settle:]]
    peer = [t for block in peer_blocks for t in block[settle:]]
    summary = {"ours_ms": 1000 * float(np.median(ours)), "peer_ms": 1000 * float(np.median(peer)),
               "calls_each": len(ours), "rounds": len(our_blocks),
               "per_round": [{"ours_ms": 1000 * float(np.median(a[settle:])), "peer_ms": 1000 * float(np.median(b[settle:]))}
                             for a, b in zip(our_blocks, peer_blocks)]}
    summary["gap_ms"] = summary["ours_ms"] - summary["peer_ms"]
    summary["ours_over_peer"] = summary["ours_ms"] / summary["peer_ms"]
    return summary


def duels_to_run(rows: list[dict]) -> list[tuple[str, str, Peer]]:
    """What the goals compare, against this run's rows: `embed` at b1 with each in-process peer that may be the
    fastest (`in_process_b1_contenders`), `embed` at b32 with the fastest peer holding the gates, the gateway at b32
    and b1 with the faster infinity-emb engine at b32.
    -> [(ours, batch, peer)], leaving out an opponent this run could not measure."""
    by_name = {peer.name: peer for peer in PEERS}
    infinity = [row for row in rows if row.get("kind") == "infinity" and "b32_p50_ms" in row and "error" not in row]
    faster_infinity = min(infinity, key=lambda row: row["b32_p50_ms"]) if infinity else None
    wanted = [("embed", "b1", row) for row in in_process_b1_contenders(rows)]
    wanted += [("embed", "b32", fastest_holding_gates(rows)), ("gateway", "b32", faster_infinity),
               ("gateway", "b1", faster_infinity)]
    return [(ours, batch, by_name[row["peer"]]) for ours, batch, row in wanted
            if row is not None and by_name.get(row["peer"]) and by_name[row["peer"]].kind in ("worker", "infinity")]


def table(rows: list[dict], machine_line: str) -> str:
    lines = [f"Embedding stacks, all-MiniLM-L6-v2, text in, vectors out, p50, one caller; {machine_line}",
             f"{'row':<38}{'b32 ms':>9}{'texts/s':>9}{'b1 ms':>8}{'STS conf.':>11}{'invariance':>12}"]
    for row in rows:
        if "b32_p50_ms" not in row:
            lines.append(f"{row['row']:<38}not run: {row.get('error', '?')}")
            continue
        ratio = row.get("spearman_ratio_confirmation")
        lines.append(f"{row['row']:<38}{row['b32_p50_ms']:>9.1f}{row['b32_texts_per_s']:>9.0f}{row['b1_p50_ms']:>8.2f}"
                     f"{'-' if ratio is None else format(ratio, '.5f'):>11}"
                     f"{row.get('batch_invariance_min_cosine', float('nan')):>12.6f}")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if "b32_p50_ms" in row]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(measured) + 1.8))
    names = [row["row"] for row in measured]
    for axis, key, label in ((axes[0], "b32_p50_ms", "b32 x 128 tokens, p50 ms"), (axes[1], "b1_p50_ms", "b1 x 16 tokens, p50 ms")):
        values = [row[key] for row in measured]
        colors = ["tab:orange" if row["kind"] == "project" else "tab:blue" for row in measured]
        axis.barh(names, values, color=colors)
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:.1f}" if value >= 10 else f" {value:.2f}", va="center", fontsize=8)
        axis.set_xlabel(label)
        axis.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- venvs ---------------------------------------------------------------------------------------------------------

def venv_python(name: str) -> Path:
    return WORK / name / "bin" / "python"


BROKEN_VENVS: dict[str, str] = {}  # this run's failed installs: each is tried once, not once per peer


def ensure_venv(name: str) -> Path:
    """build/peers/<name>, installed from requirements-<name>.txt; reused while the file is unchanged."""
    if name in BROKEN_VENVS:
        raise RuntimeError(BROKEN_VENVS[name])
    requirements = HERE / f"requirements-{name}.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = WORK / name / ".installed"
    if stamp.exists() and stamp.read_text().strip() == digest and venv_python(name).exists():
        return venv_python(name)
    log.info("building the %s venv under %s (pip, a few minutes)", name, WORK / name)
    shutil.rmtree(WORK / name, ignore_errors=True)
    if name == "st":  # build/peers/work holds what its exporters wrote (ONNX, qint8, OpenVINO INT8): redo them too
        shutil.rmtree(WORK / "work", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(WORK / name)], check=True)
    install = subprocess.run([str(venv_python(name)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "-r", str(requirements)], capture_output=True, text=True)
    if install.returncode != 0:
        BROKEN_VENVS[name] = f"pip could not install {requirements.name}: {install.stderr.strip()[-400:]}"
        raise RuntimeError(BROKEN_VENVS[name])
    stamp.write_text(digest)
    return venv_python(name)


# -- running the peers ---------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    b1: list[str]
    b32: list[str]
    sts_pairs: list
    gate: list[str]
    calibration: list[str]
    runs_b1: int
    runs_b32: int
    model_dir: Path
    vectors: dict = field(default_factory=dict)

    @property
    def sts_texts(self) -> list[str]:
        return [a for a, _, _ in self.sts_pairs] + [b for _, b, _ in self.sts_pairs]


def worker_command(python: Path, peer: Peer, inputs: Inputs, folder: Path, **request) -> tuple[list[str], dict]:
    """Writes the worker's request into `folder` -> (its command line, its environment: offline, single-threaded
    tokenizers, none of this project's path)."""
    request = {"peer": peer.name, "model": str(inputs.model_dir), "work": str(WORK / "work"), "b1": inputs.b1,
               "b32": inputs.b32, "calibration": inputs.calibration, **request}
    (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return [str(python), str(HERE / "worker.py"), str(folder / "request.json")], env


def failure_line(log_text: str, limit: int = 240) -> str:
    """What a failed worker's log says went wrong: the exception line of its last traceback ("ValueError: ...", the
    first unindented line after "Traceback (most recent call last):"), else its last line (a bare SystemExit's
    message is printed alone). A message can run for pages (a list of every model type), so the start is kept."""
    lines = [line for line in log_text.strip().splitlines() if line.strip()]
    if not lines:
        return "(its log is empty)"
    text = lines[-1]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        after = [line for line in lines[starts[-1] + 1:] if not line[:1].isspace()]
        if after:
            text = after[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_worker(peer: Peer, inputs: Inputs, out: Path, timeout_s: float) -> dict:
    python = ensure_venv(peer.venv)
    folder = out / peer.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command, env = worker_command(python, peer, inputs, folder, out=str(folder / "result.json"),
                                  sts=inputs.sts_texts, gate=inputs.gate, runs_b1=inputs.runs_b1,
                                  runs_b32=inputs.runs_b32)
    with open(folder / "worker.log", "w") as log_file:
        done = subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s,
                              cwd=folder)
    if done.returncode != 0:
        raise RuntimeError(f"exited {done.returncode}: {failure_line((folder / 'worker.log').read_text(errors='replace'))} "
                           f"(log: {folder / 'worker.log'})")
    result = parse_result((folder / "result.json").read_text(encoding="utf-8"))
    vectors = {name: np.load(folder / f"{name}.npy") for name in ("sts", "gate_batched", "gate_alone")}
    return {**speed(result["b1_s"], result["b32_s"]), "versions": result["versions"], "details": result["details"],
            "load_s": result["load_s"], "_vectors": vectors}


def interleave(ours, theirs, texts: list[str], batch: str, rounds: int, timeout_s: float, label: str) -> dict:
    """`ours` (texts -> vectors) and `theirs` (a number of calls -> their seconds) in alternating blocks."""
    from bench.peers.worker import time_calls

    calls, settle = DUEL_BLOCKS[batch]
    time_calls(ours, texts, 2 * settle + 2)
    theirs(2 * settle + 2)
    our_blocks, their_blocks = [], []
    started = time.monotonic()
    for round_ in range(rounds):
        our_blocks.append(time_calls(ours, texts, calls, warmup=0))
        time.sleep(DUEL_PAUSE_S)
        their_blocks.append(theirs(calls))
        time.sleep(DUEL_PAUSE_S)
        log.info("%s round %d/%d: %.2f against %.2f ms", label, round_ + 1, rounds,
                 1000 * np.median(our_blocks[-1][settle:]), 1000 * np.median(their_blocks[-1][settle:]))
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the duel took over {timeout_s:.0f} s")
    return duel_summary(our_blocks, their_blocks, settle)


@contextlib.contextmanager
def blocks_from(command: list[str], env: dict, folder: Path, batch: str, timeout_s: float, name: str):
    """A worker process speaking `worker.duel`'s protocol on stdin/stdout (its stderr to folder/worker.log): yields
    (a number of calls -> their seconds). A worker that hangs is killed after `timeout_s` (its end is then the
    error); the worker is always ended and its pipes closed."""
    with open(folder / "worker.log", "w") as log_file:
        worker = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                  text=True, cwd=folder)
        watchdog = threading.Timer(timeout_s, worker.kill)
        watchdog.start()
        try:
            def answer() -> str:
                line = worker.stdout.readline()
                if not line:
                    reason = failure_line((folder / "worker.log").read_text(errors="replace"))
                    raise RuntimeError(f"the {name} worker ended (exit {worker.poll()}, killed after "
                                       f"{timeout_s:.0f} s if it hung): {reason} (log: {folder / 'worker.log'})")
                return line

            if answer().strip() != "ready":
                raise RuntimeError(f"the {name} worker did not say it was ready")

            def blocks(calls: int) -> list[float]:
                worker.stdin.write(f"{batch} {calls}\n")
                worker.stdin.flush()
                return json.loads(answer())

            yield blocks
        finally:
            watchdog.cancel()
            with contextlib.suppress(OSError):
                worker.stdin.close()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            worker.stdout.close()


@contextlib.contextmanager
def worker_blocks(peer: Peer, inputs: Inputs, out: Path, batch: str, timeout_s: float):
    """A peer's worker kept loaded (`worker.py` with "duel"): yields (a number of calls -> their seconds)."""
    python = ensure_venv(peer.venv)
    folder = out / f"duel-{batch}-{peer.name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command, env = worker_command(python, peer, inputs, folder, duel=True)
    with blocks_from(command, env, folder, batch, timeout_s, peer.name) as blocks:
        yield blocks


def run_duel(ours_name: str, ours, peer: Peer, batch: str, inputs: Inputs, out: Path, rounds: int,
             timeout_s: float) -> dict:
    """`ours` (our served path: texts -> vectors) against `peer`, kept loaded, in alternating blocks of `batch`."""
    from bench.peers.worker import time_calls

    texts = {"b1": inputs.b1, "b32": inputs.b32}[batch]
    label = f"{batch} duel, {ours_name} against {peer.name}"
    retries_before = getattr(ours, "retries", 0)
    if peer.kind == "worker":
        with worker_blocks(peer, inputs, out, batch, timeout_s) as theirs:
            summary = interleave(ours, theirs, texts, batch, rounds, timeout_s, label)
    elif peer.kind == "infinity":
        with infinity_server(peer, inputs, out, timeout_s, folder=out / f"duel-{batch}-{peer.name}") as server:
            summary = interleave(ours, lambda calls: time_calls(server, texts, calls, warmup=0), texts, batch, rounds,
                                 timeout_s, label)
            summary["peer_http_retries"] = server.retries
    else:
        raise ValueError(f"no duel against {peer.name} ({peer.kind})")
    if hasattr(ours, "retries"):
        summary["ours_http_retries"] = ours.retries - retries_before
    return {"ours": ours_name, "peer": peer.name, "batch": batch, **summary}


class HttpEmbeddings:
    """POST {input: [...]} to an OpenAI-style /embeddings route over one keep-alive connection."""

    def __init__(self, port: int, path: str, model: str, key: str = ""):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.path, self.model = path, model
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.retries = 0  # calls sent again on a new connection (their time includes the reconnect)

    def __call__(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"model": self.model, "input": list(texts), "encoding_format": "float"})
        try:
            self.connection.request("POST", self.path, body, self.headers)
            response = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed the idle keep-alive connection (uvicorn does after 5 s, e.g. while another server
            # starts): once more on a new one, as HTTP clients do.
            self.connection.close()
            self.retries += 1
            self.connection.request("POST", self.path, body, self.headers)
            response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {self.path}: HTTP {response.status}: {payload[:200]!r}")
        data = sorted(json.loads(payload)["data"], key=lambda item: item["index"])
        vectors = np.array([item["embedding"] for item in data], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def close(self) -> None:
        self.connection.close()


def measure_in_process(embed, inputs: Inputs) -> dict:
    """The worker's protocol, run here on a callable texts -> vectors (a server's client or a bare runner)."""
    from bench.peers.worker import embed_in_batches, time_calls

    b1 = time_calls(embed, inputs.b1, inputs.runs_b1)
    b32 = time_calls(embed, inputs.b32, inputs.runs_b32)
    vectors = {"sts": embed_in_batches(embed, inputs.sts_texts, B32),
               "gate_batched": embed_in_batches(embed, inputs.gate, B32),
               "gate_alone": np.concatenate([embed([text]) for text in inputs.gate])}
    return {**speed(b1, b32), "_vectors": vectors}


@contextlib.contextmanager
def infinity_server(peer: Peer, inputs: Inputs, out: Path, timeout_s: float, folder: Path | None = None):
    """infinity-emb serving the model on a free loopback port (its log in `folder`, default out/<peer>): yields its
    HttpEmbeddings client."""
    from bench.gateway import stop, wait_http
    from bert_recsys.server.launcher import free_port

    python = ensure_venv(peer.venv)
    folder = folder or out / peer.name
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    model = inputs.model_dir if peer.engine != "optimum" else onnx_model_folder(inputs.model_dir)
    command = [str(python.parent / "infinity_emb"), "v2", "--model-id", str(model),
               "--engine", peer.engine, "--device", "cpu", "--pooling-method", "mean", "--batch-size", str(B32),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "model", "--no-model-warmup"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    env.pop("PYTHONPATH", None)
    with open(folder / "server.log", "w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=folder)
        try:
            wait_http(process, port, "/health", timeout_s, folder / "server.log")
            embed = HttpEmbeddings(port, "/embeddings", "model")
            try:
                yield embed
            finally:
                embed.close()
        finally:
            stop(process)


def run_infinity(peer: Peer, inputs: Inputs, out: Path, timeout_s: float) -> dict:
    with infinity_server(peer, inputs, out, timeout_s) as embed:
        return measure_in_process(embed, inputs)


def onnx_model_folder(model_dir: Path) -> Path:
    """The model folder plus onnx/model.onnx (FP32, exported by the st-onnx-qint8 peer): infinity's optimum engine
    loads an ONNX file from the model's folder and exports none itself."""
    onnx = WORK / "work" / "st-onnx" / "onnx" / "model.onnx"
    if not onnx.exists():
        raise RuntimeError(f"infinity's optimum engine runs the ONNX file the st-onnx-qint8 peer exports: {onnx} missing")
    folder = WORK / "work" / "infinity-model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(model_dir, folder, symlinks=True)
    (folder / "onnx").mkdir(exist_ok=True)
    shutil.copy2(onnx, folder / "onnx" / "model.onnx")
    return folder


def bare_rows(inputs: Inputs) -> list[dict]:
    """Every gated CPU variant in build/export, in this process: tokenizer + runtime, as the peers run."""
    from transformers import AutoTokenizer

    from bert_recsys.export.runners import runner_for, tokenize
    from bert_recsys.export.variants import CPU_VARIANTS
    from bert_recsys.server.choice import passing_exports

    from bert_recsys.export.source import load_source

    tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
    max_length = load_source(inputs.model_dir).max_length
    rows = []
    for variant, manifest in passing_exports(settings.EXPORT_DIR).items():
        if variant not in CPU_VARIANTS:
            continue
        row = {"row": f"bert-recsys {variant} (bare)", "peer": "project-bare", "variant": variant, "kind": "project"}
        log.info("project %s, bare", variant)
        try:
            runner = runner_for(settings.EXPORT_DIR / variant, manifest)
            embed = lambda texts, runner=runner: runner(*tokenize(tokenizer, texts, max_length))  # noqa: E731
            row.update(measure_in_process(embed, inputs))
        except Exception as error:  # one variant that cannot run must not lose the rows measured before it
            row["error"] = f"{type(error).__name__}: {error}"
            log.warning("%s not run: %s", row["row"], row["error"])
        rows.append(row)
    return rows


def duel(ours_name: str, ours, peer: Peer, batch: str, inputs: Inputs, out: Path, rounds: int,
         timeout_s: float) -> dict:
    """`run_duel`, or a summary saying why it did not run: the rows measured stand without it."""
    log.info("%s duel: %s against %s, %d rounds of %d calls each", batch, ours_name, peer.name, rounds,
             DUEL_BLOCKS[batch][0])
    try:
        return run_duel(ours_name, ours, peer, batch, inputs, out, rounds, timeout_s)
    except Exception as error:
        log.warning("%s duel of %s against %s not run: %s", batch, ours_name, peer.name, error)
        return {"ours": ours_name, "peer": peer.name, "batch": batch, "error": f"{type(error).__name__}: {error}"}


def served_rows(inputs: Inputs, wanted: set[str], variant: str, rows: list[dict], duel_results: list[dict],
                duels: list[tuple[str, str, Peer]] = (), out: Path = WORK, duel_rounds: int = 10,
                timeout_s: float = 900) -> None:
    """`embed` over gRPC and the gateway over HTTP, beside one tritonserver serving `variant`, appended to `rows`
    as each is measured; then each duel of `duels` ((ours: "embed" or "gateway", batch, peer)) interleaved
    (`run_duel`), appended to `duel_results`: what was measured stays measured if a later part fails."""
    from dataclasses import replace

    from bert_recsys.client.triton import TritonClient
    from bench.gateway import KEY, start_gateway, stop
    from bench.served import serve_variant
    from bert_recsys.server.launcher import free_port

    work = WORK / "serving"
    with serve_variant(variant, work, admin_key="") as triton:
        server = triton.server
        if "project-embed" in wanted:
            log.info("project embed over gRPC (%s)", variant)
            with TritonClient(server.grpc_url, settings=replace(settings.SETTINGS, server=server)) as client:
                rows.append({"row": f"bert-recsys embed gRPC ({variant})", "peer": "project-embed", "variant": variant,
                             "kind": "project", **measure_in_process(client.embed, inputs)})
                for ours, batch, peer in duels:
                    if ours == "embed":
                        duel_results.append(duel(ours, client.embed, peer, batch, inputs, out, duel_rounds, timeout_s))
        if "project-gateway" in wanted:
            port = free_port()
            gateway = start_gateway(server, port, rate_rps=1e6, out=work)
            embed = None
            try:
                log.info("project gateway over HTTP (%s)", variant)
                embed = HttpEmbeddings(port, "/v1/embeddings", "embed", KEY)
                rows.append({"row": f"bert-recsys gateway HTTP ({variant})", "peer": "project-gateway",
                             "variant": variant, "kind": "project", **measure_in_process(embed, inputs)})
                for ours, batch, peer in duels:
                    if ours == "gateway":
                        duel_results.append(duel(ours, embed, peer, batch, inputs, out, duel_rounds, timeout_s))
            finally:
                if embed is not None:
                    embed.close()
                stop(gateway)


def build_inputs(runs_b1: int, runs_b32: int) -> Inputs:
    from transformers import AutoTokenizer

    from bert_recsys.export.lineage import read_texts
    from bert_recsys.export.gate import load_gate_sentences, load_sts

    tokenizer = AutoTokenizer.from_pretrained(settings.default_model_dir())
    gate = load_gate_sentences()[0]
    if not Path(settings.STSB_DEV).exists():
        raise SystemExit(f"STS-B dev not found at {settings.STSB_DEV}: the quality columns need it (set DATA_DIR)")
    calibration, _ = read_texts(settings.SHARED_DATA_DIR, ["sts-train"], 300)
    return Inputs(b1=texts_of_tokens(tokenizer, gate, B1_TOKENS, 1), b32=texts_of_tokens(tokenizer, gate, B32_TOKENS, B32),
                  sts_pairs=load_sts(settings.STSB_DEV), gate=gate, calibration=calibration, runs_b1=runs_b1,
                  runs_b32=runs_b32, model_dir=settings.default_model_dir())


def served_variant() -> str:
    """What `bert-recsys serve` serves here: the tuned choice for this machine, else the default."""
    from bert_recsys.server import choice

    return choice.variant_to_serve(settings.BUILD_DIR, settings.EXPORT_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(PEER_NAMES), help="comma-separated, from %(default)s")
    parser.add_argument("--runs-b1", type=int, default=100)
    parser.add_argument("--runs-b32", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one peer may take, install excluded")
    parser.add_argument("--variant", default=None, help="what `embed` and the gateway serve (default: make serve's)")
    parser.add_argument("--duel-rounds", type=int, default=10,
                        help="blocks of embed and of a peer, interleaved, at b1 and b32 (0: no duels)")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports")
    args = parser.parse_args(argv)
    if args.duel_rounds < 0:
        parser.error("--duel-rounds must be 0 or more")
    logs.configure()
    wanted = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(PEER_NAMES))
    if unknown:
        parser.error(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEER_NAMES)}")
    if "st-torch" not in wanted:
        wanted.insert(0, "st-torch")  # the quality reference
    for needs_onnx in ("fastembed", "infinity-optimum"):  # both run the ONNX files st-onnx-qint8 exports
        if needs_onnx in wanted and "st-onnx-qint8" not in wanted:
            wanted.insert(wanted.index(needs_onnx), "st-onnx-qint8")
    from bert_recsys.contracts.machine import machine

    inputs = build_inputs(args.runs_b1, args.runs_b32)
    out = args.out / "peers"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for peer in (p for p in PEERS if p.name in wanted and p.kind != "project"):
        log.info("peer %s: %s", peer.name, peer.label)
        row = {"row": peer.name, "peer": peer.name, "kind": peer.kind, "label": peer.label}
        try:
            measured = (run_worker if peer.kind == "worker" else run_infinity)(peer, inputs, out, args.timeout)
            row.update(measured)
        except Exception as error:  # a peer that breaks is a row saying why, never the end of the run
            row["error"] = f"{type(error).__name__}: {error}" if not isinstance(error, RuntimeError) else str(error)
            log.warning("peer %s not run: %s", peer.name, row["error"])
        rows.append(row)
    if "project-bare" in wanted:
        rows.extend(bare_rows(inputs))
    reference = next((row for row in rows if row["peer"] == "st-torch" and "_vectors" in row), None)
    reference_halves = None
    if reference is not None:
        n = len(inputs.sts_pairs)
        from bert_recsys.export.gate import spearman_by_half

        vectors = reference["_vectors"]["sts"]
        reference_halves = spearman_by_half(vectors[:n], vectors[n:], inputs.sts_pairs)

    def score(measured: list[dict]) -> None:
        for row in measured:
            vectors = row.pop("_vectors", None)
            if vectors is not None:
                row.update(quality(vectors["sts"], vectors["gate_batched"], vectors["gate_alone"], inputs.sts_pairs,
                                   reference_halves))

    score(rows)  # before the served rows: the b32 duel needs the fastest peer holding the gates
    served = {"project-embed", "project-gateway"} & set(wanted)
    duels: list[dict] = []
    if served:
        variant = args.variant or served_variant()
        served_measured: list[dict] = []
        failed = None
        try:
            served_rows(inputs, served, variant, served_measured, duels,
                        duels_to_run(rows) if args.duel_rounds else [], out, args.duel_rounds, args.timeout)
        except Exception as error:  # Triton or the gateway would not start: say so beside the rows measured
            failed = {"row": f"bert-recsys served ({variant})", "peer": "project-served", "kind": "project",
                      "error": f"{type(error).__name__}: {error}"}
            log.warning("served rows not all run: %s", error)
        score(served_measured)
        rows.extend(served_measured + ([failed] if failed else []))
    line = machine()
    print()
    print(table(rows, line))
    best_peer = fastest_holding_gates(rows)
    summary = {"machine": line, "rows": rows, "fastest_peer_holding_gates": best_peer and best_peer["row"],
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "protocol": {"b1_tokens": B1_TOKENS, "b32_tokens": B32_TOKENS, "runs_b1": args.runs_b1,
                            "runs_b32": args.runs_b32, "callers": 1, "statistic": "p50"}}
    summary["duels"] = duels
    summary["b1_verdict"] = b1_verdict(duels)
    if duels:
        print("\nInterleaved (blocks alternating, the peer kept loaded):")
    for result in duels:
        ours = {"embed": "`embed` over gRPC", "gateway": "the gateway over HTTP"}[result["ours"]]
        if "error" in result:
            print(f"  {result['batch']}: {ours} against {result['peer']}: not run ({result['error']})")
        else:
            print(f"  {result['batch']}: {ours} {result['ours_ms']:.2f} ms, {result['peer']} {result['peer_ms']:.2f} ms: "
                  f"{result['gap_ms']:+.2f} ms, {result['ours_over_peer']:.3f}x ({result['rounds']} rounds, "
                  f"{result['calls_each']} calls counted each)")
    verdict = summary["b1_verdict"]
    if verdict:
        print(f"  b1, of {verdict['duels']} in-process peer(s): the fastest interleaved, {verdict['peer']} "
              f"({verdict['peer_ms']:.2f} ms), against `embed` {verdict['ours_ms']:.2f} ms: {verdict['gap_ms']:+.2f} ms; "
              f"the largest gap, against {verdict['strictest_peer']}: {verdict['strictest_gap_ms']:+.2f} ms")
    if best_peer:
        print(f"\nfastest peer holding the gates (STS-B confirmation >= 0.9985 of torch FP32, invariance >= 0.999): "
              f"{best_peer['row']}, {best_peer['b32_p50_ms']:.1f} ms at b32, {best_peer['b1_p50_ms']:.2f} ms at b1")
    (args.out / "peers.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    plot(rows, f"text -> vectors, p50, one caller; {line}", args.out / "peers.png")
    print(f"written {args.out / 'peers.json'} and {args.out / 'peers.png'}")
    return 0
