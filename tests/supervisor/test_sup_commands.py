from __future__ import annotations

from supervisor.commands import format_age, format_status


def test_status_table_reads_like_kubectl():
    data = {"services": [{
        "name": "web", "desired": 2, "ready": 1, "revision": "9f86d081884c0000", "problem": None,
        "instances": [
            {"id": "web-0-aa", "node": "local", "address": "127.0.0.1:20001", "state": "ready",
             "restarts": 0, "age": 75.2, "exit_code": None},
            {"id": "web-1-bb", "node": "local", "address": "127.0.0.1:20002", "state": "exited",
             "restarts": 3, "age": 4000, "exit_code": 137},
        ]}]}
    assert format_status(data) == [
        "web  1/2 ready  revision 9f86d081884c",
        "  INSTANCE  NODE   ADDRESS          STATE         RESTARTS  AGE",
        "  web-0-aa  local  127.0.0.1:20001  ready         0         1m15s",
        "  web-1-bb  local  127.0.0.1:20002  exited (137)  3         1h06m",
    ]


def test_no_services():
    assert format_status({"services": []}) == ["no services"]


def test_ages():
    assert [format_age(x) for x in (None, 5, 59, 61, 3601, 90000)] == ["-", "5s", "59s", "1m01s", "1h00m", "1d01h"]
