"""What loading fills in, resolves and accepts: the forms users write and what others read."""

from __future__ import annotations

import json

import pytest

import config


def one(text: str, name: str = "web", **kw) -> config.ServiceSpec:
    return config.loads(text, **kw).services[name]


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "meshlet.yaml"
    path.write_text("# nothing yet\n")
    cfg = config.load(path)
    assert cfg.services == {} and cfg.volumes == {}
    mesh = cfg.mesh
    assert (mesh.domain, mesh.catalog.url, mesh.catalog_listen) == ("meshlet", "embedded", "127.0.0.1:8500")
    assert mesh.data_dir == str(tmp_path / ".meshlet")
    assert mesh.vip_range == "127.10.0.0/16" and mesh.admin_listen == "127.0.0.1:9900"
    assert mesh.dns == config.DnsSettings(listen=("127.0.0.1:8600",), mode="vip", ttl=0.0,
                                          negative_ttl=5.0, only_passing=True, recursors=())
    assert mesh.proxy == config.ProxySettings(listen=(config.ProxyListener(address="127.0.0.1:8080"),),
                                              admin_listen="127.0.0.1:9901", workers="auto", upstream_tls=())
    assert mesh.nodes == ()


def test_whole_config_to_dict_is_json():
    cfg = config.loads("services: {web: {image: x, env: {A: b}}}\nvolumes: {v: {type: tmpfs}}\n")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["services"]["web"] == cfg.services["web"].to_dict()
    assert d["volumes"] == {"v": {"name": "v", "type": "tmpfs", "source": None, "size": None, "driver": None,
                                  "driver_opts": {}, "per_replica": False, "create": False}}


def test_command_paths_are_the_config_files(tmp_path):
    (tmp_path / "bin").mkdir()
    text = ("services:\n"
            "  a: {command: ./bin/app --flag}\n"
            "  b: {command: [python3, app.py], workdir: sub}\n"
            "  c: {command: [/usr/bin/env, python3], workdir: /srv}\n"
            "  d: {image: x, workdir: rel}\n")
    path = tmp_path / "meshlet.yaml"
    path.write_text(text)
    cfg = config.load(path)
    a, b, c, d = (cfg.services[k] for k in "abcd")
    assert a.command == (str(tmp_path / "bin" / "app"), "--flag") and a.workdir == str(tmp_path)
    assert b.command == ("python3", "app.py") and b.workdir == str(tmp_path / "sub")
    assert c.command == ("/usr/bin/env", "python3") and c.workdir == "/srv"
    assert d.workdir == "rel"  # inside the container


def test_loads_resolves_against_base_dir(tmp_path):
    cfg = config.loads("secrets: {t: {file: t.txt}}\nvolumes: {v: {type: host, source: data}}\n",
                       base_dir=str(tmp_path))
    assert cfg.secrets["t"].file == str(tmp_path / "t.txt")
    assert cfg.volumes["v"].source == str(tmp_path / "data")


def test_port_defaults():
    web = one("""
services:
  web:
    image: x
    ports:
      - {}
      - {name: admin, port: 9000}
      - {protocol: tcp, vip_port: 5432}
""")
    assert web.ports == (
        config.PortSpec(name="http", port=0, vip_port=80, protocol="http"),
        config.PortSpec(name="admin", port=9000, vip_port=9000, protocol="http"),
        config.PortSpec(name="tcp", port=0, vip_port=5432, protocol="tcp"),
    )


def test_two_http_ports_cannot_share_the_default_vip_port():
    with pytest.raises(config.ConfigError) as err:
        config.loads("services:\n  web:\n    image: x\n    ports:\n      - {name: a}\n      - {name: b}\n",
                     filename="m.yaml")
    assert str(err.value) == "m.yaml:6 services.web.ports[1].vip_port: vip_port 80 is used twice (also ports[0])"


@pytest.mark.parametrize("written, stored", [
    ("SIGTERM", "SIGTERM"), ("TERM", "SIGTERM"), ("sigint", "SIGINT"), ("KILL", "SIGKILL"),
])
def test_stop_signal_forms(written, stored):
    assert one(f"services: {{web: {{image: x, stop_signal: {written}}}}}").stop_signal == stored


def test_command_string_is_split_like_a_shell():
    web = one("""services: {web: {command: "python3 -c 'print(1)' --name \\"a b\\""}}""")
    assert web.command == ("python3", "-c", "print(1)", "--name", "a b")


def test_env_numbers_keep_their_text():
    web = one("services: {web: {image: x, env: {A: 1.10, B: 010, C: 1e3, D: text}}}")
    assert web.env == {"A": "1.10", "B": "010", "C": "1e3", "D": "text"}


def test_node_runtime_is_inferred():
    cfg = config.loads("""
mesh:
  nodes:
    - {name: a}
    - {name: b, engine: "tcp://127.0.0.1:2375"}
    - {name: c, runtime: docker}
""")
    assert [(n.runtime, n.engine) for n in cfg.mesh.nodes] == [
        ("process", None), ("docker", "tcp://127.0.0.1:2375"), ("docker", "unix:///var/run/docker.sock")]


