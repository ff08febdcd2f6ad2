"""ServiceSpec <-> JSON, revisions, and the KV service document (the cross-component contract)."""

from __future__ import annotations

import copy
import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import config
from config import ServiceSpec

FULL = """
services:
  shop:
    image: meshlet-test/shop:2
    args: [--verbose]
    workdir: /app
    replicas: 3
    resources: {cpu: 0.5, memory: 128MiB}
    ports:
      - {name: http, vip_port: 8000}
      - {name: db, port: 5432, protocol: tcp}
    env: {GREETING: hello}
    tags: [v2]
    probes:
      liveness: {http: {path: /healthz, headers: {X-Probe: "1"}}, initial_delay: 5s}
      readiness: {tcp: {port: db}, period: 1s, success_threshold: 2}
      startup: {exec: {command: [test, -f, /tmp/ready]}, failure_threshold: 30}
    restart: {policy: on-failure, backoff: {initial: 500ms, max: 1m, reset_after: 5m}}
    stop_signal: SIGQUIT
    stop_grace_period: 30s
    update:
      max_surge: 1
      max_unavailable: 0
      min_ready: 5s
      progress_deadline: 5m
      auto_revert: false
      drain_delay: 2s
      history: 5
      canary: [{weight: 10, pause: 1m}, {weight: 50}]
    routes:
      hosts: [shop.example.test]
      paths: [{prefix: /}, {prefix: /static, strip_prefix: true}]
      policy: ring_hash
      hash_on: {cookie: sid}
      retries: {attempts: 3, per_try_timeout: 2s, budget_percent: 25, min_concurrent: 5}
      timeouts: {connect: 500ms, request: 30s, idle: 2m}
      outlier: {consecutive_5xx: 3, consecutive_gateway_failure: 2, base_ejection_time: 10s,
                max_ejection_percent: 50, interval: 5s, max_ejection_time: 2m}
      max_pending: 256
    dns: {mode: vip, ttl: 1s}
    placement: {spread: false, constraints: ["node.labels.disk == ssd"]}
    volumes: [{name: data, target: /data, read_only: true}]
    configs: [{name: site, target: /etc/site.conf}]
    secrets: [{name: token}, {name: pw, target: /run/secrets/db}]
volumes: {data: {type: tmpfs}}
configs: {site: {data: "x"}}
secrets: {token: {env: T}, pw: {env: P}}
"""


@pytest.fixture(scope="module")
def shop() -> ServiceSpec:
    return config.loads(FULL).services["shop"]


def test_to_dict_is_normalised_json(shop):
    d = shop.to_dict()
    assert json.loads(json.dumps(d)) == d
    # the short form {cpu, memory} is stored in the one canonical shape: requests = limits
    assert d["resources"] == {"requests": {"cpu": 0.5, "memory": 134217728},
                              "limits": {"cpu": 0.5, "memory": 134217728}}
    assert d["placement"] == {"strategy": "binpack", "spread_over": [],
                              "constraints": ["node.labels.disk == ssd"]}
    assert d["routes"]["timeouts"] == {"connect": 0.5, "request": 30.0, "idle": 120.0}
    assert d["update"]["max_surge"] == 1 and d["update"]["max_unavailable"] == 0
    assert d["probes"]["liveness"]["http"] == {"path": "/healthz", "port": "http",
                                               "headers": {"X-Probe": "1"}}
    assert d["probes"]["liveness"]["tcp"] is None
    assert d["secrets"] == [
        {"name": "token", "target": "/run/secrets/token", "env": None, "mode": 0o400, "uid": None, "gid": None,
         "version": None},
        {"name": "pw", "target": "/run/secrets/db", "env": None, "mode": 0o400, "uid": None, "gid": None, "version": None}]
    assert d["configs"] == [{"name": "site", "target": "/etc/site.conf", "mode": 0o444, "version": None}]
    assert d["ports"][1] == {"name": "db", "port": 5432, "vip_port": 5432, "protocol": "tcp"}


def test_defaults_are_present_in_to_dict():
    d = config.loads("services: {web: {image: x}}").services["web"].to_dict()
    assert d["replicas"] == 1
    assert d["update"] == {"strategy": "rolling", "max_surge": "25%", "max_unavailable": "25%",
                           "min_ready": 0.0, "progress_deadline": 600.0, "auto_revert": True,
                           "drain_delay": 1.0, "history": 10, "canary": []}
    assert d["restart"] == {"policy": "always",
                            "backoff": {"initial": 1.0, "max": 300.0, "reset_after": 600.0}}
    assert d["routes"]["retries"] == {"attempts": 2, "per_try_timeout": 0.0,
                                      "budget_percent": 20, "min_concurrent": 3}
    assert d["routes"]["paths"] == [{"prefix": "/", "strip_prefix": False}]
    assert d["stop_signal"] == "SIGTERM" and d["stop_grace_period"] == 10.0


