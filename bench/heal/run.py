#!/usr/bin/env python3
"""Self-healing under load: kill -9 replicas behind the proxy and time the replacements.

    .venv/bin/python bench/heal/run.py [--kills 20] [--rate 200] [--interval 3]
                                       [--runtime process|docker|both] [--write]

For each runtime (docker only when a test engine starts: tests/docker_env.start_engine):

1. ``meshlet up -f <generated config>`` as a child process: embedded catalog, DNS, proxy,
   supervisor; service ``web`` with 3 replicas (process: config/examples/apps/hello.py;
   docker: the busybox httpd test image), readiness ``GET /healthz`` (``/`` on docker)
   every 200 ms, ``restart.backoff.reset_after: 2s`` (a replacement that served for 2 s
   counts as healthy again, so repeated kills of one slot are not spaced out by back-off;
   the default 10 m would turn this into a back-off benchmark).
2. Steady load through the proxy's entry listener (``Host: web.service.meshlet``): an
   aiohttp client sending ``--rate`` requests/s on a fixed schedule (keep-alive pool),
   counting every request that did not get a 200 within 5 s.
3. ``--kills`` times: pick a random ready replica, SIGKILL its pid (the process, or the
   container's PID 1 from the host), and poll the catalog every 5 ms until it shows a
   *new* passing instance for that slot (heal time). Also recorded: kill -> the killed
   instance is no longer passing in the catalog (out of DNS and the proxy). The next
   kill comes ``--interval`` seconds after the previous one and never before all 3 are
   passing again.
4. SIGTERM to ``meshlet up`` (clean stop), then a markdown table; ``--write`` puts it in
   bench/RESULTS.md under "## Heal" (only that section is replaced).

Only loopback is used; every loop is bounded by count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
from _common import catalog_auth, free_port, replace_section, use_catalog_token  # noqa: E402 - shared bench helpers
sys.path.insert(0, str(REPO / "bench" / "rollout"))
from loadgen import OpenLoad  # noqa: E402 - the shared open-loop load generator
HELLO = REPO / "config" / "examples" / "apps" / "hello.py"
SERVICE = "web"
REPLICAS = 3


@dataclass
class Run:
    runtime: str
    heal: list[float] = field(default_factory=list)        # kill -> new passing instance (s)
    out: list[float] = field(default_factory=list)         # kill -> killed one not passing (s)
    sent: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    per_kill: list[int] = field(default_factory=list)     # failures from a kill to the next
    duration: float = 0.0
    kills: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, victim "host:port")
    # per failed request: (sent at, failed at, reason, body or error text), monotonic seconds
    details: list[tuple[float, float, str, str]] = field(default_factory=list)
    metrics: str = ""                                      # the proxy's /metrics at the end



def write_config(tmp: Path, runtime: str, engine_url: str | None, image: str | None) -> tuple[Path, dict[str, int]]:
    ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy", "proxy_admin")}
    node: dict[str, object] = {"name": "local", "runtime": runtime}
    if engine_url:
        node["engine"] = engine_url
    web: dict[str, object] = {
        "replicas": REPLICAS,
        "ports": [{"name": "http", "vip_port": 80}],
        "update": {"drain_delay": "0s"},
        "stop_grace_period": "1s",
        "restart": {"backoff": {"reset_after": "2s"}},
        "probes": {"readiness": {"http": {"path": "/healthz" if runtime == "process" else "/"},
                                 "period": "0.2s"}},
    }
    if runtime == "process":
        web["command"] = [sys.executable, str(HELLO)]
    else:
        web["image"] = image
    doc = {
        "mesh": {
            "catalog_listen": f"127.0.0.1:{ports['catalog']}",
            "admin_listen": f"127.0.0.1:{ports['admin']}",
            "data_dir": str(tmp / "state"),
            "vip_range": "127.94.0.0/24",
            "dns": {"listen": [f"127.0.0.1:{ports['dns']}"]},
            "proxy": {"listen": [f"127.0.0.1:{ports['proxy']}"],
                      "admin_listen": f"127.0.0.1:{ports['proxy_admin']}"},
            "nodes": [node],
        },
        "services": {SERVICE: web},
    }
    path = tmp / "heal.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, ports


async def read_until(stream: asyncio.StreamReader, text: str, timeout: float, seen: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in s for s in seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{text!r} not printed within {timeout}s; got: {seen[-10:]}")
        line = await asyncio.wait_for(stream.readline(), left)
        if not line:
            raise RuntimeError(f"meshlet up exited; got: {seen[-10:]}")
        seen.append(line.decode().rstrip())


async def passing(session: aiohttp.ClientSession, catalog: str,
                  where: dict[str, str] | None = None) -> dict[str, int]:
    """instance id -> slot, of the passing instances of SERVICE (``where``: id -> host:port)."""
    async with session.get(f"http://{catalog}/v1/health/service/{SERVICE}") as r:
        entries = await r.json()
    out = {}
    for e in entries:
        svc = e["Service"]
        if all(c["Status"] == "passing" for c in e.get("Checks", [])):
            out[svc["ID"]] = int(svc["Meta"]["slot"])
            if where is not None:
                where[svc["ID"]] = f"{svc['Address']}:{svc['Port']}"
    return out


async def pids(session: aiohttp.ClientSession, admin: str) -> dict[str, int]:
    async with session.get(f"http://{admin}/v1/status") as r:
        status = await r.json()
    return {i["id"]: i["pid"] for s in status["services"] if s["name"] == SERVICE
            for i in s["instances"] if i["ready"] and i["pid"]}


async def load(proxy: str, rate: float, stop: asyncio.Event, run: Run) -> None:
    """``rate`` requests/s through the proxy on a fixed schedule until ``stop``, over a
    64-connection keep-alive pool; every request without a 200 within 5 s is counted into
    ``run`` as it happens (bench/rollout/loadgen.py, shared with bench/rollout)."""
    await OpenLoad(proxy, f"{SERVICE}.service.meshlet", rate, connections=64, timeout=5.0, sink=run).run(stop)


async def bench(runtime: str, args: argparse.Namespace, engine_url: str | None = None,
                image: str | None = None) -> Run:
    run = Run(runtime)
    with tempfile.TemporaryDirectory(prefix=f"heal-{runtime}-") as tmpname:
        tmp = Path(tmpname)
        path, ports = write_config(tmp, runtime, engine_url, image)
        catalog, admin = f"127.0.0.1:{ports['catalog']}", f"127.0.0.1:{ports['admin']}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor", "up", "-f", str(path), cwd=str(REPO),
            stdout=asyncio.subprocess.PIPE, stderr=open(tmp / "up.err", "wb"))
        assert proc.stdout is not None
        seen: list[str] = []
        try:
            try:
                await read_until(proc.stdout, f"{SERVICE}: {REPLICAS}/{REPLICAS} ready", 90, seen)
            except (RuntimeError, asyncio.TimeoutError):
                print("  meshlet up did not get ready; its stderr ends with:\n"
                      + (tmp / "up.err").read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            use_catalog_token(tmp / "state")
            drain = asyncio.create_task(_drain(proc.stdout))
            async with aiohttp.ClientSession(headers=catalog_auth(), timeout=aiohttp.ClientTimeout(total=5)) as session:
                stop = asyncio.Event()
                loader = asyncio.create_task(load(f"127.0.0.1:{ports['proxy']}", args.rate, stop, run))
                t0 = time.monotonic()
                await asyncio.sleep(1.0)   # warm the keep-alive pool before the first kill
                last_kill = 0.0
                failed_before = run.failed
                for n in range(args.kills):
                    while True:   # all replicas passing, and the interval since the last kill
                        now_passing = await passing(session, catalog)
                        if len(now_passing) == REPLICAS and time.monotonic() - last_kill >= args.interval:
                            break
                        await asyncio.sleep(0.05)
                    ready = await pids(session, admin)
                    where: dict[str, str] = {}
                    await passing(session, catalog, where)
                    if n:
                        run.per_kill.append(run.failed - failed_before)
                        failed_before = run.failed
                    victim = random.choice(sorted(i for i in ready if i in now_passing))
                    slot = now_passing[victim]
                    killed_at = time.monotonic()
                    os.kill(ready[victim], signal.SIGKILL)
                    run.kills.append((killed_at, where.get(victim, "?")))
                    last_kill = killed_at
                    out_at = None
                    deadline = killed_at + 60
                    while time.monotonic() < deadline:
                        cur = await passing(session, catalog)
                        t = time.monotonic()
                        if out_at is None and victim not in cur:
                            out_at = t
                        if any(s == slot and i != victim for i, s in cur.items()):
                            run.heal.append(t - killed_at)
                            run.out.append((out_at or t) - killed_at)
                            break
                        await asyncio.sleep(0.005)
                    else:
                        raise RuntimeError(f"kill {n + 1}: slot {slot} not replaced within 60 s")
                    print(f"  {runtime} kill {n + 1:2d}/{args.kills}: slot {slot} healed in "
                          f"{run.heal[-1] * 1000:.0f} ms (out of the catalog after "
                          f"{run.out[-1] * 1000:.0f} ms); failed requests so far {run.failed}",
                          flush=True)
                await asyncio.sleep(1.0)
                stop.set()
                await loader
                run.per_kill.append(run.failed - failed_before)
                run.duration = time.monotonic() - t0
                try:
                    async with session.get(f"http://127.0.0.1:{ports['proxy_admin']}/metrics") as r:
                        run.metrics = await r.text()
                except Exception as exc:  # noqa: BLE001 - the figures stand without it
                    run.metrics = f"(no /metrics: {exc})"
            drain.cancel()
            if args.keep_logs and run.failed:
                keep = Path(args.keep_logs) / f"{runtime}-{time.strftime('%H%M%S')}"
                keep.mkdir(parents=True, exist_ok=True)
                for log_file in (tmp / "state" / "logs").glob("*.log"):
                    (keep / log_file.name).write_bytes(log_file.read_bytes())
                (keep / "up.err").write_bytes((tmp / "up.err").read_bytes())
                (keep / "metrics.txt").write_text(run.metrics)
                print(f"  logs kept in {keep}", flush=True)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.wait_for(proc.wait(), 60)
                except asyncio.TimeoutError:
                    proc.kill()
                    code = await proc.wait()
                if code != 0:
                    print(f"  meshlet up exited with {code}; see its stderr:\n"
                          + (tmp / "up.err").read_text()[-2000:], file=sys.stderr)
    return run


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


def failure_report(run: Run) -> list[str]:
    """Each failed request placed after the kill before it: when it was sent and when it
    failed (ms after that kill), the victim's address, and the proxy's answer."""
    lines = []
    for sent, failed, reason, text in sorted(run.details):
        n = max((i for i, (t, _) in enumerate(run.kills) if t <= sent), default=-1)
        if n < 0:
            where = "before the first kill"
        else:
            t, victim = run.kills[n]
            where = (f"kill #{n + 1} (victim {victim}): sent +{(sent - t) * 1000:.0f} ms, "
                     f"failed +{(failed - t) * 1000:.0f} ms")
        lines.append(f"{where}: {reason}: {' '.join(text.split())}")
    return lines


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} vCPU ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; load average at the end {load}")


def table(runs: list[Run], args: argparse.Namespace) -> str:
    lines = ["| runtime | kills | heal p50 | heal p99 | heal max | out of catalog p50 / p99 | "
             "requests | failed | kills with failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.reasons.items()))
        lines.append(
            f"| {r.runtime} | {len(r.heal)} | {pct(r.heal, 50) * 1000:.0f} ms | "
            f"{pct(r.heal, 99) * 1000:.0f} ms | {max(r.heal) * 1000:.0f} ms | "
            f"{pct(r.out, 50) * 1000:.0f} / {pct(r.out, 99) * 1000:.0f} ms | "
            f"{r.sent:,} in {r.duration:.0f} s ({r.sent / r.duration:.0f}/s) | "
            f"{r.failed}{f' ({reasons})' if reasons else ''} | "
            f"{sum(1 for f in r.per_kill if f)} of {len(r.per_kill)} |")
    for r in runs:
        bad = [(n, f) for n, f in enumerate(r.per_kill) if f]
        if bad:
            lines.append("")
            lines.append(f"{r.runtime}: failed requests came after kill " + ", ".join(
                f"#{n + 1} ({f} requests; the catalog dropped the killed instance after "
                f"{r.out[n] * 1000:.0f} ms, healed after {r.heal[n] * 1000:.0f} ms)" for n, f in bad) + ".")
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    runs: list[Run] = []
    if args.runtime in ("process", "both"):
        print("process runtime:", flush=True)
        runs.append(await bench("process", args))
    if args.runtime in ("docker", "both"):
        try:
            from docker_env import TEST_IMAGE, build_test_images, start_engine
            engine = await asyncio.to_thread(start_engine, "heal-bench")
        except Exception as exc:  # noqa: BLE001 - no engine here: say so, keep the rest
            print(f"docker runtime skipped: no engine ({exc})", flush=True)
        else:
            try:
                await asyncio.to_thread(build_test_images, engine)
                print("docker runtime:", flush=True)
                runs.append(await bench("docker", args, engine.url, TEST_IMAGE))
            finally:
                await asyncio.to_thread(engine.stop)
    if not runs:
        return 1
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    cmd = "`.venv/bin/python bench/heal/run.py --write`"
    if (args.kills, args.rate, args.interval) != (20, 200.0, 3.0) or args.runtime != "both":
        cmd = (f"`.venv/bin/python bench/heal/run.py --kills {args.kills} --rate {args.rate:g} "
               f"--interval {args.interval:g} --runtime {args.runtime} --write`")
    text = f"""## Heal

