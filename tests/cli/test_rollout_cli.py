"""`meshlet rollout status|history|pause|resume`, `rollback`, `restart`.

Pure parts (progress text and verdict, history table, masking, the rollback document) are
tested with tables; the commands run as real subprocesses against a real catalog process,
with the supervisor's side (rollout state and history in KV) written by the test itself.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import MappingProxyType

import pytest

import config
from discovery.view import CRITICAL, PASSING, Instance
from supervisor.core.revisions import new_restart_token, target_revision, template_revision
from supervisor.core.rollout_history import mark_revision, record_revision
from supervisor.core.rollout_types import RolloutState
from supervisor.core.rollout_history import RolloutError
from supervisor.commands.rollout import (MASK, CliError, assess, change_summary, history_table, masked,
                                         rollback_document, rollback_entry)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]

T, OLD, DOC = "a" * 12, "b" * 12, "c" * 12


def inst(iid: str, revision: str, status: str = PASSING, template: str | None = None) -> Instance:
    """A replica as meshlet's supervisor registers it (Meta node, slot, revision[, template])."""
    meta = {"revision": revision, "node": "local", "slot": "0"}
    if template is not None:
        meta["template"] = template
    return Instance(iid, "web", "local", "127.0.0.1", 1, status, meta=MappingProxyType(meta))


def ours(revision: str, slot: int) -> dict[str, str]:
    """The Meta the supervisor registers a replica of ``revision`` in ``slot`` with."""
    return {"revision": revision, "template": revision, "node": "local", "slot": str(slot)}


def foreign(iid: str) -> Instance:
    """Another tool's registration of the same name (a shared Consul)."""
    return Instance(iid, "web", "other", "127.0.0.9", 1, PASSING, meta=MappingProxyType({}))


def state(revision: str = T, phase: str = "progressing", **kw) -> RolloutState:
    return RolloutState("web", revision, phase, **kw)


HISTORY = [{"number": 3, "revision": OLD, "status": "complete", "created_at": 0.0, "spec": None},
           {"number": 4, "revision": T, "status": "active", "created_at": 0.0, "spec": None}]


# ------------------------------------------------------------------ pure: assess

