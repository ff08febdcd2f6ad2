#!/usr/bin/env python3
"""meshlet proxy vs HAProxy, side by side in one run, with wrk (Debian: wrk, haproxy, nginx).

Self-contained: starts an nginx backend (nginx-backend.conf: 1 worker, ``return 200`` with
a 100-byte body, the anchors' configuration), HAProxy (haproxy.cfg: nbthread 1, http mode,
keep-alive both sides), a meshlet catalog with one passing instance of service ``bench``
pointing at nginx, and the meshlet proxy with 1 worker and with ``--workers 2``. Then, for
``--rounds`` rounds alternating the order of the targets, for each connection count:

    wrk -t1 -cN -dD --latency -H "Host: bench.service.meshlet" http://target/

after a 2 s warm-up per target (discarded). CPU per process is utime+stime from
/proc/<pid>/stat over each run (1.0 = one core busy the whole time), so the figure to
compare is requests per proxy CPU-second; wrk's CPU comes from its rusage.

Also measured, for context: ``raw`` (rawproxy.py, the anchors' minimal uvloop+httptools
proxy without time-outs, limits, validation or retries: the floor of Python overhead on
this machine) and, with ``--unique-heads``, every request made unique (a counter in the
query string, via a wrk Lua script, for every target) so meshlet's head memo never hits.

Prints a markdown table of medians, where each proxy's CPU goes per request (user and
kernel microseconds), and the ratios to HAProxy (goal: meshlet 1 worker >= 0.9x HAProxy's
requests per CPU-second and p99 <= 1.2x HAProxy's).

Usage: .venv/bin/python bench/proxy/run.py [--duration 10] [--rounds 5] [--conns 64,256]
       [--targets haproxy,meshlet,meshlet-w2,raw,direct] [--unique-heads] [--profile meshlet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import consul

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import cpu_seconds, cpu_times, free_port, start_ready  # noqa: E402
PY = sys.executable
HOST = "bench.service.meshlet"


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


UNIQUE_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/?n=" .. n, {["Host"] = "%s"})
end
""" % HOST
SCRIPT: list[str] = []  # ["-s", path] when --unique-heads


