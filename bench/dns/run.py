#!/usr/bin/env python3
"""meshlet dns vs dnsmasq, side by side in one run, with dnsperf (Debian's dnsperf, dnsmasq-base).

Self-contained: starts a meshlet catalog, registers web0..web9 (one passing instance each,
KV documents giving VIPs 127.0.0.10-19, so both servers answer the same ten A records),
starts dnsmasq (reference/perf-anchors/dnsmasq.conf: addn-hosts, cache-size 10000,
no-resolv) and ``python -m discovery.dns``, then measures:

1. throughput: ``dnsperf -c 8 -l D`` (no -Q), ``--rounds`` rounds alternating the order,
   a 2 s warm-up per server first; QPS, lost, and QPS per server CPU-second (utime+stime
   from /proc/<pid>/stat over the run; 1.0 = one core busy the whole time);
2. latency: ``dnsperf -Q 10000 -v`` (``--rounds`` runs per server, alternating), per-query
   times -> p50/p99/p99.9, the median over the rounds;
3. both again while the catalog changes one service every 100 ms (an extra instance of
   web<k> flips passing/critical, so every change invalidates meshlet's pre-encoded
   answers); for dnsmasq the same catalog change is followed by SIGHUP (re-reads its hosts
   file, clears its cache: what consul-template does to keep dnsmasq current), and, for
   context, a row of SIGHUP alone with no catalog write;
4. propagation: time from the catalog accepting a check change (HTTP 200) to the first
   DNS answer that shows it (polled every ~1 ms over UDP), 20 samples.

While one server is measured the other is paused (SIGSTOP, both meshlet processes), so
only the measured server follows the catalog. Prints markdown tables; ``--write`` also puts them in the "## DNS" section of bench/RESULTS.md.
Usage: .venv/bin/python bench/dns/run.py [--duration 10] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import consul
import dns.message
import dns.query

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from _common import cpu_seconds, free_port, replace_section, start_ready, with_children  # noqa: E402

PY = sys.executable
N_NAMES = 10


def dnsperf(port: int, queries: Path, duration: float, clients: int, rate: int | None,
            verbose: bool = False) -> dict:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(duration),
           "-c", str(clients)]
    if rate:
        cmd += ["-Q", str(rate)]
    if verbose:
        cmd.append("-v")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def num(label: str) -> float:
        m = re.search(label + r":\s+([\d.]+)", out)
        return float(m.group(1)) if m else float("nan")

    res = {"sent": num("Queries sent"), "completed": num("Queries completed"), "lost": num("Queries lost"),
           "qps": num("Queries per second"), "avg_ms": num(r"Average Latency \(s\)") * 1000}
    if verbose:
        lat = sorted(float(line.split()[-1]) * 1000 for line in out.splitlines()
                     if line.startswith("> ") and re.match(r"^\d+\.\d+$", line.split()[-1]))
        res["lat"] = lat
    return res


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Churn:
    """Changes one service every 100 ms until stopped (meshlet: catalog; dnsmasq: SIGHUP)."""

    def __init__(self, action, period: float = 0.1) -> None:
        self.action, self.period = action, period
        self.stop_flag = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_flag.is_set():
            self.action(self.count)
            self.count += 1
            next_at += self.period
            self.stop_flag.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> "Churn":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.thread.join()


def kv_doc(name: str, vip: str) -> str:
    """The KV service document as ``meshlet apply`` writes it."""
    import config

    spec = config.ServiceSpec.from_dict({"name": name, "command": ["true"],
                                         "ports": [{"name": "http", "port": 0, "vip_port": 80}]})
    return json.dumps(config.service_document(spec, vip))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rate", type=int, default=10000, help="fixed rate of the latency runs")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--write", action="store_true", help='replace the "## DNS" section of bench/RESULTS.md')
    args = ap.parse_args()
    args.load_start = os.getloadavg()
    for tool in ("dnsperf", "dnsmasq"):
        if not shutil.which(tool) and not Path("/usr/sbin/" + tool).exists():
            print(f"missing {tool}: apt-get install dnsperf dnsmasq-base", file=sys.stderr)
            return 2

    run = Path(tempfile.mkdtemp(prefix="meshlet-dns-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        cat, ready = start_ready([PY, "-m", "discovery.catalog", "--listen", "127.0.0.1:0",
                                  "--data-dir", str(run / "catalog")], run / "catalog.log")
        procs.append(cat)
        chost, cport = ready["http"].rsplit(":", 1)
        # the catalog's management token (made at its first start), for us and the DNS server
        token = (run / "catalog" / "management-token").read_text().strip()
        os.environ["CONSUL_HTTP_TOKEN"] = token
        c = consul.Consul(host=chost, port=int(cport), token=token)
        for i in range(N_NAMES):
            name = f"web{i}"
            c.kv.put(f"meshlet/services/{name}", kv_doc(name, f"127.0.0.{10 + i}"))
            for k, check in ((0, "passing"), (1, "churn")):
                sid = f"{name}-{k}"
                c.agent.service.register(name, service_id=sid, address="127.0.0.1", port=20000 + 10 * i + k,
                                         check=consul.Check.ttl("1h"))
                if check == "passing":
                    c.agent.check.ttl_pass(f"service:{sid}")
        c.agent.service.register("probe", service_id="probe-0", address="127.0.0.99", port=9,
                                 check=consul.Check.ttl("1h"))

        # dnsmasq, as in reference/perf-anchors (same ten A records, other names)
        dm_port = free_port(udp_too=True)
        hosts = run / "dnsmasq.hosts"
        hosts.write_text("".join(f"127.0.0.{10 + i} web{i}.svc.test\n" for i in range(N_NAMES)))
        conf = (ROOT.parent / "shared/reference/perf-anchors/dnsmasq.conf")
        conf_text = conf.read_text() if conf.exists() else (
            "port=15353\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-poll\n"
            "addn-hosts=RUNDIR/dnsmasq.hosts\ncache-size=10000\nlocal=/svc.test/\npid-file=RUNDIR/dnsmasq.pid\n"
            "user=root\n")
        conf_text = conf_text.replace("RUNDIR", str(run)).replace("port=15353", f"port={dm_port}")
        (run / "dnsmasq.conf").write_text(conf_text)
        dm = subprocess.Popen(["dnsmasq", f"--conf-file={run / 'dnsmasq.conf'}", "--keep-in-foreground"],
                              stdout=subprocess.DEVNULL, stderr=open(run / "dnsmasq.log", "wb"))
        procs.append(dm)

        ml, ready = start_ready([PY, "-m", "discovery.dns", "--listen", "127.0.0.1:0",
                                 "--consul", f"http://{chost}:{cport}", "--log-level", "WARNING"],
                                run / "dns.log")
        procs.append(ml)
        ml_port = int(ready["udp"].rsplit(":", 1)[1])

        q_dm, q_ml = run / "q-dnsmasq.txt", run / "q-meshlet.txt"
        q_dm.write_text("".join(f"web{i}.svc.test A\n" for i in range(N_NAMES)))
        q_ml.write_text("".join(f"web{i}.service.meshlet A\n" for i in range(N_NAMES)))
        servers = {"dnsmasq": (dm, dm_port, q_dm), "meshlet dns": (ml, ml_port, q_ml)}

        # sanity: both answer the same address for every name
        for i in range(N_NAMES):
            got = []
            for label, (_p, port, _q) in servers.items():
                name = f"web{i}.svc.test" if label == "dnsmasq" else f"web{i}.service.meshlet"
                deadline = time.monotonic() + 10
                while True:
                    r = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
                    if r.answer or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                got.append(sorted(str(rd) for rrset in r.answer for rd in rrset))
            assert got[0] == got[1] == [f"127.0.0.{10 + i}"], got

        flip = [False] * N_NAMES
        # The churn driver shares the 2 cores with the servers and dnsperf, so it is as light
        # as a catalog client can be: one keep-alive connection, the same HTTP calls
        # py-consul makes (PUT /v1/agent/check/pass|fail/<id>, PUT /v1/kv/<key>), ~0.1 ms each.
        driver = http.client.HTTPConnection(chost, int(cport), timeout=10)

        def put(path: str, body: bytes = b"") -> None:
            driver.request("PUT", path, body=body)
            resp = driver.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"PUT {path}: {resp.status}")

        def catalog_change(n: int) -> None:
            i = n % N_NAMES
            flip[i] = not flip[i]
            put(f"/v1/agent/check/{'pass' if flip[i] else 'fail'}/service:web{i}-1")

        def dnsmasq_change(n: int) -> None:
            catalog_change(n)              # the catalog changes for both servers
            dm.send_signal(signal.SIGHUP)  # and dnsmasq is told to re-read its records

        def sighup_only(n: int) -> None:
            dm.send_signal(signal.SIGHUP)

        def unwatched_change(n: int) -> None:
            put("/v1/kv/bench/unwatched", str(n).encode())

        churners = {"dnsmasq": dnsmasq_change, "meshlet dns": catalog_change}

        def measure(label: str, rate: int | None, verbose: bool, duration: float, churn: bool,
                    churner=None) -> dict:
            proc, port, qfile = servers[label]
            pids = with_children(proc.pid)   # meshlet dns: the answering process and its zone builder
            paused = [pid for other, (p, _, _) in servers.items() if other != label for pid in with_children(p.pid)]
            for pid in paused:
                os.kill(pid, signal.SIGSTOP)
            try:
                before = cpu_seconds(*pids)
                if churn:
                    with Churn(churner or churners[label]) as ch:
                        res = dnsperf(port, qfile, duration, args.clients, rate, verbose)
                    res["changes"] = ch.count
                else:
                    res = dnsperf(port, qfile, duration, args.clients, rate, verbose)
                res["cpu"] = (cpu_seconds(*pids) - before) / duration
            finally:
                for pid in paused:
                    os.kill(pid, signal.SIGCONT)
            return res

        results: dict[tuple[str, str], list[dict]] = {}
        order = list(servers)
        for label in order:  # warm-up, discarded
            measure(label, None, False, 2, False)
        for churn in (False, True):
            scen = "churn 100 ms" if churn else "steady"
            for r in range(args.rounds):
                for label in (order if r % 2 == 0 else order[::-1]):
                    results.setdefault((label, scen), []).append(measure(label, None, False, args.duration, churn))
            for r in range(args.rounds):
                for label in (order if r % 2 == 0 else order[::-1]):
                    results.setdefault((label, scen + " lat"), []).append(
                        measure(label, args.rate, True, args.duration, churn))

        # control: the same catalog write rate to a KV key meshlet dns does not watch (the
        # catalog and the churn driver work as hard, the DNS server has nothing to do): what
        # of the churn p99 is the machine's, not the DNS server's. dnsmasq measured the same way
        # shows what those writes do to a server that never reads the catalog.
        for r in range(args.rounds):
            for label in (order if r % 2 == 0 else order[::-1]):
                results.setdefault((label, "control lat"), []).append(
                    measure(label, args.rate, True, args.duration, True, unwatched_change))
            # context: dnsmasq's reload alone, with no catalog write beside it
            results.setdefault(("dnsmasq", "sighup lat"), []).append(
                measure("dnsmasq", args.rate, True, args.duration, True, sighup_only))

        # propagation: catalog accepts a change -> first DNS answer showing it
        prop = []
        for n in range(20):
            passing = n % 2 == 0
            t0 = time.monotonic()
            (c.agent.check.ttl_pass if passing else c.agent.check.ttl_fail)("service:probe-0")
            t1 = time.monotonic()
            while time.monotonic() - t1 < 5:
                r = dns.query.udp(dns.message.make_query("probe.service.meshlet", "A"), "127.0.0.1",
                                  port=ml_port, timeout=1)
                if bool(r.answer) == passing:
                    break
                time.sleep(0.001)
            prop.append((time.monotonic() - t1) * 1000)
            del t0
        prop.sort()

        text = report(results, order, prop, args)
        print(text)
        if args.write:
            stamp = time.strftime("%Y-%m-%d %H:%M")
            path = replace_section("## DNS", f"## DNS\n\nMeasured {stamp} with `bench/dns/run.py --write`.\n\n{NOTES}\n{text}")
            print(f"wrote {path}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
        else:
            print(f"scratch kept in {run}", file=sys.stderr)


def report(results: dict, order: list[str], prop: list[float], args: argparse.Namespace) -> str:
    lines: list[str] = []

    def print(text: str = "") -> None:  # noqa: A001 - collects the report
        lines.append(text)

    load = os.getloadavg()
    cpu = platform.processor() or "?"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except StopIteration:
        model = cpu
    print(f"Machine: {os.cpu_count()} CPU ({model}), kernel {platform.release()}, Python {platform.python_version()}; "
          f"load average at start {args.load_start[0]:.2f}, at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(other work on the machine shows here)")
    print(f"Command: .venv/bin/python bench/dns/run.py --duration {args.duration:g} --rounds {args.rounds} "
          f"--clients {args.clients} --rate {args.rate}\n")
    print("| server | scenario | QPS median [min-max] | lost | server CPU % | QPS per server CPU-s |")
    print("|---|---|---|---|---|---|")
    per_cpu: dict[tuple[str, str], float] = {}
    for scen in ("steady", "churn 100 ms"):
        for label in order:
            runs = results[(label, scen)]
            qps = [r["qps"] for r in runs]
            eff = statistics.median(r["completed"] / max(1e-9, r["cpu"] * args.duration) for r in runs)
            per_cpu[(label, scen)] = eff
            lost = sum(int(r["lost"]) for r in runs)
            sent = sum(int(r["sent"]) for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs) * 100
            print(f"| {label} | {scen} | {statistics.median(qps):,.0f} [{min(qps):,.0f}-{max(qps):,.0f}] | "
                  f"{lost} / {sent:,} | {cpu:.0f} | {eff:,.0f} |")
    print(f"\nFixed rate -Q {args.rate} -v, {args.duration:g} s, {args.rounds} rounds, per-query latency "
          f"(median over rounds; p99 of each round in brackets):\n")
    print("| server | scenario | QPS | lost | p50 ms | p99 ms [per round] | p99.9 ms | server CPU % |")
    print("|---|---|---|---|---|---|---|---|")
    p99: dict[tuple[str, str], float] = {}
    for scen in ("steady", "churn 100 ms"):
        for label in order:
            runs = results[(label, scen + " lat")]
            p99s = [pct(r["lat"], 99) for r in runs]
            p99[(label, scen)] = statistics.median(p99s)
            print(f"| {label} | {scen} | {statistics.median(r['qps'] for r in runs):,.0f} | "
                  f"{sum(int(r['lost']) for r in runs)} | "
                  f"{statistics.median(pct(r['lat'], 50) for r in runs):.3f} | "
                  f"{p99[(label, scen)]:.3f} [{', '.join(f'{v:.3f}' for v in p99s)}] | "
                  f"{statistics.median(pct(r['lat'], 99.9) for r in runs):.3f} | "
                  f"{statistics.median(r['cpu'] for r in runs) * 100:.0f} |")
    for label, key, scen in [(label, "control", "control: 100 ms catalog writes no server watches")
                             for label in order] + [("dnsmasq", "sighup", "SIGHUP alone every 100 ms")]:
        ctl = results.get((label, key + " lat"))
        if not ctl:
            continue
        p99s = [pct(r["lat"], 99) for r in ctl]
        p99[(label, key)] = statistics.median(p99s)
        print(f"| {label} | {scen} | "
              f"{statistics.median(r['qps'] for r in ctl):,.0f} | {sum(int(r['lost']) for r in ctl)} | "
              f"{statistics.median(pct(r['lat'], 50) for r in ctl):.3f} | "
              f"{statistics.median(p99s):.3f} [{', '.join(f'{v:.3f}' for v in p99s)}] | "
              f"{statistics.median(pct(r['lat'], 99.9) for r in ctl):.3f} | "
              f"{statistics.median(r['cpu'] for r in ctl) * 100:.0f} |")
    print("\n| ratio meshlet / dnsmasq | steady | churn 100 ms |")
    print("|---|---|---|")
    print("| QPS per server CPU-s (goal >= 1.0) | " + " | ".join(
        f"{per_cpu[('meshlet dns', s)] / per_cpu[('dnsmasq', s)]:.2f}" for s in ("steady", "churn 100 ms")) + " |")
    print("| p99 latency at fixed rate (goal <= 1.5) | " + " | ".join(
        f"{p99[('meshlet dns', s)] / p99[('dnsmasq', s)]:.2f}" for s in ("steady", "churn 100 ms")) + " |")
    if ("dnsmasq", "control") in p99:
        print("| p99, control rows (context: the catalog's writes alone) | " + " | ".join(
            ["", f"{p99[('meshlet dns', 'control')] / p99[('dnsmasq', 'control')]:.2f}"]) + " |")
    if ("dnsmasq", "sighup") in p99:
        print("| p99 against dnsmasq's SIGHUP alone (context: no catalog write in dnsmasq's row) | | "
              f"{p99[('meshlet dns', 'churn 100 ms')] / p99[('dnsmasq', 'sighup')]:.2f} |")
    lost = sum(int(r["lost"]) for k, runs in results.items() if k[0] == "meshlet dns" for r in runs)
    eff = [per_cpu[("meshlet dns", s)] / per_cpu[("dnsmasq", s)] for s in ("steady", "churn 100 ms")]
    lat = [p99[("meshlet dns", s)] / p99[("dnsmasq", s)] for s in ("steady", "churn 100 ms")]
    print(f"\nGoals: QPS per CPU-s >= 1.0x dnsmasq: {'met' if min(eff) >= 1.0 else 'NOT met'} "
          f"({min(eff):.2f}-{max(eff):.2f}); no lost queries: {'met' if lost == 0 else f'NOT met ({lost} lost)'}; "
          f"p99 <= 1.5x dnsmasq: {'met' if max(lat) <= 1.5 else 'NOT met'} ({min(lat):.2f}-{max(lat):.2f}).")
    print(f"\nPropagation (catalog accepted a check change -> first DNS answer showing it, 20 samples): "
          f"p50 {pct(prop, 50):.1f} ms, max {max(prop):.1f} ms")
    return "\n".join(lines) + "\n"


NOTES = """\
Setup: both servers on 127.0.0.1 answer the same ten A records (web0..web9 -> 127.0.0.10-19):
dnsmasq from `addn-hosts` with `cache-size=10000` (reference/perf-anchors/dnsmasq.conf), meshlet
from a real catalog (one passing instance per service plus one that the churn flips, a KV
document with the VIP). dnsperf 2.10 (UDP, no EDNS, `-c 8`, default 100 outstanding) runs on
the same 2 cores, so both servers are load-generator bound at saturation: compare QPS per
server CPU-second, not QPS. Server CPU = utime+stime from /proc/<pid>/stat over each run;
meshlet's counts both its processes: the answering process and its zone builder (the child
that runs the catalog watch and builds zones). "churn 100 ms": meshlet's catalog flips one
instance's TTL check every 100 ms (each flip changes one service's SRV records: the builder
sends the names that changed, the answering process swaps them in and drops the pre-encoded
answers of the record types that changed; the A answer, the service's VIP, stays cached).
The catalog changes the same way while dnsmasq is measured, and each change is followed by
SIGHUP to dnsmasq (re-reads its hosts file, clears its cache), which is how dnsmasq is kept
current from a catalog (consul-template renders the hosts file and sends SIGHUP; its own
watch and rendering are left out, in dnsmasq's favour). The catalog runs on the same 2
cores either way, so its write is in both rows and the ratio compares what each DNS server
costs in following it. The row "SIGHUP alone" is the earlier, stricter anchor: dnsmasq
reloading with no catalog write beside it. While one server is measured the other is
paused (SIGSTOP), so only the measured server follows the catalog. The churn driver is one
keep-alive HTTP connection in the bench process (the same PUTs py-consul sends, without its
per-call cost on the shared cores). The control rows write a KV key that meshlet dns does
not watch at the same rate, for each server: the catalog and the driver work as hard while
the DNS server has nothing to do, so they show what the catalog's own work on the same 2
cores does to either server's p99.

Where the time goes (measured separately on this machine, 2026-11-24, dnsperf at saturation,
user/sys from /proc per query): dnsmasq ~0.55-0.65 us user + ~1.45-1.55 us sys; meshlet
~0.65-0.75 us user + ~1.1-1.2 us sys with batched I/O (recvmmsg/sendmmsg, the default on
Linux), ~1.05-1.2 us user + ~1.3 us sys with `--udp-io plain` (recvfrom/sendto; 0.87x
dnsmasq per CPU-second). meshlet spends less in the kernel because it drains a whole batch
per wake-up instead of polling per datagram. At a fixed 10k QPS each query is its own
wake-up, and meshlet's costs ~14-19 us of CPU against dnsmasq's ~8-9 us (an event-loop turn
per datagram), which is why its CPU % is higher there. On a loaded machine p99/p99.9 are
dominated by scheduling delays of whichever process is preempted: read the per-round p99s,
and re-run on a quiet machine.
"""


if __name__ == "__main__":
    raise SystemExit(main())
