#!/usr/bin/env python3
"""Rolling updates under a steady load: failed requests, latency during versus before, duration.

    .venv/bin/python bench/rollout/run.py [--rate 1000] [--replicas 3 10] [--before 10]
                                          [--runtime process|docker|both] [--rounds 1] [--deadline 180]
                                          [--write]

For each runtime (docker only when a test engine starts: tests/docker_env.start_engine) and
each replica count:

1. ``meshlet up -f <generated config>`` as a child process (embedded catalog, DNS, proxy,
   supervisor); service ``web`` with N replicas (process: bench/rollout/app.py, an asyncio
   keep-alive app; docker: the busybox httpd test image), readiness ``GET /healthz`` (``/`` on docker)
   every 200 ms, the default update strategy (25% surge, 25% unavailable, drain_delay 1s).
2. Open-loop load through the proxy's entry listener (``Host: web.service.meshlet``):
   ``--rate`` requests/s on a fixed schedule over 16 keep-alive connections
   (bench/rollout/loadgen.py), latency counted from each request's scheduled time.
3. After ``--before`` seconds of load, ``meshlet apply`` of the same file with a changed
   ``env`` (a new revision); ``meshlet rollout status web`` follows it. The rollout is
   *done* when the supervisor's state (KV ``meshlet/rollout/web/state``) is complete for
   the new target revision; also recorded: when the catalog first shows N passing
   instances and none of the old ones (*settled*), and when ``rollout status`` exited.
   Both are watched with blocking queries.
4. Two more seconds of load, SIGTERM to ``meshlet up``; a markdown table; ``--write`` puts
   it in bench/RESULTS.md under "## Rollout" (only that section is replaced).

Without a supervisor that writes rollout states the *done* column says so, and the
figures are those of whatever the supervisor does with a changed spec.
Only loopback is used; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from _common import catalog_auth, free_port, replace_section, use_catalog_token  # noqa: E402 - shared bench helpers
from heal.run import _drain, machine, read_until  # noqa: E402
from loadgen import OpenLoad, percentile  # noqa: E402

APP = HERE / "app.py"    # hello.py (http.server) tops out at a few hundred requests/s; see app.py
SERVICE = "web"
HOST = f"{SERVICE}.service.meshlet"


@dataclass
class Result:
    runtime: str
    replicas: int
    load: OpenLoad | None = None
    t_before: float = 0.0                   # start of the "before" window
    t_apply: float = 0.0                    # `meshlet apply` of the new revision returned
    t_done: float | None = None             # state complete for the target (KV)
    t_settled: float | None = None          # catalog: N passing, none of the old instances
    t_status: float | None = None           # `meshlet rollout status` exited
    status_rc: int | None = None
    status_out: str = ""
    t_end: float = 0.0                      # end of the "during" window
    replaced: str = ""                      # "10 of 10" instance ids new at the end
    notes: list[str] = field(default_factory=list)



def write_config(path: Path, tmp: Path, ports: dict[str, int], runtime: str, replicas: int, version: str,
                 engine_url: str | None, image: str | None) -> None:
    node: dict[str, object] = {"name": "local", "runtime": runtime}
    if engine_url:
        node["engine"] = engine_url
    web: dict[str, object] = {
        "replicas": replicas,
        "ports": [{"name": "http", "vip_port": 80}],
        "env": {"VERSION": version},
        "probes": {"readiness": {"http": {"path": "/healthz" if runtime == "process" else "/"}, "period": "0.2s"}},
    }
    web.update({"command": [sys.executable, str(APP)]} if runtime == "process" else {"image": image})
    doc = {
        "mesh": {
            "catalog_listen": f"127.0.0.1:{ports['catalog']}",
            "admin_listen": f"127.0.0.1:{ports['admin']}",
            "data_dir": str(tmp / "state"),
            "vip_range": "127.95.0.0/24",
            "dns": {"listen": [f"127.0.0.1:{ports['dns']}"]},
            "proxy": {"listen": [f"127.0.0.1:{ports['proxy']}"], "admin_listen": f"127.0.0.1:{ports['proxy_admin']}"},
            "nodes": [node],
        },
        "services": {SERVICE: web},
    }
    path.write_text(yaml.safe_dump(doc))


async def blocking(session: aiohttp.ClientSession, url: str, index: int) -> tuple[int, object]:
    """One blocking query: (X-Consul-Index, JSON body or None on 404)."""
    sep = "&" if "?" in url else "?"
    async with session.get(f"{url}{sep}index={index}&wait=10s") as r:
        new = int(r.headers.get("X-Consul-Index", "0"))
        body = await r.json() if r.status == 200 else None
    return (0 if new < index else max(new, 1)), body


async def watch_rollout(catalog: str, target: str, old_ids: set[str], res: Result, deadline: float) -> None:
    """Set res.t_done (state complete for ``target``) and res.t_settled (catalog) as they happen."""
    import base64
    async with aiohttp.ClientSession(headers=catalog_auth(), timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def state() -> None:
            index = 0
            while res.t_done is None and time.monotonic() < deadline:
                index, body = await blocking(session, f"http://{catalog}/v1/kv/meshlet/rollout/{SERVICE}/state", index)
                if body:
                    st = json.loads(base64.b64decode(body[0]["Value"] or ""))
                    if st.get("revision") == target and st.get("phase") == "complete":
                        res.t_done = time.monotonic()
                    elif st.get("phase") in ("failed", "reverting"):
                        res.notes.append(f"state {st.get('phase')}: {st.get('reason')}")
                        return

        async def health() -> None:
            index = 0
            while res.t_settled is None and time.monotonic() < deadline:
                index, body = await blocking(session, f"http://{catalog}/v1/health/service/{SERVICE}", index)
                ids = {e["Service"]["ID"] for e in body or ()
                       if all(c["Status"] == "passing" for c in e.get("Checks", []))}
                if len(body or ()) == res.replicas == len(ids) and not ids & old_ids:
                    res.t_settled = time.monotonic()
                    res.replaced = f"{len(ids)} of {res.replicas}"

        await asyncio.wait_for(asyncio.gather(state(), health()), max(1.0, deadline - time.monotonic()))


async def follow_status(catalog: str, timeout: float, res: Result) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "supervisor", "rollout", "status", SERVICE, "--consul", f"http://{catalog}",
        "--timeout", f"{timeout:.0f}s", cwd=str(REPO), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    res.t_status, res.status_rc = time.monotonic(), proc.returncode
    res.status_out = out.decode(errors="replace").strip().splitlines()[-1] if out.strip() else ""


async def health_ids(catalog: str) -> set[str]:
    async with aiohttp.ClientSession(headers=catalog_auth()) as session:
        async with session.get(f"http://{catalog}/v1/health/service/{SERVICE}") as r:
            return {e["Service"]["ID"] for e in await r.json()}


async def target_revision(catalog: str) -> str:
    import base64

    import config
    from supervisor.core.revisions import target_revision as revision_of
    async with aiohttp.ClientSession(headers=catalog_auth()) as session:
        async with session.get(f"http://{catalog}/v1/kv/meshlet/services/{SERVICE}") as r:
            raw = base64.b64decode((await r.json())[0]["Value"])
    spec, _, _ = config.parse_service_document(raw)
    return revision_of(spec)


async def bench(runtime: str, replicas: int, args: argparse.Namespace, engine_url: str | None = None,
                image: str | None = None) -> Result:
    res = Result(runtime, replicas)
    with tempfile.TemporaryDirectory(prefix=f"rollout-{runtime}-") as tmpname:
        tmp = Path(tmpname)
        ports = {k: free_port() for k in ("catalog", "admin", "dns", "proxy", "proxy_admin")}
        path = tmp / "rollout.yaml"
        write_config(path, tmp, ports, runtime, replicas, "1", engine_url, image)
        catalog = f"127.0.0.1:{ports['catalog']}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor", "up", "-f", str(path), cwd=str(REPO),
            stdout=asyncio.subprocess.PIPE, stderr=open(tmp / "up.err", "wb"))
        assert proc.stdout is not None
        seen: list[str] = []
        try:
            await read_until(proc.stdout, f"{SERVICE}: {replicas}/{replicas} ready", 180, seen)
            use_catalog_token(tmp / "state")
            drain = asyncio.create_task(_drain(proc.stdout))
            res.load = load = OpenLoad(f"127.0.0.1:{ports['proxy']}", HOST, args.rate, connections=16)
            stop = asyncio.Event()
            loader = asyncio.create_task(load.run(stop))
            await asyncio.sleep(2.0)            # warm the keep-alive pools
            res.t_before = time.monotonic()
            await asyncio.sleep(args.before)
            old_ids = await health_ids(catalog)
            write_config(path, tmp, ports, runtime, replicas, "2", engine_url, image)
            t_apply0 = time.monotonic()
            apply = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "supervisor", "apply", "-f", str(path), "--consul", f"http://{catalog}",
                cwd=str(REPO), stdout=asyncio.subprocess.DEVNULL)
            if await apply.wait() != 0:
                raise RuntimeError("meshlet apply of the new revision failed")
            res.t_apply = time.monotonic()
            print(f"  apply took {(res.t_apply - t_apply0) * 1000:.0f} ms", flush=True)
            target = await target_revision(catalog)
            deadline = res.t_apply + args.deadline
            status = asyncio.create_task(follow_status(catalog, args.deadline, res))
            try:
                await watch_rollout(catalog, target, old_ids, res, deadline)
            except asyncio.TimeoutError:
                res.notes.append(f"not done within {args.deadline:g} s")
            res.t_end = res.t_done or res.t_settled or time.monotonic()
            await asyncio.sleep(2.0)
            stop.set()
            await loader
            if res.t_done is not None:
                await asyncio.wait_for(status, 30)
            else:
                status.cancel()
            drain.cancel()
            if args.keep_logs and res.load is not None and res.load.failed:
                keep = Path(args.keep_logs) / f"{runtime}-{replicas}-{time.strftime('%H%M%S')}"
                keep.mkdir(parents=True, exist_ok=True)
                for log_file in (tmp / "state" / "logs").glob("*.log"):
                    (keep / log_file.name).write_bytes(log_file.read_bytes())
                (keep / "up.err").write_bytes((tmp / "up.err").read_bytes())
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
                    print(f"  meshlet up exited with {code}; its stderr:\n" + (tmp / "up.err").read_text()[-2000:],
                          file=sys.stderr)
    return res


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}" if value < 0.1 else f"{value * 1000:.0f}"


def row(r: Result) -> str:
    assert r.load is not None
    before = r.load.window(r.t_before, r.t_apply)
    during = r.load.window(r.t_apply, r.t_end)
    lat_b = [o.latency for o in before if o.error is None]
    lat_d = [o.latency for o in during if o.error is None]
    failed_d = sum(1 for o in during if o.error)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.load.reasons.items()))
    done = f"{r.t_done - r.t_apply:.1f} s" if r.t_done else "no complete state"
    settled = f"{r.t_settled - r.t_apply:.1f} s" if r.t_settled else "-"
    status = f"exit {r.status_rc} after {r.t_status - r.t_apply:.1f} s" if r.t_status else "not exited"
    return (f"| {r.runtime} | {r.replicas} | {done} | {settled} | {status} | "
            f"{len(during):,} | {failed_d} | {r.load.failed}{f' ({reasons})' if reasons else ''} of {r.load.sent:,} | "
            f"{ms(percentile(lat_b, 50))} / {ms(percentile(lat_d, 50))} | "
            f"{ms(percentile(lat_b, 99))} / {ms(percentile(lat_d, 99))} | {ms(max(lat_d, default=None))} |")


def table(results: list[Result]) -> str:
    lines = ["| runtime | replicas | done (apply → state complete) | catalog settled | `rollout status` | "
             "requests during | failed during | failed, whole run | p50 before / during (ms) | "
             "p99 before / during (ms) | max during (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in results]
    for r in results:
        if r.notes:
            lines.append(f"\n{r.runtime}, {r.replicas} replicas: {'; '.join(r.notes)}.")
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    results: list[Result] = []

    async def each(runtime: str, engine_url: str | None = None, image: str | None = None) -> None:
        for n, k in [(n, k) for n in args.replicas for k in range(args.rounds)]:
            print(f"{runtime}, {n} replicas, round {k + 1} of {args.rounds}:", flush=True)
            r = await bench(runtime, n, args, engine_url, image)
            results.append(r)
            print("  " + row(r), flush=True)
            for due, at, reason, text in sorted(r.load.details if r.load else [])[:20]:
                print(f"  failed: +{(due - r.t_apply) * 1000:.0f} ms after apply: {reason}: {' '.join(text.split())}")

    if args.runtime in ("process", "both"):
        await each("process")
    if args.runtime in ("docker", "both"):
        try:
            from docker_env import TEST_IMAGE, build_test_images, start_engine
            engine = await asyncio.to_thread(start_engine, "rollout-bench")
        except Exception as exc:  # noqa: BLE001 - no engine here: say so, keep the rest
            print(f"docker runtime skipped: no engine ({exc})", flush=True)
        else:
            try:
                await asyncio.to_thread(build_test_images, engine)
                await each("docker", engine.url, TEST_IMAGE)
            finally:
                await asyncio.to_thread(engine.stop)
    if not results:
        return 1
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    cmd = ".venv/bin/python bench/rollout/run.py --write"
    if (args.rate, args.before, args.runtime, args.replicas, args.rounds) != (1000.0, 10.0, "process", [3, 10], 1):
        cmd = (f".venv/bin/python bench/rollout/run.py --rate {args.rate:g} --before {args.before:g} "
               f"--runtime {args.runtime} --replicas {' '.join(map(str, args.replicas))} "
               f"--rounds {args.rounds} --write")
    text = f"""## Rollout

