"""Where containers' resolv.conf points: the DNS listener on port 53 that `meshlet up` picks
or adds, and which host nameservers it may forward outside names to (pure helpers)."""

from __future__ import annotations

import pytest

from supervisor.daemon.components import DEFAULT_RESOLVER, loopback_nameservers, plan_resolver


@pytest.mark.parametrize("listen, default, resolver, runs", [
    pytest.param(("127.0.0.1:8600",), DEFAULT_RESOLVER, DEFAULT_RESOLVER,
                 ("127.0.0.1:8600", f"{DEFAULT_RESOLVER}:53"), id="none-on-53-default-added"),
    pytest.param(("127.0.0.1:8600",), None, None, ("127.0.0.1:8600",), id="none-and-no-default"),
    pytest.param(("127.0.0.1:8600", "127.0.0.77:53"), DEFAULT_RESOLVER, "127.0.0.77",
                 ("127.0.0.1:8600", "127.0.0.77:53"), id="configured-port-53-wins"),
    pytest.param(("0.0.0.0:53",), DEFAULT_RESOLVER, "127.0.0.1", ("0.0.0.0:53",),
                 id="wildcard-answers-on-loopback"),
    pytest.param(("[::]:53",), None, "::1", ("[::]:53",), id="v6-wildcard"),
    pytest.param(("[::1]:53",), None, "::1", ("[::1]:53",), id="v6-loopback"),
    pytest.param(("localhost:53",), None, None, ("localhost:53",), id="a-name-cannot-go-in-resolv-conf"),
])
def test_plan_resolver(listen, default, resolver, runs):
    assert plan_resolver(listen, default) == (resolver, runs)


def test_only_loopback_nameservers_become_recursors_and_never_our_own():
    text = ("# generated\nsearch example.org\nnameserver 10.255.255.53\nnameserver 127.0.0.53\n"
            "nameserver ::1\nnameserver 127.0.0.153\nnameserver fe80::1%eth0\nnameserver 127.0.0.53\n"
            "options ndots:2\nnameserver\n")
    assert loopback_nameservers(text, exclude="127.0.0.153") == ("127.0.0.53:53", "[::1]:53")
    assert loopback_nameservers("nameserver 192.168.1.1\n") == ()