@pytest.mark.parametrize("st, history, instances, code, text", [
    pytest.param(None, [], [], None, "Waiting for the supervisor to start the rollout of web to revision aaaaaaaaaaaa...",
                 id="no-state-yet"),
    pytest.param(state(OLD, "complete"), HISTORY, [inst("o1", OLD)] * 3, None,
                 "Waiting for the supervisor to start the rollout of web to revision 4 "
                 "(its last rollout was to revision 3, complete)...", id="stale-complete-state-is-no-success"),
    pytest.param(state(), HISTORY, [inst("n1", T), inst("n2", T, CRITICAL), inst("o1", OLD), inst("o2", OLD)],
                 None, "Waiting for rollout of web to finish: 1 of 3 updated replicas are available...",
                 id="progressing"),
    pytest.param(state(), HISTORY, [inst("n1", T), inst("n2", T), inst("n3", T), foreign("x1"), foreign("x2")],
                 None, "Waiting for rollout of web to finish: 3 of 3 updated replicas are available, "
                 "waiting for the supervisor to confirm...", id="another-tools-registrations-do-not-count"),
    pytest.param(state(), HISTORY, [inst("o1", T, template=OLD), inst("o2", T, template=OLD),
                                    inst("n1", T, template=T)],
                 None, "Waiting for rollout of web to finish: 1 of 3 updated replicas are available...",
                 id="restart-old-replicas-still-named-by-the-document"),
    pytest.param(state(), HISTORY, [inst(f"n{i}", T) for i in range(3)] + [inst("o1", OLD)], None,
                 "Waiting for rollout of web to finish: 1 old replica is pending termination...", id="old-left"),
    pytest.param(state(), HISTORY, [inst(f"n{i}", T) for i in range(3)], None,
                 "Waiting for rollout of web to finish: 3 of 3 updated replicas are available, "
                 "waiting for the supervisor to confirm...", id="all-available-not-marked"),
    pytest.param(state(phase="complete"), HISTORY, [inst(f"n{i}", T) for i in range(3)], 0,
                 "rollout of web to revision 4 complete", id="complete"),
    pytest.param(state(phase="complete"), HISTORY, [inst(f"n{i}", T) for i in range(3)] + [inst("n4", T, CRITICAL)],
                 0, "rollout of web to revision 4 complete", id="complete-with-one-extra-starting"),
    pytest.param(state(phase="complete"), HISTORY, [inst("n1", T), inst("n2", T, CRITICAL)], None,
                 "Waiting for rollout of web to finish: 1 of 3 updated replicas are available...",
                 id="complete-but-scaled-up-or-crashed-since"),
    pytest.param(state(phase="failed", reason="web-1 crashed 3 times"), HISTORY, [], 1,
                 "rollout of web to revision 4 failed: web-1 crashed 3 times", id="failed"),
    pytest.param(state(phase="paused", reason="checking logs"), HISTORY, [], 1,
                 "rollout of web to revision 4 is paused: checking logs; resume it with "
                 "`meshlet rollout resume web`", id="paused"),
    pytest.param(state(OLD, "reverting", reverted_from=T, reason="progress deadline 10s exceeded"), HISTORY, [], 1,
                 "rollout of web to revision 4 failed and was reverted to revision 3: progress deadline 10s exceeded",
                 id="reverted-document-kept"),
    pytest.param(state(T, "reverting", reverted_from=OLD, reason="crashed"), HISTORY, [], 1,
                 "rollout of web to revision 3 failed: crashed; reverting to revision 4", id="reverting-to-target"),
    pytest.param(None, [], [inst(f"n{i}", T) for i in range(3)], 0, "rollout of web to revision aaaaaaaaaaaa complete",
                 id="first-deploy-settled-without-state"),
    pytest.param(None, [], [inst("n1", T), inst("n2", T), inst("n3", T, CRITICAL)], None,
                 "Waiting for the supervisor to start the rollout of web to revision aaaaaaaaaaaa...",
                 id="first-deploy-not-ready"),
    pytest.param(None, [dict(HISTORY[1], status="complete")], [inst(f"n{i}", T) for i in range(3)], 0,
                 "rollout of web to revision 4 complete", id="history-says-complete"),
    pytest.param(None, [dict(HISTORY[1], status="complete")], [inst("n1", T)], None,
                 "Waiting for rollout of web to finish: 1 of 3 updated replicas are available...",
                 id="history-says-complete-but-replicas-missing"),
])
def test_assess(st, history, instances, code, text) -> None:
    p = assess("web", T, 3, st, history, instances)
    assert (p.code, p.text) == (code, text)


@pytest.mark.parametrize("step, text", [
    pytest.param(0, "1 of 3 updated replicas are available (canary step 1 of 2: 10%)...", id="first-step"),
    pytest.param(1, "1 of 3 updated replicas are available (canary step 2 of 2: 50%)...", id="second-step"),
    pytest.param(2, "1 of 3 updated replicas are available...", id="canary-done"),
])
def test_assess_names_the_canary_step(step, text) -> None:
    p = assess("web", T, 3, state(canary_step=step), HISTORY, [inst("n1", T), inst("o1", OLD)], canary=[10, 50])
    assert (p.code, p.text) == (None, "Waiting for rollout of web to finish: " + text)


def test_assess_counts_the_documents_revision_only_when_told() -> None:
    """The supervisor registers replicas of the document's target with the document's
    revision in Meta: `rollout status` passes both as ``current``."""
    running = [inst(f"n{i}", DOC) for i in range(3)]
    assert assess("web", T, 3, state(), HISTORY, running).text.endswith("0 of 3 updated replicas are available...")
    assert "3 of 3" in assess("web", T, 3, state(), HISTORY, running, frozenset({T, DOC})).text


# ------------------------------------------------------------------ pure: history

SPEC1 = {"name": "web", "image": "web:1", "replicas": 3, "env": {"GREETING": "hi", "DB_PASSWORD": "hunter2"},
         "probes": {"readiness": {"http": {"headers": {"Authorization": "Bearer xyz", "X-Env": "test"}}}}}


