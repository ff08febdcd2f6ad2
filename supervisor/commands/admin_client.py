"""``meshlet status``, ``logs``, ``events``, ``explain``, ``node ls``, ``volume ls|rm``, ``rebalance`` and ``down``: clients of the running supervisor's admin API
(daemon/admin.py) at ``--admin HOST:PORT``, else ``$MESHLET_ADMIN``, else
``mesh.admin_listen`` of ``-f FILE`` (``--file`` for logs, where ``-f`` is ``--follow``),
else the default ``mesh.admin_listen``.

Wired into the ``meshlet`` parser (supervisor/cli.py) by ``add_subcommands``; ``run(args)``
runs one of ``COMMANDS``. Exit codes: 0 ok, 1 supervisor unreachable or a failure, 2
usage/invalid file.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import config

__all__ = ["COMMANDS", "add_subcommands", "run", "format_status", "format_age", "format_volumes", "format_size"]

COMMANDS = ("status", "logs", "explain", "node", "volume", "rebalance", "down", "events")
DEFAULT_ADMIN = config.MESH_DEFAULTS.admin_listen


def add_subcommands(sub: Any) -> None:
    status = sub.add_parser("status", help="services, ready/desired and their instances")
    status.add_argument("-f", "--file", help="meshlet.yaml naming mesh.admin_listen")
    status.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    logs = sub.add_parser("logs", help="the logs of a service's instances")
    logs.add_argument("service")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines of each instance")
    logs.add_argument("--instance", metavar="ID", help="only this instance")
    logs.add_argument("--previous", action="store_true",
                      help="the last lines of the replicas that exited (the newest exit of each slot)")
    logs.add_argument("--file", help="meshlet.yaml naming mesh.admin_listen")
    logs.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")

    explain = sub.add_parser("explain", help="per replica of a service, every node with why it is filtered "
                                              "out or its placement score")
    explain.add_argument("service")
    explain.add_argument("-f", "--file", help="meshlet.yaml naming mesh.admin_listen")
    explain.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")
    explain.add_argument("--json", action="store_true", help="print the raw JSON")

    node = sub.add_parser("node", help="the nodes")
    node_sub = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    node_ls = node_sub.add_parser("ls", help="each node with its capacity, reserve and what replicas requested there")
    node_ls.add_argument("-f", "--file", help="meshlet.yaml naming mesh.admin_listen")
    node_ls.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")
    node_ls.add_argument("--json", action="store_true", help="print the nodes' JSON")
    run = node_sub.add_parser("run", help="this host's node side of a fleet: DNS and proxy for its apps, "
                                          "pointed at the shared catalog, until Ctrl-C")
    run.add_argument("--catalog", required=True, metavar="URL", help="the shared catalog (http://HOST:8500)")
    run.add_argument("--address", required=True, metavar="IP",
                     help="this host's address in the fleet (mesh.nodes[].address); its proxy's admin API "
                          "listens there for the supervisor")
    run.add_argument("--name", help="the node's name in mesh.nodes (default: the host name)")
    run.add_argument("-f", "--file", help="meshlet.yaml whose mesh settings (domain, dns, proxy) to use")
    run.add_argument("--data-dir", default=".meshlet-node", help="where the components' logs go")
    run.add_argument("--proxy-admin", metavar="HOST:PORT",
                     help="the proxy's admin API (default: --address with mesh.proxy.admin_listen's port)")
    for action, text in (("cordon", "place no new replica on NODE"),
                         ("uncordon", "let NODE take replicas again (ends a drain)"),
                         ("drain", "cordon NODE and move its replicas elsewhere, each replacement ready "
                                   "before its predecessor stops; waits until NODE runs none")):
        p = node_sub.add_parser(action, help=text)
        p.add_argument("name", metavar="NODE")
        p.add_argument("-f", "--file", help="meshlet.yaml naming mesh.admin_listen")
        p.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")
        if action == "drain":
            p.add_argument("--no-wait", action="store_true", help="return once the drain is stored")
            p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                           help="give up waiting after this long (default 600; the drain goes on)")

    volume = sub.add_parser("volume", help="the volumes meshlet keeps (the only way to delete one)")
    volume_sub = volume.add_subparsers(dest="volume_command", metavar="COMMAND", required=True)
    volume_ls = volume_sub.add_parser("ls", help="each volume: kind, driver, node, size used, the replicas using it")
    volume_rm = volume_sub.add_parser("rm", help="delete a volume and its data (refused while a replica uses it)")
    volume_rm.add_argument("name", help="the volume as `meshlet volume ls` names it")
    for p in (volume_ls, volume_rm):
        p.add_argument("-f", "--file", help="meshlet.yaml naming mesh.admin_listen")
        p.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")
    volume_ls.add_argument("--json", action="store_true", help="print the volumes' JSON")

    rebalance = sub.add_parser("rebalance", help="move replicas where placement would put them now (spread "
                                                  "onto new nodes, pack binpack services); waits until done")
    rebalance.add_argument("--dry-run", action="store_true", help="only show the moves")
    rebalance.add_argument("--no-wait", action="store_true", help="return once the moves are started")
    rebalance.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                           help="give up waiting after this long (default 600; the moves go on)")
    rebalance.add_argument("-f", "--file", help="meshlet.yaml naming mesh.admin_listen")
    rebalance.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")

    down = sub.add_parser("down", help="stop every workload and the running `meshlet up`")
    down.add_argument("-f", "--file", help="meshlet.yaml naming mesh.admin_listen")
    down.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")
    _add_events(sub)


# --------------------------------------------------------------------------- meshlet events

EVENTS_WAIT = "30s"          # each long poll of `events -f`; the HTTP timeout is longer


def _add_events(sub: Any) -> None:
    events = sub.add_parser("events", help="what happened: starts, exits and why, probe transitions, restarts, "
                                           "placements, rollout steps, node changes (kept in the catalog)")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--service", metavar="S", help="only the events of service S (and its replicas)")
    events.add_argument("--kind", action="append", default=[], metavar="K",
                        help="only events of kind K (started, exited, ready, rollout, node, ...; repeatable)")
    events.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N events (default 1000)")
    events.add_argument("--json", action="store_true", help="one JSON object per event and line")
    events.add_argument("--file", help="meshlet.yaml naming mesh.admin_listen")
    events.add_argument("--admin", metavar="HOST:PORT", help="the supervisor's admin API")


def _events(base: str, admin: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``meshlet events``: print the kept events, and with ``-f`` the new ones as they come
    (long polls; a supervisor that restarts meanwhile is waited for, the stored events
    continuing from where they were)."""
    import time

    from ..core.events import format_event
    if args.tail is not None and args.tail < 1:
        print(f"meshlet events: --tail: expected a number >= 1, got {args.tail}", file=err)
        return 2
    query: list[tuple[str, str]] = [("limit", str(args.tail or 1000))]
    if args.service:
        query.append(("service", args.service))
    query += [("kind", k) for k in args.kind]

    def show(events: Sequence[Mapping[str, Any]]) -> None:
        for e in events:
            print(json.dumps(e, sort_keys=True) if args.json else format_event(e), file=out)
        out.flush()

    with _request("GET", f"{base}/v1/events?{urllib.parse.urlencode(query)}") as r:
        doc = json.load(r)
    show(doc.get("events") or ())
    if not args.follow:
        return 0
    last = doc.get("last", -1)
    waiting = False
    while True:
        url = f"{base}/v1/events?{urllib.parse.urlencode([*query, ('since', str(last)), ('wait', EVENTS_WAIT)])}"
        try:
            with _request("GET", url, timeout=60.0) as r:
                doc = json.load(r)
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise
            if not waiting:
                print(f"meshlet events: the supervisor at {admin} does not answer ({getattr(exc, 'reason', exc)}); "
                      "waiting for it", file=err, flush=True)
                waiting = True
            time.sleep(1.0)
            continue
        waiting = False
        show(doc.get("events") or ())
        last = doc.get("last", last)