def test_secret_mount_target_defaults():
    web = one("""
services:
  web:
    command: [x]
    secrets: [{name: a}, {name: b, env: B}, {name: c, env: C, target: /c}]
secrets: {a: {env: A}, b: {env: B}, c: {env: C}}
""")
    assert [(s.target, s.env) for s in web.secrets] == [("/run/secrets/a", None), (None, "B"), ("/c", "C")]


def test_an_image_service_gets_secrets_as_files_only():
    """docker inspect shows a container's variables to anyone who can reach the engine."""
    with pytest.raises(config.ConfigError) as info:
        config.loads("""\
services:
  web:
    image: x
    secrets: [{name: a}, {name: b, env: B}]
secrets: {a: {env: A}, b: {env: B}}
""", filename="meshlet.yaml")
    assert [str(i) for i in info.value.issues] == [
        "meshlet.yaml:4 services.web.secrets[1].env: a container's variables are shown by docker inspect, so a "
        "secret is delivered to an image service as a file only: drop env and read /run/secrets/b"]


def test_anchors_and_merge_keys():
    cfg = config.loads("""
x-base: &base            # x-: ignored, as in Compose; a place for anchors
  image: x
  replicas: 3
  env: {A: "1"}
services:
  web:
    <<: *base
    replicas: 1
    x-note: {anything: goes}
  api: *base
""")
    assert cfg.services["web"].replicas == 1 and cfg.services["web"].image == "x"
    assert cfg.services["api"].replicas == 3 and cfg.services["api"].env == {"A": "1"}


def test_anchor_under_an_unknown_key_is_still_an_unknown_key():
    with pytest.raises(config.ConfigError) as err:
        config.loads("base: &b {image: x}\nservices: {web: *b}\n", filename="m.yaml")
    assert str(err.value) == "m.yaml:1 base: unknown key (expected one of: mesh, services, volumes, configs, secrets)"


def test_alias_bomb_is_refused_quickly():
    rows = ["a: &a [x,x,x,x,x,x,x,x,x,x]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(config.ConfigError) as err:
        config.loads("\n".join(rows), filename="m.yaml")
    assert str(err.value) == "m.yaml too many values: more than 200000 after expanding aliases"


@pytest.mark.parametrize("text, message", [
    pytest.param("services: {w: {command: []}}",
                 "m.yaml:1 services.w.command: expected a command like [python3, app.py], got an empty one",
                 id="empty-command"),
    pytest.param("services: {w: {image: x, restart: {backoff: {initial: 10s, max: 5s}}}}",
                 "m.yaml:1 services.w.restart.backoff.max: must not be less than initial (10s), got 5s",
                 id="backoff-max-below-initial"),
    pytest.param("services: {w: {image: x, probes: {readiness: {exec: {command: [ok]}, period: 0s}}}}",
                 'm.yaml:1 services.w.probes.readiness.period: must be greater than 0, got "0s"',
                 id="zero-period"),
    pytest.param("services: {w: {image: x, routes: {hosts: [a.test, a.test]}}}",
                 'm.yaml:1 services.w.routes.hosts[1]: "a.test" is listed twice (also at [0])',
                 id="host-twice"),
    pytest.param("services: {w: {image: x, routes: {policy: random, hash_on: {cookie: s}}}}",
                 "m.yaml:1 services.w.routes.hash_on: hash_on is only used by policy ring_hash, not random",
                 id="hash-on-without-ring-hash"),
    pytest.param("services: {w: {image: x, placement: {constraints: [disk=ssd]}}}",
                 'm.yaml:1 services.w.placement.constraints[0]: expected a constraint like '
                 '"node.labels.disk == ssd", got "disk=ssd"', id="bad-constraint"),
    pytest.param("volumes: {t: {type: tmpfs, source: /x}}",
                 "m.yaml:1 volumes.t.source: a tmpfs volume has no source", id="tmpfs-source"),
    pytest.param("volumes: {t: {type: host, source: /x, size: 1Gi}}",
                 "m.yaml:1 volumes.t.size: size is only for tmpfs volumes", id="size-not-tmpfs"),
    pytest.param("mesh: {vip_range: 127.10.0.0/31}",
                 "m.yaml:1 mesh.vip_range: 127.10.0.0/31 is too small: it needs at least 4 addresses",
                 id="tiny-vip-range"),
    pytest.param("services: {w: {image: x, update: {strategy: recreate, canary: [{weight: 5}]}}}",
                 "m.yaml:1 services.w.update.canary: canary steps need strategy rolling",
                 id="canary-recreate"),
    pytest.param("services:\n  web:\n    name: web\n    image: x\n",
                 'm.yaml:3 services.web.name: the name comes from the key above ("web"); remove this line',
                 id="name-inside-service"),
    pytest.param("---\nservices: {}\n---\nservices: {}\n",
                 "m.yaml:3 invalid YAML: expected a single document in the stream, "
                 "but found another document (column 1)", id="two-documents"),
])
def test_more_bad_inputs(text, message):
    with pytest.raises(config.ConfigError) as err:
        config.loads(text, filename="m.yaml")
    assert str(err.value) == message
