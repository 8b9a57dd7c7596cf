"""bert-recsys bench trace: where the b1 time of `embed` goes, step by step, from Triton's trace API.

One server with tracing on (every request, TIMESTAMPS), one client sending b1 `embed` requests one at a time over
gRPC, timed on the client. For each request, from the trace file Triton writes at shutdown:
  client + protocol   client latency - the server's time from reading the request to sending the response
  grpc in / out       request read -> REQUEST_START; REQUEST_END -> response sent (Triton's gRPC frontend)
  ensemble            `embed` total - its steps' totals (scheduling between steps, tensor hand-over)
  <step> queue        QUEUE_START -> COMPUTE_START (dynamic batcher)
  <step> input        COMPUTE_START -> COMPUTE_INPUT_END (inputs to the backend: for a Python model, into the
                      stub's shared memory)
  <step> compute      COMPUTE_INPUT_END -> COMPUTE_OUTPUT_START (the model's own execute, stub IPC included)
  <step> output       COMPUTE_OUTPUT_START -> COMPUTE_END
  <step> other        the step's REQUEST_START -> REQUEST_END not covered above
beside the bare encoder (its runtime in this process, same token ids) for the overhead figure, twice: back to
back, and after the same idle time the served encoder has between requests (sleeping as long as the rest of the
path takes). And the engine's own time inside the encoder's stub, in the same served requests (the model writes
it when it unloads): the client's time less that is what the serving path adds around the model. The overhead is
measured first, on a server without tracing (tracing costs time of its own), with served and bare calls
alternating in blocks of 50 so that the machine's noise falls on both alike; then the same requests go to a traced
server for the breakdown. Medians over the requests (so the rows do not add up
exactly); writes build/reports/trace_breakdown.json and prints the table.

When `embed`'s encoder takes the text (ENCODER_TOKENIZES, the default), the same untraced server also serves
`embed_tokenizer_step`: the same encoder behind the tokenizer model, as before, in the same alternation, so that
`with_tokenizer_step` and `tokenizer_step_costs` say what the stub hop the default saves costs. The engine's
times then cover both paths' calls (the same engine on the same shape).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bert_recsys import logs
from bert_recsys import settings

log = logs.get("loadtest")
BLOCK, SETTLE = 50, 5  # calls per block counted, and not counted at the start of each block
PAUSE_S = 0.2  # between blocks: the last block's spinning threads go to sleep
PHASES = (("queue", "QUEUE_START", "COMPUTE_START"), ("input", "COMPUTE_START", "COMPUTE_INPUT_END"),
          ("compute", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"), ("output", "COMPUTE_OUTPUT_START", "COMPUTE_END"))


def trace_flags(path: Path) -> tuple[str, ...]:
    """Every request traced with timestamps, written to `path` when the server shuts down."""
    return ("--trace-config", f"triton,file={path}", "--trace-config", "triton,log-frequency=0",
            "--trace-config", "rate=1", "--trace-config", "level=TIMESTAMPS", "--trace-config", "count=-1")


def read_traces(path: Path) -> dict[int, dict]:
    """Triton's trace file -> {id: {"model": name, "parent": id or None, "ts": {name: ns}}}. A trace's entries
    (its model line, its timestamps) may be split over several objects with the same id."""
    traces: dict[int, dict] = {}
    for entry in json.loads(Path(path).read_text()):
        trace = traces.setdefault(int(entry["id"]), {"model": None, "parent": None, "ts": {}})
        if "model_name" in entry:
            trace["model"] = entry["model_name"]
            trace["parent"] = int(entry["parent_id"]) if entry.get("parent_id") not in (None, 0) else None
        for stamp in entry.get("timestamps", []):
            trace["ts"].setdefault(stamp["name"], int(stamp["ns"]))
    return traces


def span_ms(ts: dict, start: str, end: str) -> float | None:
    return (ts[end] - ts[start]) / 1e6 if start in ts and end in ts else None


def breakdown(traces: dict[int, dict], ensemble: str, client_ms: list[float]) -> list[dict]:
    """One row of phase -> ms per `ensemble` request, the last len(client_ms) of them, in order, paired with the
    client's own timings (the client sent them one at a time, in the same order)."""
    children: dict[int, list[dict]] = {}
    for trace in traces.values():
        if trace["parent"] is not None:
            children.setdefault(trace["parent"], []).append(trace)
    tops = [i for i in sorted(traces) if traces[i]["model"] == ensemble and traces[i]["parent"] is None]
    tops = tops[-len(client_ms):]
    if len(tops) != len(client_ms):
        raise ValueError(f"{len(tops)} traces of {ensemble} for {len(client_ms)} timed requests")
    rows = []
    for trace_id, client in zip(tops, client_ms):
        top = traces[trace_id]["ts"]
        total = span_ms(top, "REQUEST_START", "REQUEST_END")
        row = {"client_total": client, "server_total": total}
        grpc_in, grpc_out = span_ms(top, "GRPC_WAITREAD_END", "REQUEST_START"), span_ms(top, "REQUEST_END", "GRPC_SEND_END")
        if grpc_in is not None and grpc_out is not None:
            row.update({"grpc in": grpc_in, "grpc out": grpc_out})
        row["client_and_protocol"] = client - total - (grpc_in or 0.0) - (grpc_out or 0.0)
        steps_total = 0.0
        for child in children.get(trace_id, []):
            ts, name = child["ts"], child["model"]
            step_total = span_ms(ts, "REQUEST_START", "REQUEST_END") or 0.0
            steps_total += step_total
            covered = 0.0
            for phase, start, end in PHASES:
                value = span_ms(ts, start, end)
                if value is not None:
                    row[f"{name} {phase}"] = value
                    covered += value
            row[f"{name} other"] = step_total - covered
        row["ensemble"] = total - steps_total
        rows.append(row)
    return rows