def _admin_address(args: argparse.Namespace, err: TextIO) -> str | None:
    if getattr(args, "admin", None):
        return args.admin
    if os.environ.get("MESHLET_ADMIN"):
        return os.environ["MESHLET_ADMIN"]
    if getattr(args, "file", None):
        try:
            return config.load(args.file).mesh.admin_listen
        except config.ConfigError as exc:
            for issue in exc.issues:
                print(issue, file=err)
            return None
        except OSError as exc:
            print(f"meshlet: cannot read {args.file}: {exc.strerror or exc}", file=err)
            return None
    return DEFAULT_ADMIN


def _share(used: float, room: float | None, memory: bool) -> str:
    def show(x: float) -> str:
        return f"{x / 2**20:g}Mi" if memory else f"{x:g}"
    return f"{show(used)} of {show(room)}" if room is not None else f"{show(used)} (unbounded)"


def format_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """``meshlet node ls``: NODE RUNTIME ADDRESS REPLICAS CPU MEMORY (requested of what
    the node offers, capacity less its reserve)."""
    rows = [("NODE", "STATE", "RUNTIME", "ADDRESS", "REPLICAS", "CPU REQUESTED", "MEMORY REQUESTED")]
    for n in nodes:
        a, room = n["allocated"], n["room"]
        rows.append((n["name"], node_state(n), n["runtime"], n["address"], str(a["replicas"]),
                     _share(a["cpu"], room["cpu"], False), _share(a["memory"], room["memory"], True)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def node_state(n: Mapping[str, Any]) -> str:
    """ready | unreachable | lost, with ",draining" or ",cordoned" (kubectl's
    "Ready,SchedulingDisabled")."""
    state = str(n.get("state") or "ready")
    if n.get("draining"):
        state += ",draining"
    elif n.get("cordoned"):
        state += ",cordoned"
    return state


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def format_volumes(volumes: Sequence[Mapping[str, Any]]) -> list[str]:
    """``meshlet volume ls``: NAME KIND DRIVER NODE SIZE USED BY."""
    rows = [("NAME", "KIND", "DRIVER", "NODE", "SIZE", "USED BY")]
    for v in volumes:
        rows.append((v["name"], v["kind"], v.get("driver") or "-", v["node"], format_size(v.get("size")),
                     ", ".join(v.get("users") or ()) or ("- (" + v["missing"] + ")" if v.get("missing") else "-")))
    if len(rows) == 1:
        return ["no volumes"]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_status(data: dict[str, Any]) -> list[str]:
    """The admin API's /v1/status as the table `meshlet status` prints."""
    out: list[str] = []
    for s in data.get("services", []):
        head = f"{s['name']}  {s['ready']}/{s['desired']} ready"
        # the replicas' revision (as the instances and `rollout history` show it), else the
        # applied document's
        revision = (s.get("rollout") or {}).get("revision") or s.get("revision")
        if revision:
            head += f"  revision {revision[:12]}"
        if s.get("problem"):
            head += f"  ({s['problem']})"
        out.append(head)
        rollout = s.get("rollout") or {}
        if rollout.get("phase") in ("progressing", "reverting", "paused"):
            line = f"  rollout to revision {rollout.get('number') or '?'}: {rollout['phase']}"
            if rollout.get("progress"):
                line += f", {rollout['progress']}"
            if rollout.get("terminating"):
                line += f", {rollout['terminating']} terminating"
            out.append(line)
        now = data.get("now")
        for f in s.get("failing") or ():
            code = "exited" if f.get("code") is None else f"exited with code {f['code']}"
            ago = f", {format_age(now - f['at'])} ago" if isinstance(now, (int, float)) and f.get("at") else ""
            out.append(f"  slot {f['slot']}: {code}{ago}" + (f": {f['line']}" if f.get("line") else "")
                       + f"  (meshlet logs {s['name']} --previous)")
        rows = [("INSTANCE", "NODE", "ADDRESS", "STATE", "RESTARTS", "AGE", "REVISION")]
        for i in s.get("instances", []):
            state = i["state"] + (f" ({i['exit_code']})" if i.get("exit_code") is not None else "")
            rows.append((i["id"], i["node"], i["address"], state, str(i["restarts"]),
                         format_age(i.get("age")), (i.get("revision") or "-")[:12]))
        if len(rows) > 1:
            widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
            for r in rows:
                out.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if not out:
        out.append("no services")
    return out


def _request(method: str, url: str, timeout: float | None = 10.0) -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method in ("POST", "DELETE") else None)
    return urllib.request.urlopen(req, timeout=timeout)


def _on_node(data: Mapping[str, Any], node: str) -> tuple[list[str], list[str]]:
    """(replicas still running on ``node``, problems of services that cannot leave it)."""
    here, stuck = [], []
    for s in data.get("services", []):
        # a replica being retired still finishes its requests: drained means gone
        mine = [i["id"] for i in s.get("instances", []) if i.get("node") == node and i.get("state") != "exited"]
        here += mine
        if mine and s.get("problem"):
            stuck.append(f"{s['name']}: {s['problem']}")
    return here, stuck


def _node_action(base: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``meshlet node cordon|uncordon|drain NODE``; a drain waits until NODE runs nothing."""
    import time
    with _request("POST", f"{base}/v1/nodes/{urllib.parse.quote(args.name)}/{args.node_command}") as r:
        state = json.load(r)
    print(f"node {args.name}: {node_state(state)}", file=out, flush=True)
    if args.node_command != "drain" or args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    shown: tuple[int, tuple[str, ...]] | None = None
    while True:
        with _request("GET", base + "/v1/status") as r:
            here, stuck = _on_node(json.load(r), args.name)
        if not here:
            print(f"node {args.name}: drained", file=out, flush=True)
            return 0
        if (len(here), tuple(stuck)) != shown:
            shown = (len(here), tuple(stuck))
            print(f"node {args.name}: {len(here)} replica(s) still there", file=out, flush=True)
            for line in stuck:
                print(f"  {line}", file=out, flush=True)
        if time.monotonic() >= deadline:
            print(f"meshlet node drain: {len(here)} replica(s) still on {args.name} after {args.timeout:g}s "
                  "(the drain goes on; see meshlet status)", file=err)
            return 1
        time.sleep(0.5)


def _rebalance(base: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``meshlet rebalance``: the planned moves, then (unless --dry-run/--no-wait) wait
    until none is in progress; moves given up are printed with why."""
    import time
    query = "?dry_run=1" if args.dry_run else ""
    with _request("POST", f"{base}/v1/rebalance{query}") as r:
        doc = json.load(r)
    planned = doc.get("planned") or []
    if not planned:
        print("nothing to move: every replica is where placement would put it now", file=out)
        return 0
    for line in planned:
        print(("would move " if args.dry_run else "moving ") + line, file=out, flush=True)
    if args.dry_run or args.no_wait:
        return 0
    dropped_before = set(doc.get("dropped") or [])
    given_up = False
    deadline = time.monotonic() + args.timeout
    while True:
        with _request("GET", f"{base}/v1/rebalance") as r:
            doc = json.load(r)
        for line in doc.get("dropped") or []:
            if line not in dropped_before:
                dropped_before.add(line)
                given_up = True
                print(f"not moved: {line}", file=err, flush=True)
        if not doc.get("moves"):
            print("rebalanced", file=out, flush=True)
            return 1 if given_up else 0
        if time.monotonic() >= deadline:
            print(f"meshlet rebalance: {len(doc['moves'])} move(s) still in progress after {args.timeout:g}s "
                  "(they go on; see meshlet status)", file=err)
            return 1
        time.sleep(0.5)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    admin = _admin_address(args, err)
    if admin is None:
        return 2
    base = f"http://{admin}"
    try:
        if args.command == "rebalance":
            return _rebalance(base, args, out, err)
        if args.command == "node" and args.node_command != "ls":
            return _node_action(base, args, out, err)
        if args.command in ("status", "node", "explain"):
            from ..core.explain import format_explanation
            path, pick, lines = {
                "status": ("/v1/status", lambda d: d, format_status),
                "node": ("/v1/status", lambda d: d["nodes"], format_nodes),
                "explain": (f"/v1/explain/{urllib.parse.quote(getattr(args, 'service', ''))}", lambda d: d,
                            format_explanation),
            }[args.command]
            with _request("GET", base + path) as r:
                data = pick(json.load(r))
            for line in [json.dumps(data, indent=2)] if args.json else lines(data):
                print(line, file=out)
            return 0
        if args.command == "volume" and args.volume_command == "ls":
            with _request("GET", base + "/v1/volumes", timeout=60.0) as r:
                volumes = json.load(r)["volumes"]
            for line in [json.dumps(volumes, indent=2)] if args.json else format_volumes(volumes):
                print(line, file=out)
            return 0
        if args.command == "volume":
            with _request("DELETE", f"{base}/v1/volumes/{urllib.parse.quote(args.name, safe='')}", timeout=60.0) as r:
                done = json.load(r)
            where = f" on {', '.join(done['nodes'])}" if done.get("nodes") else ""
            print(f"meshlet volume rm: deleted {done['removed']}{where}" + (f" ({done['note']})" if done.get("note") else ""),
                  file=out)
            return 0
        if args.command == "events":
            return _events(base, admin, args, out, err)
        if args.command == "down":
            with _request("POST", base + "/v1/down") as r:
                r.read()
            print("meshlet down: stopping the workloads and the supervisor", file=out)
            return 0
        if args.command == "logs":
            query = {"follow": "1" if args.follow and not args.previous else "0"}
            if args.previous:
                query["previous"] = "1"
            if args.tail is not None:
                query["tail"] = str(args.tail)
            if args.instance:
                query["instance"] = args.instance
            url = f"{base}/v1/logs/{urllib.parse.quote(args.service)}?{urllib.parse.urlencode(query)}"
            with _request("GET", url, timeout=None if args.follow else 30.0) as r:
                try:
                    while chunk := r.read1(65536):
                        out.write(chunk.decode("utf-8", "replace"))
                        out.flush()
                except (http.client.HTTPException, ValueError, ConnectionError):
                    print(f"meshlet logs: the supervisor at {admin} closed the stream", file=err)
            return 0
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        print(f"meshlet {args.command}: {message}", file=err)
        return 1
    except BrokenPipeError:
        raise            # our own output went away (`| head`): the CLI ends quietly
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"meshlet {args.command}: no supervisor answers at {admin} ({reason}); "
              "is `meshlet up` running?", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
