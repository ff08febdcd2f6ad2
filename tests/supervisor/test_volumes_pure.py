"""Volumes in the pure core: engine names, where a replica is pinned, what placement and
``meshlet explain`` say about it, one writer per slot in reconcile and in the rollout
engine (slot by slot, stop before start), and the mesh-wide checks apply runs.

Rollout rows read like tests/supervisor/test_rollout.py's: per slot from 0, ``A``
available, ``S`` starting, ``T`` terminating, ``.`` none; old ids ``o<slot>``, new
``n<slot>``."""

from __future__ import annotations

import dataclasses

import pytest

import config
from supervisor.core.checks import check_mesh
from supervisor.core.model import Observed, Replica, Start, Stop, Unplaceable, Wait
from supervisor.core.placement import NodeInfo, Request, explain, place
from supervisor.core.reconcile import ONE_WRITER, pinned_request, reconcile_service
from supervisor.core.rollout import RetireReplica, StartReplica, Strategy, rollout_step
from supervisor.core.volumes import (conflicts, engine_name, home_key, is_node_local, one_writer, pin,
                                     runtime_reason, with_definitions)
from test_rollout import NOW, replicas, state, text

V = config.VolumeSpec
DATA = V(name="data", type="named", driver="local", per_replica=True)
SHARED = V(name="shared", type="named", driver="local", source="shop-cache")
HOST = V(name="logs", type="host", source="/srv/logs")
TMP = V(name="scratch", type="tmpfs", size=2**20)
NFS = V(name="media", type="named", driver="local",
        driver_opts=config.FrozenDict({"type": "nfs", "o": "addr=127.0.0.1", "device": ":/m"}))
PLUGIN = V(name="ebs", type="named", driver="rexray/ebs")


def service(*vols: config.VolumeSpec, replicas: int = 3, image: bool = False, **kw) -> config.ServiceSpec:
    mounts = tuple(config.VolumeMount(name=v.name, target=f"/v/{v.name}", volume=v) for v in vols)
    run = {"image": "kv:1"} if image else {"command": ("kv",)}
    return config.ServiceSpec(name="db", replicas=replicas, volumes=mounts, **run, **kw)


# ---------------------------------------------------------------- names and kinds

@pytest.mark.parametrize("vol, slot, name, key, local", [
    pytest.param(DATA, 2, "db-data-2", "named/db-data-2", True, id="per-replica"),
    pytest.param(SHARED, 2, "shop-cache", "named/shop-cache", True, id="named-source"),
    pytest.param(V(name="c", type="named", driver="local"), 0, "c", "named/c", True, id="named-default-name"),
    pytest.param(HOST, 1, "/srv/logs", "host/logs", True, id="host"),
    pytest.param(TMP, 1, None, None, False, id="tmpfs-scratch"),
    pytest.param(NFS, 1, "media", None, False, id="nfs-does-not-pin"),
    pytest.param(PLUGIN, 1, "ebs", None, False, id="plugin-does-not-pin"),
])
def test_engine_names_and_homes(vol, slot, name, key, local):
    assert engine_name(vol, "db", slot) == name
    assert home_key(vol, "db", slot) == key
    assert is_node_local(vol) is local


def test_env_name_upper_cases_and_replaces_dashes_and_dots():
    assert config.volume_env_name("shop-data.v2") == "MESHLET_VOLUME_SHOP_DATA_V2"


def test_one_writer_only_with_a_per_replica_volume():
    assert one_writer(service(DATA, TMP))
    assert not one_writer(service(SHARED, HOST, NFS))


# ---------------------------------------------------------------- pinning

NODES = (NodeInfo("a", "process"), NodeInfo("b", "process"), NodeInfo("d", "docker"))


@pytest.mark.parametrize("vols, homes, slot, node, why", [
    pytest.param((DATA,), {}, 0, None, "", id="no-home-yet-anywhere"),
    pytest.param((DATA,), {"named/db-data-1": "b"}, 1, "b", "volume db-data-1 lives on node b", id="per-replica-slot"),
    pytest.param((DATA,), {"named/db-data-1": "b"}, 0, None, "", id="other-slot-free"),
    pytest.param((HOST,), {"host/logs": "a"}, 2, "a", "host volume logs (/srv/logs) lives on node a", id="host"),
    pytest.param((NFS,), {"named/media": "a"}, 0, None, "", id="network-never-pins"),
    pytest.param((DATA, HOST), {"named/db-data-0": "a", "host/logs": "b"}, 0, "",
                 "volume db-data-0 lives on node a and host volume logs (/srv/logs) on node b: no node has both",
                 id="homes-disagree"),
])
def test_pin(vols, homes, slot, node, why):
    assert pin(service(*vols), slot, homes) == (node, why)