@pytest.mark.parametrize("before, after, summary", [
    pytest.param(None, {"spec": SPEC1}, "-", id="oldest"),
    pytest.param({"spec": SPEC1}, {"spec": dict(SPEC1, image="web:2")}, "image", id="image"),
    pytest.param({"spec": SPEC1}, {"spec": dict(SPEC1, replicas=5, image="web:2", command=["x"])}, "command, image",
                 id="replicas-ignored"),
    pytest.param({"spec": SPEC1}, {"spec": dict(SPEC1, env={"GREETING": "yo", "NEW": "1"})},
                 "env (-DB_PASSWORD, GREETING, +NEW)", id="env-names-only"),
    pytest.param({"spec": SPEC1}, {"spec": SPEC1, "restart_token": "t1"}, "rolling restart", id="restart"),
    pytest.param({"spec": SPEC1}, {"spec": SPEC1}, "no change", id="same"),
    pytest.param({"spec": None}, {"spec": SPEC1}, "?", id="no-spec-recorded"),
])
def test_change_summary(before, after, summary) -> None:
    assert change_summary(before, after) == summary


def test_masked_hides_secret_looking_env_and_header_values_only() -> None:
    out = masked(SPEC1)
    assert out["env"] == {"GREETING": "hi", "DB_PASSWORD": MASK}
    assert out["probes"]["readiness"]["http"]["headers"] == {"Authorization": MASK, "X-Env": "test"}
    assert out["image"] == "web:1" and SPEC1["env"]["DB_PASSWORD"] == "hunter2"  # input untouched
    for name in ("API_KEY", "TOKEN", "AWS_SECRET_ACCESS_KEY", "SESSION_COOKIE", "KEY", "TLS_KEY_FILE"):
        assert masked({"env": {name: "v"}})["env"][name] == MASK, name
    for name in ("KEYBOARD", "MONKEY_COUNT", "PORT", "LOG_LEVEL"):
        assert masked({"env": {name: "v"}})["env"][name] == "v", name


def test_history_table() -> None:
    history = [{"number": 1, "revision": "9f86d081884c", "status": "complete", "created_at": 1000.0, "spec": SPEC1},
               {"number": 2, "revision": "0123456789ab", "status": "active", "created_at": 1290.0,
                "spec": dict(SPEC1, image="web:2")}]
    assert history_table(history, 1300.0) == [
        "NUMBER  REVISION      STATUS    CREATED    CHANGE",
        "1       9f86d081884c  complete  5m00s ago  -",
        "2       0123456789ab  active    10s ago    image",
    ]


# ------------------------------------------------------------------ pure: writes

def spec_doc(text: str, vip: str | None = "127.10.0.2") -> dict:
    (spec,) = config.loads("services:\n" + textwrap.indent(textwrap.dedent(text), "  "), base_dir="/").services.values()
    return json.loads(json.dumps(config.service_document(spec, vip if spec.ports else None)))


V1 = "web: {command: [python3, app.py], replicas: 3, ports: [{name: http}], env: {V: '1'}}"
V2 = V1.replace("V: '1'", "V: '2'")


def test_rollback_document_keeps_name_vip_and_replicas_and_recomputes_the_revision() -> None:
    current = spec_doc(V2.replace("replicas: 3", "replicas: 5"))
    entry = {"number": 1, "revision": "x", "spec": spec_doc(V1)["spec"]}
    doc = rollback_document(current, entry)
    assert doc["spec"]["env"] == {"V": "1"} and doc["spec"]["replicas"] == 5
    assert (doc["name"], doc["vip"], doc["format"]) == ("web", "127.10.0.2", 2)
    spec, vip, revision = config.parse_service_document(json.dumps(doc))
    assert revision == config.service_revision(spec) and vip == "127.10.0.2"
    assert template_revision(spec) == template_revision(config.ServiceSpec.from_dict(entry["spec"]))


@pytest.mark.parametrize("entry, message", [
    pytest.param({"number": 1, "spec": None}, "revision 1 has no spec recorded", id="no-spec"),
    pytest.param({"number": 1, "spec": {"name": "web", "replicas": -1}},
                 "history revision 1 replicas: expected an integer >= 0", id="invalid-spec"),
    pytest.param({"number": 1, "spec": spec_doc(V1.replace("web:", "api:"))["spec"]}, "of service 'api'",
                 id="other-service"),
])
def test_rollback_document_refuses(entry, message) -> None:
    with pytest.raises(CliError, match=message):
        rollback_document(spec_doc(V2), entry)


