"""The one command line: `bert-recsys --help` lists every subcommand, each subcommand's --help is its stage's own
(named `bert-recsys <command>`), wrong commands exit 2, and what only a checkout has says so."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from bert_recsys import cli, settings

SCRIPT = Path(sys.executable).parent / "bert-recsys"
# What the issue and the README promise, as the top-level --help must list them.
COMMANDS = ("export", "repository", "serve", "gateway", "rollout", "evaluate", "experiments", "tune", "bench", "demo")


def run(*args, cwd=None, env=None):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or settings.REPO_ROOT, env=env)


def test_help_lists_every_subcommand_and_python_m_is_the_same():
    listed = run("--help")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.split("Commands:")[1].splitlines()
    names = {line.split()[0] for line in lines if line.strip()}
    assert set(COMMANDS) <= names, set(COMMANDS) - names
    same = subprocess.run([sys.executable, "-m", "bert_recsys", "--help"], capture_output=True, text=True, timeout=300)
    assert same.returncode == 0 and same.stdout == listed.stdout


@pytest.mark.parametrize("argv", [["export"], ["repository"], ["serve"], ["gateway"], ["rollout"], ["experiments"],
                                  ["data"], ["demo"], ["evaluate", "server"], ["evaluate", "full"],
                                  ["train", "finetune"], ["train", "select"], ["train", "distill"],
                                  ["env"]])
def test_each_stage_answers_help_with_its_own_options(argv, capsys):
    assert cli.main([*argv, "--help"]) == 0
    usage = capsys.readouterr().out
    assert usage.startswith(f"usage: bert-recsys {' '.join(argv)}"), usage[:200]


def test_every_bench_names_a_module_with_a_main():
    for bench, (module, _) in cli.BENCHES.items():
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"bench {bench.value}: no module {module}"
        if spec.submodule_search_locations:  # python -m package runs package.__main__
            spec = importlib.util.find_spec(module + ".__main__")
        assert "main(" in Path(spec.origin).read_text(), f"bench {bench.value}: {module} has no main"
        assert module.startswith(("bench.", "loadtest.")), bench  # each runs from the checkout
    for name in ("serving", "export"):
        result = run("bench", name, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: bert-recsys bench {name}"), result.stderr[-1000:]


def test_a_wrong_command_or_a_stage_error_exits_2():
    wrong = run("nope")
    assert wrong.returncode == 2 and "No such command 'nope'" in wrong.stderr
    missing = run("experiments")  # argparse: a required argument is missing
    assert missing.returncode == 2 and "bert-recsys experiments" in missing.stderr


def test_the_checkout_commands_say_what_they_need_without_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)
    assert cli.main(["bench", "serving"]) == 2
    assert cli.main(["tune"]) == 2
    assert "not shipped" in capsys.readouterr().err


def test_tune_print_choice_reads_the_choice_without_the_bench_area(monkeypatch, tmp_path, capsys):
    """The decision is serving's: with no tune.json it prints nothing; a damaged one is named."""
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)   # no checkout: still answers
    monkeypatch.setattr(settings, "BUILD_DIR", tmp_path)
    monkeypatch.setattr(settings, "EXPORT_DIR", tmp_path / "export")
    assert cli.main(["tune", "--print-choice"]) == 0
    assert capsys.readouterr().out == ""
    (tmp_path / "tune.json").write_text("{not json")
    assert cli.main(["tune", "--print-choice"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{tmp_path / 'tune.json'}: unreadable tune record" in captured.err


def test_bench_loadtest_runs_in_locusts_own_venv(monkeypatch, tmp_path, capsys):
    result = run("bench", "loadtest", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: bert-recsys bench loadtest"), result.stderr[-1000:]
    monkeypatch.setattr(settings, "LOADTEST_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    assert cli.main(["bench", "loadtest", "--users", "1"]) == 2
    assert "make loadtest-venv" in capsys.readouterr().err