Measured {stamp} UTC with {cmd} on {machine()}.

`meshlet up` (embedded catalog, DNS, proxy, supervisor) runs service `web` with {REPLICAS}
replicas (process: config/examples/apps/hello.py; docker: the busybox httpd test image on a
private test engine), readiness probe every 200 ms, `restart.backoff.reset_after: 2s`.
An aiohttp client sends {args.rate:g} requests/s through the proxy (`Host:
web.service.meshlet`) the whole time; {args.kills} times a random ready replica gets
`kill -9` ({args.interval:g} s apart, and only once all {REPLICAS} pass again). *Heal* is
kill -> the catalog shows a new passing instance for the killed slot (polled every 5 ms);
*out of catalog* is kill -> the killed instance is no longer passing (what DNS and the
proxy follow). *Failed* counts client requests without a 200 within 5 s; *kills with
failures* says how many kills had any failed request between them and the next kill.

{table(runs, args)}
"""
    print()
    for r in runs:
        if r.details:
            print(f"{r.runtime}: failed requests in detail:")
            for line in failure_report(r):
                print("  " + line)
            print(f"{r.runtime}: proxy metrics at the end (retries, upstream):")
            for line in r.metrics.splitlines():
                if "retries" in line or "ejection" in line or ('code="5' in line):
                    print("  " + line)
    print(text)
    if args.write:
        replace_section("## Heal", text)
        print("written to bench/RESULTS.md")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--rate", type=float, default=200.0, help="client requests per second")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between kills (at least)")
    p.add_argument("--runtime", choices=("process", "docker", "both"), default="both")
    p.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    p.add_argument("--keep-logs", metavar="DIR", help="when requests failed, copy the components' logs "
                   "and the proxy's /metrics to DIR/<runtime>-<time>/")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