def medians(rows: list[dict]) -> dict[str, float]:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: statistics.median(row[key] for row in rows if key in row) for key in keys}


def set_parameter(repository: Path, serving, model: str, key: str, value: str) -> None:
    """One parameter set in a rendered model's config.pbtxt (the diagnostics the encoder model reads)."""
    from bert_recsys.model_repository.render import to_pbtxt
    from bert_recsys.rollout.repository import LiveRepository

    config = LiveRepository(repository, serving).config(model)
    config.parameters[key].string_value = value
    (repository / model / "config.pbtxt").write_text(to_pbtxt(config))


TWO_STEP = "embed_tokenizer_step"


def add_two_step_embed(repository: Path, serving, name: str = TWO_STEP) -> str | None:
    """Beside `embed`, when its encoder takes the text (ENCODER_TOKENIZES): the same encoder behind the tokenizer
    model, as `embed` runs with ENCODER_TOKENIZES=false (the encoder takes token ids too), to measure what the
    tokenizer step costs in the same server. None when the encoder does not take text."""
    from bert_recsys.model_repository.render import embed_config, to_pbtxt
    from bert_recsys.rollout.repository import LiveRepository

    live = LiveRepository(repository, serving)
    if not live.encoder_takes_text:
        return None
    config = embed_config(serving, live.encoder_config.output[0].dims[0], name, encoder_version=live.stable,
                          text_in_encoder=False)
    (repository / name / "1").mkdir(parents=True, exist_ok=True)
    (repository / name / "config.pbtxt").write_text(to_pbtxt(config))
    return name


