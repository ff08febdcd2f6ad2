"""Secrets and configs end to end on the process runtime: a real catalog, `meshlet apply`'s
own code, a real supervisor, real processes reading real files; what must never show a
value is searched for it (and its base64) byte by byte."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

import config
from _util import async_wait_for, cli_env
from supervisor.commands.apply import apply_config
from supervisor.secrets import KeySource

pytestmark = pytest.mark.slow   # real processes, sockets (tests/conftest.py)

APPS = Path(__file__).resolve().parent / "apps"
TOKEN = "s3cr3t-tok3n-7f2d41"          # a value to search for everywhere
PASSWORD = "pa55w0rd-b9e0c3"
SITE = "listen 8080\nname shop\n"


def yaml_text(tmp: Path, *, replicas: int = 1, extra_env: str = "") -> str:
    return textwrap.dedent(f"""\
        mesh: {{data_dir: {tmp / 'mesh'}}}
        services:
          web:
            command: [{sys.executable}, {APPS / 'report.py'}]
            replicas: {replicas}
            ports: [{{name: http}}]
            env: {{APP_PLAIN: visible{extra_env}}}
            update: {{drain_delay: 0s}}
            probes:
              readiness: {{http: {{path: /ready}}, period: 0.2s}}
            secrets:
              - {{name: token}}
              - {{name: pw, env: APP_PASSWORD, target: /run/secrets/pw}}
            configs:
              - {{name: site, target: /etc/site.conf}}
        secrets:
          token: {{file: {tmp / 'token.txt'}}}
          pw: {{env: TEST_PW}}
        configs:
          site: {{file: {tmp / 'site.conf'}}}
        """)


async def _apply(mesh, tmp: Path, **kw) -> tuple[int, str, str]:
    path = tmp / "meshlet.yaml"
    path.write_text(yaml_text(tmp, **kw))
    cfg = config.load(path)
    out, err = io.StringIO(), io.StringIO()
    code, applied = await apply_config(mesh.access, cfg, str(path), err=err)
    if applied is not None:
        from supervisor.commands.apply import print_applied
        print_applied(applied, out)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def sources(tmp_path, monkeypatch):
    (tmp_path / "token.txt").write_text(TOKEN)
    (tmp_path / "site.conf").write_text(SITE)
    monkeypatch.setenv("TEST_PW", PASSWORD)
    return tmp_path


def key(tmp: Path) -> KeySource:
    return KeySource(path=tmp / "mesh" / "secrets.key", default=True)


async def report(mesh) -> dict:
    (inst,) = [i for i in mesh.running("web").values()]
    port = next(iter(inst.ports.values()))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/") as r:
            return json.loads(await r.text())


async def test_process_replicas_get_file_and_env_secrets_and_configs(mesh, sources, caplog):
    code, out, err = await _apply(mesh, sources)
    assert code == 0, err
    assert "secret token: created (version 1)" in out and "secret pw: created (version 1)" in out
    assert "config site: created (version 1)" in out
    key_file = sources / "mesh" / "secrets.key"
    assert os.stat(key_file).st_mode & 0o777 == 0o600      # made by the first apply, private
    sup = await mesh.start(secrets_key=key(sources))
    await async_wait_for(lambda: mesh.passing("web"), timeout=20)
    got = await report(mesh)
    assert got["files"]["secrets/token"] == {"data": TOKEN, "mode": "0o400"}
    assert got["files"]["secrets/pw"] == {"data": PASSWORD, "mode": "0o400"}
    assert got["files"]["configs/site"] == {"data": SITE, "mode": "0o444"}
    assert got["env"]["APP_PASSWORD"] == PASSWORD and got["env"]["APP_PLAIN"] == "visible"
    secrets_dir = Path(got["env"]["MESHLET_SECRETS_DIR"])
    assert os.stat(secrets_dir).st_mode & 0o777 == 0o700
    assert secrets_dir.is_relative_to("/dev/shm")           # a tmpfs: never on a disk

    # nothing shows a value: the status, the logs, the process arguments, the state
    # files and every file the catalog and the supervisor wrote, the raw KV
    values = [v.encode() for v in (TOKEN, PASSWORD)]
    values += [base64.b64encode(v) for v in values]
    status = json.dumps(sup.status()).encode()
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()
    (inst,) = mesh.running("web").values()
    cmdline = Path(f"/proc/{inst.pid}/cmdline").read_bytes()
    _, entries = await mesh.client.kv.get("", recurse=True)
    kv = b"".join((e["Key"].encode() + (e.get("Value") or b"")) for e in entries or ())
    on_disk = b"".join(p.read_bytes() for root in (mesh.data_dir, mesh.catalog.data_dir, sources / "mesh")
                       for p in Path(root).rglob("*") if p.is_file() and p != key_file)
    for where, blob in (("status", status), ("logs", logs), ("cmdline", cmdline), ("kv", kv),
                        ("files on disk", on_disk), ("apply output", (out + err).encode())):
        for v in values:
            assert v not in blob, f"{v!r} in {where}"
    state = next(mesh.data_dir.glob("nodes/*/instances/*.json"))
    assert os.stat(state).st_mode & 0o777 == 0o600
    # the process's own environment holds the env-delivered secret, as asked, and only it
    environ = Path(f"/proc/{inst.pid}/environ").read_bytes()
    assert PASSWORD.encode() in environ and TOKEN.encode() not in environ


async def test_a_changed_secret_or_config_rolls_the_service(mesh, sources):
    assert (await _apply(mesh, sources, replicas=2))[0] == 0
    await mesh.start(secrets_key=key(sources))
    await async_wait_for(lambda: len_passing(mesh, 2), timeout=20)
    first = set(mesh.running("web"))

    # unchanged sources: no new version, no rollout
    code, out, _ = await _apply(mesh, sources, replicas=2)
    assert code == 0 and "secret token: unchanged (version 1)" in out and "web: unchanged" in out

    (sources / "token.txt").write_text(TOKEN + "-2")
    code, out, _ = await _apply(mesh, sources, replicas=2)
    assert code == 0 and "secret token: changed (version 2)" in out and "web: updated (revision" in out
    await async_wait_for(lambda: not (first & set(mesh.running("web"))) and len_running(mesh, 2), timeout=30,
                         what="every replica replaced")
    await async_wait_for(lambda: len_passing(mesh, 2), timeout=20)
    for inst in mesh.running("web").values():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{next(iter(inst.ports.values()))}/") as r:
                assert json.loads(await r.text())["files"]["secrets/token"]["data"] == TOKEN + "-2"

    second = set(mesh.running("web"))
    (sources / "site.conf").write_text(SITE + "workers 4\n")
    code, out, _ = await _apply(mesh, sources, replicas=2)
    assert code == 0 and "config site: changed (version 2)" in out
    await async_wait_for(lambda: not (second & set(mesh.running("web"))) and len_running(mesh, 2), timeout=30)


def len_running(mesh, n: int) -> bool:
    return len(mesh.running("web")) == n


async def len_passing(mesh, n: int) -> bool:
    return len(await mesh.passing("web")) == n


@pytest.mark.parametrize("case, setup, message", [
    pytest.param("missing-file", lambda tmp, mp: (tmp / "token.txt").unlink(),
                 "secrets.token.file: {tmp}/token.txt: No such file or directory", id="missing-file"),
    pytest.param("unset-env", lambda tmp, mp: mp.delenv("TEST_PW"), "secrets.pw.env: $TEST_PW is not set",
                 id="unset-env"),
    pytest.param("empty", lambda tmp, mp: (tmp / "token.txt").write_text(""),
                 "secrets.token.file: {tmp}/token.txt is empty", id="empty-value"),
])
async def test_a_missing_source_is_refused_with_the_line_and_nothing_is_written(mesh, sources, monkeypatch,
                                                                                 case, setup, message):
    setup(sources, monkeypatch)
    code, out, err = await _apply(mesh, sources)
    assert code == 2 and out == ""
    line = config.locate(sources / "meshlet.yaml", "secrets", "pw" if case == "unset-env" else "token",
                         "env" if case == "unset-env" else "file")
    assert f"meshlet.yaml:{line} " + message.format(tmp=sources) in err
    _, entries = await mesh.client.kv.get("meshlet/", recurse=True)
    assert not entries                                   # nothing written
    assert not (sources / "mesh" / "secrets.key").exists()


async def test_a_wrong_key_starts_nothing_and_says_why(mesh, sources):
    assert (await _apply(mesh, sources))[0] == 0
    other = sources / "other.key"
    from supervisor.secrets import Keyring, new_key, write_keyring
    write_keyring(other, Keyring.of([new_key()]))
    sup = await mesh.start(secrets_key=KeySource(path=other))
    await async_wait_for(lambda: "web" in sup.problems, timeout=10)
    assert "is sealed with key-encryption key" in sup.problems["web"]
    assert "not the mesh's key here" in sup.problems["web"]
    assert mesh.running("web") == {}

    # apply with the wrong key cannot write a second, other-keyed version either
    os.replace(other, sources / "mesh" / "secrets.key")
    (sources / "token.txt").write_text("another")
    code, _, err = await _apply(mesh, sources)
    assert code == 1 and "is sealed with key-encryption key" in err


async def test_a_missing_key_starts_nothing_and_says_why(mesh, sources):
    assert (await _apply(mesh, sources))[0] == 0
    sup = await mesh.start(secrets_key=KeySource(path=sources / "nowhere.key", default=True))
    await async_wait_for(lambda: "web" in sup.problems, timeout=10)
    assert "no key-encryption key" in sup.problems["web"] and "does not exist" in sup.problems["web"]
    assert mesh.running("web") == {}


async def test_a_restarted_supervisor_delivers_the_same_secrets_again(mesh, sources):
    assert (await _apply(mesh, sources))[0] == 0
    sup = await mesh.start(secrets_key=key(sources))
    await async_wait_for(lambda: len_passing(mesh, 1), timeout=20)
    await sup.close(stop=False)
    from supervisor.daemon.supervisor import Supervisor
    mesh.sup = Supervisor(mesh.access, [config.NodeSpec(name="local", runtime="process")], mesh.data_dir,
                          resync=1.0, secrets_key=key(sources))
    await mesh.sup.start()
    (old,) = mesh.running("web").values()
    os.kill(old.pid, 9)                                   # restarted by the new supervisor
    await async_wait_for(lambda: len_running(mesh, 1) and old.instance_id not in mesh.running("web"),
                         timeout=20)
    await async_wait_for(lambda: len_passing(mesh, 1), timeout=20)
    got = await report(mesh)
    assert got["files"]["secrets/token"]["data"] == TOKEN and got["env"]["APP_PASSWORD"] == PASSWORD


def meshlet(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "meshlet"), *args], input=stdin,
                          capture_output=True, timeout=60, env=cli_env())


async def test_the_secret_command_sets_lists_and_refuses_to_remove_a_used_secret(mesh, sources):
    assert (await _apply(mesh, sources, replicas=1))[0] == 0
    sup = await mesh.start(secrets_key=key(sources))
    await async_wait_for(lambda: len_passing(mesh, 1), timeout=20)
    first = set(mesh.running("web"))
    args = ["--consul", mesh.url, "--key-file", str(sources / "mesh" / "secrets.key")]
    done = meshlet("secret", "set", "token", *args, stdin=b"from-stdin-1c9a")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "secret token: changed (version 2); rolling web"
    assert b"from-stdin-1c9a" not in done.stdout + done.stderr
    await async_wait_for(lambda: not (first & set(mesh.running("web"))) and len_running(mesh, 1), timeout=30)
    await async_wait_for(lambda: len_passing(mesh, 1), timeout=20)
    assert (await report(mesh))["files"]["secrets/token"]["data"] == "from-stdin-1c9a"

    listing = meshlet("secret", "ls", *args)
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split() for line in listing.stdout.decode().splitlines()[1:]}
    assert rows["token"][1] == "2" and rows["token"][-1] == "web" and rows["pw"][-1] == "web"
    as_json = json.loads(meshlet("secret", "ls", "--json", *args).stdout)
    assert {r["name"]: r["versions"] for r in as_json} == {"pw": [1], "token": [1, 2]}
    assert b"from-stdin" not in listing.stdout and TOKEN.encode() not in listing.stdout

    refused = meshlet("secret", "rm", "token", *args)
    assert refused.returncode == 1 and b"secret token is used by web" in refused.stderr
    assert meshlet("secret", "set", "unused", *args, stdin=b"x").returncode == 0
    removed = meshlet("secret", "rm", "unused", *args)
    assert removed.returncode == 0 and b"removed (1 versions)" in removed.stdout
    empty = meshlet("secret", "set", "token", *args, stdin=b"")
    assert empty.returncode == 2 and b"is empty" in empty.stderr
    assert sup.problems.get("web") is None


async def test_rotate_key_rewraps_every_version_without_downtime(mesh, sources):
    assert (await _apply(mesh, sources))[0] == 0
    sup = await mesh.start(secrets_key=key(sources))
    await async_wait_for(lambda: len_passing(mesh, 1), timeout=20)
    key_file = sources / "mesh" / "secrets.key"
    before = json.loads(key_file.read_text())["keys"][0]["id"]
    done = meshlet("secret", "rotate-key", "--consul", mesh.url, "--key-file", str(key_file))
    assert done.returncode == 0, done.stderr
    after = json.loads(key_file.read_text())["keys"]
    assert len(after) == 1 and after[0]["id"] != before
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    _, entries = await mesh.client.kv.get("meshlet/secrets/", recurse=True)
    assert {json.loads(e["Value"])["key_id"] for e in entries} == {after[0]["id"]}
    # the running supervisor (which held the old key) opens them: a new replica gets them
    (old,) = mesh.running("web").values()
    os.kill(old.pid, 9)
    await async_wait_for(lambda: len_running(mesh, 1) and old.instance_id not in mesh.running("web"), timeout=20)
    await async_wait_for(lambda: len_passing(mesh, 1), timeout=20)
    assert (await report(mesh))["files"]["secrets/token"]["data"] == TOKEN
    assert sup.problems.get("web") is None
    # and an apply of the same sources with the new key sees nothing changed
    code, out, _ = await _apply(mesh, sources)
    assert code == 0 and "secret token: unchanged (version 1)" in out


# --------------------------------------------------------------------------- Docker

from docker_env import TEST_IMAGE, build_test_images, docker_engine  # noqa: E402,F401


@pytest.fixture
def engine(docker_engine):  # noqa: F811
    build_test_images(docker_engine)
    return docker_engine


def docker_yaml(tmp: Path) -> str:
    return textwrap.dedent(f"""\
        mesh: {{data_dir: {tmp / 'mesh'}}}
        services:
          box:
            image: {TEST_IMAGE}
            ports: [{{name: http}}]
            stop_grace_period: 1s
            secrets:
              - {{name: token, uid: 1000, gid: 2000}}
              - {{name: pw, target: /run/secrets/pw}}
            configs:
              - {{name: site, target: /etc/site.conf}}
        secrets:
          token: {{file: {tmp / 'token.txt'}}}
          pw: {{env: TEST_PW}}
        configs:
          site: {{file: {tmp / 'site.conf'}}}
        """)


async def test_docker_replicas_get_secrets_on_tmpfs_and_inspect_shows_none(mesh, sources, engine):
    from supervisor.daemon.supervisor import Supervisor
    path = sources / "meshlet.yaml"
    path.write_text(docker_yaml(sources))
    code, applied = await apply_config(mesh.access, config.load(path), str(path), err=io.StringIO())
    assert code == 0
    node = config.NodeSpec(name="dock", runtime="docker", engine=engine.url)
    mesh.sup = Supervisor(mesh.access, [node], mesh.data_dir, resync=1.0, secrets_key=key(sources))
    await mesh.sup.start()
    await async_wait_for(lambda: _box(mesh), timeout=60)
    (obs,) = _box(mesh).values()
    container = engine.client().containers.get(obs.container_id)

    def sh(cmd: str) -> str:
        code, output = container.exec_run(["sh", "-c", cmd])
        assert code == 0, output
        return output.decode()

    assert sh("cat /run/secrets/token") == TOKEN
    assert sh("stat -c '%a %u %g' /run/secrets/token").split() == ["400", "1000", "2000"]
    assert sh("cat /etc/site.conf") == SITE
    assert sh("stat -c '%a' /etc/site.conf").strip() == "444"
    assert sh("cat /run/secrets/pw") == PASSWORD
    # read-only: the container cannot change what it was given
    code, _ = container.exec_run(["sh", "-c", "echo x > /run/secrets/token"])
    assert code != 0
    # on a tmpfs of the host, the mounts' sources
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert Path(mounts["/run/secrets/token"]["Source"]).is_relative_to("/dev/shm")
    assert mounts["/run/secrets/token"]["RW"] is False
    # docker inspect: no secret anywhere (an image service gets secrets as files only)
    inspect = json.dumps(container.attrs).encode()
    for v in (TOKEN, PASSWORD):
        assert v.encode() not in inspect and base64.b64encode(v.encode()) not in inspect

    # removed with its replica: nothing is left on the tmpfs
    source = Path(mounts["/run/secrets/token"]["Source"])
    await mesh.sup.close(stop=True)
    mesh.sup = None
    assert not source.exists() and not source.parent.parent.exists()


def _box(mesh) -> dict:
    return {i: o for i, o in mesh.running("box").items()}


# --------------------------------------------------------------------------- under load

from test_rollout_live import Load, proxy  # noqa: E402,F401 (fixture)


def load_yaml(tmp: Path, markers: Path) -> str:
    return textwrap.dedent(f"""\
        mesh: {{data_dir: {tmp / 'mesh'}}}
        services:
          web:
            command: [{sys.executable}, {APPS / 'flaky.py'}]
            replicas: 3
            ports: [{{name: http}}]
            env: {{MARKERS: {markers}, TERM_SERVE: "0.3"}}
            update: {{drain_delay: 0s}}
            stop_grace_period: 2s
            probes:
              readiness: {{http: {{path: /ready}}, period: 0.1s, failure_threshold: 1}}
            secrets: [{{name: token}}]
            configs: [{{name: site, target: /etc/site.conf}}]
        secrets:
          token: {{file: {tmp / 'token.txt'}}}
        configs:
          site: {{file: {tmp / 'site.conf'}}}
        """)


async def test_a_secret_and_a_config_change_roll_with_no_failed_request_through_the_proxy(mesh, sources, proxy):
    path = sources / "meshlet.yaml"
    path.write_text(load_yaml(sources, mesh.markers))

    async def apply() -> str:
        out = io.StringIO()
        code, applied = await apply_config(mesh.access, config.load(path), str(path), err=out)
        assert code == 0, out.getvalue()
        return " ".join(o.line() for o in applied.objects)

    await apply()
    await mesh.start(secrets_key=key(sources))
    await async_wait_for(lambda: len_passing(mesh, 3), timeout=30)
    async with Load(proxy) as load:
        await async_wait_for(lambda: load.sent > 20, timeout=10)
        for change, what in ((lambda: (sources / "token.txt").write_text("next-token"), "secret token: changed"),
                             (lambda: (sources / "site.conf").write_text("next-site"), "config site: changed")):
            before = set(mesh.running("web"))
            change()
            assert what in await apply()
            await async_wait_for(lambda: not (before & set(mesh.running("web"))) and len_running(mesh, 3),
                                 timeout=60, what=f"every replica replaced after '{what}'")
            await async_wait_for(lambda: len_passing(mesh, 3), timeout=20)
        sent = load.sent
        await async_wait_for(lambda: load.sent > sent + 20, timeout=10)
    assert load.failed == 0, load.reasons
    assert load.sent > 100