def entries(*statuses: str) -> list[dict]:
    return [{"number": n, "revision": f"r{n}", "status": s, "created_at": 0.0, "spec": None}
            for n, s in enumerate(statuses, 1)]


@pytest.mark.parametrize("history, to, doc_target, number", [
    pytest.param(entries("complete", "active"), None, "r2", 1, id="previous-complete"),
    pytest.param(entries("complete", "failed", "active"), None, "r3", 1, id="skips-failed"),
    pytest.param(entries("complete", "complete", "active"), 1, "r3", 1, id="to-n"),
    pytest.param(entries("failed", "complete"), None, "r1", 2, id="after-auto-revert-goes-to-what-runs"),
    pytest.param(entries("failed", "complete"), 2, "r1", 2, id="after-auto-revert-to-the-last"),
    pytest.param(entries("complete", "failed", "complete"), 1, "r2", 1, id="after-auto-revert-to-older"),
    pytest.param(entries("complete"), None, "r1", None, id="nothing-to-go-back-to"),
])
def test_rollback_entry(history, to, doc_target, number) -> None:
    entry = rollback_entry(history, to, doc_target)
    assert (entry and entry["number"]) == number


def test_rollback_entry_refuses_like_rollback_target() -> None:
    with pytest.raises(RolloutError, match="revision 2 is the current revision"):
        rollback_entry(entries("complete", "active"), 2, "r2")
    with pytest.raises(RolloutError, match=r"revision 5 is not in the history \(have: 1, 2\)"):
        rollback_entry(entries("complete", "active"), 5, "r2")


def test_restart_tokens_are_fresh_and_readable() -> None:
    assert new_restart_token(1764000000.25) == "2025-11-24T16:00:00.250000Z"
    assert new_restart_token(1764000000.25) != new_restart_token(1764000000.250001)


# ------------------------------------------------------------------ commands against a catalog

def meshlet_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor", *args]


def clean_env() -> dict[str, str]:
    from _util import cli_env

    return cli_env()


def meshlet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(meshlet_argv(*args), capture_output=True, text=True, cwd=REPO, env=clean_env(),
                          timeout=timeout)


class Catalog:
    """The test's side of the catalog: service documents, and the supervisor's KV keys."""

    def __init__(self, catalog, tmp: Path) -> None:
        self.url, self.c, self.tmp = catalog.url, catalog.client(), tmp

    def apply(self, text: str) -> dict:
        f = self.tmp / "meshlet.yaml"
        f.write_text("services:\n" + textwrap.indent(textwrap.dedent(text), "  "))
        r = meshlet("apply", "-f", str(f), "--consul", self.url)
        assert r.returncode == 0, r.stderr
        return self.doc()

    def doc(self) -> dict:
        return json.loads(self.c.kv.get("meshlet/services/web")[1]["Value"])

    def target(self, token: str | None = None) -> str:
        return target_revision(config.ServiceSpec.from_dict(self.doc()["spec"]), token)

    def put(self, key: str, value) -> None:
        assert self.c.kv.put(key, json.dumps(value))

    def get(self, key: str):
        _, e = self.c.kv.get(key)
        return None if e is None else json.loads(e["Value"])

    def record(self, status: str | None = None, token: str | None = None) -> list:
        """What the supervisor does when it starts rolling the current document out."""
        history = self.get(config.rollout_key("web", "history")) or []
        rev = self.target(token)
        history = record_revision(history, rev, self.doc()["spec"], 1000.0 + len(history))
        history[-1]["restart_token"] = token
        if status:
            history = mark_revision(history, rev, status)
        self.put(config.rollout_key("web", "history"), history)
        return history

    def state(self, revision: str, phase: str, **kw) -> None:
        self.put(config.rollout_key("web", "state"), RolloutState("web", revision, phase, **kw).to_dict())

    def replicas(self, revision: str, n: int = 3) -> None:
        """``n`` passing instances of ``revision`` in the catalog, replacing those of before
        (what a supervisor registers once a rollout to it is complete)."""
        for sid in [s["ID"] for s in self.c.agent.services().values() if s["Service"] == "web"]:
            self.c.agent.service.deregister(sid)
        for i in range(n):
            self.c.agent.service.register("web", service_id=f"web-{i}-{revision[:8]}", port=1000 + i,
                                          meta=ours(revision, i))