def engine_median_ms(path: Path, rows: int, tokens: int, skip: int) -> float | None:
    """The encoder engine's own median time (ms) over its calls of this shape, after the first `skip`, from the
    file the encoder model writes when it unloads (`diagnostic_engine_times_file`); None without one."""
    if not path.exists():
        return None
    try:
        calls = json.loads(path.read_text())
    except ValueError as error:
        log.warning("the engine's times in %s are unreadable (%s): no engine figure", path, error)
        return None
    times = [seconds for r, n, seconds in calls if (r, n) == (rows, tokens)][skip:]
    return 1000 * statistics.median(times) if times else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bert-recsys bench trace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="onnx-int8")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--encoder-threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: settings)")
    parser.add_argument("--null-encoder", action="store_true",
                        help="the encoder returns zeros: what the serving path costs without the model")
    parser.add_argument("--no-spinning", action="store_true", help="ONNX Runtime threads sleep instead of spin-wait")
    parser.add_argument("--out", type=Path, default=settings.BUILD_DIR / "reports" / "trace_breakdown.json")
    args = parser.parse_args(argv)
    logs.configure()

    import tritonclient.grpc as grpcclient
    from transformers import AutoTokenizer

    from bert_recsys.contracts.manifest import Manifest
    from bert_recsys.contracts.machine import machine
    from bert_recsys.export.runners import runner_for, tokenize
    from bench.serving import SHORT_TEXT
    from bench.served import render, serve

    work = settings.BUILD_DIR / "trace_breakdown"
    work.mkdir(parents=True, exist_ok=True)
    trace_file = work / "trace.json"
    trace_file.unlink(missing_ok=True)
    instances = settings.SETTINGS.instances
    instances = replace(instances, encoder_intra_op_spinning=instances.encoder_intra_op_spinning and not args.no_spinning,
                        encoder_intra_op_threads=instances.encoder_intra_op_threads if args.encoder_threads is None
                        else args.encoder_threads)
    serving = replace(settings.SETTINGS, instances=instances)
    repo = render(args.variant, work / "repository", serving)
    if args.null_encoder:
        from bert_recsys.rollout.repository import LiveRepository

        dim = LiveRepository(repo, serving).encoder_config.output[0].dims[0]
        set_parameter(repo, serving, serving.models.encoder, "diagnostic_null_encoder_dim", str(dim))
    engine_file = work / "engine_times.json"
    engine_file.unlink(missing_ok=True)
    if not args.null_encoder:
        set_parameter(repo, serving, serving.models.encoder, "diagnostic_engine_times_file", str(engine_file))
    two_step = add_two_step_embed(repo, serving)
    t = settings.SETTINGS.tensors
    tokenizer = AutoTokenizer.from_pretrained(settings.EXPORT_DIR / "tokenizer")
    ids, mask = tokenize(tokenizer, [SHORT_TEXT], 256)
    bare = runner_for(settings.EXPORT_DIR / args.variant, Manifest.read(settings.EXPORT_DIR / args.variant))  # any runtime
    for _ in range(20):
        bare(ids, mask)

    def timed(call) -> float:
        started = time.perf_counter()
        call()
        return 1000 * (time.perf_counter() - started)

    @contextlib.contextmanager
    def embed_client(trace: Path | None):
        """A server (traced or not) and a function that sends it one b1 `embed` request (or to the ensemble named)."""
        extra = trace_flags(trace) if trace else ()
        with serve(repo, work / "triton.log", serving, extra_args=extra) as server:
            with grpcclient.InferenceServerClient(server.server.grpc_url) as client:
                text = grpcclient.InferInput(t.text, [1, 1], "BYTES")
                text.set_data_from_numpy(np.array([[SHORT_TEXT.encode()]], dtype=object))
                outputs = [grpcclient.InferRequestedOutput(t.embedding)]
                yield lambda model=settings.SETTINGS.models.embed: client.infer(model, [text], outputs=outputs)

    rounds = -(-args.requests // BLOCK)
    # 1. The overhead, on a server without tracing (tracing costs ~0.1-0.3 ms of its own here, even switched off
    # at run time): served and bare calls alternate in blocks, so this machine's noise (other tenants, frequency)
    # falls on both alike. The first calls of each block are not counted: the other side's threads may spin.
    served_ms, two_step_ms, bare_ms, idle_ms = [], [], [], []
    with embed_client(None) as served:
        for _ in range(args.warmup):
            served()
            if two_step:
                served(two_step)
        for round_ in range(rounds):
            served_ms.extend([timed(served) for _ in range(SETTLE + BLOCK)][SETTLE:])
            time.sleep(PAUSE_S)
            if two_step:
                two_step_ms.extend([timed(lambda: served(two_step)) for _ in range(SETTLE + BLOCK)][SETTLE:])
                time.sleep(PAUSE_S)
            bare_ms.extend([timed(lambda: bare(ids, mask)) for _ in range(SETTLE + BLOCK)][SETTLE:])
            time.sleep(PAUSE_S)
            # Served, the encoder idles between requests (while the client, gRPC and the tokenizer work); back to
            # back it never does. On a VM an idle core comes back slow: the same bare call after the same idle
            # time is the fair comparison for what serving itself adds.
            idle_s = max(0.0, (statistics.median(served_ms) - statistics.median(bare_ms)) / 1000)
            for index in range(SETTLE + BLOCK):
                time.sleep(idle_s)
                elapsed = timed(lambda: bare(ids, mask))
                if index >= SETTLE:
                    idle_ms.append(elapsed)
            time.sleep(PAUSE_S)
            log.info("round %d/%d: served p50 %.3f ms%s, bare %.3f ms", round_ + 1, rounds, statistics.median(served_ms),
                     f", with the tokenizer step {statistics.median(two_step_ms):.3f} ms" if two_step else "",
                     statistics.median(bare_ms))

    # The model's own time inside the stub, in the same requests: what the serving path adds around the model
    # is the client's time less this (the bare encoder's back-to-back figure never pays for waking its threads).
    # (Both paths' calls are the same engine on the same shape; the warm-up made one of each per round.)
    engine_ms = engine_median_ms(engine_file, 1, ids.shape[1], args.warmup * (2 if two_step else 1))
    if engine_file.exists():  # the traced server below writes its own: keep this one's beside it
        engine_file.replace(work / "engine_times_untraced.json")

    # 2. The breakdown, on a traced server: the same requests, one at a time, each timed on the client too.
    client_ms = []
    with embed_client(trace_file) as served:
        for _ in range(args.warmup + args.requests):
            client_ms.append(timed(served))
    log.info("%d requests traced; server stopped, trace written", args.requests)
    client_ms = client_ms[args.warmup:]
    rows = breakdown(read_traces(trace_file), settings.SETTINGS.models.embed, client_ms)
    result = medians(rows)
    result["client_total_untraced"] = statistics.median(served_ms)
    result["bare_encoder"] = statistics.median(bare_ms)
    result["overhead"] = result["client_total_untraced"] - result["bare_encoder"]
    result["bare_encoder_after_idle"] = statistics.median(idle_ms)
    result["overhead_vs_idle_bare"] = result["client_total_untraced"] - result["bare_encoder_after_idle"]
    if two_step_ms:
        result["with_tokenizer_step"] = statistics.median(two_step_ms)
        result["tokenizer_step_costs"] = result["with_tokenizer_step"] - result["client_total_untraced"]
    if engine_ms is not None:
        result["engine_in_stub"] = engine_ms
        result["served_outside_engine"] = result["client_total_untraced"] - engine_ms

    print(f"\n`embed` b1 ({args.variant}, {ids.shape[1]} tokens), gRPC, one request at a time, medians of "
          f"{len(rows)}; encoder threads {instances.encoder_intra_op_threads or 'all'}, spinning "
          f"{instances.encoder_intra_op_spinning}{'; NULL ENCODER (zeros, no model)' if args.null_encoder else ''}; "
          f"{machine()}")
    for key, value in result.items():
        print(f"  {key:<28}{value:>8.3f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "variant": args.variant, "requests": len(rows),
                                    "encoder_threads": instances.encoder_intra_op_threads,
                                    "null_encoder": args.null_encoder,
                                    "spinning": instances.encoder_intra_op_spinning,
                                    "medians_ms": result}, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
