"""Bad meshlet.yaml files and the exact messages users get: every problem, file:line path."""

from __future__ import annotations

import pytest

import config

# (id, YAML, the exact lines of str(ConfigError)); the YAML starts on line 2 (after the
# opening newline), so line numbers below count that empty first line.
BAD_FILES = [
    pytest.param("""
services:
  web:
    image: x
    replicas: three
""", [
        'meshlet.yaml:5 services.web.replicas: expected an integer >= 0, got "three"',
    ], id='wrong-type-replicas'),
    pytest.param("""
services:
  web:
    image: x
    replicas: -1
""", [
        'meshlet.yaml:5 services.web.replicas: expected an integer >= 0, got -1',
    ], id='negative-replicas'),
    pytest.param("""
services:
  web:
    image: x
    ports: {name: http}
""", [
        'meshlet.yaml:5 services.web.ports: expected a list, got a mapping',
    ], id='list-expected'),
    pytest.param("""
services:
  web: [image, x]
""", [
        'meshlet.yaml:3 services.web: expected a mapping, got a list',
    ], id='mapping-expected'),
    pytest.param("""
services:
  web:
    image: true
""", [
        'meshlet.yaml:4 services.web.image: expected an image reference, got true',
    ], id='bool-for-string'),
    pytest.param("""
services:
  web:
    image: x
    ports:
      - name: http
        protocl: http
""", [
        'meshlet.yaml:7 services.web.ports[0].protocl: unknown key (did you mean "protocol"?)',
    ], id='unknown-key-suggestion'),
    pytest.param("""
services:
  web:
    image: x
    ports:
      - name: http
        colour: red
""", [
        'meshlet.yaml:7 services.web.ports[0].colour: unknown key (expected one of: name, port, vip_port, protocol)',
    ], id='unknown-key-no-suggestion'),
    pytest.param("""
service:
  web: {image: x}
""", [
        'meshlet.yaml:2 service: unknown key (did you mean "services"?)',
    ], id='unknown-top-level'),
    pytest.param("""
services:
  web:
    image: x
    replicas: 2
    replicas: 3
""", [
        'meshlet.yaml:6 services.web.replicas: duplicate key (first defined on line 5)',
    ], id='duplicate-key'),
    pytest.param("""
services:
  web: {image: x}
  web: {image: y}
""", [
        'meshlet.yaml:4 services.web: duplicate key (first defined on line 3)',
    ], id='duplicate-service'),
    pytest.param("""
services:
  web:
    image: x
   replicas: 2
""", [
        "meshlet.yaml:5 invalid YAML: expected <block end>, but found '<block mapping start>' (column 4; while parsing a block mapping on line 3) - check the indentation",
    ], id='yaml-syntax'),
    pytest.param("""
services:
  web: {image: x, ports: [{name: http}
""", [
        "meshlet.yaml:4 invalid YAML: expected ',' or ']', but got '<stream end>' (column 1; while parsing a flow sequence on line 3)",
    ], id='yaml-unclosed-flow'),
    pytest.param('services:\n\tweb: {image: x}\n', [
        "meshlet.yaml:2 invalid YAML: found character '\\t' that cannot start any token (column 1)",
    ], id='yaml-tab'),
    pytest.param("""
- web
""", [
        'meshlet.yaml:2 expected a mapping with keys mesh, services, volumes, configs and secrets, got a list',
    ], id='top-level-list'),
    pytest.param("""
services:
  web:
    replicas: 2
""", [
        'meshlet.yaml:3 services.web: missing image or command (exactly one is required)',
    ], id='missing-image-command'),
    pytest.param("""
services:
  web:
    image: x
    command: [python3]
""", [
        'meshlet.yaml:5 services.web: give image or command, not both',
    ], id='both-image-command'),
    pytest.param("""
services:
  web:
    image: x
    stop_grace_period: 10 seconds
""", [
        'meshlet.yaml:5 services.web.stop_grace_period: expected a duration like 500ms, 5s or 2m, got "10 seconds"',
    ], id='bad-duration'),
    pytest.param("""
services:
  web:
    image: x
    resources: {memory: 512m}
""", [
        'meshlet.yaml:5 services.web.resources.memory: expected a size like 128MiB, 1G or 512k, got "512m" (lower-case m is ambiguous: write 512M for powers of 1000 or 512Mi for powers of 1024)',
    ], id='bad-size'),
    pytest.param("""
services:
  web:
    image: x
    resources: {cpu: half}
""", [
        'meshlet.yaml:5 services.web.resources.cpu: expected a CPU amount like 0.5, 500m or 2, got "half"',
    ], id='bad-cpu'),
    pytest.param("""
services:
  web:
    image: x
    ports: [{name: HTTP}]
""", [
        'meshlet.yaml:5 services.web.ports[0].name: expected a port name ([a-z][a-z0-9-]*), got "HTTP"',
    ], id='bad-port-name'),
    pytest.param("""
services:
  web:
    image: x
    ports:
      - {name: http, port: 8080}
      - {name: http, port: 8081}
""", [
        'meshlet.yaml:7 services.web.ports[1].name: port name "http" is used twice (also ports[0])',
    ], id='duplicate-port-name'),
    pytest.param("""
services:
  web:
    image: x
    ports:
      - {name: a, port: 8080}
      - {name: b, port: 8080, vip_port: 81}
""", [
        'meshlet.yaml:7 services.web.ports[1].port: port 8080 is used twice (also ports[0])',
    ], id='duplicate-host-port'),
    pytest.param("""
services:
  db:
    image: x
    ports: [{name: pg, protocol: tcp}]
""", [
        'meshlet.yaml:5 services.db.ports[0]: a tcp port with port 0 needs vip_port (the port clients use on the service VIP)',
    ], id='tcp-port-0-needs-vip-port'),
    pytest.param("""
services:
  web:
    image: x
    ports: [{name: http}]
    probes:
      readiness: {tcp: {port: admin}}
""", [
        'meshlet.yaml:7 services.web.probes.readiness.tcp.port: unknown port "admin" (declared: http)',
    ], id='probe-unknown-port'),
    pytest.param("""
services:
  web:
    image: x
    probes:
      readiness: {http: {path: /healthz}}
""", [
        'meshlet.yaml:6 services.web.probes.readiness.http: no port given and the service declares no ports',
    ], id='probe-no-ports'),
    pytest.param("""
services:
  web:
    image: x
    ports: [{name: http}]
    probes:
      readiness:
        http: {path: /}
        tcp: {port: http}
""", [
        'meshlet.yaml:9 services.web.probes.readiness: give only one of http, tcp or exec (got http and tcp)',
    ], id='probe-two-kinds'),
    pytest.param("""
services:
  web:
    image: x
    probes:
      liveness: {period: 5s}
""", [
        'meshlet.yaml:6 services.web.probes.liveness: expected exactly one of http, tcp or exec',
    ], id='probe-no-kind'),
    pytest.param("""
services:
  web:
    image: x
    ports: [{name: http}]
    probes:
      liveness: {tcp: {}, success_threshold: 2}
""", [
        'meshlet.yaml:7 services.web.probes.liveness.success_threshold: must be 1 for liveness probes (as in Kubernetes), got 2',
    ], id='liveness-success-threshold'),
    pytest.param("""
services:
  web:
    image: x
    volumes: [{name: data, target: /data}]
volumes:
  cache: {type: tmpfs}
""", [
        'meshlet.yaml:5 services.web.volumes[0].name: unknown volume "data" (defined: cache)',
    ], id='unknown-volume'),
    pytest.param("""
services:
  web:
    image: x
    secrets: [{name: token}]
""", [
        'meshlet.yaml:5 services.web.secrets[0].name: unknown secret "token" (no secrets are defined)',
    ], id='unknown-secret'),
    pytest.param("""
services:
  web:
    image: x
    configs: [{name: site, target: /etc/site.conf}]
configs:
  other: {data: x}
""", [
        'meshlet.yaml:5 services.web.configs[0].name: unknown config "site" (defined: other)',
    ], id='unknown-config'),
    pytest.param("""
services:
  web:
    image: x
    volumes: [{name: a, target: /data}]
    configs: [{name: c, target: /data}]
volumes: {a: {type: tmpfs}}
configs: {c: {data: hi}}
""", [
        'meshlet.yaml:6 services.web.configs[0].target: target /data is used twice (also volumes[0])',
    ], id='mount-target-twice'),
    pytest.param("""
services:
  web:
    image: x
    update:
      max_surge: 0
      max_unavailable: 0%
""", [
        'meshlet.yaml:7 services.web.update: max_surge and max_unavailable cannot both be 0 (no replica could ever be replaced)',
    ], id='surge-and-unavailable-zero'),
    pytest.param("""
services:
  web:
    image: x
    update: {max_unavailable: 120%}
""", [
        'meshlet.yaml:5 services.web.update.max_unavailable: expected at most 100%, got "120%"',
    ], id='unavailable-over-100'),
    pytest.param("""
services:
  web:
    image: x
    update:
      canary:
        - {weight: 50}
        - {weight: 20}
""", [
        'meshlet.yaml:8 services.web.update.canary[1].weight: canary weights must increase, got 20 after 50',
    ], id='canary-not-increasing'),
    pytest.param("""
services:
  web:
    image: x
    update:
      canary: [{weight: 0}]
""", [
        'meshlet.yaml:6 services.web.update.canary[0].weight: expected an integer in 1..100, got 0',
    ], id='canary-weight-range'),
    pytest.param("""
services:
  web:
    image: x
    routes: {policy: ring_hash}
""", [
        'meshlet.yaml:5 services.web.routes.policy: ring_hash needs hash_on ({header: X}, {cookie: X} or {source_ip: true})',
    ], id='ring-hash-needs-hash-on'),
    pytest.param("""
services:
  web:
    image: x
    routes:
      policy: ring_hash
      hash_on: {header: X-User, source_ip: true}
""", [
        'meshlet.yaml:7 services.web.routes.hash_on: give only one of header, cookie or source_ip (got header and source_ip)',
    ], id='hash-on-two'),
    pytest.param("""
services:
  Web_1: {image: x}
""", [
        'meshlet.yaml:3 services.Web_1: service name must be a DNS label (lowercase letters, digits and "-", at most 63 characters), got "Web_1"',
    ], id='bad-service-name'),
    pytest.param(f"""
services:
  {'a' * 64}: {{image: x}}
""", [
        'meshlet.yaml:3 services.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa: service name must be a DNS label (lowercase letters, digits and "-", at most 63 characters), got "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa..."',
    ], id='long-service-name'),
    pytest.param("""
services:
  web:
    image: x
    restart: {policy: sometimes}
""", [
        'meshlet.yaml:5 services.web.restart.policy: expected always, on-failure or never, got "sometimes"',
    ], id='bad-enum'),
    pytest.param("""
services:
  web:
    image: x
    env: {PORT: "80"}
""", [
        'meshlet.yaml:5 services.web.env.PORT: PORT and PORT_<NAME> are set by meshlet from ports',
    ], id='reserved-env'),
    pytest.param("""
services:
  web:
    image: x
    env: {DEBUG: yes}
""", [
        'meshlet.yaml:5 services.web.env.DEBUG: expected a string (quote it), got true',
    ], id='env-bool'),
    pytest.param("""
services:
  web:
    image: x
    stop_signal: SIGFOO
""", [
        'meshlet.yaml:5 services.web.stop_signal: expected a signal name like SIGTERM, got "SIGFOO"',
    ], id='bad-signal'),
    pytest.param("""
volumes:
  data: {type: host}
""", [
        'meshlet.yaml:3 volumes.data: a host volume needs source (a directory on the node)',
    ], id='host-volume-no-source'),
    pytest.param("""
configs:
  site: {data: x, file: site.conf}
""", [
        'meshlet.yaml:3 configs.site: give only one of data or file (got data and file)',
    ], id='config-data-and-file'),
    pytest.param("""
secrets:
  token: {}
""", [
        'meshlet.yaml:3 secrets.token: expected exactly one of file, env or external',
    ], id='secret-neither'),
    pytest.param("""
mesh:
  nodes:
    - {name: a, runtime: process, engine: unix:///x.sock}
""", [
        'meshlet.yaml:4 mesh.nodes[0].engine: engine is only for runtime docker',
    ], id='process-node-engine'),
    pytest.param("""
mesh:
  nodes:
    - {name: a}
    - {name: a}
""", [
        'meshlet.yaml:5 mesh.nodes[1].name: node name "a" is used twice (also nodes[0])',
    ], id='duplicate-node'),
    pytest.param("""
mesh:
  vip_range: 127.10.0.1/16
""", [
        'meshlet.yaml:3 mesh.vip_range: expected an IPv4 network like 127.10.0.0/16, got "127.10.0.1/16" (127.10.0.1/16 has host bits set)',
    ], id='bad-vip-range'),
    pytest.param("""
mesh:
  dns: {listen: [127.0.0.1:99999, localhost]}
""", [
        'meshlet.yaml:3 mesh.dns.listen[0]: port must be at most 65535, got "127.0.0.1:99999"',
        'meshlet.yaml:3 mesh.dns.listen[1]: expected host:port like 127.0.0.1:8600, got "localhost"',
    ], id='bad-listen'),
    pytest.param("""
services:
  1: {image: x}
""", [
        'meshlet.yaml:3 services: keys must be strings, got 1',
    ], id='non-string-key'),
    pytest.param("""
mesh:
  domain: Mesh
services:
  web:
    image: x
    replicas: three
    ports:
      - name: http
        protocl: http
    probes:
      readiness: {tcp: {port: admin}}
    update: {max_surge: 0, max_unavailable: 0}
  api:
    replicas: 1
    secrets: [{name: token}]
""", [
        'meshlet.yaml:3 mesh.domain: expected a lowercase DNS domain like meshlet, got "Mesh"',
        'meshlet.yaml:7 services.web.replicas: expected an integer >= 0, got "three"',
        'meshlet.yaml:10 services.web.ports[0].protocl: unknown key (did you mean "protocol"?)',
        'meshlet.yaml:12 services.web.probes.readiness.tcp.port: unknown port "admin" (declared: http)',
        'meshlet.yaml:13 services.web.update: max_surge and max_unavailable cannot both be 0 (no replica could ever be replaced)',
        'meshlet.yaml:14 services.api: missing image or command (exactly one is required)',
        'meshlet.yaml:16 services.api.secrets[0].name: unknown secret "token" (no secrets are defined)',
    ], id='several-at-once'),
]


