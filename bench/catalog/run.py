"""Benchmark of the embedded catalog (a benchmark, not a test: it asserts nothing).

    .venv/bin/python bench/catalog/run.py            # print the results as markdown
    .venv/bin/python bench/catalog/run.py --write    # and replace "## Catalog" in bench/RESULTS.md

Starts a real ``python -m discovery.catalog`` on a fresh data dir and measures, over real
HTTP on loopback:

1. registrations per second: 10,000 instances (100 services x 100, each with a passing
   TTL check and meshlet's Meta), from 64 concurrent clients; also per catalog CPU-second;
2. KV writes per second (5,000 PUTs of a 200-byte value, 64 concurrent clients);
3. RSS of the catalog process when idle and with the 10,000 instances registered;
4. wake-up latency: 1,000 blocking watchers (py-consul aio, one process, 4 clients x 250
   connections) on one service; 20 times its TTL check is flipped (pass <-> fail) and we
   measure, from the moment the flip is acknowledged, the time until every watcher holds
   the new status (p50/p99 over the 20 flips), and each watcher's own delay (p50/p99 over
   20,000 observations). Watchers parse their answers in this process, so the numbers
   include client-side work (1,000 JSON answers per flip) on the same 2 cores;
5. fan-out: the same with 1,000 lean watchers (raw keep-alive sockets that only find the
   end of each answer, _lean.py), i.e. the time the catalog takes to tell every watcher;
6. CPU per write: the catalog's CPU per TTL flip with nobody watching (1,000 flips in
   sequence on one keep-alive connection, the 10,000 instances registered);
7. the catalog's own timing of each flip of (5), from its metrics: batch taken ->
   durable -> every woken watcher written to (no client-side reading in it).

``--json FILE`` saves the medians; ``--before FILE`` puts a saved run beside this one in
the table (run the old tree with ``--json``, the new one with ``--before``).

Every write is durable before it is acknowledged (SQLite WAL, synchronous=FULL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from _common import cpu_seconds, replace_section  # noqa: E402 - shared bench helpers
from _lean import bench_lean_watchers, bench_write_cpu  # noqa: E402 - this directory

SECTION = "## Catalog"
# The catalog's management token, read from its data dir once it has started (every
# request carries it, as meshlet's own components do).
TOKEN = ""


def _auth() -> dict[str, str]:
    return {"X-Consul-Token": TOKEN}


def start_catalog(data_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "discovery.catalog", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
         "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise SystemExit(f"catalog did not start: {line!r}")
    global TOKEN
    TOKEN = (Path(data_dir) / "management-token").read_text().strip()
    return proc, "http://" + json.loads(line[6:])["http"]


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def run_concurrently(n: int, concurrency: int, one) -> float:
    """Run ``one(i)`` for i in range(n) from ``concurrency`` workers; return the elapsed seconds."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def bench_registrations(url: str, pid: int, n: int, concurrency: int) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=_auth()) as http:
        async def register(i: int) -> None:
            body = {
                "Name": f"svc{i % 100}", "ID": f"svc{i % 100}-{i}", "Address": "127.0.0.1",
                "Port": 20000 + i % 40000, "Tags": ["v1"],
                "Meta": {"revision": "9f86d081884c", "node": "local", "slot": str(i // 100), "weight": "1"},
                "Check": {"CheckID": f"service:svc{i % 100}-{i}", "TTL": "10m", "Status": "passing"},
            }
            async with http.put(url + "/v1/agent/service/register", json=body) as r:
                assert r.status == 200, await r.text()

        cpu0 = cpu_seconds(pid)
        elapsed = await run_concurrently(n, concurrency, register)
        cpu = cpu_seconds(pid) - cpu0
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "per_cpu_s": n / cpu if cpu else float("nan")}


async def bench_kv(url: str, n: int, concurrency: int) -> dict[str, float]:
    value = b"x" * 200
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=_auth()) as http:
        async def put(i: int) -> None:
            async with http.put(f"{url}/v1/kv/bench/{i % 1000}", data=value) as r:
                assert r.status == 200

        elapsed = await run_concurrently(n, concurrency, put)
    return {"n": n, "rate": n / elapsed}