@pytest.fixture
def cat(catalog, tmp_path) -> Catalog:
    return Catalog(catalog, tmp_path)


def status(cat: Catalog, *extra: str) -> subprocess.CompletedProcess:
    return meshlet("rollout", "status", "web", "--consul", cat.url, *extra)


def test_status_exit_codes(cat: Catalog) -> None:
    cat.apply(V1)
    cat.record("complete")
    cat.apply(V2)
    cat.record()
    target = cat.target()
    cat.state(target, "complete")
    cat.replicas(target, 2)
    r = status(cat, "--timeout", "1s")       # complete, but a replica short (scaled up, crashed since)
    assert r.returncode == 1 and r.stdout == "Waiting for rollout of web to finish: 2 of 3 updated " \
        "replicas are available...\n", r.stderr
    cat.replicas(target)
    r = status(cat)
    assert (r.returncode, r.stdout) == (0, "rollout of web to revision 2 complete\n"), r.stderr
    cat.replicas(target, 0)

    cat.state(target, "failed", reason="web-0 crashed 3 times")
    r = status(cat)
    assert r.returncode == 1 and "rollout of web to revision 2 failed: web-0 crashed 3 times" in r.stderr

    cat.state(target, "paused", reason="canary looks slow")
    r = status(cat)
    assert r.returncode == 1 and "is paused: canary looks slow" in r.stderr

    cat.state(target, "progressing")
    r = status(cat, "--timeout", "1s")
    assert r.returncode == 1
    assert r.stdout == "Waiting for rollout of web to finish: 0 of 3 updated replicas are available...\n"
    assert "timed out after 1s" in r.stderr

    r = meshlet("rollout", "status", "nope", "--consul", cat.url)
    assert r.returncode == 2 and "no service 'nope'" in r.stderr


def test_status_waits_for_the_supervisor_to_catch_up_then_follows_to_complete(cat: Catalog) -> None:
    """The state is for the previous revision (complete): no success until the supervisor
    starts the new one; progress lines follow the catalog; exit 0 on the complete state."""
    cat.apply(V1)
    old = cat.target()
    cat.record("complete")
    cat.state(old, "complete")
    for i in range(3):
        cat.c.agent.service.register("web", service_id=f"web-{i}-old", port=1000 + i, meta=ours(old, i))
    cat.apply(V2)
    new = cat.target()
    proc = subprocess.Popen(meshlet_argv("rollout", "status", "web", "--consul", cat.url, "--timeout", "60s"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=clean_env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln.rstrip("\n")) for ln in proc.stdout], daemon=True).start()
    def until(expected: str) -> None:
        """Read lines until ``expected`` (one line per catalog change; those on the way are
        progress lines of the same rollout)."""
        while (line := lines.get(timeout=30)) != expected:
            assert line.startswith("Waiting for rollout of web to finish: "), line

    try:
        assert lines.get(timeout=30) == ("Waiting for the supervisor to start the rollout of web to revision "
                                         f"{new} (its last rollout was to revision 1, complete)...")
        cat.state(new, "progressing")
        assert lines.get(timeout=30) == "Waiting for rollout of web to finish: 0 of 3 updated replicas are available..."
        cat.c.agent.service.register("web", service_id="web-0-new", port=2000, meta=ours(new, 0))
        assert lines.get(timeout=30) == "Waiting for rollout of web to finish: 1 of 3 updated replicas are available..."
        for i in (1, 2):
            cat.c.agent.service.register("web", service_id=f"web-{i}-new", port=2000 + i, meta=ours(new, i))
        until("Waiting for rollout of web to finish: 3 old replicas are pending termination...")
        for i in range(3):
            cat.c.agent.service.deregister(f"web-{i}-old")
        until("Waiting for rollout of web to finish: 3 of 3 updated replicas are available, "
              "waiting for the supervisor to confirm...")
        assert proc.poll() is None      # not complete before the supervisor says so
        cat.record("complete")
        cat.state(new, "complete")
        assert lines.get(timeout=30) == "rollout of web to revision 2 complete"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(proc.stderr.read(), file=sys.stderr)


