"""`meshlet apply` as a real subprocess against a real catalog process."""

from __future__ import annotations

import pytest

import ipaddress
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import config
from _util import cli_env, refusing_port
from supervisor.core.revisions import target_revision

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]


def meshlet(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = cli_env()
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)


def write(path: Path, services: str, mesh: str = "") -> Path:
    path.write_text(textwrap.dedent(mesh) + "services:\n" + textwrap.indent(textwrap.dedent(services), "  "))
    return path


WEB_API = """\
web:
  command: [python3, app.py]
  replicas: 2
  ports: [{name: http}]
api:
  command: [python3, app.py]
  ports: [{name: http}]
worker:
  command: [python3, worker.py]
"""


def kv_docs(catalog) -> dict[str, dict]:
    _, entries = catalog.client().kv.get("meshlet/services/", recurse=True)
    return {e["Key"].rsplit("/", 1)[1]: json.loads(e["Value"]) for e in entries or ()}


def kv_vips(catalog) -> dict[str, str]:
    _, entries = catalog.client().kv.get("meshlet/vips/", recurse=True)
    return {e["Key"].rsplit("/", 1)[1]: e["Value"].decode() for e in entries or ()}


def lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def replica_revisions(path: Path, token: str | None = None) -> dict[str, str]:
    """The revision each service's replicas run, as the supervisor derives it from the file
    (and ``meshlet status`` and ``meshlet rollout history`` show it)."""
    return {name: target_revision(spec, token) for name, spec in config.load(str(path)).services.items()}


def test_apply_create_unchanged_update_and_stable_vips(catalog, tmp_path) -> None:
    f = write(tmp_path / "meshlet.yaml", WEB_API)
    out = lines(meshlet("apply", "-f", str(f), "--consul", catalog.url))
    docs = kv_docs(catalog)
    rev = replica_revisions(f)
    assert sorted(docs) == ["api", "web", "worker"]
    assert out == [
        f"api: created (revision {rev['api']}, vip {docs['api']['vip']})",
        f"web: created (revision {rev['web']}, vip {docs['web']['vip']})",
        f"worker: created (revision {rev['worker']})",
    ]
    assert docs["worker"]["vip"] is None
    assert docs["api"]["vip"] != docs["web"]["vip"]
    assert kv_vips(catalog) == {docs["api"]["vip"]: "api", docs["web"]["vip"]: "web"}
    for d in docs.values():
        assert d["vip"] is None or ipaddress.ip_address(d["vip"]) in ipaddress.ip_network("127.10.0.0/16")

    assert lines(meshlet("apply", "-f", str(f), "--consul", catalog.url)) == [
        "api: unchanged", "web: unchanged", "worker: unchanged"]

    # a scale keeps the replicas' revision (no rollout); the document changes
    write(f, WEB_API.replace("replicas: 2", "replicas: 3"))
    out = lines(meshlet("apply", "-f", str(f), "--consul", catalog.url))
    after = kv_docs(catalog)
    assert after["web"]["revision"] != docs["web"]["revision"]
    assert replica_revisions(f)["web"] == rev["web"]
    assert out == ["api: unchanged", f"web: scaled (replicas 2 → 3, revision {rev['web']})", "worker: unchanged"]
    assert after["web"]["spec"]["replicas"] == 3
    assert {n: d["vip"] for n, d in after.items()} == {n: d["vip"] for n, d in docs.items()}

    catalog.restart()  # state survives the catalog, VIPs stay
    assert lines(meshlet("apply", "-f", str(f), "--consul", catalog.url)) == [
        "api: unchanged", "web: unchanged", "worker: unchanged"]
    assert {n: d["vip"] for n, d in kv_docs(catalog).items()} == {n: d["vip"] for n, d in docs.items()}


def test_a_new_revision_is_named_as_the_replicas_will_run_it(catalog, tmp_path) -> None:
    """A template change prints the replicas' old and new revision (a rollout), with a
    rolling restart's token folded in as the supervisor does; scaling at once says so."""
    f = write(tmp_path / "meshlet.yaml", WEB_API)
    lines(meshlet("apply", "-f", str(f), "--consul", catalog.url))
    catalog.client().kv.put(config.rollout_key("web", "restart"), json.dumps({"token": "t1", "at": 1.0}))
    before = replica_revisions(f, "t1")
    write(f, WEB_API.replace("replicas: 2", "replicas: 4").replace("python3, app.py", "python3, app2.py", 1))
    after = replica_revisions(f, "t1")
    assert after["web"] != before["web"] and after["web"] != replica_revisions(f)["web"]
    assert lines(meshlet("apply", "-f", str(f), "--consul", catalog.url)) == [
        "api: unchanged", f"web: updated (revision {before['web']} → {after['web']}, replicas 2 → 4)",
        "worker: unchanged"]