def test_probe_defaults_are_kubernetes():
    svc = config.loads("services: {web: {image: x, ports: [{}], probes: {readiness: {tcp: {}}}}}")
    probe = svc.services["web"].probes.readiness
    assert (probe.initial_delay, probe.period, probe.timeout) == (0.0, 10.0, 1.0)
    assert (probe.success_threshold, probe.failure_threshold) == (1, 3)
    assert probe.tcp.port == "http"  # no port: the first declared one (named after its protocol)


def test_from_dict_round_trips(shop):
    assert ServiceSpec.from_dict(shop.to_dict()) == shop
    assert ServiceSpec.from_dict(json.loads(json.dumps(shop.to_dict()))) == shop


def test_from_dict_reports_every_bad_field_by_path(shop):
    d = shop.to_dict()
    d["replicas"] = -2
    d["ports"][0]["protocol"] = "udp"
    d["routes"]["timeouts"]["connect"] = "soon"
    d["tag"] = ["v3"]
    with pytest.raises(config.ConfigError) as err:
        ServiceSpec.from_dict(d)
    assert str(err.value).split("\n") == [
        '<service spec> tag: unknown key (did you mean "tags"?)',
        "<service spec> replicas: expected an integer >= 0, got -2",
        '<service spec> ports[0].protocol: expected http or tcp, got "udp"',
        '<service spec> routes.timeouts.connect: expected a duration like 500ms, 5s or 2m, got "soon"',
    ]


def test_from_dict_rejects_non_mapping():
    with pytest.raises(config.ConfigError) as err:
        ServiceSpec.from_dict(["web"])
    assert str(err.value) == "<service spec> expected a mapping, got a list"


def test_specs_are_frozen_and_hashable(shop):
    with pytest.raises(AttributeError):
        shop.replicas = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        shop.env["X"] = "y"  # type: ignore[index]
    assert hash(shop) == hash(ServiceSpec.from_dict(shop.to_dict()))
    assert copy.deepcopy(shop) == shop


# --- revisions ------------------------------------------------------------------------------

def test_revision_is_stable_across_versions():
    """A revision change restarts every replica on upgrade: this value must not drift.

    If a deliberate change of the document shape moves it, bump the document format.
    """
    spec = config.loads("services: {web: {image: nginx:1.27, ports: [{name: http}]}}").services["web"]
    assert config.service_revision(spec) == "495a218ce48c"


def test_revision_ignores_how_the_yaml_was_written():
    a = config.loads("services: {web: {image: x, stop_grace_period: 1m, env: {A: '1', B: '2'}}}")
    b = config.loads("services:\n  web:\n    env: {B: '2', A: '1'}\n    stop_grace_period: 60s\n"
                     "    image: x\n    replicas: 1\n")
    assert config.service_revision(a.services["web"]) == config.service_revision(b.services["web"])


def _leaves(d, path=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(d, list) and d:
        for i, v in enumerate(d):
            yield from _leaves(v, path + (i,))
    else:
        yield path, d


_ALTERNATIVES = ["http", "tcp", "vip", "endpoints", "always", "never", "recreate", "random",
                 "SIGINT", "/other", "X-Other", "other", "OTHER_ENV", "node.name == b"]


def _mutations(value):
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [value + 1.0]
    if isinstance(value, str):
        return [a for a in _ALTERNATIVES if a != value] + [value + "x", "75%"]
    if value is None:
        return ["vip", 1.0, "/x", 1]
    if value == []:
        return [["other"]]
    return []


def _fields_whose_change_moves_the_revision(spec: ServiceSpec) -> set[str]:
    """Change each leaf of spec.to_dict() in turn (first valid alternative) and return the
    top-level fields for which some change was valid; every valid change must move the revision."""
    base = spec.to_dict()
    revision = config.service_revision(spec)
    changed_fields = set()
    for path, value in _leaves(base):
        for new in _mutations(value):
            d = copy.deepcopy(base)
            target = d
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = new
            try:
                mutated = ServiceSpec.from_dict(d)
            except config.ConfigError:
                continue
            assert config.service_revision(mutated) != revision, path
            changed_fields.add(path[0])
            break
    return changed_fields


def test_revision_changes_when_any_field_changes(shop):
    process = config.loads("services: {job: {command: [python3, app.py]}}").services["job"]
    changed = (_fields_whose_change_moves_the_revision(shop)
               | _fields_whose_change_moves_the_revision(process))
    assert changed == set(shop.to_dict())


# --- the KV document ------------------------------------------------------------------------

def test_service_document_shape(shop):
    doc = config.service_document(shop, "127.10.0.7")
    assert set(doc) == {"format", "name", "revision", "vip", "spec"}
    assert doc["format"] == 2 and doc["name"] == "shop" and doc["vip"] == "127.10.0.7"
    assert doc["revision"] == config.service_revision(shop)
    assert len(doc["revision"]) == 12 and int(doc["revision"], 16) >= 0
    assert doc["spec"] == shop.to_dict()


def test_parse_service_document_accepts_bytes_and_null_vip(shop):
    raw = json.dumps(config.service_document(shop, None)).encode()
    spec, vip, revision = config.parse_service_document(raw)
    assert (spec, vip, revision) == (shop, None, config.service_revision(shop))


def _doc(shop, **changes):
    doc = config.service_document(shop, "127.10.0.7")
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...})


