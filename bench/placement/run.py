#!/usr/bin/env python3
"""Placement: how well ``place`` packs a whole config, against an exact solver, and how
fast it places 10,000 replicas on 1,000 nodes.

    .venv/bin/pip install -e '.[bench]'          # OR-tools (bench only)
    .venv/bin/python bench/placement/run.py [--clusters 100] [--seed 1] [--limit 20] [--write]

Packing. ``--clusters`` random clusters, each: 2-6 services (cpu request 0.1-2 cores,
memory 64 MiB-4 GiB, drawn from lists so several services share a size) with 15-50
replicas in all, all ``strategy: binpack``, on nodes of five shapes (2c/4G, 4c/8G, 8c/32G,
16c/16G, 4c/32G) drawn at random until the fleet holds twice the requests in both cpu and
memory, with a random ``reserved`` share on some. meshlet places every replica at once
(``place``, as ``meshlet plan`` does). The cost of a placement is the capacity of the
nodes it uses, cpu and memory each as a share of the fleet's: sum over used nodes of
``room_cpu / fleet_cpu + room_memory / fleet_memory``. OR-tools CP-SAT minimises the same
cost exactly (per service and node an integer count of replicas, a used flag per node,
identical nodes ordered to break symmetry), with a time limit of ``--limit`` seconds per
cluster on 2 workers; clusters it does not prove optimal are counted and compared with
its best bound as well as its best solution. Reported: mean and worst gap
``(meshlet - optimum) / optimum``.

Speed. 1,000 nodes of the five shapes and 10,000 replicas in one ``place`` call, for
binpack and spread, in three mixes: 100 services x 100 replicas, 1,000 x 10, and 100 x 100
with ``spread_over: [zone]`` (10 zones). Best of ``--rounds`` wall-clock times (the
machine is shared; the least disturbed run is the one that says what the code costs).

``--write`` replaces the "## Placement" section of bench/RESULTS.md. Pure computation:
no process, no socket.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import config  # noqa: E402
from _common import replace_section  # noqa: E402 - shared bench helpers
from supervisor.core.placement import NodeInfo, Request, place  # noqa: E402

GiB, MiB = 2**30, 2**20
SHAPES = [(2.0, 4 * GiB), (4.0, 8 * GiB), (8.0, 32 * GiB), (16.0, 16 * GiB), (4.0, 32 * GiB)]
CPUS = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0]
MEMORIES = [64 * MiB, 128 * MiB, 256 * MiB, 512 * MiB, 1 * GiB, 2 * GiB, 4 * GiB]


def service(name: str, cpu: float, memory: int, strategy: str = "binpack",
            spread_over: tuple[str, ...] = ()) -> config.ServiceSpec:
    amounts = config.ResourceAmounts(cpu=cpu, memory=memory)
    return config.ServiceSpec(name=name, command=("app",),
                              resources=config.Resources(requests=amounts, limits=amounts),
                              placement=config.Placement(strategy=strategy, spread_over=spread_over))


@dataclass
class Cluster:
    nodes: list[NodeInfo]
    services: list[tuple[config.ServiceSpec, int]]   # (spec, replicas)

    def requests(self) -> list[Request]:
        return [Request(s, slot) for s, n in self.services for slot in range(n)]

    def cost_weights(self) -> list[float]:
        cpu = sum(n.room_cpu for n in self.nodes)
        mem = sum(n.room_memory for n in self.nodes)
        return [n.room_cpu / cpu + n.room_memory / mem for n in self.nodes]


def random_cluster(rng: random.Random) -> Cluster:
    total = rng.randint(15, 50)
    kinds = rng.randint(2, 6)
    cuts = sorted(rng.sample(range(1, total), kinds - 1))
    counts = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    services = [(service(f"s{i}", rng.choice(CPUS), rng.choice(MEMORIES)), n) for i, n in enumerate(counts)]
    need_cpu = sum(s.resources.requests.cpu * n for s, n in services)
    need_mem = sum(s.resources.requests.memory * n for s, n in services)
    nodes: list[NodeInfo] = []
    while (sum(n.room_cpu for n in nodes) < 2 * need_cpu or sum(n.room_memory for n in nodes) < 2 * need_mem):
        cpu, mem = rng.choice(SHAPES)
        reserved = rng.random() < 0.3
        nodes.append(NodeInfo(f"n{len(nodes):02d}", "process", cpu=cpu, memory=mem,
                              reserved_cpu=0.5 if reserved else 0.0, reserved_memory=GiB // 2 if reserved else 0))
    return Cluster(nodes, services)


def meshlet_cost(cluster: Cluster) -> tuple[float, int]:
    result = place(cluster.requests(), cluster.nodes, [])
    assert not result.failed, result.failed[:1]
    used = {node for _, node in result.placed}
    weights = cluster.cost_weights()
    return sum(w for n, w in zip(cluster.nodes, weights) if n.name in used), len(used)


def optimum(cluster: Cluster, limit: float) -> tuple[float, float, bool]:
    """(best cost found, best lower bound, proven optimal) by CP-SAT."""
    from ortools.sat.python import cp_model
    scale = 1_000_000
    weights = [round(w * scale) for w in cluster.cost_weights()]
    m = cp_model.CpModel()
    used = [m.new_bool_var(f"u{j}") for j in range(len(cluster.nodes))]
    count = {(i, j): m.new_int_var(0, n, f"x{i}_{j}")
             for i, (_, n) in enumerate(cluster.services) for j in range(len(cluster.nodes))}
    for i, (_, n) in enumerate(cluster.services):
        m.add(sum(count[i, j] for j in range(len(cluster.nodes))) == n)
    for j, node in enumerate(cluster.nodes):
        cpu = [round(s.resources.requests.cpu * 1000) for s, _ in cluster.services]
        mem = [s.resources.requests.memory // MiB for s, _ in cluster.services]
        m.add(sum(cpu[i] * count[i, j] for i in range(len(cluster.services)))
              <= round(node.room_cpu * 1000) * used[j])
        m.add(sum(mem[i] * count[i, j] for i in range(len(cluster.services)))
              <= (node.room_memory // MiB) * used[j])
    # identical nodes are interchangeable: use them in order
    for j in range(1, len(cluster.nodes)):
        for k in range(j - 1, -1, -1):
            a, b = cluster.nodes[k], cluster.nodes[j]
            if (a.room_cpu, a.room_memory) == (b.room_cpu, b.room_memory):
                m.add(used[k] >= used[j])
                break
    m.minimize(sum(w * u for w, u in zip(weights, used)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = limit
    solver.parameters.num_workers = 2
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT found no placement ({solver.status_name(status)})")
    return solver.objective_value / scale, solver.best_objective_bound / scale, status == cp_model.OPTIMAL


def packing(clusters: int, seed: int, limit: float) -> dict:
    rng = random.Random(seed)
    gaps, bound_gaps, proven, rows = [], [], 0, []
    for c in range(clusters):
        cluster = random_cluster(rng)
        ours, n_ours = meshlet_cost(cluster)
        best, bound, optimal = optimum(cluster, limit)
        proven += optimal
        gaps.append((ours - best) / best)
        bound_gaps.append((ours - bound) / bound)
        rows.append((c, len(cluster.nodes), sum(n for _, n in cluster.services), ours, best, optimal))
        print(f"cluster {c:3d}: {len(cluster.nodes):2d} nodes, {rows[-1][2]:2d} replicas, "
              f"meshlet {ours:.4f} ({n_ours} nodes), CP-SAT {best:.4f}{'' if optimal else ' (not proven)'}, "
              f"gap {gaps[-1]:+.2%}", flush=True)
    return {"clusters": clusters, "mean": statistics.fmean(gaps), "worst": max(gaps),
            "at_optimum": sum(g <= 1e-9 for g in gaps), "proven": proven,
            "mean_vs_bound": statistics.fmean(bound_gaps), "worst_vs_bound": max(bound_gaps)}


def big_fleet(rng: random.Random, n_nodes: int, n_services: int, per_service: int, strategy: str,
              spread_over: tuple[str, ...]) -> tuple[list[NodeInfo], list[Request]]:
    nodes = []
    for i in range(n_nodes):
        cpu, mem = rng.choice(SHAPES)
        nodes.append(NodeInfo(f"n{i:04d}", "process", cpu=cpu, memory=mem, labels={"zone": f"z{i % 10}"}))
    requests = []
    for s in range(n_services):
        spec = service(f"s{s:04d}", rng.choice(CPUS[:4]), rng.choice(MEMORIES[:5]), strategy, spread_over)
        requests += [Request(spec, slot) for slot in range(per_service)]
    return nodes, requests


SPEED_CASES = [
    ("100 services x 100 replicas", 100, 100, ()),
    ("1,000 services x 10 replicas", 1000, 10, ()),
    ("100 x 100, spread_over: [zone] (10 zones)", 100, 100, ("zone",)),
]


def speed(rounds: int, seed: int) -> list[tuple[str, str, float, int]]:
    out = []
    for label, n_services, per_service, spread_over in SPEED_CASES:
        for strategy in ("binpack", "spread"):
            nodes, requests = big_fleet(random.Random(seed), 1000, n_services, per_service, strategy, spread_over)
            best, placed = float("inf"), 0
            for _ in range(rounds):
                t0 = time.perf_counter()
                result = place(requests, nodes, [])
                best = min(best, time.perf_counter() - t0)
                placed = len(result.placed)
            print(f"{label}, {strategy}: {best * 1000:.0f} ms ({placed} placed)", flush=True)
            out.append((label, strategy, best, placed))
    return out


def report(pack: dict, timings: list, args: argparse.Namespace) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    from ortools import __version__ as ortools_version
    lines = [
        "## Placement", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `bench/placement/run.py`: "
        f"{os.cpu_count()} vCPU ({cpu}), Python {platform.python_version()}, OR-tools {ortools_version}. "
        f"Load average at the end {load}: the machine was shared with other work.", "",
        f"Reproduce: `.venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/placement/run.py "
        f"--clusters {args.clusters} --seed {args.seed} --limit {args.limit:g} --rounds {args.rounds} --write`", "",
        "Packing a whole config at once (`strategy: binpack`, every replica in one `place` call, as "
        "`meshlet plan` does) against OR-tools CP-SAT minimising the same cost: the capacity of the "
        "nodes used, cpu and memory each as a share of the fleet's. Random clusters of 15-50 replicas "
        "of 2-6 services on nodes of five shapes (2c/4G, 4c/8G, 8c/32G, 16c/16G, 4c/32G), some with a "
        "reserved share, twice the requests in capacity.", "",
        "| measure | result |", "|---|---|",
        f"| clusters | {pack['clusters']} (CP-SAT proved {pack['proven']} optimal within {args.limit:g} s each) |",
        f"| mean gap to CP-SAT's best | {pack['mean']:+.2%} |",
        f"| worst gap | {pack['worst']:+.2%} |",
        f"| clusters where meshlet matched it | {pack['at_optimum']} |",
        f"| mean / worst gap to CP-SAT's lower bound | {pack['mean_vs_bound']:+.2%} / {pack['worst_vs_bound']:+.2%} |",
        "",
        f"Time to place 10,000 replicas on 1,000 nodes in one call (best of {args.rounds}; goal < 1 s):", "",
        "| replicas | strategy | time | placed |", "|---|---|---|---|",
    ]
    lines += [f"| {label} | {strategy} | {t * 1000:,.0f} ms | {placed:,} |" for label, strategy, t, placed in timings]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=float, default=20.0, help="CP-SAT seconds per cluster")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-packing", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace the Placement section of bench/RESULTS.md")
    args = ap.parse_args()
    timings = speed(args.rounds, args.seed)
    if args.skip_packing:
        return 0
    pack = packing(args.clusters, args.seed, args.limit)
    text = report(pack, timings, args)
    print(text)
    if args.write:
        print(f"written to {replace_section('## Placement', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