@pytest.mark.parametrize("homes, nodes, placed, reason", [
    pytest.param({"named/db-data-0": "b"}, NODES[:2], "b", None, id="pinned-node-wins-over-spread"),
    pytest.param({"named/db-data-0": "z"}, NODES[:2], None,
                 "volume db-data-0 lives on node z, and node z is not in the fleet: waiting for it",
                 id="node-gone-stays-pending"),
    pytest.param({"named/db-data-0": "d"}, NODES, None,
                 "volume db-data-0 lives on node d, which cannot hold it: no node fits "
                 "(d: docker node, service has no image)", id="pinned-node-cannot-run-it"),
])
def test_place_honours_the_pin(homes, nodes, placed, reason):
    result = place([pinned_request(service(DATA, replicas=1), 0, homes)], nodes, [])
    assert [n for _, n in result.placed] == ([placed] if placed else [])
    assert [r for _, r in result.failed] == ([reason] if reason else [])


def test_pinned_and_free_requests_placed_together():
    spec = service(DATA, replicas=3)
    homes = {"named/db-data-0": "b", "named/db-data-2": "b"}
    result = place([pinned_request(spec, s, homes) for s in range(3)], NODES[:2], [])
    assert sorted((r.slot, n) for r, n in result.placed) == [(0, "b"), (1, "a"), (2, "b")]


def test_explain_filters_every_other_node_with_the_pin():
    e = explain(pinned_request(service(DATA, replicas=1), 0, {"named/db-data-0": "b"}), NODES[:2], [])
    assert e.chosen == "b"
    assert [(v.node, v.reason) for v in e.verdicts] == [("b", None), ("a", "volume db-data-0 lives on node b")]


def test_a_process_node_cannot_hold_a_driver_volume():
    assert runtime_reason(service(PLUGIN), "process") == "process node, volume ebs needs a Docker engine (driver rexray/ebs)"
    assert runtime_reason(service(NFS), "process") == "process node, volume media needs a Docker engine (driver_opts)"
    assert runtime_reason(service(PLUGIN), "docker") is None
    assert runtime_reason(service(DATA, HOST, TMP), "process") is None
    result = place([Request(service(NFS, image=True), 0)], (NodeInfo("a", "process"), NodeInfo("d", "docker")), [])
    assert [n for _, n in result.placed] == ["d"]


# ---------------------------------------------------------------- reconcile: one writer per slot

def rep(iid: str, slot: int, revision: str = "r1", node: str = "a", running: bool = True,
        terminating: bool = False) -> Replica:
    return Replica(iid, "db", slot, revision, node, running, ready=running, serving=running,
                   terminating=terminating)


def actions(spec, reps, homes=None, nodes=NODES[:2]):
    observed = Observed(replicas=tuple(reps), nodes=nodes, volume_homes=homes or {})
    out = []
    for a in reconcile_service("db", {"db": (spec, "r1")}, observed, NOW):
        if isinstance(a, Start):
            out.append(f"start {a.slot} on {a.node}")
        elif isinstance(a, Stop):
            out.append(f"stop {a.instance_id}")
        elif isinstance(a, Wait):
            out.append(f"wait {a.slot}" + (" one-writer" if a.reason == ONE_WRITER else ""))
        elif isinstance(a, Unplaceable):
            out.append(f"pending {a.slot}: {a.reason}")
    return out


@pytest.mark.parametrize("spec, reps, homes, expected", [
    pytest.param(service(DATA, replicas=2), [rep("x0", 0), rep("x1", 1, terminating=True)], {},
                 ["wait 1 one-writer"], id="slot-waits-for-its-stopping-replica"),
    pytest.param(service(SHARED, replicas=2), [rep("x0", 0), rep("x1", 1, terminating=True)], {},
                 ["start 1 on b"], id="no-per-replica-volume-starts-beside"),
    pytest.param(service(DATA, replicas=2), [rep("x0", 0), rep("x1", 1, revision="r0")], {},
                 ["stop x1", "wait 1 one-writer"], id="old-revision-stopped-before-its-replacement"),
    pytest.param(service(SHARED, replicas=2), [rep("x0", 0), rep("x1", 1, revision="r0")], {},
                 ["stop x1", "start 1 on a"], id="old-revision-replaced-beside-without"),
    pytest.param(service(DATA, replicas=3), [rep("x0", 0)], {"named/db-data-1": "a", "named/db-data-2": "a"},
                 ["start 1 on a", "start 2 on a"], id="scale-up-finds-its-slots-volumes"),
    pytest.param(service(DATA, replicas=2), [rep("x0", 0)], {"named/db-data-1": "gone"},
                 ["pending 1: volume db-data-1 lives on node gone, and node gone is not in the fleet: waiting for it"],
                 id="home-node-gone-pending-never-elsewhere"),
    pytest.param(service(DATA, replicas=1), [rep("x0", 0), rep("x1", 1), rep("x2", 2)], {},
                 ["stop x1", "stop x2"], id="scale-down-stops-replicas-keeps-volumes"),
])
def test_reconcile_one_writer(spec, reps, homes, expected):
    assert actions(spec, reps, homes) == expected


