"""The suite's leftover-process check (tests/process_guard.py) finds what it should and nothing else."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import process_guard  # noqa: E402


def test_a_process_carrying_the_token_is_found_named_by_its_test_and_ended():
    guard = process_guard.ProcessGuard()  # a token of its own, not the running session's
    marked = subprocess.Popen(["sleep", "30"], env={**os.environ, process_guard.TEST_SESSION_ENV: guard.token},
                              start_new_session=True)
    other = subprocess.Popen(["sleep", "30"], env={**os.environ, process_guard.TEST_SESSION_ENV: "another"})
    try:
        guard.observe("tests/x.py::test_that_leaks")
        leftovers, _ = guard.leftovers(grace_s=0)
        assert [(l.pid, l.first_seen_after) for l in leftovers] == [(marked.pid, "tests/x.py::test_that_leaks")]
        assert "sleep 30" in leftovers[0].command
        assert "sleep 30" in process_guard.report(leftovers, set())
        guard.clean(leftovers, set())
        assert marked.wait(timeout=10) != 0  # killed
        assert guard.leftovers(grace_s=0)[0] == []
        assert other.poll() is None  # not the guard's: untouched
    finally:
        for process in (marked, other):
            process.kill()
            process.wait()


def test_a_process_that_ends_within_the_grace_period_is_not_a_leftover():
    guard = process_guard.ProcessGuard()
    brief = subprocess.Popen(["sleep", "0.5"], env={**os.environ, process_guard.TEST_SESSION_ENV: guard.token})
    started = time.monotonic()
    reaper = threading.Thread(target=brief.wait)  # reap it as it ends (a zombie is skipped anyway)
    reaper.start()
    assert guard.leftovers(grace_s=10)[0] == []
    reaper.join()
    assert time.monotonic() - started < 9


def test_every_marked_process_is_recorded_with_parent_start_and_test_and_a_zombie_child_is_reaped(tmp_path):
    guard = process_guard.ProcessGuard()
    guard.current = "tests/x.py::test_that_starts_one"
    before = time.time()
    marked = subprocess.Popen(["sleep", "30"], env={**os.environ, process_guard.TEST_SESSION_ENV: guard.token})
    try:
        guard.sample()
        (started,) = guard.started.values()
        assert started.pid == marked.pid and started.parent == os.getpid() and "sleep 30" in started.command
        assert started.during == "tests/x.py::test_that_starts_one" and before - 2 <= started.started_at <= time.time() + 2
        guard.sample()
        assert len(guard.started) == 1  # seen again: recorded once
        assert [(s.pid, state[0] in "RS") for s, state in guard.lingering()] == [(marked.pid, True)]  # running
        os.kill(marked.pid, 9)  # dies unreaped: a zombie whose parent is this process
        deadline = time.monotonic() + 10
        while process_guard.proc_stat(marked.pid)[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert guard.lingering() == []  # reaped by the guard
        assert process_guard.proc_stat(marked.pid) is None
        guard.write_record(tmp_path / "processes.json")
        import json
        (row,) = json.loads((tmp_path / "processes.json").read_text())
        assert row["pid"] == marked.pid and row["during"] == "tests/x.py::test_that_starts_one"
    finally:
        if marked.poll() is None:
            marked.kill()
