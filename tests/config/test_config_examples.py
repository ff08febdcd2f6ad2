"""The shipped example configs load, and loading fills in the defaults users rely on."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import yaml

import config

EXAMPLES = Path(config.__file__).parent / "examples"


@pytest.mark.parametrize("name", ["demo.yaml", "demo-docker.yaml", "full.yaml"])
def test_example_loads_and_every_service_round_trips(name):
    cfg = config.load(EXAMPLES / name)
    assert cfg.services
    for spec in cfg.services.values():
        doc = json.loads(json.dumps(config.service_document(spec, "127.10.0.2")))
        assert config.parse_service_document(json.dumps(doc)) == (spec, "127.10.0.2", doc["revision"])


def test_examples_directory_holds_only_loadable_configs():
    """A new example that does not load is caught even if nobody lists it above (and a
    directory that lost its examples, or a wrong path to it, is caught too)."""
    paths = sorted(EXAMPLES.glob("*.yaml"))
    assert {"demo.yaml", "demo-docker.yaml", "full.yaml"} <= {p.name for p in paths}, paths
    for path in paths:
        assert config.load(path).services, path


def test_demo_runs_two_web_replicas_from_the_config_directory():
    cfg = config.load(EXAMPLES / "demo.yaml")
    web, api = cfg.services["web"], cfg.services["api"]
    assert web.replicas == 2 and web.image is None
    # relative paths of process services are the config file's
    assert web.workdir == str(EXAMPLES)
    assert (Path(web.workdir) / web.command[1]).is_file()
    assert web.ports == (config.PortSpec(name="http", port=0, vip_port=80, protocol="http"),)
    assert web.probes.readiness.http == config.HttpProbe(path="/healthz", port="http")
    assert web.probes.liveness.http.port == "http"
    assert [n.runtime for n in cfg.mesh.nodes] == ["process"]
    assert api.routes.paths == (config.PathRoute(prefix="/api", strip_prefix=True),)
    assert web.routes.hosts == api.routes.hosts == ("demo.localhost",)


def test_demo_docker_uses_the_demo_image_on_a_docker_node():
    cfg = config.load(EXAMPLES / "demo-docker.yaml")
    assert {s.image for s in cfg.services.values()} == {"meshlet-demo/httpd:latest"}
    assert cfg.mesh.nodes[0].runtime == "docker"
    amounts = config.ResourceAmounts(cpu=0.25, memory=32 * 2**20)
    assert cfg.services["web"].resources == config.Resources(requests=amounts, limits=amounts)


def test_full_example_sets_fields_and_resolves_paths():
    cfg = config.load(EXAMPLES / "full.yaml")
    shop, batch = cfg.services["shop"], cfg.services["batch"]
    assert cfg.mesh.data_dir == str(EXAMPLES / "state")
    assert cfg.configs["site"].file == str(EXAMPLES / "files" / "site.conf")
    assert cfg.secrets["token"].file == str(EXAMPLES / "files" / "token.txt")
    assert batch.command == ("python3", "-u", "jobs/worker.py", "--queue", "default")
    assert batch.workdir == str(EXAMPLES / "jobs")
    assert batch.stop_signal == "SIGINT"
    assert shop.workdir == "/app"  # an image's workdir is inside the container: kept
    assert shop.env == {"GREETING": "hello", "RATIO": "1.10", "WORKERS": "4"}
    assert shop.args == ("--verbose", "--threads", "4")
    assert shop.secrets[1] == config.SecretMount(name="db-password", target="/run/secrets/db")
    assert batch.secrets[0] == config.SecretMount(name="db-password", target=None, env="DB_PASSWORD")
    assert shop.update.canary[-1] == config.CanaryStep(weight=100, pause=0.0)
    assert shop.ports[1].vip_port == 9102
    assert cfg.services["exporter"].ports[0].vip_port == 9100  # a fixed port is its own VIP port
    assert cfg.mesh.nodes[0].capacity == config.NodeCapacity(cpu=4.0, memory=8 * 2**30)
    assert cfg.mesh.nodes[1].capacity.cpu == 1.5
    assert cfg.volumes["scratch"] == config.VolumeSpec(name="scratch", type="tmpfs", size=64 * 2**20)


def _schema_paths(cls: type, prefix: str) -> set[str]:
    """Dotted paths of every field below dataclass ``cls`` (list items share their list's path)."""
    paths = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}"
        paths.add(path)
        for inner in _dataclasses_in(hints[f.name]):
            paths |= _schema_paths(inner, path)
    return paths


def _dataclasses_in(hint) -> list[type]:
    if dataclasses.is_dataclass(hint):
        return [hint]
    return [c for arg in typing.get_args(hint) for c in _dataclasses_in(arg)]


def _yaml_paths(value, prefix: str, out: set[str]) -> set[str]:
    if isinstance(value, dict):
        for key, v in value.items():
            path = f"{prefix}.{key}"
            out.add(path)
            _yaml_paths(v, path, out)
    elif isinstance(value, list):
        for v in value:
            _yaml_paths(v, prefix, out)
    return out


def test_full_example_uses_every_field():
    raw = yaml.safe_load((EXAMPLES / "full.yaml").read_text())
    written: set[str] = set()
    for kind in ("services", "volumes", "configs", "secrets"):
        for item in raw[kind].values():
            _yaml_paths(item, f".{kind}.*", written)
    _yaml_paths(raw["mesh"], ".mesh", written)
    expected = _schema_paths(config.MeshSettings, ".mesh")
    for kind, cls in (("services", config.ServiceSpec), ("volumes", config.VolumeSpec),
                      ("configs", config.ConfigSpec), ("secrets", config.SecretSpec)):
        expected |= _schema_paths(cls, f".{kind}.*") - {f".{kind}.*.name"}  # the key is the name
    # meshlet apply fills in the versions; a file may not (and full.yaml can show only one
    # of key_file / key_env)
    expected -= {".services.*.secrets.version", ".services.*.configs.version", ".mesh.secrets.key_env",
                 ".mesh.catalog.token"}      # token_file is shown; the two exclude each other
    # ... and each mount's volume definition (copied from the top-level volumes)
    expected = {p for p in expected if not p.startswith(".services.*.volumes.volume")}
    # each probe kind (http/tcp/exec) and its fields need to appear under one of the probes
    probe = re.compile(r"(\.probes)\.(liveness|readiness|startup)\.")
    expected = {probe.sub(r"\1.*.", p) for p in expected}
    free_keys = re.compile(r"\.(labels|env|headers|driver_opts)\.[^.]+$")  # mappings with keys of the user's
    written = {probe.sub(r"\1.*.", p) for p in written if not free_keys.search(p)}
    assert sorted(expected - written) == []
    assert sorted(written - expected) == []
