from __future__ import annotations

import pytest

import config
from supervisor.core.backoff import BackoffState, decide, delay_for, should_restart

DEFAULT = config.RestartPolicy()


def test_default_delay_sequence_doubles_to_the_cap():
    delays = [delay_for(DEFAULT.backoff, n) for n in range(1, 13)]
    assert delays == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_huge_failure_counts_stay_at_the_cap():
    assert delay_for(DEFAULT.backoff, 10_000) == 300


@pytest.mark.parametrize("policy, code, failed, expected", [
    pytest.param("always", 0, False, True, id="always-clean"),
    pytest.param("always", 1, False, True, id="always-crash"),
    pytest.param("on-failure", 0, False, False, id="on-failure-clean"),
    pytest.param("on-failure", 137, False, True, id="on-failure-killed"),
    pytest.param("on-failure", None, False, True, id="on-failure-unknown-code"),
    pytest.param("on-failure", 0, True, True, id="on-failure-probe-kill"),
    pytest.param("never", 1, False, False, id="never"),
])
def test_restart_policy(policy, code, failed, expected):
    assert should_restart(policy, code, failed=failed) is expected


def test_consecutive_crashes_wait_longer_each_time():
    state, t, waits = BackoffState(), 100.0, []
    for _ in range(5):
        d = decide(DEFAULT, state, exit_code=1, started_at=t, finished_at=t + 2)
        assert d.restart
        waits.append(d.at - (t + 2))
        state, t = d.state, d.at
    assert waits == [0, 1, 2, 4, 8]
    assert state.restarts == 5


def test_a_long_healthy_run_resets_the_series():
    state = BackoffState(failures=6, restarts=6)
    d = decide(DEFAULT, state, exit_code=1, started_at=0.0, finished_at=700.0)
    assert d.at == 700.0 and d.state == BackoffState(failures=1, restarts=7)


def test_never_keeps_the_state_and_says_why():
    d = decide(config.RestartPolicy(policy="never"), BackoffState(), exit_code=3,
               started_at=0.0, finished_at=1.0)
    assert not d.restart and "never" in d.reason and "3" in d.reason


def test_custom_backoff_from_the_spec():
    policy = config.RestartPolicy(backoff=config.Backoff(initial=0.5, max=2.0, reset_after=5.0))
    assert [delay_for(policy.backoff, n) for n in range(1, 6)] == [0, 0.5, 1.0, 2.0, 2.0]