def test_history_table_and_one_revision_as_yaml_with_secrets_masked(cat: Catalog) -> None:
    cat.apply(V1.replace("V: '1'", "V: '1', DB_PASSWORD: hunter2"))
    cat.record("complete")
    cat.apply(V2)
    cat.record()
    r = meshlet("rollout", "history", "web", "--consul", cat.url)
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines()]
    assert rows[0] == ["NUMBER", "REVISION", "STATUS", "CREATED", "CHANGE"]
    assert [row[:3] for row in rows[1:]] == [["1", cat.get(config.rollout_key("web", "history"))[0]["revision"], "complete"],
                                             ["2", cat.target(), "active"]]
    assert r.stdout.splitlines()[2].endswith("env (-DB_PASSWORD, V)")
    assert "hunter2" not in r.stdout

    r = meshlet("rollout", "history", "web", "--consul", cat.url, "--revision", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# revision 1 (") and "complete" in r.stdout.splitlines()[0]
    import yaml
    spec = yaml.safe_load(r.stdout)
    assert spec["env"] == {"V": "1", "DB_PASSWORD": MASK} and spec["command"] == ["python3", "app.py"]
    assert "hunter2" not in r.stdout

    r = meshlet("rollout", "history", "web", "--consul", cat.url, "--revision", "9")
    assert r.returncode == 2 and "revision 9 is not in the history (have: 1, 2)" in r.stderr


def test_rollback_writes_the_document_and_restart_key_in_one_transaction(cat: Catalog) -> None:
    v1 = cat.apply(V1)
    first = cat.record("complete")[-1]
    cat.apply(V2)
    cat.record()
    cat.put(config.rollout_key("web", "restart"), {"token": "later", "at": 1.0})   # v1 had no token: rollback deletes it
    r = meshlet("rollback", "web", "--consul", cat.url)
    assert r.returncode == 0, r.stderr
    doc = cat.doc()
    # the revision as `rollout history` and `meshlet status` show it (the replicas' template)
    assert doc == v1 and r.stdout.startswith(f"web: rolling back to revision 1 ({first['revision']})")
    assert cat.get(config.rollout_key("web", "restart")) is None

    # --to N restores N's restart token too; both keys land with one index (one transaction)
    cat.record()                      # the supervisor records v1 again, as number 3
    cat.put(config.rollout_key("web", "restart"), {"token": "t1", "at": 2.0})
    cat.record("complete", token="t1")  # a rolling restart of v1: number 4, complete
    cat.apply(V2)
    cat.record()                      # v2 again: number 5
    cat.c.kv.delete(config.rollout_key("web", "restart"))
    assert [e["number"] for e in cat.get(config.rollout_key("web", "history"))] == [3, 4, 5]
    r = meshlet("rollback", "web", "--consul", cat.url, "--to", "4")
    assert r.returncode == 0, r.stderr
    _, d = cat.c.kv.get("meshlet/services/web")
    _, k = cat.c.kv.get(config.rollout_key("web", "restart"))
    assert json.loads(d["Value"]) == v1 and json.loads(k["Value"])["token"] == "t1"
    assert d["ModifyIndex"] == k["ModifyIndex"]
    assert cat.target("t1") == cat.get(config.rollout_key("web", "history"))[1]["revision"]


def test_rollback_after_an_auto_revert_makes_the_document_say_what_runs(cat: Catalog) -> None:
    """The supervisor reverted v2 to v1 (history: v2 failed, v1 complete again) and left the
    document at v2: plain `rollback` writes v1's spec (the state says what was reverted)."""
    v1 = cat.apply(V1)
    cat.record("complete")
    cat.apply(V2)
    cat.record("failed")
    v2 = cat.doc()
    cat.c.kv.put("meshlet/services/web", json.dumps(v1))
    cat.record("complete")                 # the revert: v1 again, as number 3
    cat.c.kv.put("meshlet/services/web", json.dumps(v2))
    cat.state(target_revision(config.ServiceSpec.from_dict(v1["spec"])), "complete",
              reverted_from=cat.target(), reason="web-0 crashed")
    r = status(cat)
    assert r.returncode == 1 and "failed and was reverted to revision 3: web-0 crashed" in r.stderr
    r = meshlet("rollback", "web", "--consul", cat.url)
    assert r.returncode == 0, r.stderr
    assert cat.doc() == v1 and r.stdout.startswith("web: rolling back to revision 3")
    cat.replicas(target_revision(config.ServiceSpec.from_dict(v1["spec"])))
    assert status(cat).returncode == 0


def test_rollback_refusals(cat: Catalog) -> None:
    cat.apply(V1)
    r = meshlet("rollback", "web", "--consul", cat.url)
    assert r.returncode == 1 and "web has no rollout history yet" in r.stderr
    cat.record("complete")
    r = meshlet("rollback", "web", "--consul", cat.url)
    assert r.returncode == 1 and "no complete revision to go back to (history: 1 (complete))" in r.stderr
    cat.apply(V2)
    cat.record("failed")
    before = cat.doc()
    for args, code, message in [
        (("--to", "7"), 2, "revision 7 is not in the history (have: 1, 2)"),
        (("--to", "2"), 2, "revision 2 is the current revision"),
    ]:
        r = meshlet("rollback", "web", "--consul", cat.url, *args)
        assert (r.returncode, message in r.stderr) == (code, True), r.stderr
    assert cat.doc() == before
    r = meshlet("rollback", "nope", "--consul", cat.url)
    assert r.returncode == 2 and "no service 'nope'" in r.stderr


def test_pause_resume_and_restart_write_their_keys(cat: Catalog) -> None:
    cat.apply(V1)
    r = meshlet("rollout", "pause", "web", "--consul", cat.url, "--reason", "look at the canary")
    assert r.returncode == 0, r.stderr
    control = cat.get(config.rollout_key("web", "control"))
    assert (control["paused"], control["reason"]) == (True, "look at the canary")
    r = meshlet("rollout", "resume", "web", "--consul", cat.url)
    assert r.returncode == 0 and cat.get(config.rollout_key("web", "control"))["paused"] is False

    tokens = []
    for _ in range(2):
        r = meshlet("restart", "web", "--consul", cat.url)
        assert r.returncode == 0, r.stderr
        tokens.append(cat.get(config.rollout_key("web", "restart"))["token"])
        assert r.stdout.startswith(f"web: rolling restart requested (revision {cat.target(tokens[-1])}")
    assert tokens[0] != tokens[1] and cat.target(tokens[1]) != cat.target()

    # status follows the restart's revision: the state for the plain revision is stale
    cat.state(cat.target(), "complete")
    r = status(cat, "--timeout", "1s")
    assert r.returncode == 1 and "Waiting for the supervisor to start the rollout" in r.stdout
    cat.state(cat.target(tokens[1]), "complete", restart_token=tokens[1])
    cat.replicas(cat.target(tokens[1]))
    assert status(cat).returncode == 0

    for cmd in (("rollout", "pause"), ("rollout", "resume"), ("restart",)):
        r = meshlet(*cmd, "nope", "--consul", cat.url)
        assert r.returncode == 2 and "no service 'nope'" in r.stderr, cmd


def test_unreadable_keys_are_named_not_a_traceback(cat: Catalog) -> None:
    cat.apply(V1)
    cat.c.kv.put(config.rollout_key("web", "history"), "{not json")
    r = meshlet("rollout", "history", "web", "--consul", cat.url)
    assert r.returncode == 1 and "meshlet/rollout/web/history: not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr
    cat.put(config.rollout_key("web", "history"), {"number": 1})
    r = meshlet("rollback", "web", "--consul", cat.url)
    assert r.returncode == 1 and "meshlet/rollout/web/history: expected a list of entries" in r.stderr
    cat.c.kv.delete(config.rollout_key("web", "history"))
    cat.put(config.rollout_key("web", "state"), {"service": "web", "revision": cat.target(), "phase": "exploded"})
    r = status(cat, "--timeout", "1s")      # a state it cannot read counts as none: it waits
    assert r.returncode == 1 and "ignoring an unreadable state: rollout state: phase" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unreachable_catalog_is_a_message_not_a_traceback(tmp_path) -> None:
    from _util import refusing_port
    r = meshlet("rollout", "status", "web", "--consul", f"http://127.0.0.1:{refusing_port()}")
    assert r.returncode == 1 and "cannot reach the catalog" in r.stderr and "Traceback" not in r.stderr