async def gauges(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/v1/agent/metrics") as r:
        return {g["Name"]: g["Value"] for g in (await r.json())["Gauges"]}


async def blocked_queries(http: aiohttp.ClientSession, url: str) -> int:
    return int((await gauges(http, url))["meshlet.catalog.blocked_queries"])


async def bench_watchers(url: str, pid: int, n_watchers: int, flips: int) -> dict[str, float]:
    import consul.aio

    host, port = url[len("http://"):].rsplit(":", 1)
    clients = [consul.aio.Consul(host=host, port=int(port), token=TOKEN, connections_limit=n_watchers // 4 + 10)
               for _ in range(4)]
    admin = consul.aio.Consul(host=host, port=int(port), token=TOKEN)
    http = aiohttp.ClientSession(headers=_auth())
    try:
        await admin.agent.service.register("hot", service_id="hot-1", port=8080, check={"TTL": "10m"})
        await admin.agent.check.ttl_pass("service:hot-1")
        index, _ = await admin.health.service("hot")
        seen: list[str] = ["passing"] * n_watchers
        arrival: list[float] = [0.0] * n_watchers
        changed = asyncio.Event()
        want = {"status": "passing", "remaining": 0}

        async def watch(w: int) -> None:
            c = clients[w % len(clients)]
            idx = index
            while True:
                idx, nodes = await c.health.service("hot", index=idx, wait="120s")
                status = next(ch["Status"] for ch in nodes[0]["Checks"] if ch["CheckID"] == "service:hot-1")
                if status != seen[w]:
                    seen[w] = status
                    arrival[w] = time.perf_counter()
                    if status == want["status"]:
                        want["remaining"] -= 1
                        if want["remaining"] == 0:
                            changed.set()

        tasks = [asyncio.ensure_future(watch(w)) for w in range(n_watchers)]
        while await blocked_queries(http, url) < n_watchers:
            await asyncio.sleep(0.02)
        server_cpu0, client_cpu0 = cpu_seconds(pid), cpu_seconds(os.getpid())
        all_latencies: list[float] = []
        each_latencies: list[float] = []
        after_ack: list[float] = []
        for k in range(flips):
            while await blocked_queries(http, url) < n_watchers:
                await asyncio.sleep(0.02)
            status = "critical" if k % 2 == 0 else "passing"
            want.update(status=status, remaining=n_watchers)
            changed.clear()
            sent = time.perf_counter()
            if status == "critical":
                await admin.agent.check.ttl_fail("service:hot-1")
            else:
                await admin.agent.check.ttl_pass("service:hot-1")
            acked = time.perf_counter()
            await asyncio.wait_for(changed.wait(), 60)
            delays = [t - sent for t in arrival]
            all_latencies.append(max(delays))
            each_latencies.extend(delays)
            after_ack.append(max(delays) - (acked - sent))
        server_cpu, client_cpu = cpu_seconds(pid) - server_cpu0, cpu_seconds(os.getpid()) - client_cpu0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await http.close()
        await admin.close()
        for c in clients:
            await c.close()
    ms = 1000.0
    return {
        "watchers": n_watchers, "flips": flips,
        "all_p50": statistics.median(all_latencies) * ms, "all_p99": pct(all_latencies, 99) * ms,
        "all_max": max(all_latencies) * ms,
        "each_p50": statistics.median(each_latencies) * ms, "each_p99": pct(each_latencies, 99) * ms,
        "ack_p50": statistics.median(after_ack) * ms, "ack_p99": pct(after_ack, 99) * ms,
        "server_cpu_ms": server_cpu / flips * ms, "client_cpu_ms": client_cpu / flips * ms,
    }


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import uvloop

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "uvloop": uvloop.__version__,
        "aiohttp": aiohttp.__version__,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d"),
    }


async def one_round(args: argparse.Namespace) -> dict[str, float]:
    data_dir = tempfile.mkdtemp(prefix="catalog-bench-")
    proc, url = start_catalog(data_dir)
    try:
        await asyncio.sleep(0.5)
        out = {"rss_idle": rss_mib(proc.pid)}
        reg = await bench_registrations(url, proc.pid, args.instances, args.concurrency)
        out.update(reg_rate=reg["rate"], reg_per_cpu=reg["per_cpu_s"], rss_full=rss_mib(proc.pid))
        out["kv_rate"] = (await bench_kv(url, args.kv_writes, args.concurrency))["rate"]
        watch = await bench_watchers(url, proc.pid, args.watchers, args.flips)
        out.update({f"w_{k}": v for k, v in watch.items()})
        host, port = url[len("http://"):].rsplit(":", 1)
        wcpu = await bench_write_cpu(host, int(port), proc.pid, args.write_flips, cpu_seconds)
        out.update(write_cpu_ms=wcpu["cpu_ms"], write_rate=wcpu["rate"])
        async with aiohttp.ClientSession(headers=_auth()) as http:
            lean = await bench_lean_watchers(host, int(port), proc.pid, args.watchers, args.flips,
                                             lambda: blocked_queries(http, url), cpu_seconds,
                                             (lambda: gauges(http, url)) if args.server_timing else None)
        out.update({f"l_{k}": v for k, v in lean.items()})
        out["db_mib"] = sum(f.stat().st_size for f in Path(data_dir).iterdir()) / 2**20
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    return out


def _rows(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...], str, str]]:
    """(label, keys, format, unit) of each table row; several keys are shown "a / b"."""
    n, w, f = args.instances, args.watchers, args.flips
    return [
        (f"registrations/s ({n:,} instances with a TTL check, {args.concurrency} concurrent clients)",
         ("reg_rate",), ",.0f", " /s"),
        ("registrations per catalog CPU-second", ("reg_per_cpu",), ",.0f", ""),
        (f"KV writes/s ({args.kv_writes:,} PUTs of 200 bytes, {args.concurrency} concurrent clients)",
         ("kv_rate",), ",.0f", " /s"),
        ("RSS idle", ("rss_idle",), ".1f", " MiB"),
        (f"RSS with {n:,} instances (+ as many checks)", ("rss_full",), ".1f", " MiB"),
        ("data dir size at the end", ("db_mib",), ".1f", " MiB"),
        (f"catalog CPU per TTL flip, nobody watching ({args.write_flips:,} flips in sequence)",
         ("write_cpu_ms",), ".2f", " ms"),
        ("TTL flips/s, one client in sequence (each acknowledged once fsynced)", ("write_rate",), ",.0f", " /s"),
        (f"**fan-out**, {w:,} lean watchers on one service: flip sent -> every watcher told, p50 / p99 over "
         f"{f} flips (includes the durable write)", ("l_sent_p50", "l_sent_p99"), ".1f", " ms"),
        ("same, counted from the flip's acknowledgement, p50 / p99", ("l_ack_p50", "l_ack_p99"), ".1f", " ms"),
        (f"same, per watcher from the flip sent, p50 / p99 over {w * f:,} observations",
         ("l_each_p50", "l_each_p99"), ".1f", " ms"),
        ("same, timed by the catalog itself: batch taken -> every watcher's answer written (its own gauges; "
         "leaves out the watchers' process reading 1,000 sockets), p50 / p99", ("l_srv_total_p50", "l_srv_total_p99"),
         ".1f", " ms"),
        ("of which durable -> every watcher's answer written (the fan-out proper), p50 / p99",
         ("l_srv_fanout_p50", "l_srv_fanout_p99"), ".1f", " ms"),
        (f"catalog CPU per flip with {w:,} lean watchers ({w:,} answers sent, {w:,} new blocking queries)",
         ("l_server_cpu_ms",), ".1f", " ms"),
        (f"{w:,} py-consul aio watchers: flip sent -> every watcher has parsed the new status, p50 / p99 over "
         f"{f} flips", ("w_all_p50", "w_all_p99"), ".0f", " ms"),
        ("same, counted from the flip's acknowledgement, p50 / p99", ("w_ack_p50", "w_ack_p99"), ".0f", " ms"),
        (f"same, per watcher from the flip sent, p50 / p99 over {w * f:,} observations",
         ("w_each_p50", "w_each_p99"), ".0f", " ms"),
        (f"CPU per flip: catalog ({w:,} py-consul answers sent, {w:,} new blocking queries)",
         ("w_server_cpu_ms",), ".0f", " ms"),
        (f"CPU per flip: watcher process (py-consul aio handling {w:,} answers)", ("w_client_cpu_ms",), ".0f", " ms"),
    ]