Measured {stamp} UTC with `{cmd}` on {machine()}.

`meshlet up` (embedded catalog, DNS, proxy, supervisor) runs service `web` (process:
bench/rollout/app.py, a keep-alive asyncio app; docker: the busybox httpd test image) with readiness `GET`
every 200 ms and the default update strategy (25% surge, 25% unavailable, drain_delay 1s).
An open-loop client (bench/rollout/loadgen.py: fixed schedule, 16 keep-alive connections,
latency from each request's scheduled time) sends {args.rate:g} requests/s through the proxy
(`Host: {HOST}`). After {args.before:g} s of load (*before*), `meshlet apply` changes an env
value; *during* runs from the apply's return to the supervisor's rollout state turning
complete for the new revision (*done*; watched with a blocking query), *catalog settled* is
when the catalog first showed every replica passing and none of the old instances, and
`rollout status` is the CLI's exit. *Failed* is a request without a 200 within 5 s.

{table(results)}
"""
    print()
    print(text)
    if args.write:
        replace_section("## Rollout", text)
        print("written to bench/RESULTS.md")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="client requests per second")
    p.add_argument("--replicas", type=int, nargs="+", default=[3, 10], help="replica counts to roll (default 3 10)")
    p.add_argument("--rounds", type=int, default=1, help="rollouts per runtime and replica count, "
                   "each on a fresh `meshlet up` (one table row each)")
    p.add_argument("--before", type=float, default=10.0, help="seconds of load measured before the apply")
    p.add_argument("--deadline", type=float, default=180.0, help="give up on a rollout after this many seconds")
    p.add_argument("--runtime", choices=("process", "docker", "both"), default="process")
    p.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    p.add_argument("--keep-logs", metavar="DIR", help="when requests failed, copy the components' logs "
                   "and meshlet up's stderr to DIR/<runtime>-<replicas>-<time>/")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
