"""``meshlet rollout status|history|pause|resume``, ``meshlet rollback`` and ``meshlet restart``.

These commands talk to the catalog only (``--consul URL``, else ``$CONSUL_HTTP_ADDR``, else
``mesh.catalog`` of ``-f FILE``, else the default catalog address), never to the
supervisor: the supervisor reads what they write. The KV keys are ``config.rollout_key``'s
(the contract, config/README.md): the supervisor writes ``state`` and ``history``; these
commands write ``control`` (pause/resume), ``restart`` (restart, rollback) and, for a
rollback, the service document.

Flow of ``rollout status``::

    KV meshlet/services/<svc>  --blocking query--+
    KV meshlet/rollout/<svc>/  --blocking query--+--> assess (pure) --Progress--> line / exit code
    /v1/health/service/<svc>   --blocking query--+

``assess`` only trusts a state whose ``revision`` is ``target_revision(spec, restart token)``
of the service document read *now*: a state left from an older desired revision means
"the supervisor has not caught up yet", never success.

Exit codes
    0   done: the rollout completed and as many updated replicas pass as the document asks
        for (as kubectl's rollout status: a scale-up since is waited for); the key was written
    1   the rollout failed, was reverted or is paused; ``--timeout`` passed; the catalog is
        unreachable or refused; no history / no complete revision to roll back to; the
        service changed under a rollback twice (CAS conflict)
    2   usage: unknown service, ``--to N`` / ``--revision N`` not in the history (the message
        names the numbers there are) or the current one

Secrets: specs carry secret *references* only (config/README.md: secret values never enter
the model), but ``env`` values and probe ``headers`` are plain text a user may have filled
with a password. ``history`` therefore prints ``<masked>`` for the value of every ``env``
or ``headers`` key that looks secret-like (``SECRET_NAME``: PASSWORD, TOKEN, SECRET, KEY,
CREDENTIAL, AUTH, ...); the change summary names changed env keys and never values.

``rollback`` goes to ``rollback_target`` of the history (the newest complete revision
before the current one, or ``--to N``), with one exception: after an auto-revert the
supervisor leaves the document at the failed revision while the last history entry
(complete) is what runs; then plain ``rollback`` writes that entry, so the document says
what runs again. The document, the restart key (the entry's token, or deleted) and, when
the spec lost its ports, the VIP reservation change in one transaction, CAS on the
document's ModifyIndex; a conflict is retried once.

``restart`` and ``rollback`` return once their write is done (as ``kubectl rollout restart``
and ``undo`` do, and so that they work while no supervisor runs); ``--wait`` follows the
rollout like ``rollout status`` afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import config

from ..core.redact import MASK, SECRET_NAME, masked
from ..core.revisions import new_restart_token, read_restart_token, target_revision
from ..core.rollout_history import EntryStatus, RolloutError, change_summary, rollback_target
from ..core.rollout_types import COMPLETE, FAILED, PAUSED, REVERTING, RolloutState
from .admin_client import format_age

__all__ = ["COMMANDS", "add_subcommands", "run", "Progress", "assess", "history_table",
           "change_summary", "masked", "rollback_entry", "rollback_document", "rollback_ops",
           "SECRET_NAME", "MASK", "CliError", "NoSuchService", "set_paused", "request_restart", "roll_back"]

COMMANDS = ("rollout", "rollback", "restart")
DEFAULT_CATALOG = config.DEFAULT_CATALOG_URL
ENTRY_COMPLETE = EntryStatus.COMPLETE
WAIT = "30s"                     # blocking query wait; the HTTP timeout is longer


class CliError(Exception):
    """What the user is told, with the exit code (1 failure, 2 usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class NoSuchService(CliError):
    """The service is not in the catalog (exit code 2; the admin API answers 404)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


# =============================================================== pure: status

@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    code: int | None          # None: keep following; 0 complete; 1 failed, reverted or paused
    text: str


def _label(history: Sequence[Mapping[str, Any]], revision: str) -> str:
    """``revision 4`` when the history numbers ``revision``, else ``revision 9f86d081884c``."""
    for e in reversed(history):
        if e.get("revision") == revision and isinstance(e.get("number"), int):
            return f"revision {e['number']}"
    return f"revision {revision[:12]}"


def _revision_of(instance: Any) -> str | None:
    meta = getattr(instance, "meta", None) or {}
    return meta.get("revision")


def _is_ours(instance: Any) -> bool:
    """A replica meshlet's supervisor registered (Meta node, slot, revision): other
    registrations of the same name (another tool's, on a shared Consul) are not counted."""
    meta = getattr(instance, "meta", None) or {}
    return all(k in meta for k in ("node", "slot", "revision"))


def _updated(instance: Any, target: str, current: frozenset[str]) -> bool:
    """Runs ``target``: by Meta ``template`` (the replica's own revision) when the supervisor
    registered it, else by Meta ``revision`` being one of ``current``. ``revision`` names the
    applied document for replicas of its target (DNS serves that document's tags), so it
    cannot tell an old replica from a new one while a restart token changes the target."""
    meta = getattr(instance, "meta", None) or {}
    if "template" in meta:
        return meta["template"] == target
    return meta.get("revision") in current


def assess(service: str, target: str, replicas: int, state: RolloutState | None,
           history: Sequence[Mapping[str, Any]], instances: Sequence[Any],
           current: frozenset[str] | None = None, canary: Sequence[int] = ()) -> Progress:
    """Where the rollout of ``service`` to ``target`` stands, as ``rollout status`` prints it.

    ``instances``: ``discovery.view.Instance`` of every catalog instance of the service
    (only meshlet's own count); an instance is *updated* when it runs ``target``
    (``_updated``), *available* when updated and passing. ``state``: the supervisor's state,
    trusted only when its ``revision`` is ``target``. Without any state, a service whose
    ``replicas`` instances are all updated and passing, with nothing else registered, is
    complete (its first deployment needs no rollout), as is a last history entry for
    ``target`` marked complete. ``canary``: the weights of ``update.canary``; the step the
    state is at is named while progressing.
    """
    current = current or frozenset({target})
    instances = [i for i in instances if _is_ours(i)]
    name = _label(history, target)
    if state is not None and state.revision != target and state.reverted_from == target:
        return Progress(1, f"rollout of {service} to {name} failed and was reverted to "
                           f"{_label(history, state.revision)}: {state.reason or 'no reason given'}")
    new = [i for i in instances if _updated(i, target, current)]
    available = sum(1 for i in new if getattr(i, "is_passing", False))
    head = f"Waiting for rollout of {service} to finish: "
    # Done, as kubectl's rollout status: the revision is complete *and* as many updated
    # replicas pass as the document asks for (a scale-up or a crash after the rollout
    # still has to come up).
    done = Progress(0, f"rollout of {service} to {name} complete") if available >= replicas else \
        Progress(None, f"{head}{available} of {replicas} updated replicas are available...")
    if state is None or state.revision != target:
        if state is None and (_settled(instances, target, current, replicas) or (
                history and history[-1].get("revision") == target
                and history[-1].get("status") == ENTRY_COMPLETE)):
            return done
        was = f" (its last rollout was to {_label(history, state.revision)}, {state.phase})" \
            if state is not None else ""
        return Progress(None, f"Waiting for the supervisor to start the rollout of {service} "
                              f"to {name}{was}...")
    if state.phase == COMPLETE:
        return done
    if state.phase == FAILED:
        return Progress(1, f"rollout of {service} to {name} failed: {state.reason or 'no reason given'}")
    if state.phase == REVERTING:
        failed = _label(history, state.reverted_from) if state.reverted_from else "the new revision"
        return Progress(1, f"rollout of {service} to {failed} failed: {state.reason or 'no reason given'}; "
                           f"reverting to {name}")
    if state.phase == PAUSED:
        return Progress(1, f"rollout of {service} to {name} is paused: {state.reason or 'no reason given'}; "
                           f"resume it with `meshlet rollout resume {service}`")
    old = len(instances) - len(new)
    step = f" (canary step {state.canary_step + 1} of {len(canary)}: {canary[state.canary_step]}%)" \
        if state.canary_step < len(canary) else ""
    if available < replicas:
        return Progress(None, f"{head}{available} of {replicas} updated replicas are available{step}...")
    if old:
        return Progress(None, f"{head}{old} old replica{'s are' if old != 1 else ' is'} pending "
                              f"termination{step}...")
    return Progress(None, f"{head}{available} of {replicas} updated replicas are available, "
                          f"waiting for the supervisor to confirm...")


def _settled(instances: Sequence[Any], target: str, current: frozenset[str], replicas: int) -> bool:
    return len(instances) == replicas and all(
        _updated(i, target, current) and getattr(i, "is_passing", False) for i in instances)


# =============================================================== pure: history

def _age(seconds: float | None) -> str:
    return format_age(seconds)


def history_table(history: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """``rollout history``: NUMBER REVISION STATUS CREATED CHANGE, oldest first."""
    rows = [("NUMBER", "REVISION", "STATUS", "CREATED", "CHANGE")]
    prev = None
    for e in history:
        created = e.get("created_at")
        age = _age(max(0.0, now - created)) + " ago" if isinstance(created, (int, float)) else "-"
        # what it changed when it was recorded; older entries have no record of it: against
        # the entry listed before (which a rollback's renumbering may have made another)
        change = e.get("change") if isinstance(e.get("change"), str) else change_summary(prev, e)
        rows.append((str(e.get("number", "?")), str(e.get("revision", "?"))[:12], str(e.get("status", "?")),
                     age, change))
        prev = e
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def entry_yaml(entry: Mapping[str, Any], now: float) -> str:
    """``rollout history --revision N``: a comment line, then the entry's spec (masked) as YAML."""
    import yaml
    created = entry.get("created_at")
    age = f", created {_age(max(0.0, now - created))} ago" if isinstance(created, (int, float)) else ""
    token = f", restart {entry['restart_token']}" if entry.get("restart_token") else ""
    head = f"# revision {entry.get('number')} ({entry.get('revision')}), {entry.get('status')}{age}{token}\n"
    spec = entry.get("spec")
    if not isinstance(spec, Mapping):
        return head + "# (no spec recorded)\n"
    return head + yaml.safe_dump(masked(spec), sort_keys=False, default_flow_style=False)


def rollback_entry(history: Sequence[Mapping[str, Any]], to: int | None,
                   doc_target: str) -> dict[str, Any] | None:
    """The history entry ``rollback [--to N]`` goes to: ``rollback_target``, except after an
    auto-revert, when the document still names the failed revision while the last entry
    (complete) is what runs: then plain ``rollback`` (or ``--to`` that entry) makes the
    document say what runs. RolloutError as ``rollback_target``."""
    last = history[-1] if history else None
    if last is not None and last.get("revision") != doc_target and last.get("status") == ENTRY_COMPLETE \
            and to in (None, last.get("number")):
        return dict(last)
    return rollback_target(history, to)


def _find(history: Sequence[Mapping[str, Any]], number: int) -> Mapping[str, Any]:
    for e in history:
        if e.get("number") == number:
            return e
    have = ", ".join(str(e.get("number")) for e in history) or "none"
    raise CliError(f"revision {number} is not in the history (have: {have})", 2)


# =============================================================== pure: writes

def rollback_document(current: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """The service document a rollback to ``entry`` writes: the entry's spec with the
    current ``replicas`` (a rollback restores the template, not the scale, as ``kubectl
    rollout undo``), the current VIP when the spec has ports (None otherwise), ``format``
    and ``name`` as config writes them and the revision recomputed as ``meshlet apply``
    does. CliError when the entry's spec is unusable."""
    number = entry.get("number")
    if not isinstance(entry.get("spec"), Mapping):
        raise CliError(f"revision {number} has no spec recorded in the history; cannot roll back to it")
    try:
        spec = config.ServiceSpec.from_dict(dict(entry["spec"]), source=f"history revision {number}")
        replicas = config.ServiceSpec.from_dict(dict(current["spec"])).replicas
    except config.ConfigError as exc:
        raise CliError("; ".join(str(i) for i in exc.issues)) from None
    if spec.name != current.get("name"):
        raise CliError(f"revision {number} is of service {spec.name!r}, not {current.get('name')!r}")
    vip = current.get("vip") if spec.ports else None
    if spec.ports and not vip:
        raise CliError(f"revision {number} has ports but the service has no virtual IP now; "
                       "apply a file with its ports instead (`meshlet apply`)")
    doc = config.service_document(dataclasses.replace(spec, replicas=replicas), vip)
    return json.loads(json.dumps(doc))


def rollback_ops(service: str, doc: Mapping[str, Any], doc_index: int, token: str | None,
                 now: float, release_vip: tuple[str, int] | None = None) -> list[dict[str, Any]]:
    """One transaction: the document (CAS on its ModifyIndex), the restart key set to the
    entry's token or deleted, and the VIP reservation given back when the spec lost its
    ports; built with apply's operations (``commands.apply``)."""
    from .apply import document_op, restart_op, vip_release_op
    ops = [document_op(service, doc, doc_index), restart_op(service, token or None, now)]
    if release_vip is not None:
        ops.append(vip_release_op(*release_vip))
    return ops


def _json(data: Any) -> bytes:
    return config.canonical_json(data).encode()


# =============================================================== I/O

def add_subcommands(sub: Any) -> None:
    """Add ``rollout``, ``rollback`` and ``restart`` to the ``meshlet`` subparsers."""
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("service", help="the service's name")
        p.add_argument("--consul", metavar="URL",
                       help="catalog URL (default: $CONSUL_HTTP_ADDR, else mesh.catalog of -f FILE, "
                            f"else {DEFAULT_CATALOG})")
        p.add_argument("-f", "--file", help="meshlet.yaml naming mesh.catalog")
        return p

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", action="store_true", help="then follow the rollout like `rollout status`")
        p.add_argument("--timeout", type=_duration, metavar="D", help="with --wait: give up after D (e.g. 5m)")

    rollout = sub.add_parser("rollout", help="follow, list, pause and resume a service's rollouts")
    actions = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    status = common(actions.add_parser("status", help="follow the rollout until it completes (exit 0) "
                                                      "or fails, is reverted or paused (exit 1)"))
    status.add_argument("--timeout", type=_duration, metavar="D", help="give up (exit 1) after D, e.g. 5m")
    history = common(actions.add_parser("history", help="the service's revisions"))
    history.add_argument("--revision", type=int, metavar="N", help="print revision N's spec as YAML")
    pause = common(actions.add_parser("pause", help="stop the rollout where it is"))
    pause.add_argument("--reason", default="paused by the user", help="shown by `rollout status`")
    common(actions.add_parser("resume", help="continue a paused rollout"))
    rollback = common(sub.add_parser("rollback", help="roll back to the last complete revision, or --to N"))
    rollback.add_argument("--to", type=int, metavar="N", help="the history number to roll back to")
    waiting(rollback)
    waiting(common(sub.add_parser("restart", help="replace every replica, one by one (same spec)")))


def _duration(text: str) -> float:
    try:
        return float(config.parse_duration(text))
    except (ValueError, config.UnitError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _catalog_access(args: argparse.Namespace) -> Any:
    """The catalog (and its token and TLS files) these commands talk to: --consul, else
    $CONSUL_HTTP_ADDR, else mesh.catalog of -f FILE, else the default embedded catalog."""
    from discovery.consul import CatalogAccessError, access_for_mesh

    from ..core.apply_plan import resolve_catalog_url
    mesh = config.MESH_DEFAULTS
    if args.file:
        try:
            mesh = config.load(args.file).mesh
        except config.ConfigError as exc:
            raise CliError("; ".join(str(i) for i in exc.issues), 2) from None
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror or exc}", 2) from None
    if not args.consul and not os.environ.get("CONSUL_HTTP_ADDR") and args.file:
        url = resolve_catalog_url(None, {}, mesh.catalog.url, mesh.catalog_listen)
    else:
        url = resolve_catalog_url(args.consul, os.environ, "embedded", config.MESH_DEFAULTS.catalog_listen)
    try:
        return access_for_mesh(url, mesh, os.environ)
    except CatalogAccessError as exc:
        raise CliError(str(exc), 2) from None


def _name(args: argparse.Namespace) -> str:
    return f"{args.command} {args.rollout_command}" if args.command == "rollout" else args.command


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one of COMMANDS; returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        return asyncio.run(_run(args, out, err))
    except CliError as exc:
        print(f"meshlet {_name(args)}: {exc}", file=err)
        return exc.code
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import aiohttp
    import consul

    from discovery.consul import catalog_problem, connect, parse_seconds
    access = _catalog_access(args)
    try:
        client = connect(access, timeout=parse_seconds(WAIT) + 15.0)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    handlers = {"status": lambda: follow(client, args.service, args.timeout, out, err),
                "history": lambda: _history(client, args, out), "pause": lambda: _control(client, args, out, True),
                "resume": lambda: _control(client, args, out, False),
                "rollback": lambda: _rollback(client, args, out, err), "restart": lambda: _restart(client, args, out, err)}
    try:
        return await handlers[getattr(args, "rollout_command", None) or args.command]()
    except BrokenPipeError:
        raise                            # our reader left: cli.main ends quietly
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, consul.ConsulException) as exc:
        raise CliError(catalog_problem(exc, access)) from None
    finally:
        await client.close()


async def _document(client: Any, service: str) -> tuple[int, dict[str, Any], Any]:
    """(ModifyIndex, document, ServiceSpec) of ``service``; CliError 2 when it does not exist."""
    from discovery.consul import kv_get
    index, raw = await kv_get(client, config.service_key(service))
    if raw is None:
        raise NoSuchService(f"no service {service!r} in the catalog (apply it first: `meshlet apply`)")
    try:
        spec, _vip, _rev = config.parse_service_document(raw, source=config.service_key(service))
    except config.ConfigError as exc:
        raise CliError("; ".join(str(i) for i in exc.issues)) from None
    return index, json.loads(raw), spec


async def _read_json(client: Any, key: str) -> Any:
    from discovery.consul import kv_get
    _, raw = await kv_get(client, key)
    return _parse(key, raw)


def _parse(key: str, raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(f"{key}: not valid JSON ({exc})") from None


def _history_list(key: str, data: Any) -> list[dict[str, Any]]:
    if data is not None and (not isinstance(data, list) or not all(isinstance(e, dict) for e in data)):
        raise CliError(f"{key}: expected a list of entries")
    return data or []


async def _history(client: Any, args: argparse.Namespace, out: TextIO) -> int:
    await _document(client, args.service)
    key = config.rollout_key(args.service, "history")
    history = _history_list(key, await _read_json(client, key))
    now = time.time()
    if args.revision is not None:
        out.write(entry_yaml(_find(history, args.revision), now))
        return 0
    if not history:
        print(f"{args.service}: no rollout history yet (the supervisor records each revision it rolls out)",
              file=out)
        return 0
    for line in history_table(history, now):
        print(line, file=out)
    return 0


async def set_paused(client: Any, service: str, paused: bool, reason: str = "paused by the user") -> str:
    """Pause or resume the rollout of ``service`` (its control key); what to tell the user.
    NoSuchService when it is not in the catalog. Shared by the CLI and the admin API."""
    from discovery.consul import kv_put
    await _document(client, service)
    reason = reason if paused else ""
    await kv_put(client, config.rollout_key(service, "control"),
                 _json({"paused": paused, "reason": reason, "at": time.time()}))
    state = await _read_json(client, config.rollout_key(service, "state"))
    phase = state.get("phase") if isinstance(state, dict) else None
    if paused:
        return f"{service}: rollout paused ({reason})" + (
            "" if phase in ("progressing", "reverting", "paused") else
            "; no rollout is in progress, the next one will wait")
    return f"{service}: rollout resumed"


async def request_restart(client: Any, service: str) -> str:
    """Ask for a rolling restart of ``service`` (a new restart token); what to tell the user."""
    from discovery.consul import kv_put
    _, _, spec = await _document(client, service)
    now = time.time()
    token = new_restart_token(now)
    await kv_put(client, config.rollout_key(service, "restart"), _json({"token": token, "at": now}))
    return f"{service}: rolling restart requested (revision {target_revision(spec, token)}, token {token})"


async def _control(client: Any, args: argparse.Namespace, out: TextIO, paused: bool) -> int:
    print(await set_paused(client, args.service, paused, args.reason if paused else ""), file=out)
    return 0


async def _restart(client: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    print(await request_restart(client, args.service), file=out)
    return await follow(client, args.service, args.timeout, out, err) if args.wait else 0


async def _rollback(client: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    entry = await roll_back(client, args.service, args.to)
    print(f"{args.service}: rolling back to revision {entry['number']} ({entry['revision']}); "
          f"follow it with `meshlet rollout status {args.service}`", file=out)
    return await follow(client, args.service, args.timeout, out, err) if args.wait else 0


async def roll_back(client: Any, service: str, to: int | None = None) -> dict[str, Any]:
    """Roll ``service`` back (to history number ``to``, else the last complete revision):
    the history entry it goes to. CliError (NoSuchService; code 2 for an unknown ``to``)
    when it cannot. Shared by the CLI and the admin API."""
    from discovery.consul import kv_get

    from .apply import TxnConflict, txn
    for attempt in (1, 2):
        index, doc, spec = await _document(client, service)
        key = config.rollout_key(service, "history")
        history = _history_list(key, await _read_json(client, key))
        if not history:
            raise CliError(f"{service} has no rollout history yet; nothing to roll back to")
        token = read_restart_token(await _read_json(client, config.rollout_key(service, "restart")))
        try:
            entry = rollback_entry(history, to, target_revision(spec, token))
        except RolloutError as exc:
            raise CliError(str(exc), 2) from None
        if entry is None:
            have = ", ".join(f"{e['number']} ({e['status']})" for e in history)
            raise CliError(f"no complete revision to go back to (history: {have}); "
                           "name one with --to N")
        new = rollback_document(doc, entry)
        release = None
        if doc.get("vip") and new["vip"] is None:
            vip_index, owner = await kv_get(client, config.vip_key(doc["vip"]))
            if owner is not None and owner.decode("utf-8", "replace") == service:
                release = (doc["vip"], vip_index)
        try:
            await txn(client, rollback_ops(service, new, index, entry.get("restart_token"),
                                            time.time(), release))
            return entry
        except TxnConflict as exc:
            if attempt == 2:
                raise CliError(f"{service} changed in the catalog during the rollback, twice "
                               f"(a concurrent apply?): {exc}; try again") from None
    raise AssertionError("unreachable")


async def follow(client: Any, service: str, timeout: float | None, out: TextIO, err: TextIO) -> int:
    """``rollout status``: three blocking queries (the document, the rollout keys, the
    service's health); ``assess`` after each answer that changed something; one line per
    new text. Catalog errors after the first answers are retried with back-off."""
    from discovery.consul import Backoff, instances_from_health, next_index
    deadline = None if timeout is None else time.monotonic() + timeout
    doc_key, prefix = config.service_key(service), config.rollout_key(service)
    fetch = {
        "doc": lambda i: client.kv.get(doc_key, index=i, wait=WAIT),
        "rollout": lambda i: client.kv.get(prefix, index=i, recurse=True, wait=WAIT),
        "health": lambda i: client.health.service(service, index=i, wait=WAIT),
    }
    index = dict.fromkeys(fetch, 0)
    data: dict[str, Any] = {}
    backoff, failing = Backoff(), False

    async def later(name: str, delay: float) -> Any:
        await asyncio.sleep(delay)
        return await fetch[name](index[name])

    tasks = {name: asyncio.ensure_future(f(0)) for name, f in fetch.items()}
    last, bad_state = "", ""
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                print(f"meshlet rollout status: timed out after {timeout:g}s; last: {last or 'nothing yet'}",
                      file=err)
                return 1
            done, _ = await asyncio.wait(tasks.values(), timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for name, task in list(tasks.items()):
                if task not in done:
                    continue
                try:
                    returned, value = task.result()
                except Exception as exc:  # noqa: BLE001 - the catalog failing: first read fails, later retried
                    if len(data) < len(fetch):
                        raise
                    if not failing:
                        print(f"meshlet rollout status: catalog not answering ({exc or type(exc).__name__}); "
                              "retrying", file=err)
                    failing = True
                    tasks[name] = asyncio.ensure_future(later(name, backoff.next()))
                    continue
                failing = False
                backoff.reset()
                index[name] = next_index(index[name], int(returned))
                data[name] = value
                tasks[name] = asyncio.ensure_future(fetch[name](index[name]))
            if len(data) < len(fetch):
                continue
            entry = data["doc"]
            if entry is None:
                raise CliError(f"no service {service!r} in the catalog" + (
                    " (it was deleted)" if last else " (apply it first: `meshlet apply`)"), 1 if last else 2)
            raw = entry.get("Value") or b""
            try:
                spec, _vip, doc_revision = config.parse_service_document(raw, source=doc_key)
            except config.ConfigError as exc:
                raise CliError("; ".join(str(i) for i in exc.issues)) from None
            rollout = {e["Key"][len(prefix):]: e.get("Value") for e in data["rollout"] or ()}
            token = read_restart_token(_parse(config.rollout_key(service, "restart"), rollout.get("restart")))
            history_key = config.rollout_key(service, "history")
            history = _history_list(history_key, _parse(history_key, rollout.get("history")))
            state = None
            try:
                raw_state = _parse(config.rollout_key(service, "state"), rollout.get("state"))
                state = RolloutState.from_dict(raw_state) if raw_state is not None else None
            except (CliError, RolloutError) as exc:
                if str(exc) != bad_state:
                    print(f"meshlet rollout status: ignoring an unreadable state: {exc}", file=err)
                    bad_state = str(exc)
            target = target_revision(spec, token)
            # The supervisor registers replicas of the document's target with the document's
            # revision in Meta (DNS serves that document's tags), others with their own.
            current = frozenset({target, doc_revision})
            progress = assess(service, target, spec.replicas, state, history,
                              instances_from_health(data["health"]), current,
                              [c.weight for c in spec.update.canary])
            if progress.text != last:
                print(progress.text, file=out if progress.code in (None, 0) else err)
                out.flush()
                last = progress.text
            if progress.code is not None:
                return progress.code
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