def _cell(rounds: list[dict[str, float]], keys: tuple[str, ...], fmt: str, unit: str) -> str:
    parts = []
    for key in keys:
        values = [x[key] for x in rounds if key in x]
        if not values:
            return "not measured"
        m = statistics.median(values)
        text = format(m, fmt)
        if len(values) > 1:
            text += f" [{format(min(values), fmt)}–{format(max(values), fmt)}]"
        parts.append(text)
    return " / ".join(parts) + unit


async def main_async(args: argparse.Namespace) -> tuple[str, list[dict[str, float]]]:
    rounds = []
    if args.from_json:  # render rounds measured earlier (e.g. interleaved with a --before tree's)
        for path in args.from_json:
            rounds += json.loads(Path(path).read_text())["rounds"]
    else:
        for r in range(args.rounds):
            rounds.append(await one_round(args))
            rounds[-1]["load1"] = os.getloadavg()[0]
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    m = machine()
    before = None
    if args.before:
        before = {"label": "", "rounds": []}
        for path in args.before:
            doc = json.loads(Path(path).read_text())
            before["label"], before["rounds"] = doc["label"], before["rounds"] + doc["rounds"]
    lines = [
        SECTION,
        "",
        f"Measured {m['date']} with `bench/catalog/run.py`: {m['nproc']} vCPU ({m['cpu']}), Python {m['python']}, "
        f"SQLite {m['sqlite']}, uvloop {m['uvloop']}, aiohttp {m['aiohttp']}. Load average at the end "
        f"{m['load']}: the machine was shared with other work, so the wall-clock figures are a floor and vary "
        "between runs; the CPU figures are steadier. The catalog is one process; the load generator and the "
        "watchers run in a second process on the same cores. Every write is acknowledged only once durable "
        "(SQLite WAL, synchronous=FULL, group commit).",
        "",
        f"Reproduce: `.venv/bin/python bench/catalog/run.py --write` ({len(rounds)} rounds, each on a fresh "
        "catalog; median [min–max] over rounds).",
        "",
    ]
    def loads(rs: list[dict[str, float]]) -> str:
        return ", ".join(format(r["load1"], ".2f") for r in rs if "load1" in r)

    if loads(rounds):
        text = f"1-minute load average after each round: {loads(rounds)}"
        if before is not None and loads(before["rounds"]):
            text += f" (before: {loads(before['rounds'])})"
        lines += [text + ".", ""]
    if before is not None:
        lines += [f"| measure | before ({before['label']}) | after ({args.label}) |", "|---|---|---|"]
    else:
        lines += ["| measure | result |", "|---|---|"]
    for label, keys, fmt, unit in _rows(args):
        row = f"| {label} | "
        if before is not None:
            row += _cell(before["rounds"], keys, fmt, unit) + " | "
        lines.append(row + _cell(rounds, keys, fmt, unit) + " |")
    lines.append("")
    return "\n".join(lines), rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--kv-writes", type=int, default=5_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--watchers", type=int, default=1_000)
    p.add_argument("--flips", type=int, default=20)
    p.add_argument("--write-flips", type=int, default=1_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--label", default="this tree", help="what this run measures, for the table heading")
    p.add_argument("--no-server-timing", dest="server_timing", action="store_false",
                   help="do not read the catalog's own timing gauges (a catalog older than them has none)")
    p.add_argument("--json", metavar="FILE", help="save this run's figures (for a later --before)")
    p.add_argument("--before", metavar="FILE", nargs="+", help="runs saved with --json, shown beside this one")
    p.add_argument("--from-json", metavar="FILE", nargs="+", help="render runs saved with --json instead of measuring")
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args()
    try:
        import uvloop

        text, rounds = uvloop.run(main_async(args))
    except ImportError:
        text, rounds = asyncio.run(main_async(args))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"label": args.label, "rounds": rounds}, indent=1))
    if args.write:
        replace_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
