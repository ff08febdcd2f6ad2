"""The runtimes' pure parts: validation, the workload environment, exit codes, the Docker
API translation, /proc parsing, state records and log tails. No engine, no processes."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.runtime import RUNTIMES, DockerRuntime, ProcessRuntime, Runtime
from supervisor.runtime._bridge import EventQueue
from supervisor.runtime._docker_model import (create_kwargs, docker_state, identity_labels,
                                              observed_from_attrs, observed_from_event,
                                              parse_docker_time)
from supervisor.runtime._proc import Record, parse_stat_starttime, tail_offset
from supervisor.runtime.base import (InstanceSpec, InvalidSpec, RuntimeEvent,
                                     exit_code_from_returncode, port_env_name, signal_number,
                                     spec_from_dict, spec_to_dict, validate_spec, workload_env)


def spec(**kw) -> InstanceSpec:
    base = dict(instance_id="web-0-abc", service="web", slot=0, revision="r1", node="n1")
    base.update(kw)
    return InstanceSpec(**base)


def test_runtimes_are_looked_up_by_name_and_satisfy_the_protocol(tmp_path) -> None:
    assert RUNTIMES == {"docker": DockerRuntime, "process": ProcessRuntime}
    assert isinstance(ProcessRuntime(tmp_path), Runtime)
    assert isinstance(DockerRuntime("unix:///nonexistent.sock"), Runtime)


# --- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("kw, runtime, fragment", [
    pytest.param(dict(image="busybox:1"), "docker", None, id="docker-ok"),
    pytest.param(dict(command=("sleep", "1")), "process", None, id="process-ok"),
    pytest.param(dict(), "docker", "image: required on a docker node", id="docker-no-image"),
    pytest.param(dict(image="app:1"), "process", "command: required on a process node "
                 "(the service has only image app:1)", id="process-image-only"),
    pytest.param(dict(command=("",)), "process", "command: expected non-empty", id="empty-word"),
    pytest.param(dict(instance_id="../x", image="a"), "docker", "instance_id", id="bad-id"),
    pytest.param(dict(instance_id=".hidden", image="a"), "docker", "instance_id",
                 id="dot-id"),
    pytest.param(dict(image="a", ports={"http": 0}), "docker", "ports http", id="port-0"),
    pytest.param(dict(image="a", ports={"http": 8080, "admin": 8080}), "docker",
                 "port 8080 assigned twice", id="port-twice"),
    pytest.param(dict(image="a", ports={"HTTP": 80}), "docker", "port name", id="port-name"),
    pytest.param(dict(image="a", env={"A-B": "x"}), "docker", "env 'A-B'", id="env-name"),
    pytest.param(dict(image="a", stop_signal="SIGNOPE"), "docker", "stop_signal",
                 id="signal"),
    pytest.param(dict(image="a", stop_grace_period=-1), "docker", "stop_grace_period",
                 id="grace"),
    pytest.param(dict(image="a", dns="resolver"), "docker", "dns", id="dns"),
    pytest.param(dict(image="a", memory=0), "docker", "memory", id="memory"),
    pytest.param(dict(image="a", cpu=0.0), "docker", "cpu", id="cpu"),
    pytest.param(dict(image="a", labels={"meshlet.owner": "me"}), "docker",
                 "meshlet.* prefix", id="reserved-label"),
])
def test_validate_spec(kw, runtime, fragment) -> None:
    if fragment is None:
        validate_spec(spec(**kw), runtime=runtime)
        return
    with pytest.raises(InvalidSpec) as info:
        validate_spec(spec(**kw), runtime=runtime)
    assert fragment in str(info.value)


def test_validate_spec_reports_every_problem_at_once() -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_spec(spec(instance_id="a/b", slot=-1, ports={"http": 70000}), runtime="docker")
    assert len(info.value.problems) == 4   # id, slot, image, port
    assert str(info.value).startswith("invalid instance spec 'a/b': ")


# --- environment, signals, exit codes ----------------------------------------------------

def test_workload_env_precedence_and_port_names() -> None:
    s = spec(env={"PORT": "1", "GREETING": "hi", "PATH": "/spec"},
             ports={"http": 8080, "admin-api": 9090}, slot=2)
    env = workload_env(s, base={"PATH": "/usr/bin", "HOME": "/root"})
    assert env == {
        "PATH": "/spec", "HOME": "/root", "GREETING": "hi",
        "PORT": "8080", "PORT_HTTP": "8080", "PORT_ADMIN_API": "9090",   # meshlet's win
        "MESHLET_INSTANCE": "web-0-abc", "MESHLET_SERVICE": "web", "MESHLET_SLOT": "2",
        "MESHLET_REVISION": "r1", "MESHLET_NODE": "n1",
    }
    assert "PORT" not in workload_env(spec())
    assert port_env_name("a-b-c") == "PORT_A_B_C"


@pytest.mark.parametrize("returncode, code", [(0, 0), (3, 3), (-9, 137), (-15, 143)])
def test_exit_codes_follow_the_shell_convention(returncode, code) -> None:
    assert exit_code_from_returncode(returncode) == code


@pytest.mark.parametrize("name, number", [("SIGTERM", 15), ("TERM", 15), ("sigint", 2),
                                           ("9", 9), ("SIGUSR1", 10)])
def test_signal_number(name, number) -> None:
    assert signal_number(name) == number


def test_signal_number_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        signal_number("SIGFOO")


names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)


@given(ports=st.dictionaries(names, st.integers(1, 65535), max_size=4),
       env=st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
                           st.text(max_size=10).filter(lambda v: "\0" not in v), max_size=4),
       command=st.none() | st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3),
       memory=st.none() | st.integers(1, 2**40))
def test_spec_survives_its_json_form(ports, env, command, memory) -> None:
    s = spec(ports=ports, env=env, command=command, memory=memory, cpu=0.5, dns="127.0.0.1")
    back = spec_from_dict(json.loads(json.dumps(spec_to_dict(s))))
    assert back == s
    assert list(back.ports) == list(s.ports)     # order kept: the first port is PORT


def test_spec_is_hashable_and_frozen() -> None:
    s = spec(env={"A": "1"}, command=["x"])
    assert s.command == ("x",) and hash(s) == hash(spec(env={"A": "1"}, command=("x",)))
    with pytest.raises(TypeError):
        s.env["B"] = "2"  # type: ignore[index]


# --- docker translation ------------------------------------------------------------------

@pytest.mark.parametrize("command, args, expect", [
    pytest.param(None, (), {}, id="image-defaults"),
    pytest.param(None, ("-v",), {"command": ["-v"]}, id="args-replace-cmd"),
    pytest.param(("sh", "-c", "x"), (), {"entrypoint": ["sh", "-c", "x"], "command": []},
                 id="command-replaces-entrypoint"),
    pytest.param(("app",), ("--flag",), {"entrypoint": ["app"], "command": ["--flag"]},
                 id="both"),
])
def test_create_kwargs_command_semantics(command, args, expect) -> None:
    kw = create_kwargs(spec(image="img:1", command=command, args=args))
    assert {k: kw[k] for k in ("entrypoint", "command") if k in kw} == expect


def test_a_secret_variable_never_reaches_a_containers_config() -> None:
    """docker inspect prints a container's Env: a secret as a variable is refused, and the
    message carries no value."""
    with pytest.raises(InvalidSpec) as info:
        create_kwargs(spec(image="img:1", secret_env={"DB_PASSWORD": "pa55-w0rd"}))
    assert "files only" in str(info.value) and "pa55-w0rd" not in str(info.value)


def test_create_kwargs_limits_network_identity() -> None:
    s = spec(image="img:1", cpu=0.5, memory=64 * 2**20, dns="127.0.0.53", workdir="/srv",
             ports={"http": 8080}, labels={"team": "a"}, stop_signal="SIGINT")
    kw = create_kwargs(s)
    host = kw["host_config"]
    assert host["network_mode"] == "host" and "restart_policy" not in host
    assert host["nano_cpus"] == 500_000_000
    assert host["mem_limit"] == host["memswap_limit"] == 64 * 2**20
    assert host["dns"] == ["127.0.0.53"] and kw["working_dir"] == "/srv"
    mounted = create_kwargs(s, resolv_conf_path="/d/resolv.conf")["host_config"]
    assert "dns" not in mounted
    assert mounted["binds"] == {"/d/resolv.conf": {"bind": "/etc/resolv.conf", "mode": "ro"}}
    assert kw["name"] == "web-0-abc" and kw["stop_signal"] == "SIGINT"
    assert kw["stop_timeout"] == 10             # the default grace, in the API's seconds
    assert create_kwargs(spec(image="i", stop_grace_period=0.2))["stop_timeout"] == 1
    assert kw["labels"] == {"team": "a", **identity_labels(s)}
    assert kw["labels"]["meshlet.owner"] == "meshlet"
    assert json.loads(kw["labels"]["meshlet.ports"]) == {"http": 8080}
    assert kw["environment"]["PORT_HTTP"] == "8080"


@pytest.mark.parametrize("text, expect", [
    ("2024-05-01T10:00:00Z", 1714557600.0),
    ("2024-05-01T10:00:00.123456789Z", 1714557600.123456),
    ("2024-05-01T12:00:00.5+02:00", 1714557600.5),
    ("0001-01-01T00:00:00Z", None),
    ("", None),
    ("garbage", None),
])
def test_parse_docker_time(text, expect) -> None:
    assert parse_docker_time(text) == (pytest.approx(expect) if expect else None)


@pytest.mark.parametrize("status, state", [("running", "running"), ("paused", "running"),
                                           ("created", "starting"), ("restarting", "starting"),
                                           ("exited", "exited"), ("dead", "exited"),
                                           ("removing", "exited")])
def test_docker_state(status, state) -> None:
    assert docker_state(status) == state


def test_observed_from_attrs_reads_identity_from_labels() -> None:
    s = spec(image="img:1", ports={"http": 8080, "grpc": 9090}, slot=4, labels={"team": "a"})
    attrs = {
        "Id": "c0ffee", "Name": "/web-0-abc",
        "Config": {"Labels": {**identity_labels(s), "team": "a"}},
        "State": {"Status": "exited", "ExitCode": 137, "OOMKilled": True, "Pid": 0,
                  "StartedAt": "2024-05-01T10:00:00Z", "FinishedAt": "2024-05-01T10:00:05Z"},
    }
    obs = observed_from_attrs(attrs, "10.0.0.1")
    assert (obs.instance_id, obs.service, obs.slot, obs.revision, obs.node) == \
        ("web-0-abc", "web", 4, "r1", "n1")
    assert (obs.state, obs.exit_code, obs.oom_killed, obs.pid) == ("exited", 137, True, None)
    assert obs.finished_at - obs.started_at == 5
    assert list(obs.ports.items()) == [("http", 8080), ("grpc", 9090)]
    assert dict(obs.labels) == {"team": "a"} and obs.address == "10.0.0.1"
    running = {**attrs, "State": {**attrs["State"], "Status": "running", "Pid": 42}}
    obs = observed_from_attrs(running, "10.0.0.1")
    assert (obs.state, obs.exit_code, obs.finished_at, obs.pid) == ("running", None, None, 42)


def test_observed_from_a_die_event() -> None:
    labels = identity_labels(spec(image="i", ports={"http": 1234}))
    event = {"id": "c0ffee", "timeNano": 1714557600_000000000,
             "Actor": {"ID": "c0ffee", "Attributes": {**labels, "exitCode": "143",
                                                      "name": "web-0-abc"}}}
    obs = observed_from_event(event, "127.0.0.1")
    assert (obs.instance_id, obs.state, obs.exit_code, obs.container_id) == \
        ("web-0-abc", "exited", 143, "c0ffee")
    assert obs.finished_at == 1714557600.0 and dict(obs.ports) == {"http": 1234}


# --- process helpers ---------------------------------------------------------------------

def test_parse_stat_starttime_with_a_hostile_command_name() -> None:
    fields = " ".join(str(i) for i in range(3, 53))   # fields 3..52; field 22 holds "22"
    assert parse_stat_starttime(f"1234 (a) b (c) S {fields[2:]}") == 22
    assert parse_stat_starttime(f"1 (sh) {fields}") == 22


@pytest.mark.parametrize("content, lines, expect", [
    (b"a\nb\nc\n", 1, b"c\n"),
    (b"a\nb\nc\n", 2, b"b\nc\n"),
    (b"a\nb\nc\n", 5, b"a\nb\nc\n"),
    (b"a\nb\nc", 1, b"c"),               # a last line without newline is a line
    (b"a\nb\nc", 2, b"b\nc"),
    (b"", 3, b""),
    (b"a\n", 0, b""),
    (b"x" * 20000 + b"\n" + b"y" * 9000 + b"\n", 1, b"y" * 9000 + b"\n"),  # across blocks
])
def test_tail_offset(content, lines, expect) -> None:
    f = io.BytesIO(content)
    f.seek(tail_offset(f, lines, block=4096))
    assert f.read() == expect


def test_state_record_round_trip() -> None:
    r = Record(spec=spec(command=("x",), ports={"b": 2, "a": 1}), pid=42, starttime=12345,
               started_at=1.5, exit_code=137, finished_at=2.5, exited=True)
    assert Record.from_json(r.to_json()) == r
    with pytest.raises(ValueError, match="format"):
        Record.from_json(json.dumps({"format": 99}))


# --- events -------------------------------------------------------------------------------

async def test_event_queue_keeps_early_events_and_refuses_a_second_consumer() -> None:
    q = EventQueue("test")
    q.put(RuntimeEvent("exit", "a"))        # before anyone listens
    first = q.stream()
    assert (await first.__anext__()).instance_id == "a"
    with pytest.raises(RuntimeError, match="already has a consumer"):
        await q.stream().__anext__()
    q.put(RuntimeEvent("resync"))
    q.close()
    assert [e.kind async for e in first] == ["resync"]
    await asyncio.sleep(0)
