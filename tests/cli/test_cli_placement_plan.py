"""``meshlet plan -f FILE [--json]``: where apply would place every replica, decided by
the supervisor's core on the file's declared nodes, contacting nothing."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import textwrap

import pytest

from supervisor.cli import main

FILE = """\
mesh:
  nodes:
    - {name: a, capacity: {cpu: 4, memory: 8Gi}, reserved: {cpu: 1}, labels: {zone: x}}
    - {name: b, capacity: {cpu: 2, memory: 4Gi}, labels: {zone: y}}
services:
  web:
    command: [app]
    replicas: 2
    resources: {cpu: 1, memory: 1Gi}
    placement: {spread_over: [zone]}
  db:
    command: [db]
    replicas: 2
    resources: {requests: {cpu: 2}, limits: {cpu: 4}}
    placement: {strategy: binpack}
"""


@pytest.fixture(autouse=True)
def contacts_nothing(monkeypatch):
    """No engine, no catalog: a connect or a child process fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("meshlet plan tried to contact something")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def plan(tmp_path, text, *args):
    path = tmp_path / "meshlet.yaml"
    path.write_text(textwrap.dedent(text))
    out, err = io.StringIO(), io.StringIO()
    rc = main(["plan", "-f", str(path), *args], out=out, err=err)
    return rc, out.getvalue(), err.getvalue(), str(path)


def test_json_lists_every_replica_placed_or_pending(tmp_path):
    rc, out, err, _ = plan(tmp_path, FILE, "--json")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    # 6 cores requested, 5 offered (a keeps 1 of its 4): one replica stays pending. db (2
    # cores, largest first, binpack) fills b exactly, then a; web takes what a has left
    assert doc == {
        "placements": [{"service": "db", "slot": 0, "node": "b"},
                       {"service": "db", "slot": 1, "node": "a"},
                       {"service": "web", "slot": 0, "node": "a"}],
        "pending": [{"service": "web", "slot": 1,
                     "reason": "no node fits (a: cpu: 0 of 3 free, needs 1; b: cpu: 0 of 2 free, needs 1)"}]}


def test_table_shows_placements_pending_and_what_each_node_holds(tmp_path):
    rc, out, _, _ = plan(tmp_path, FILE)
    assert rc == 0
    assert out.splitlines() == [
        "SERVICE  SLOT  NODE",
        "db       0     b",
        "db       1     a",
        "web      0     a",
        "",
        "1 pending:",
        "SERVICE  SLOT  REASON",
        "web      1     no node fits (a: cpu: 0 of 3 free, needs 1; b: cpu: 0 of 2 free, needs 1)",
        "",
        "NODE  REPLICAS  CPU REQUESTED  MEMORY REQUESTED",
        "a     2         3 of 3         1024Mi of 8192Mi",
        "b     1         2 of 2         0Mi of 4096Mi",
    ]


def test_a_node_without_capacity_is_unbounded_and_said_so(tmp_path):
    rc, out, err, _ = plan(tmp_path, """\
        mesh: {nodes: [{name: big}]}
        services: {web: {command: [app], replicas: 3, resources: {cpu: 64}}}
        """, "--json")
    assert rc == 0 and len(json.loads(out)["placements"]) == 3
    assert err == "meshlet plan: node big declares no cpu or memory capacity: unbounded in this plan\n"


def test_without_nodes_one_local_node_is_assumed_and_said_so(tmp_path):
    rc, out, err, _ = plan(tmp_path, "services: {web: {image: x, replicas: 2}}\n", "--json")
    assert rc == 0
    assert [p["node"] for p in json.loads(out)["placements"]] == ["local", "local"]
    assert 'planned on one node "local" (docker, unbounded)' in err


def test_an_invalid_file_exits_2_naming_file_line_and_field(tmp_path):
    rc, out, err, path = plan(tmp_path, """\
        services:
          web:
            command: [app]
            resources: {requests: {cpu: 2}, limits: {cpu: 1}}
        """)
    assert rc == 2 and out == ""
    assert err == f"{path}:4 services.web.resources.requests.cpu: must not be more than limits.cpu (1), got 2\n"


def test_what_crosses_services_is_refused_as_apply_refuses_it(tmp_path):
    rc, out, err, path = plan(tmp_path, """\
        services:
          a: {command: [x], ports: [{name: http, port: 7000}], update: {max_surge: 0}}
          b: {command: [y], ports: [{name: http, port: 7000}], update: {max_surge: 0}}
        """)
    assert rc == 2 and out == ""
    assert err.startswith(f"{path}:3 services.b.ports[0].port: port 7000 is also services.a.ports[0]'s"), err
