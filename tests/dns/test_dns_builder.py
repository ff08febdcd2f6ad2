"""The zone builder's two pure parts: the changes it sends (and how the answering process
applies them), and how it yields the CPU (``Priority``). The process itself is tested in
test_dns_server.py (killed, restarted, gone with the server)."""

from __future__ import annotations

import pickle

import dns.message
import pytest

from discovery.dns import Settings
from discovery.dns._builder import Priority, _Builder, read_frame
from discovery.dns._engine import Engine
from discovery.dns._watch import CatalogProcess
from discovery.view import Instance, ServiceView, View

from test_dns_wire import _with, ask, big_view


class _Socket:
    """Collects what the builder sends."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        self.data += data

    def recv(self, n: int) -> bytes:
        out = bytes(self.data[:n])
        del self.data[:n]
        return out


def _builder(sock: _Socket) -> _Builder:
    """A builder that leaves this process's scheduling alone."""
    return _Builder(sock, Settings(), Priority(delay=lambda: 0, setter=lambda idle: None,  # type: ignore[arg-type]
                                               can_leave_idle=False))


def _messages(sock: _Socket) -> list[tuple]:
    out = []
    while sock.data:
        out.append(read_frame(sock))  # type: ignore[arg-type]
    return out


def test_the_answering_side_rebuilds_every_zone_the_builder_sends() -> None:
    """First the whole zone, then only changed names; applied in place, the served names
    equal the builder's zone after every step, and a change drops the cached answers it
    touches (and no others)."""
    sock = _Socket()
    builder = _builder(sock)
    serving = Engine(Settings())
    parent = CatalogProcess("http://127.0.0.1:1", serving)

    pair_key = dns.message.make_query("pair.service.meshlet", "A").to_wire()[2:]
    views = [big_view()]
    views.append(_with(views[-1], web=ServiceView("web", (), vip="127.10.0.7")))             # VIP moved
    views.append(_with(views[-1], pair=ServiceView("pair", (Instance("p-1", "pair", "local", "127.0.0.21", 1),))))
    views.append(View(services={k: v for k, v in views[-1].services.items() if k != "big"},  # service gone
                      nodes=views[-1].nodes, index=views[-1].index + 1))
    for step, view in enumerate(views):
        builder.publish(view)
        msg, built = _messages(sock)
        assert built[0] == "built" and built[1] >= 0      # how long the build took, for /metrics
        assert (msg[5] is None) == (step == 0)            # whole zone first, then the changes
        if step:
            assert set(msg[4]) == set(msg[5]) and len(msg[4]) < len(builder.engine.zone.names)
        if step == 1:
            ask(serving, "pair.service.meshlet", "A")     # cached before the change to web
        parent._apply(msg)
        assert dict(serving.zone.names) == dict(builder.engine.zone.names)
        assert serving.zone.soa == builder.engine.zone.soa and serving.zone.index == view.index
        if step == 1:
            assert pair_key in serving.udp_cache          # a change to web leaves pair's answer
            assert [r.to_text() for rr in ask(serving, "web.service.meshlet", "A").answer for r in rr] == ["127.10.0.7"]
    assert pair_key not in serving.udp_cache                 # step 2 changed pair: re-encoded on demand
    assert ask(serving, "big.service.meshlet", "A").rcode() == 3     # NXDOMAIN after step 3
    assert sorted(r.to_text() for rr in ask(serving, "pair.service.meshlet", "A").answer for r in rr) == ["127.0.0.21"]


def test_messages_are_plain_data() -> None:
    """What crosses the socket pickles without the zone's read-only mappings."""
    sock = _Socket()
    _builder(sock).publish(big_view())
    msg, _built = _messages(sock)
    assert pickle.loads(pickle.dumps(msg)) == msg


class _Clock:
    def __init__(self) -> None:
        self.now, self.delay_ns = 0.0, 0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prio():
    clock = _Clock()
    calls: list[bool] = []
    p = Priority(clock=clock, delay=lambda: clock.delay_ns, setter=calls.append, can_leave_idle=True)
    return p, clock, calls


def test_idle_while_prompt_normal_when_starved_and_back_after_calm(prio) -> None:
    p, clock, calls = prio
    assert p.idle and calls == [True]
    for _ in range(5):                                    # waits of 1 ms: stays idle
        clock.delay_ns += 1_000_000
        clock.now += 0.1
        p.after_change()
    assert p.idle and calls == [True]
    clock.delay_ns += 25_000_000                          # waited 25 ms for a CPU in one change
    p.after_change()
    assert not p.idle and calls == [True, False]
    clock.now += Priority.CALM_S / 2
    clock.delay_ns += 30_000_000                          # still starved: the calm period restarts
    p.after_change()
    clock.now += Priority.CALM_S - 1
    p.after_change()
    assert not p.idle
    clock.now += 2
    p.after_change()                                      # calm for CALM_S: idle again
    assert p.idle and calls == [True, False, True]


def test_without_the_right_to_leave_idle_it_never_enters_it() -> None:
    calls: list[bool] = []
    p = Priority(delay=lambda: 0, setter=calls.append, can_leave_idle=False)
    p.after_change()
    assert not p.idle and calls == []


def test_a_refused_switch_disables_the_policy() -> None:
    def refuse(idle: bool) -> None:
        raise PermissionError(1, "Operation not permitted")

    p = Priority(delay=lambda: 0, setter=refuse, can_leave_idle=True)
    assert not p.idle and not p.enabled