def test_dry_run_writes_nothing(catalog, tmp_path) -> None:
    f = write(tmp_path / "meshlet.yaml", WEB_API)
    out = lines(meshlet("apply", "-f", str(f), "--consul", catalog.url, "--dry-run"))
    assert [line.split(" (")[0] for line in out] == [
        "api: would create", "web: would create", "worker: would create", "dry run: nothing written"]
    assert kv_docs(catalog) == {} and kv_vips(catalog) == {}

    lines(meshlet("apply", "-f", str(f), "--consul", catalog.url))
    before = kv_docs(catalog)
    write(f, WEB_API.replace("replicas: 2", "replicas: 5"))
    out = lines(meshlet("apply", "-f", str(f), "--consul", catalog.url, "--dry-run"))
    assert out[1].startswith("web: would scale (replicas 2 → 5, revision ")
    assert "    replicas: 2 → 5" in out
    assert kv_docs(catalog) == before


def test_prune_deletes_and_gives_the_vip_back(catalog, tmp_path) -> None:
    f = write(tmp_path / "meshlet.yaml", WEB_API)
    lines(meshlet("apply", "-f", str(f), "--consul", catalog.url))
    api_vip = kv_docs(catalog)["api"]["vip"]
    only_web = "\n".join(WEB_API.splitlines()[:4]) + "\n"
    g = write(tmp_path / "web.yaml", only_web)
    assert lines(meshlet("apply", "-f", str(g), "--consul", catalog.url)) == ["web: unchanged"]
    assert sorted(kv_docs(catalog)) == ["api", "web", "worker"]  # without --prune nothing goes
    assert lines(meshlet("apply", "-f", str(g), "--consul", catalog.url, "--prune")) == [
        "api: deleted", "web: unchanged", "worker: deleted"]
    assert sorted(kv_docs(catalog)) == ["web"]
    assert api_vip not in kv_vips(catalog)


def test_invalid_file_exits_2_and_writes_nothing(catalog, tmp_path) -> None:
    f = write(tmp_path / "bad.yaml", """\
        web:
          command: [x]
          replicas: three
          ports: [{name: http, protocl: tcp}]
        """)
    result = meshlet("apply", "-f", str(f), "--consul", catalog.url)
    assert result.returncode == 2
    assert "services.web.replicas" in result.stderr
    assert "protocl" in result.stderr  # every issue, not only the first
    assert "Traceback" not in result.stderr
    assert kv_docs(catalog) == {}
    missing = meshlet("apply", "-f", str(tmp_path / "nope.yaml"), "--consul", catalog.url)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_unreachable_catalog_exits_1_naming_the_url(tmp_path) -> None:
    url = f"http://127.0.0.1:{refusing_port()}"
    f = write(tmp_path / "meshlet.yaml", WEB_API)
    result = meshlet("apply", "-f", str(f), "--consul", url)
    assert result.returncode == 1
    assert f"cannot reach the catalog at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_catalog_url_from_file_and_environment(catalog, tmp_path) -> None:
    f = write(tmp_path / "meshlet.yaml", WEB_API, mesh=f"mesh:\n  catalog_listen: {catalog.host}:{catalog.port}\n")
    assert lines(meshlet("apply", "-f", str(f)))[0].startswith("api: created")
    dead = f"127.0.0.1:{refusing_port()}"
    result = meshlet("apply", "-f", str(f), env={"CONSUL_HTTP_ADDR": dead})
    assert result.returncode == 1 and f"http://{dead}" in result.stderr
    g = write(tmp_path / "other.yaml", WEB_API, mesh=f"mesh:\n  catalog_listen: {dead}\n")
    assert lines(meshlet("apply", "-f", str(g), env={"CONSUL_HTTP_ADDR": catalog.url})) == [
        "api: unchanged", "web: unchanged", "worker: unchanged"]


def test_concurrent_applies_never_share_a_vip(catalog, tmp_path) -> None:
    files = []
    for i in range(4):
        services = "".join(f"s{i}x{j}:\n  command: [x]\n  ports: [{{name: http}}]\n" for j in range(3))
        files.append(write(tmp_path / f"f{i}.yaml", services, mesh="mesh:\n  vip_range: 127.20.0.0/28\n"))
    env = cli_env()
    procs = [subprocess.Popen([sys.executable, "-m", "supervisor", "apply", "-f", str(f), "--consul", catalog.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for f in files]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err for _, err, _ in results]
    docs = kv_docs(catalog)
    assert len(docs) == 12
    vips = [d["vip"] for d in docs.values()]
    assert len(set(vips)) == 12, vips
    assert kv_vips(catalog) == {d["vip"]: name for name, d in docs.items()}
    assert all(ipaddress.ip_address(v) in ipaddress.ip_network("127.20.0.0/28") for v in vips)


def test_exhausted_range_is_reported(catalog, tmp_path) -> None:
    services = "".join(f"s{j}:\n  command: [x]\n  ports: [{{name: http}}]\n" for j in range(3))
    f = write(tmp_path / "f.yaml", services, mesh="mesh:\n  vip_range: 127.20.0.0/30\n")
    result = meshlet("apply", "-f", str(f), "--consul", catalog.url)
    assert result.returncode == 1
    assert "no free virtual IP left in mesh.vip_range 127.20.0.0/30" in result.stderr
    assert kv_docs(catalog) == {}