@pytest.mark.parametrize("change, message", [
    pytest.param({"format": 3}, "meshlet/services/shop format: unsupported document format 3 "
                                "(this meshlet reads formats 1 and 2)", id="future-format"),
    pytest.param({"format": ...}, "meshlet/services/shop format: unsupported document format "
                                  "null (this meshlet reads formats 1 and 2)", id="no-format"),
    pytest.param({"format": True}, "meshlet/services/shop format: unsupported document format "
                                   "true (this meshlet reads formats 1 and 2)", id="bool-format"),
    pytest.param({"name": "web"}, 'meshlet/services/shop name: "web" does not match spec.name '
                                  '"shop"', id="name-mismatch"),
    pytest.param({"vip": "10.0.0.300"}, 'meshlet/services/shop vip: expected an IPv4 address or '
                                        'null, got "10.0.0.300"', id="bad-vip"),
    pytest.param({"revision": "xyz"}, 'meshlet/services/shop revision: expected 12 hex digits, '
                                      'got "xyz"', id="bad-revision"),
    pytest.param({"spec": ...}, 'meshlet/services/shop missing required key "spec"', id="no-spec"),
    pytest.param({"extra": 1}, "meshlet/services/shop extra: unknown key", id="unknown-key"),
])
def test_parse_service_document_rejects(shop, change, message):
    with pytest.raises(config.ConfigError) as err:
        config.parse_service_document(_doc(shop, **change), source="meshlet/services/shop")
    assert str(err.value) == message


def test_a_format_1_document_reads_as_before_with_the_same_revision(shop):
    """What an older meshlet stored (resources {cpu, memory}, placement.spread) still loads
    after an upgrade, as the same spec with the same revision: nothing restarts."""
    doc = config.service_document(shop, "127.10.0.7")
    old = copy.deepcopy(doc)
    old["format"] = 1
    old["spec"]["resources"] = {"cpu": 0.5, "memory": 134217728}
    old["spec"]["placement"] = {"spread": False, "constraints": ["node.labels.disk == ssd"]}
    spec, vip, revision = config.parse_service_document(json.dumps(old))
    assert spec == shop and revision == doc["revision"] == config.service_revision(spec)
    # the revision of a service without resources or placement, computed before format 2
    plain = config.loads("services: {web: {image: nginx:1.27, ports: [{name: http}]}}").services["web"]
    assert config.service_revision(plain) == "495a218ce48c"


@pytest.mark.parametrize("change", [
    pytest.param({"resources": {"requests": {"cpu": 0.5}, "limits": {"cpu": 1}}}, id="limit-above-request"),
    pytest.param({"placement": {"strategy": "binpack", "spread_over": ["zone"]}}, id="spread-over"),
])
def test_specs_format_1_could_not_hold_have_revisions_of_their_own(shop, change):
    d = shop.to_dict()
    d.update(change)
    other = ServiceSpec.from_dict(d)
    assert other != shop and config.service_revision(other) != config.service_revision(shop)


def test_parse_service_document_names_bad_spec_fields(shop):
    doc = config.service_document(shop, None)
    doc["spec"]["replicas"] = "many"
    with pytest.raises(config.ConfigError) as err:
        config.parse_service_document(json.dumps(doc), source="kv")
    assert str(err.value) == 'kv spec.replicas: expected an integer >= 0, got "many"'


