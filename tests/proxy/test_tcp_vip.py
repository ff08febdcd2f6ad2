"""Virtual-IP listeners: TCP services spliced to an instance, HTTP services routed by VIP,
both added and removed as the catalog changes."""

from __future__ import annotations

import socket
import threading

import pytest
from _util import refusing_port

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

TCP_SPEC = "command: [x]\nports: [{name: echo, port: 0, vip_port: 7000, protocol: tcp}]"
HTTP_SPEC = "command: [x]\nports: [{name: http, port: 0, vip_port: 8081, protocol: http}]"


@pytest.fixture(scope="module")
def vips(mesh_catalog, tmp_path_factory, px):
    echo_a, echo_b = px.EchoServer(), px.EchoServer()
    tcp, http = px.unique("echo"), px.unique("vipweb")
    mesh_catalog.register(tcp, tcp + "-0", echo_a.port, port_name="echo")
    mesh_catalog.register(tcp, tcp + "-1", echo_b.port, port_name="echo")
    mesh_catalog.register(tcp, tcp + "-2", refusing_port(), port_name="echo")  # refuses: retried elsewhere
    mesh_catalog.put_service(tcp, TCP_SPEC, vip="127.77.0.2")
    web = px.Backend(http + "-b0")
    mesh_catalog.register(http, http + "-0", web.port)
    mesh_catalog.put_service(http, HTTP_SPEC, vip="127.77.0.3")
    proxy = px.Proxy(mesh_catalog.url, log_path=tmp_path_factory.mktemp("vip") / "proxy.log")
    yield proxy, (echo_a, echo_b), web, tcp, http
    proxy.stop()
    for i in range(3):
        mesh_catalog.deregister(f"{tcp}-{i}")
    mesh_catalog.deregister(http + "-0")
    mesh_catalog.delete_service(tcp)
    mesh_catalog.delete_service(http)
    echo_a.close()
    echo_b.close()
    web.stop()


def _echo_roundtrip(data: bytes) -> bytes:
    with socket.create_connection(("127.77.0.2", 7000), timeout=10) as s:
        got = bytearray()

        def send() -> None:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # half-close: the echo answers everything, then closes
        t = threading.Thread(target=send)
        t.start()
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        t.join()
        return bytes(got)


def test_tcp_vip_echoes_through_an_instance(vips):
    for i in range(6):  # some land on the refusing instance first and are retried
        assert _echo_roundtrip(b"hello %d" % i) == b"hello %d" % i
    proxy, echoes, *_ = vips
    assert sum(e.accepted for e in echoes) >= 6


def test_tcp_vip_large_transfer_with_half_close(vips):
    data = bytes(range(256)) * (40 * 1024)  # 10 MiB
    assert _echo_roundtrip(data) == data


def test_http_vip_routes_without_host_matching(vips, px):
    proxy, _, web, _, http = vips
    with px.RawClient("127.77.0.3:8081") as c:
        c.send(b"GET /via-vip HTTP/1.1\r\nHost: anything.example\r\n\r\n")
        r = c.response()
    assert r.status == 200 and r.json()["path"] == "/via-vip" and r.header("x-backend") == web.name


def test_vip_listeners_follow_the_catalog(vips, mesh_catalog, px):
    proxy, _, web, tcp, http = vips

    def connects(addr: tuple[str, int]) -> bool:
        try:
            socket.create_connection(addr, timeout=1).close()
            return True
        except OSError:
            return False
    extra = px.unique("late")
    mesh_catalog.register(extra, extra + "-0", web.port)
    mesh_catalog.put_service(extra, "command: [x]\nports: [{name: http, port: 0, vip_port: 8082, protocol: http}]",
                             vip="127.77.0.4")
    px.wait_for(lambda: connects(("127.77.0.4", 8082)), 5, what="the new VIP listener")
    mesh_catalog.delete_service(extra)
    px.wait_for(lambda: not connects(("127.77.0.4", 8082)), 5, what="the VIP listener to close")
    mesh_catalog.deregister(extra + "-0")
