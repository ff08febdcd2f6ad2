"""Revision history helpers: numbering, limits, rollback targets, restart revisions."""

from __future__ import annotations

import json
import re

import pytest

from supervisor.core.rollout import (RolloutError, mark_revision, record_revision, restart_revision,
                                rollback_target)


def entry(number, revision, status):
    return {"number": number, "revision": revision, "created_at": float(number), "status": status}


def statuses(history):
    return [(e["number"], e["revision"], e["status"]) for e in history]


def test_revisions_are_numbered_and_the_previous_active_one_is_superseded():
    h = record_revision([], "r1", {"image": "a"}, 1.0)
    h = mark_revision(h, "r1", "complete")
    h = record_revision(h, "r2", {"image": "b"}, 2.0)
    h = record_revision(h, "r3", {"image": "c"}, 3.0)
    assert statuses(h) == [(1, "r1", "complete"), (2, "r2", "superseded"), (3, "r3", "active")]
    assert h[-1]["spec"] == {"image": "c"} and h[-1]["created_at"] == 3.0
    assert json.loads(json.dumps(h)) == h            # stores in KV as is


def test_recording_the_active_revision_again_is_no_new_revision():
    h = record_revision([], "r1", None, 1.0)
    assert record_revision(h, "r1", None, 2.0) == h


def test_reapplying_an_old_revision_moves_it_to_a_new_number():
    h = [entry(1, "r1", "complete"), entry(2, "r2", "failed")]
    h = record_revision(h, "r1", None, 3.0)
    assert statuses(h) == [(2, "r2", "failed"), (3, "r1", "active")]


@pytest.mark.parametrize("limit, expected", [
    # r3 is the newest complete one: kept although older than the last 2
    pytest.param(2, [(3, "r3", "complete"), (4, "r4", "failed"), (5, "r5", "superseded"),
                     (6, "r6", "active")], id="limit-2-keeps-newest-complete"),
    pytest.param(10, [(1, "r1", "complete"), (2, "r2", "complete"), (3, "r3", "complete"),
                      (4, "r4", "failed"), (5, "r5", "superseded"), (6, "r6", "active")], id="limit-10"),
    pytest.param(0, [(3, "r3", "complete"), (6, "r6", "active")], id="limit-0-still-keeps-a-revert-target"),
])
def test_history_limit(limit, expected):
    h = [entry(1, "r1", "complete"), entry(2, "r2", "complete"), entry(3, "r3", "complete"),
         entry(4, "r4", "failed"), entry(5, "r5", "active")]
    assert statuses(record_revision(h, "r6", None, 6.0, limit=limit)) == expected


@pytest.mark.parametrize("history, to, expected", [
    pytest.param([entry(1, "r1", "complete"), entry(2, "r2", "failed"), entry(3, "r3", "active")],
                 None, "r1", id="failed-is-never-the-auto-target"),
    pytest.param([entry(1, "r1", "complete"), entry(2, "r2", "complete"), entry(3, "r3", "active")],
                 None, "r2", id="newest-complete"),
    pytest.param([entry(1, "r1", "complete"), entry(2, "r2", "complete")],
                 None, "r1", id="current-complete-is-not-its-own-target"),
    pytest.param([entry(1, "r1", "superseded"), entry(2, "r2", "active")],
                 None, None, id="nothing-complete"),
    pytest.param([], None, None, id="empty"),
    pytest.param([entry(1, "r1", "complete"), entry(2, "r2", "failed"), entry(3, "r3", "active")],
                 2, "r2", id="to-N-may-name-any-kept-revision"),
])
def test_rollback_target(history, to, expected):
    got = rollback_target(history, to)
    assert (got["revision"] if got else None) == expected


@pytest.mark.parametrize("to, message", [
    pytest.param(7, "revision 7 is not in the history (have: 1, 2, 3)", id="unknown"),
    pytest.param(3, "revision 3 is the current revision", id="current"),
])
def test_rollback_to_a_revision_it_does_not_hold_says_which_it_has(to, message):
    h = [entry(1, "r1", "complete"), entry(2, "r2", "failed"), entry(3, "r3", "active")]
    with pytest.raises(RolloutError, match=re.escape(message)):
        rollback_target(h, to)


def test_a_broken_history_entry_is_named():
    with pytest.raises(RolloutError, match=r"history\[1\]"):
        rollback_target([entry(1, "r1", "complete"), {"number": "x"}])


def test_mark_revision_marks_the_newest_entry_and_refuses_unknown_statuses():
    h = [entry(1, "r1", "complete"), entry(2, "r2", "active")]
    assert statuses(mark_revision(h, "r2", "failed"))[-1] == (2, "r2", "failed")
    assert mark_revision(h, "nope", "failed") == h
    with pytest.raises(RolloutError, match="status"):
        mark_revision(h, "r2", "great")


def test_restart_revision_is_a_new_revision_per_token():
    base = "9f86d081884c"
    assert restart_revision(base, None) == base
    a, b = restart_revision(base, "1764000000"), restart_revision(base, "1764000001")
    assert a != base and a != b and len(a) == 12 and int(a, 16) >= 0
    assert restart_revision(base, "1764000000") == a
