from __future__ import annotations

from supervisor.commands.admin_client import format_age, format_status


def test_status_table_reads_like_kubectl():
    data = {"services": [{
        "name": "web", "desired": 2, "ready": 1, "revision": "0123456789ab", "problem": None,
        "rollout": {"phase": "complete", "number": 1, "progress": "2/2 updated", "revision": "9f86d081884c"},
        "instances": [
            {"id": "web-0-aa", "node": "local", "address": "127.0.0.1:20001", "state": "ready",
             "restarts": 0, "age": 75.2, "exit_code": None, "revision": "9f86d081884c"},
            {"id": "web-1-bb", "node": "local", "address": "127.0.0.1:20002", "state": "exited",
             "restarts": 3, "age": 4000, "exit_code": 137, "revision": "9f86d081884c"},
        ]}]}
    assert format_status(data) == [
        "web  1/2 ready  revision 9f86d081884c",
        "  INSTANCE  NODE   ADDRESS          STATE         RESTARTS  AGE    REVISION",
        "  web-0-aa  local  127.0.0.1:20001  ready         0         1m15s  9f86d081884c",
        "  web-1-bb  local  127.0.0.1:20002  exited (137)  3         1h06m  9f86d081884c",
    ]


def test_status_shows_a_rollout_in_progress_and_each_replicas_revision():
    data = {"services": [{
        "name": "web", "desired": 3, "ready": 3, "revision": "bbbbbbbbbbbb", "problem": None,
        "rollout": {"phase": "progressing", "number": 4, "progress": "1/3 updated, 2 old",
                    "terminating": 1},
        "instances": [
            {"id": "web-0-n", "node": "local", "address": "127.0.0.1:1", "state": "ready",
             "restarts": 0, "age": 2, "exit_code": None, "revision": "bbbbbbbbbbbb"},
            {"id": "web-1-o", "node": "local", "address": "127.0.0.1:2", "state": "terminating",
             "restarts": 0, "age": 90, "exit_code": None, "revision": "aaaaaaaaaaaa"},
        ]}]}
    lines = format_status(data)
    assert lines[1] == "  rollout to revision 4: progressing, 1/3 updated, 2 old, 1 terminating"
    assert lines[3].split()[-1] == "bbbbbbbbbbbb" and lines[4].split()[-1] == "aaaaaaaaaaaa"
    paused = {**data["services"][0], "rollout": {"phase": "paused", "number": 4, "progress": "1/3 updated, 2 old"},
              "problem": "rollout paused: paused by the user"}
    assert format_status({"services": [paused]})[:2] == [
        "web  3/3 ready  revision bbbbbbbbbbbb  (rollout paused: paused by the user)",
        "  rollout to revision 4: paused, 1/3 updated, 2 old"]


def test_without_a_rollout_the_head_shows_the_applied_revision():
    data = {"services": [{"name": "api", "desired": 0, "ready": 0, "revision": "0123456789ab",
                          "problem": None, "rollout": None, "instances": []}]}
    assert format_status(data) == ["api  0/0 ready  revision 0123456789ab"]


def test_no_services():
    assert format_status({"services": []}) == ["no services"]


def test_ages():
    assert [format_age(x) for x in (None, 5, 59, 61, 3601, 90000)] == ["-", "5s", "59s", "1m01s", "1h00m", "1d01h"]