# ---------------------------------------------------------------- rollout: slot by slot

def one_writer_strategy(replicas: int, max_surge="25%", max_unavailable="25%") -> Strategy:
    update = config.UpdateStrategy(max_surge=max_surge, max_unavailable=max_unavailable)
    return Strategy.from_spec(replicas, update, one_writer=True)


@pytest.mark.parametrize("replicas_, surge, unavailable, expected", [
    pytest.param(3, "25%", "25%", (0, 1), id="surge-forced-to-0"),
    pytest.param(4, "100%", "50%", (0, 2), id="unavailable-kept"),
    pytest.param(2, 1, 0, (0, 1), id="both-zero-becomes-one-unavailable"),
])
def test_one_writer_strategy(replicas_, surge, unavailable, expected):
    s = one_writer_strategy(replicas_, surge, unavailable)
    assert (s.surge, s.unavailable) == expected and s.one_writer


@pytest.mark.parametrize("old, new, expected", [
    pytest.param("AAA", "", ["retire o2"], id="retire-highest-slot-first"),
    pytest.param("AAT", "", [], id="wait-while-it-stops"),
    pytest.param("AA.", "", ["start 2"], id="start-in-the-freed-slot-only"),
    pytest.param("AA.", "..S", [], id="wait-for-the-new-one"),
    pytest.param("AA.", "..A", ["retire o1"], id="next-slot"),
    pytest.param("A..", ".AA", ["retire o0"], id="last-slot"),
    pytest.param("...", "AAA", ["complete"], id="done"),
])
def test_rollout_goes_slot_by_slot(old, new, expected):
    result = rollout_step(state(), replicas(old, new), one_writer_strategy(3), NOW)
    assert text(result.actions) == expected


def test_without_one_writer_the_same_rollout_surges_beside_the_old_replicas():
    s = Strategy.from_spec(3, config.UpdateStrategy())
    assert text(rollout_step(state(), replicas("AAA", ""), s, NOW).actions) == ["start 0"]


def test_a_whole_rollout_never_has_two_replicas_in_a_slot():
    """Simulated: each retire takes one step to stop, each start one step to be available."""
    s = one_writer_strategy(4, max_unavailable="50%")
    phase = {("o", i): "A" for i in range(4)}
    for _ in range(40):
        obs = replicas("".join(phase.get(("o", i), ".") for i in range(4)),
                       "".join(phase.get(("n", i), ".") for i in range(4)))
        result = rollout_step(state(), obs, s, NOW)
        if any(text([a]) == ["complete"] for a in result.actions):
            break
        for key, ph in list(phase.items()):     # one step of time
            if ph == "T":
                del phase[key]
            elif ph == "S":
                phase[key] = "A"
        for a in result.actions:
            if isinstance(a, RetireReplica):
                phase[(a.instance_id[0], int(a.instance_id[1:]))] = "T"
            elif isinstance(a, StartReplica):
                phase[("n", a.slot)] = "S"
        for slot in range(4):
            assert not (("o", slot) in phase and ("n", slot) in phase), f"slot {slot} has two writers: {phase}"
        assert sum(1 for k, ph in phase.items() if ph == "A") >= 2     # max_unavailable 50% of 4
    else:
        pytest.fail(f"the rollout did not complete: {phase}")


# ---------------------------------------------------------------- apply's checks

def test_apply_copies_each_volume_definition_into_its_mount():
    cfg = config.loads("services: {db: {command: [kv], volumes: [{name: data, target: /d}]}}\n"
                       "volumes: {data: {per_replica: true}}\n")
    spec = with_definitions(cfg.services["db"], cfg.volumes)
    assert spec.volumes[0].volume == cfg.volumes["data"]
    back = config.ServiceSpec.from_dict(spec.to_dict())
    assert back == spec and config.service_revision(back) != config.service_revision(cfg.services["db"])