@pytest.mark.parametrize("text, messages", BAD_FILES)
def test_bad_file_reports_every_problem_exactly(text, messages):
    with pytest.raises(config.ConfigError) as err:
        config.loads(text, filename="meshlet.yaml")
    assert str(err.value).split("\n") == messages
    assert [str(issue) for issue in err.value.issues] == messages


def test_issue_fields_name_file_line_and_path():
    with pytest.raises(config.ConfigError) as err:
        config.loads("services:\n  web:\n    image: x\n    replicas: three\n", filename="m.yaml")
    (issue,) = err.value.issues
    assert issue == config.ConfigIssue("m.yaml", 4, "services.web.replicas",
                                       'expected an integer >= 0, got "three"')


def test_load_names_the_file_as_given(tmp_path, monkeypatch):
    (tmp_path / "meshlet.yaml").write_text("services:\n  web:\n    replicas: 2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError) as err:
        config.load("meshlet.yaml")
    assert str(err.value) == ("meshlet.yaml:2 services.web: missing image or command "
                              "(exactly one is required)")


def test_load_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value) == f"{path} cannot read: No such file or directory"


def test_load_rejects_non_utf8_with_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"services:\n  web:\n    image: caf\xe9\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value) == f"{path}:3 not UTF-8 text"


def test_control_character_is_reported_with_line():
    with pytest.raises(config.ConfigError) as err:
        config.loads("services:\n  web: {image: x\x07}\n", filename="meshlet.yaml")
    assert str(err.value) == "meshlet.yaml:2 invalid YAML: unacceptable character #x0007 (column 17)"
