"""server/restart.py: when the launcher restarts a dead tritonserver, and when it calls it a crash loop."""
from __future__ import annotations

import pytest

from bert_recsys.server.restart import RestartPolicy, restart_delay


def test_the_backoff_doubles_with_each_recent_crash_up_to_its_cap():
    policy = RestartPolicy(max_restarts=10, window_s=300, backoff_s=1, max_backoff_s=5)
    crashes, delays = [], []
    for now in (0.0, 10.0, 20.0, 30.0, 40.0):
        crashes.append(now)
        delays.append(restart_delay(policy, crashes, now))
    assert delays == [1, 2, 4, 5, 5]


def test_more_crashes_than_allowed_within_the_window_is_a_crash_loop():
    policy = RestartPolicy(max_restarts=2, window_s=60)
    assert restart_delay(policy, [0.0], 0.0) == 1
    assert restart_delay(policy, [0.0, 5.0], 5.0) == 2
    assert restart_delay(policy, [0.0, 5.0, 9.0], 9.0) is None           # a third crash within 60 s: give up


def test_crashes_outside_the_window_are_forgotten():
    policy = RestartPolicy(max_restarts=2, window_s=60)
    assert restart_delay(policy, [0.0, 5.0, 100.0], 100.0) == 1          # the first two are over 60 s old
    assert restart_delay(policy, [0.0, 50.0, 100.0], 100.0) == 2


def test_no_restarts_means_the_first_crash_ends_it():
    assert restart_delay(RestartPolicy(max_restarts=0), [3.0], 3.0) is None


@pytest.mark.parametrize("bad", [dict(max_restarts=-1), dict(window_s=0), dict(backoff_s=-1),
                                 dict(backoff_s=10, max_backoff_s=5)])
def test_a_policy_that_makes_no_sense_is_refused(bad):
    with pytest.raises(ValueError):
        RestartPolicy(**bad)


def test_the_crash_being_decided_must_be_the_last_one():
    with pytest.raises(ValueError):
        restart_delay(RestartPolicy(), [0.0, 5.0], 3.0)
