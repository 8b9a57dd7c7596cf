"""bert-recsys: the one command line (also `python -m bert_recsys`).

Each subcommand hands its arguments to the stage it runs, so `bert-recsys <command> --help` is that stage's own
help. Stages are imported only when their command runs: `--help` and the client-side commands never load torch
or the server. The benchmarks and research tools (`bench`, `tune`'s measuring, Locust) are not shipped: they run
from a checkout of the project, which those commands find or name.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from enum import Enum
from pathlib import Path

import typer

from bert_recsys import __version__

# Arguments go to the stage untouched, --help included.
FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

app = typer.Typer(name="bert-recsys", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="BERT semantic recall and recommendations served by NVIDIA Triton. "
                       "`bert-recsys COMMAND --help` shows each command's own options.")
bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="benchmarks (from a checkout): `bert-recsys bench NAME --help` for each")
train_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="the recommendation encoder: fine-tuning, its settings, distillation")
evaluate_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="offline quality of the recommender and the encoders")
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")


class CheckoutMissing(RuntimeError):
    """A command that runs the checkout's bench area, run from an installed package without one."""


def checkout() -> Path:
    """The project checkout this package is installed from (editable install), holding the bench area."""
    from bert_recsys import settings

    root = settings.REPO_ROOT
    if not (root / "bench" / "__init__.py").is_file():
        raise CheckoutMissing(
            f"this command runs the benchmarks in a checkout of the project (bench/, loadtest/), which are not shipped; "
            f"{root} is not one: clone the project and install it with `make venv` (pip install -e .)")
    return root