def wrk(port: int, conns: int, duration: float) -> dict:
    """One wrk run; req/s, p50/p99 (ms), errors, and wrk's own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency", "-H", f"Host: {HOST}",
                          *SCRIPT, f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"rps": rps, "requests": requests, "p50": p50, "p99": p99, "errors": errors, "wrk_cpu": cpu, "raw": out}


class Target:
    def __init__(self, name: str, label: str, port: int, pids: callable) -> None:  # type: ignore[valid-type]
        self.name, self.label, self.port, self.pids = name, label, port, pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--targets", default="haproxy,meshlet,meshlet-w2,raw")
    ap.add_argument("--unique-heads", action="store_true", help="a different request target for every request")
    ap.add_argument("--profile", default="", help="py-spy record the meshlet proxy during one run "
                    "(writes bench/out/proxy-profile.txt; needs py-spy in the venv)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "proxy.json"))
    args = ap.parse_args()
    for tool in ("wrk", "haproxy", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"missing {tool}: apt-get install wrk haproxy nginx", file=sys.stderr)
            return 2
    conns_list = [int(c) for c in args.conns.split(",")]
    wanted = args.targets.split(",")
    run = Path(tempfile.mkdtemp(prefix="proxybench-"))
    if args.unique_heads:
        (run / "unique.lua").write_text(UNIQUE_LUA)
        SCRIPT[:] = ["-s", str(run / "unique.lua")]
    procs: list[subprocess.Popen] = []
    try:
        return _bench(args, run, procs, conns_list, wanted)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(run, ignore_errors=True)


def _bench(args: argparse.Namespace, run: Path, procs: list, conns_list: list[int], wanted: list[str]) -> int:
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"
    backend_port, haproxy_port = free_port(), free_port()
    nb = run / "nginx-backend"
    for d in ("logs", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (nb / d).mkdir(parents=True, exist_ok=True)
    conf = (HERE / "nginx-backend.conf").read_text().replace("RUNDIR", str(run)).replace("18001", str(backend_port))
    (run / "nginx-backend.conf").write_text(conf)
    nginx = subprocess.Popen([nginx_bin, "-c", str(run / "nginx-backend.conf"), "-p", str(nb)],
                             stderr=open(run / "nginx.log", "wb"))
    procs.append(nginx)
    wait_port(backend_port)
    cfg = ((HERE / "haproxy.cfg").read_text().replace("RUNDIR", str(run))
           .replace("18002", str(haproxy_port)).replace("18001", str(backend_port)))
    (run / "haproxy.cfg").write_text(cfg)
    haproxy = subprocess.Popen([haproxy_bin, "-f", str(run / "haproxy.cfg"), "-db"],
                               stderr=open(run / "haproxy.log", "wb"))
    procs.append(haproxy)
    wait_port(haproxy_port)

    cat, ready = start_ready([PY, "-m", "discovery.catalog", "--listen", "127.0.0.1:0", "--data-dir",
                              str(run / "catalog")], run / "catalog.log")
    procs.append(cat)
    host, port = ready["http"].rsplit(":", 1)
    c = consul.Consul(host=host, port=int(port))
    c.agent.service.register("bench", service_id="bench-0", address="127.0.0.1", port=backend_port,
                             check=consul.Check.ttl("24h"))
    c.agent.check.ttl_pass("service:bench-0")
    url = f"http://{ready['http']}"

    targets: list[Target] = []
    if "direct" in wanted:
        targets.append(Target("direct", "nginx direct (no proxy)", backend_port, lambda: []))
    if "haproxy" in wanted:
        targets.append(Target("haproxy", "HAProxy 2.x, nbthread 1", haproxy_port, lambda: [haproxy.pid]))
    if "meshlet" in wanted:
        m1, r1 = start_ready([PY, "-m", "proxy", "--consul", url, "--listen", "127.0.0.1:0",
                              "--log-level", "WARNING"], run / "meshlet1.log")
        procs.append(m1)
        targets.append(Target("meshlet", "meshlet proxy, 1 worker", int(r1["http"][0].rsplit(":", 1)[1]),
                              lambda m1=m1: [m1.pid]))
    if "raw" in wanted:
        raw, rr = start_ready([PY, str(HERE / "rawproxy.py"), "0", str(backend_port)], run / "raw.log")
        procs.append(raw)
        targets.append(Target("raw", "minimal raw proxy (rawproxy.py)", int(rr["http"][0].rsplit(":", 1)[1]),
                              lambda raw=raw: [raw.pid]))
    if "meshlet-w2" in wanted:
        m2, r2 = start_ready([PY, "-m", "proxy", "--consul", url, "--listen", "127.0.0.1:0", "--workers", "2",
                              "--log-level", "WARNING"], run / "meshlet2.log")
        procs.append(m2)
        targets.append(Target("meshlet-w2", "meshlet proxy, --workers 2", int(r2["http"][0].rsplit(":", 1)[1]),
                              lambda m2=m2: [m2.pid, *children(m2.pid)]))
    backend_pids = lambda: [nginx.pid, *children(nginx.pid)]  # noqa: E731

    for t in targets:  # every target answers 200 before we measure
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {HOST}",
                              f"http://127.0.0.1:{t.port}/"], capture_output=True, text=True).stdout
        if out != "200":
            raise RuntimeError(f"{t.name} answered {out!r}")

    if args.profile:
        profile(args, [t for t in targets if t.name == args.profile][0], conns_list[0])

    results: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        order = targets if rnd % 2 == 0 else list(reversed(targets))
        for t in order:
            for conns in conns_list:
                wrk(t.port, conns, args.warmup)
                pids, bpids = t.pids(), backend_pids()
                u0, s0 = cpu_times(*pids)
                b0, w0 = cpu_seconds(*bpids), time.monotonic()
                r = wrk(t.port, conns, args.duration)
                wall = time.monotonic() - w0
                u1, s1 = cpu_times(*pids)
                r["proxy_cpu"] = (u1 - u0 + s1 - s0) / wall
                # where the proxy's CPU goes, per request (wrk's count; ~0 for "direct")
                r["user_us"] = (u1 - u0) / r["requests"] * 1e6
                r["sys_us"] = (s1 - s0) / r["requests"] * 1e6
                r["backend_cpu"] = (cpu_seconds(*bpids) - b0) / wall
                r["wrk_cpu"] /= wall
                r.pop("raw")
                results.setdefault((t.name, conns), []).append(r)
                print(f"round {rnd} {t.name:11} c{conns:<4} {r['rps']:>9,.0f} req/s p99 {r['p99']:.2f} ms "
                      f"proxy CPU {r['proxy_cpu']:.0%} errors {r['errors']}", file=sys.stderr)
    report(results, targets, conns_list, args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({f"{k[0]}:{k[1]}": v for k, v in results.items()}, indent=1))
    return 0


def profile(args: argparse.Namespace, t: Target, conns: int) -> None:
    """py-spy record the proxy during one wrk run (top functions by own time)."""
    spy = Path(PY).parent / "py-spy"
    out = ROOT / "bench" / "out" / "proxy-profile.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = subprocess.Popen([str(spy), "record", "-p", str(t.pids()[0]), "-f", "raw", "-o", str(out) + ".raw",
                            "-d", str(int(args.duration)), "-r", "997", "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    wrk(t.port, conns, args.duration)
    rec.wait()
    own: dict[str, int] = {}
    total = 0
    for line in Path(str(out) + ".raw").read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        total += int(n)
        own[frames[-1]] = own.get(frames[-1], 0) + int(n)
    lines = [f"{n / total:6.1%}  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:40]]
    out.write_text("\n".join(lines) + "\n")
    print(f"profile: {out}", file=sys.stderr)


def _med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def report(results: dict, targets: list[Target], conns_list: list[int], args: argparse.Namespace) -> None:
    uname = platform.uname()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"\nMachine: {cpu}, {os.cpu_count()} CPUs, kernel {uname.release}; Python {platform.python_version()}; "
          f"{_version(['haproxy', '-v'])}; {_version(['nginx', '-v'])}; {_version(['wrk', '-v'])}")
    print(f"Command: bench/proxy/run.py --duration {args.duration:g} --rounds {args.rounds} "
          f"--conns {args.conns} --targets {args.targets}{' --unique-heads' if args.unique_heads else ''}  "
          f"(wrk -t1 -cN -d{args.duration:g}s --latency, {args.warmup:g} s warm-up per target and round, "
          f"order alternated)\n")
    print("| target | conns | req/s median [min–max] | p50 ms | p99 ms | proxy CPU | backend CPU | wrk CPU "
          "| req per proxy CPU-s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    per_cpu: dict[tuple[str, int], float] = {}
    for t in targets:
        for conns in conns_list:
            rs = results[(t.name, conns)]
            rps = [r["rps"] for r in rs]
            pc = statistics.median(r["rps"] / r["proxy_cpu"] for r in rs) if t.name != "direct" else 0.0
            per_cpu[(t.name, conns)] = pc
            print(f"| {t.label} | {conns} | {statistics.median(rps):,.0f} [{min(rps):,.0f}–{max(rps):,.0f}] "
                  f"| {_med(rs, 'p50'):.2f} | {_med(rs, 'p99'):.2f} | {_med(rs, 'proxy_cpu'):.0%} "
                  f"| {_med(rs, 'backend_cpu'):.0%} | {_med(rs, 'wrk_cpu'):.0%} "
                  f"| {f'{pc:,.0f}' if pc else '—'} | {sum(r['errors'] for r in rs)} |")
    print("\nWhere the proxy's CPU goes, per request (medians of user and kernel CPU from /proc/<pid>/stat "
          "over wrk's request count):\n")
    print("| target | conns | user µs | kernel µs |")
    print("|---|---|---|---|")
    for t in targets:
        if t.name == "direct":
            continue
        for conns in conns_list:
            rs = results[(t.name, conns)]
            print(f"| {t.label} | {conns} | {_med(rs, 'user_us'):.2f} | {_med(rs, 'sys_us'):.2f} |")
    if any(t.name == "haproxy" for t in targets):
        print("\n| ratio to HAProxy | conns | req/s | req per proxy CPU-s | p99 |")
        print("|---|---|---|---|---|")
        for t in targets:
            if t.name in ("haproxy", "direct"):
                continue
            for conns in conns_list:
                mine, ha = results[(t.name, conns)], results[("haproxy", conns)]
                print(f"| {t.label} | {conns} | {_med(mine, 'rps') / _med(ha, 'rps'):.2f} "
                      f"| {per_cpu[(t.name, conns)] / per_cpu[('haproxy', conns)]:.2f} "
                      f"| {_med(mine, 'p99') / _med(ha, 'p99'):.2f} |")


def _version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except OSError:
        return cmd[0] + " ?"
    text = (p.stdout + p.stderr).strip().splitlines()
    return text[0] if text else cmd[0]


if __name__ == "__main__":
    sys.exit(main())