def test_a_file_may_not_set_the_mounts_definition():
    with pytest.raises(config.ConfigError) as err:
        config.loads("services: {db: {command: [kv], volumes: [{name: d, target: /d, volume: {name: d}}]}}\n"
                     "volumes: {d: {}}\n", filename="m.yaml", base_dir="/")
    assert "services.db.volumes[0].volume: set by meshlet apply in the stored document, not in a file" in str(err.value)


def test_per_replica_mismatch_with_a_service_already_in_the_mesh():
    mine = service(DATA, replicas=1)
    theirs = dataclasses.replace(service(dataclasses.replace(DATA, per_replica=False)), name="other")
    assert conflicts({"db": mine}, {"other": theirs}) == [(
        "data", "per_replica is true here, but service other (already in the mesh) mounts volume data with "
                "per_replica false: one volume name cannot be both; rename one")]
    assert conflicts({"db": mine, "other": theirs}, {"other": theirs}) == []   # both applied now: the file rules


@pytest.mark.parametrize("text_, problems", [
    pytest.param("""
services: {db: {command: [kv], volumes: [{name: t, target: /t}]}}
volumes: {t: {type: tmpfs, size: 1Mi}}
""", ["volumes.t.size: services.db runs as a process, whose tmpfs volume is a directory on the host's shared "
      "tmpfs (/dev/shm), where a size cannot be enforced: drop size, or run the service from an image"],
                 id="process-tmpfs-size"),
    pytest.param("""
services: {db: {command: [kv], volumes: [{name: d, target: /d, read_only: true}]}}
volumes: {d: {}}
""", ["services.db.volumes[0].read_only: a process replica has no mount namespace, so read_only cannot be "
      "enforced: drop it, or run the service from an image"], id="process-read-only"),
    pytest.param("""
services: {db: {command: [kv], volumes: [{name: d, target: /d}]}}
volumes: {d: {driver: rexray/ebs}}
""", ["volumes.d.driver: services.db runs as a process, and only a Docker engine mounts a volume driver or "
      "driver_opts (a process node keeps local named volumes as directories): run the service from an image"],
                 id="process-driver"),
    pytest.param("""
services: {db: {image: kv, volumes: [{name: a-b, target: /a}, {name: a_b, target: /b}]}}
volumes: {a-b: {}, a_b: {}}
""", ["services.db.volumes[1].name: volumes a_b and a-b would both be $MESHLET_VOLUME_A_B: rename one"],
                 id="same-variable"),
    pytest.param("""
volumes: {a: {source: x}, b: {source: x, driver: other}}
""", ["volumes.b: names engine volume x like volumes.a, with another driver or driver_opts: one volume "
      "cannot be both"], id="one-engine-volume-two-definitions"),
    pytest.param("""
services: {db: {image: kv, volumes: [{name: d, target: /d, read_only: true}, {name: t, target: /t}]}}
volumes: {d: {driver: rexray/ebs}, t: {type: tmpfs, size: 1Mi}}
""", [], id="an-image-service-may"),
])
def test_mesh_checks(text_, problems):
    assert [f"{p.path}: {p.message}" for p in check_mesh(config.loads(text_))] == problems


@pytest.mark.parametrize("text_, message", [
    pytest.param("volumes: {d: {driver_opts: {type: nfs, bogus: x}}}",
                 'm.yaml:1 volumes.d.driver_opts.bogus: the local driver takes only type, device, o, size '
                 '(Docker refuses "bogus"); a plugin\'s options need its driver', id="local-driver-option"),
    pytest.param("volumes: {d: {per_replica: true, source: x}}",
                 "m.yaml:1 volumes.d.source: a per_replica volume has no source: each slot gets its own engine "
                 "volume, <service>-<volume>-<slot>", id="per-replica-source"),
    pytest.param("volumes: {d: {type: host, source: /x, per_replica: true}}",
                 "m.yaml:1 volumes.d.per_replica: per_replica is only for named volumes (type host has no engine "
                 "volume)", id="per-replica-host"),
    pytest.param("volumes: {d: {type: tmpfs, create: true}}",
                 "m.yaml:1 volumes.d.create: create is only for host volumes", id="create-tmpfs"),
    pytest.param("volumes: {d: {source: 'bad name'}}",
                 'm.yaml:1 volumes.d.source: expected an engine volume name of letters, digits, "_", "." and "-", '
                 'got "bad name"', id="engine-name"),
])
def test_volume_schema_errors(text_, message):
    with pytest.raises(config.ConfigError) as err:
        config.loads(text_, filename="m.yaml")
    assert str(err.value) == message