def run_stage(module: str, args: list[str]) -> int:
    """The stage's own main(argv), in this process: its exit code, SystemExit included (argparse's 2). A bad
    environment value is the user's to fix: one line naming the variable, exit code 2."""
    from bert_recsys.env import SettingsError

    try:
        return int(importlib.import_module(module).main(list(args)) or 0)
    except SettingsError as error:
        print(f"bert-recsys: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:
        return exit_code(done)


def run_checkout(module: str, args: list[str], python: Path | None = None) -> int:
    """A bench-area module of the checkout, as a child process in the checkout (it is not importable from an
    installed package), under `python` (default: this interpreter). Ctrl-C reaches it too: it shares the
    terminal's process group."""
    try:
        root = checkout()
    except CheckoutMissing as error:
        print(f"bert-recsys: {error}", file=sys.stderr)
        return 2
    if python is not None and not Path(python).exists():
        print(f"bert-recsys: {module} runs in Locust's own venv, {python}, which is missing: make loadtest-venv",
              file=sys.stderr)
        return 2
    return subprocess.run([str(python or sys.executable), "-m", module, *args], cwd=root).returncode


def run_locust(module: str, args: list[str]) -> int:
    """Locust's runner, in the load-test venv (its gevent pins conflict with the main venv's)."""
    from bert_recsys import settings

    return run_checkout(module, args, settings.LOADTEST_PYTHON)


def exit_code(done: SystemExit) -> int:
    """SystemExit's code as a process's: None is 0, a message is printed and is 1."""
    if done.code is None or isinstance(done.code, int):
        return done.code or 0
    print(done.code, file=sys.stderr)
    return 1


def stage(application: typer.Typer, name: str, module: str, help: str, runner=run_stage):
    """A subcommand that forwards its arguments to `module`, run by `runner` (in this process by default)."""
    def command(ctx: typer.Context):
        raise typer.Exit(runner(module, ctx.args))
    command.__doc__ = help
    application.command(name, help=help, context_settings=FORWARD, add_help_option=False)(command)


stage(app, "export", "bert_recsys.export.__main__",
      "export the BERT as gated ONNX and OpenVINO variants (and TensorRT where present), each with a manifest")
stage(app, "repository", "bert_recsys.model_repository.__main__",
      "render a Triton model repository (embed and score ensembles over tokenizer, encoder and similarity) from an exported variant")
stage(app, "serve", "bert_recsys.server.__main__",
      "run tritonserver on the model repository, on loopback, restarting it if it dies")
stage(app, "gateway", "bert_recsys.gateway.__main__",
      "the OpenAI-compatible HTTP gateway in front of Triton: API keys, rate limits, events")
stage(app, "rollout", "bert_recsys.rollout.__main__",
      "roll a new encoder version out: stage, canary, promote or roll back; or show what is served")
stage(app, "experiments", "bert_recsys.client.experiments.__main__",
      "A/B/n experiments on recommendations: register, assign, record events, report")
stage(app, "data", "bert_recsys.demo_data",
      "find or fetch (verified) the MovieLens catalog the demo runs on, with its rich item text")
stage(app, "env", "bert_recsys.env",
      "every environment variable the project reads: its value now, its default, and any bad value")
stage(evaluate_app, "server", "bert_recsys.client.evaluate",
      "evaluate against a running server: warm, item cold start and temporal protocols with baselines")
stage(evaluate_app, "full", "bert_recsys.training.evaluation",
      "the whole evaluation: fine-tune per split, export, serve on free ports, evaluate (make evaluate)")
stage(train_app, "finetune", "bert_recsys.training.finetune",
      "fine-tune the recommendation encoder on a catalog's interactions (training part only), with its gate")
stage(train_app, "select", "bert_recsys.training.select",
      "compare the cold-start settings on the validation split carved from the training part")
stage(train_app, "distill", "bert_recsys.training.distill",
      "distill a smaller student keeping some of the teacher's layers")


class Bench(str, Enum):
    """The benchmarks: each is a module of the checkout's bench area (bench/), or Locust's runner (loadtest/)."""

    export = "export"
    ceiling = "ceiling"
    serving = "serving"
    peers = "peers"
    trace = "trace"
    gateway = "gateway"
    rollout = "rollout"
    gpu = "gpu"
    ann = "ann"
    soak = "soak"
    report = "report"
    crosscheck = "crosscheck"
    warm_content = "warm-content"
    loadtest = "loadtest"


# name: (module of the checkout's bench area, or Locust's loadtest/; help). Each runs from the checkout.
BENCHES = {
    Bench.export: ("bench.export", "the bare encoder: PyTorch FP32 against every exported variant"),
    Bench.ceiling: ("bench.ceiling", "the most INT8 can speed the encoder up on this CPU"),
    Bench.serving: ("bench.serving", "perf_analyzer: embed and encoder through Triton against the bare encoder"),
    Bench.peers: ("bench.peers", "the peers users pick, each in its own venv, beside our variants, embed and the gateway"),
    Bench.trace: ("bench.trace", "embed b1 broken into steps by Triton's trace API"),
    Bench.gateway: ("bench.gateway", "the HTTP gateway against direct gRPC embed"),
    Bench.rollout: ("bench.rollout", "three rollouts under Locust users"),
    Bench.gpu: ("bench.gpu", "the torch runtime on a GPU: pack here, run on the device"),
    Bench.ann: ("bench.ann", "the ANN index at catalog scale"),
    Bench.soak: ("bench.soak", "steady load: RSS of tritonserver and its stubs over time"),
    Bench.report: ("bench.report", "every benchmark in one report with plots"),
    Bench.crosscheck: ("bench.crosscheck", "perf_analyzer and Locust on the same load"),
    Bench.warm_content: ("bench.warm_content", "research probe: item text inside EASE^R (side information), warm items"),
    Bench.loadtest: ("loadtest.run", "Locust headless against a running server, with SLOs (in .venv-loadtest)"),
}
for bench, (module, text) in BENCHES.items():
    stage(bench_app, bench.value, module, text, run_locust if bench is Bench.loadtest else run_checkout)


@app.command("tune", context_settings=FORWARD, add_help_option=False)
def tune(ctx: typer.Context):
    """measure every gated variant through Triton on this machine and record the fastest (from a checkout);
    --print-choice prints the variant this machine serves"""
    if list(ctx.args) == ["--print-choice"]:  # the decision is serving's, and shipped: no checkout needed
        from bert_recsys import settings
        from bert_recsys.server import choice

        raise typer.Exit(choice.print_choice(settings.BUILD_DIR, settings.EXPORT_DIR))
    raise typer.Exit(run_checkout("bench.tune", ctx.args))


@app.command("demo", context_settings=FORWARD, add_help_option=False)
def demo(ctx: typer.Context):
    """the whole flow once: the data, export, the repository, tritonserver, recommendations, the gateway, stop"""
    raise typer.Exit(run_stage("bert_recsys.demo", ctx.args))


def version_callback(value: bool):
    if value:
        print(__version__)
        raise typer.Exit(0)


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="print the version and exit")):
    """BERT semantic recall and recommendations served by NVIDIA Triton."""


def main(argv: list[str] | None = None) -> int:
    """The console script `bert-recsys`: the stage's own exit code; 2 with one line for what the user must fix (a
    wrong command or option, no checkout where one is needed)."""
    try:
        app(args=argv, prog_name="bert-recsys")  # standalone: usage errors print and exit 2, as argparse's do
    except SystemExit as done:
        return exit_code(done)
    return 0