@pytest.mark.parametrize("data, message", [
    pytest.param(b"{not json", "<service document> not valid JSON: Expecting property name "
                               "enclosed in double quotes: line 1 column 2 (char 1)", id="bad-json"),
    pytest.param(b"\xff\xfe\x00", None, id="binary"),
    pytest.param("[1, 2]", "<service document> expected a JSON object, got a list", id="array"),
])
def test_parse_service_document_rejects_garbage(data, message):
    with pytest.raises(config.ConfigError) as err:
        config.parse_service_document(data)
    if message is not None:
        assert str(err.value) == message
    else:
        assert str(err.value).startswith("<service document> not valid JSON")


# --- property: any valid spec survives to_dict -> JSON -> from_dict ----------------------------

NAMES = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
TEXT = st.text(string.ascii_letters + string.digits + " -_./:=", max_size=12)
DURATIONS = st.one_of(st.just(0.0), st.floats(0.001, 1e6, allow_nan=False), st.integers(0, 10**6).map(float))
POSITIVE = st.floats(0.001, 1e5, allow_nan=False)
COUNT = st.one_of(st.integers(0, 10), st.integers(0, 100).map(lambda p: f"{p}%"))


@st.composite
def specs(draw) -> ServiceSpec:
    port_names = draw(st.lists(NAMES, unique=True, max_size=3))
    vip_ports = draw(st.lists(st.integers(1, 65535), unique=True, min_size=len(port_names),
                              max_size=len(port_names)))
    host_ports = draw(st.lists(st.integers(1, 65535), unique=True, min_size=len(port_names),
                               max_size=len(port_names)))
    ports = tuple(config.PortSpec(name=n, port=draw(st.sampled_from([0, hp])), vip_port=vp,
                                  protocol=draw(st.sampled_from(["http", "tcp"])))
                  for n, vp, hp in zip(port_names, vip_ports, host_ports))

    def probe(liveness: bool):
        kinds = ["exec"] + (["http", "tcp"] if port_names else [])
        kind = draw(st.sampled_from(kinds))
        ref = draw(st.sampled_from(port_names)) if port_names else None
        parts = {
            "http": {"http": config.HttpProbe(path="/" + draw(NAMES), port=ref,
                                              headers=config.FrozenDict(draw(st.dictionaries(st.sampled_from(["X-A", "X-B"]), TEXT))))},
            "tcp": {"tcp": config.TcpProbe(port=ref if draw(st.booleans()) else draw(st.integers(1, 65535)))},
            "exec": {"exec": config.ExecProbe(command=tuple(draw(st.lists(TEXT, min_size=1, max_size=3))))},
        }[kind]
        return config.Probe(**parts, initial_delay=draw(DURATIONS), period=draw(POSITIVE),
                            timeout=draw(POSITIVE),
                            success_threshold=1 if liveness else draw(st.integers(1, 5)),
                            failure_threshold=draw(st.integers(1, 10)))

    maybe = lambda s: draw(st.one_of(st.none(), s))  # noqa: E731
    probes = config.Probes(
        liveness=probe(True) if draw(st.booleans()) else None,
        readiness=probe(False) if draw(st.booleans()) else None,
        startup=probe(True) if draw(st.booleans()) else None)
    surge, unavailable = draw(COUNT), draw(COUNT)
    if surge in (0, "0%") and unavailable in (0, "0%"):
        unavailable = 1
    weights = sorted(draw(st.sets(st.integers(1, 100), max_size=3)))
    strategy = "rolling" if weights else draw(st.sampled_from(["rolling", "recreate"]))
    policy = draw(st.sampled_from(["least_request", "round_robin", "random", "ring_hash", "peak_ewma"]))
    hash_on = None
    if policy == "ring_hash":
        hash_on = draw(st.sampled_from([config.HashOn(header="X-User"), config.HashOn(cookie="sid"),
                                        config.HashOn(source_ip=True)]))
    targets = iter(draw(st.lists(NAMES, unique=True, min_size=6, max_size=6)))
    use_image = draw(st.booleans())
    initial = draw(POSITIVE)
    # normalised: per resource neither amount or both, the request at most the limit
    cpu = maybe(st.tuples(POSITIVE, POSITIVE).map(sorted))
    memory = maybe(st.tuples(st.integers(1, 2**40), st.integers(1, 2**40)).map(sorted))
    resources = config.Resources(
        requests=config.ResourceAmounts(cpu=cpu and cpu[0], memory=memory and memory[0]),
        limits=config.ResourceAmounts(cpu=cpu and cpu[1], memory=memory and memory[1]))
    return ServiceSpec(
        name=draw(NAMES),
        image="img/" + draw(NAMES) if use_image else None,
        command=None if use_image else tuple(draw(st.lists(TEXT, min_size=1, max_size=4))),
        args=tuple(draw(st.lists(TEXT, max_size=3))),
        workdir=maybe(st.just("/w")),
        replicas=draw(st.integers(0, 50)),
        resources=resources,
        ports=ports,
        env=config.FrozenDict(draw(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,6}", fullmatch=True)
                                                   .filter(lambda k: not k.startswith("PORT")), TEXT, max_size=3))),
        tags=tuple(draw(st.lists(NAMES, unique=True, max_size=3))),
        probes=probes,
        restart=config.RestartPolicy(policy=draw(st.sampled_from(["always", "on-failure", "never"])),
                                     backoff=config.Backoff(initial=initial, max=initial + draw(DURATIONS),
                                                            reset_after=draw(DURATIONS))),
        stop_signal=draw(st.sampled_from(["SIGTERM", "SIGINT", "SIGQUIT", "SIGKILL"])),
        stop_grace_period=draw(DURATIONS),
        update=config.UpdateStrategy(
            strategy=strategy, max_surge=surge, max_unavailable=unavailable,
            min_ready=draw(DURATIONS), progress_deadline=draw(POSITIVE), auto_revert=draw(st.booleans()),
            drain_delay=draw(DURATIONS), history=draw(st.integers(0, 20)),
            canary=tuple(config.CanaryStep(weight=w, pause=draw(DURATIONS)) for w in weights)),
        routes=config.Routes(
            hosts=tuple(draw(st.lists(NAMES.map(lambda n: n + ".test"), unique=True, max_size=2))),
            paths=tuple(config.PathRoute(prefix="/" + p, strip_prefix=draw(st.booleans()))
                        for p in draw(st.lists(NAMES, unique=True, min_size=1, max_size=2))),
            policy=policy, hash_on=hash_on,
            retries=config.Retries(attempts=draw(st.integers(0, 5)), per_try_timeout=draw(DURATIONS),
                                   budget_percent=draw(st.integers(0, 100)), min_concurrent=draw(st.integers(0, 9))),
            timeouts=config.Timeouts(connect=draw(POSITIVE), request=draw(DURATIONS), idle=draw(DURATIONS)),
            outlier=config.Outlier(consecutive_5xx=draw(st.integers(0, 9)),
                                   consecutive_gateway_failure=draw(st.integers(0, 9)),
                                   base_ejection_time=draw(DURATIONS),
                                   max_ejection_percent=draw(st.integers(0, 100)),
                                   interval=draw(POSITIVE), max_ejection_time=draw(DURATIONS)),
            max_pending=draw(st.integers(0, 5000))),
        dns=config.DnsOverride(mode=maybe(st.sampled_from(["vip", "endpoints"])), ttl=maybe(DURATIONS)),
        placement=config.Placement(strategy=draw(st.sampled_from(["spread", "binpack"])),
                                   spread_over=tuple(draw(st.lists(NAMES, unique=True, max_size=2))),
                                   constraints=tuple(draw(st.lists(NAMES.map(lambda n: f"node.labels.{n} == x"),
                                                                   unique=True, max_size=2)))),
        volumes=tuple(config.VolumeMount(name=draw(NAMES), target="/" + next(targets),
                                         read_only=draw(st.booleans())) for _ in range(draw(st.integers(0, 2)))),
        configs=tuple(config.ConfigMount(name=draw(NAMES), target="/" + next(targets))
                      for _ in range(draw(st.integers(0, 2)))),
        secrets=tuple(draw(st.sampled_from([            # a variable only for processes
            config.SecretMount(name="s", target="/" + next(targets), env=None),
            *([] if use_image else [config.SecretMount(name="s", target=None, env="S")]),
        ])) for _ in range(draw(st.integers(0, 2)))),
    )


@settings(max_examples=150, deadline=None)
@given(specs())
def test_property_json_round_trip_is_exact(spec):
    text = json.dumps(config.service_document(spec, "127.10.0.9"))
    parsed, vip, revision = config.parse_service_document(text)
    assert parsed == spec
    assert vip == "127.10.0.9"
    assert revision == config.service_revision(spec) == config.service_revision(parsed)
