"""The launcher's ownership of processes and shared memory, and the supervisor's decisions, without a server."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bert_recsys.server import processes
from bert_recsys.server.processes import ProcessId, RunDirectory, ServerRecord, parse_stub_argv, reap, shm_prefix_for
from bert_recsys.server.supervisor import Watch, dead_models, overdue

STUB_ARGV = ["/b/python/triton_python_backend_stub", "/repo/encoder/2/model.py", "triton_python_backend_shm_region_ab12_x",
             "1048576", "1048576", "4242", "/b/python", "336", "encoder_0_0", "DEFAULT"]


def test_a_stub_command_line_names_its_model_version_and_instance():
    stub = parse_stub_argv(7, STUB_ARGV)
    assert (stub.pid, stub.key) == (7, ("encoder", "2", "encoder_0_0"))
    assert parse_stub_argv(7, ["/usr/bin/python3", "x.py"]) is None
    assert stub.serves
    # The stub the backend starts under the model's own name at each load exits by design: never a death.
    assert not parse_stub_argv(8, STUB_ARGV[:8] + ["encoder", "DEFAULT"]).serves


def test_process_identity_survives_pid_reuse_checks():
    me = ProcessId.of(subprocess.os.getpid())
    assert me is not None and me.alive()
    assert not ProcessId(me.pid, me.start_ticks + 1).alive()  # same pid, another start: not the same process
    assert processes.start_ticks(2 ** 22 + 1) is None


def _owned(prefix: str, ignore_sigterm: bool = False) -> subprocess.Popen:
    """A process carrying the prefix on its command line, as a stub carries its region name."""
    code = "import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "") + \
           "print('ready', flush=True)\ntime.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", code, f"{prefix}region"], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def _record(prefix: str, launcher: ProcessId) -> ServerRecord:
    return ServerRecord("t", ProcessId(2 ** 22 + 1, 0), launcher, prefix, "/repo", time.time())


def test_reap_ends_only_what_carries_the_prefix_and_removes_its_regions():
    prefix = shm_prefix_for(f"unit{time.time_ns() % 10**9}")
    polite, stubborn = _owned(prefix), _owned(prefix, ignore_sigterm=True)
    bystander = _owned("triton_python_backend_shm_region_somebody_else_")
    region = processes.SHM_DIR / f"{prefix}0001"
    other = processes.SHM_DIR / "triton_python_backend_shm_region_somebody_else_0001"
    region.write_bytes(b"x")
    other.write_bytes(b"x")
    try:
        result = reap(_record(prefix, ProcessId.of(subprocess.os.getpid())), grace_s=1.0)
        assert (result.terminated, result.killed, result.shm_removed) == (1, 1, 1)
        assert polite.wait(5) is not None and stubborn.wait(5) is not None
        assert not region.exists()
        assert bystander.poll() is None and other.exists()  # never touches what it did not start
        assert not reap(_record(prefix, ProcessId.of(subprocess.os.getpid())))  # idempotent: nothing left
    finally:
        bystander.kill()
        other.unlink(missing_ok=True)


def test_the_next_launcher_reaps_only_servers_whose_launcher_is_gone(tmp_path):
    dead_prefix, live_prefix = shm_prefix_for("deadlauncher"), shm_prefix_for("livelauncher")
    orphan, kept = _owned(dead_prefix), _owned(live_prefix)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_launcher = ProcessId.of(gone.pid)
    gone.wait()
    runs = RunDirectory(tmp_path)
    runs.write(_record(dead_prefix, dead_launcher))
    runs.write(ServerRecord("u", ProcessId(2 ** 22 + 1, 0), ProcessId.of(subprocess.os.getpid()), live_prefix, "/r", 0.0))
    (tmp_path / "broken.json").write_text("{")
    try:
        reaped = runs.reap_orphans()
        assert [r.shm_prefix for r, _ in reaped] == [dead_prefix]
        assert orphan.wait(10) is not None and kept.poll() is None
        assert [r.shm_prefix for r in runs.records()] == [live_prefix]
    finally:
        kept.kill()


@pytest.mark.parametrize("missing_for, expected", [(0.5, []), (1.0, [("encoder", "1", "encoder_0_0")])])
def test_an_instance_counts_as_overdue_only_after_the_grace_period(missing_for, expected):
    watch = Watch()
    both = {("encoder", "1", "encoder_0_0"), ("tokenizer", "1", "tokenizer_0_0")}
    assert overdue(watch, both, now=0.0, grace_s=0.75) == []
    assert overdue(watch, {("tokenizer", "1", "tokenizer_0_0")}, now=1.0, grace_s=0.75) == []
    assert overdue(watch, {("tokenizer", "1", "tokenizer_0_0")}, now=1.0 + missing_for, grace_s=0.75) == expected


def test_a_replaced_stub_is_not_overdue():
    watch = Watch()
    key = ("encoder", "2", "encoder_0_0")
    overdue(watch, {key}, now=0.0, grace_s=0.5)
    overdue(watch, set(), now=0.1, grace_s=0.5)       # between the old stub's exit and the new one's start
    assert overdue(watch, {key}, now=5.0, grace_s=0.5) == []


def test_dead_means_gone_while_triton_still_calls_the_version_ready():
    watch = Watch()
    late = [("encoder", "1", "encoder_0_0"), ("encoder", "1", "encoder_0_1"), ("encoder", "2", "encoder_0_0")]
    watch.known |= set(late)
    # version 1 was unloaded on purpose (a rollout retired it); version 2 is READY with its stub gone.
    assert dead_models(watch, late, ready={("encoder", "2"), ("tokenizer", "1")}) == ["encoder"]
    assert watch.known == {("encoder", "2", "encoder_0_0")}  # the unloaded version is forgotten
    assert dead_models(Watch(), late[:2], ready={("encoder", "2")}) == []


def test_export_failures_say_a_full_disk_plainly(tmp_path):
    import errno

    from bert_recsys.export.pipeline import as_os_error, describe_failure

    rust = Exception("No space left on device (os error 28)")
    translated = as_os_error(rust, tmp_path / "tokenizer")
    assert isinstance(translated, OSError) and translated.errno == errno.ENOSPC
    assert describe_failure(translated, tmp_path).startswith(f"no space left on the device writing {tmp_path / 'tokenizer'}")
    assert as_os_error(ValueError("bad"), tmp_path).args == ("bad",)
    assert describe_failure(ValueError("bad"), tmp_path) == "ValueError: bad"
