"""The raw-bytes fast paths (proxy._framing's raw memo): a head seen before (or its shape,
with another target), alone in one read or with its whole body, skips the parser; anything
else takes the full path, with the same answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from proxy._framing import (_RAW_BODIED, _RAW_REQUESTS, _RAW_RESPONSES, _REQUESTS, HeadError, parse_request_head,
                            parse_response_head, remember_raw_request, remember_raw_response, request_head)

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


@pytest.mark.parametrize("method, headers, memo", [
    pytest.param(b"GET", [(b"Host", b"a.test")], _RAW_REQUESTS, id="get"),
    pytest.param(b"GET", [(b"Host", b"a.test"), (b"Connection", b"close")], None, id="closing"),
    pytest.param(b"POST", [(b"Host", b"a.test"), (b"Content-Length", b"3")], _RAW_BODIED, id="with-body"),
    pytest.param(b"POST", [(b"Host", b"a.test"), (b"Transfer-Encoding", b"chunked")], None, id="chunked"),
    pytest.param(b"GET", [(b"Host", b"a.test"), (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")], None,
                 id="upgrade"),
    pytest.param(b"PUT", [(b"Host", b"a.test"), (b"Expect", b"100-continue"), (b"Content-Length", b"0")], None,
                 id="expect"),
])
def test_only_keep_alive_requests_the_fast_path_can_finish_are_remembered(method, headers, memo):
    raw = method + b" /r HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    remember_raw_request(raw, parse_request_head(method, b"/r", "1.1", headers))
    assert (raw in _RAW_REQUESTS) is (memo is _RAW_REQUESTS)
    assert (raw in _RAW_BODIED) is (memo is _RAW_BODIED)
    _RAW_REQUESTS.pop(raw, None)
    _RAW_BODIED.pop(raw, None)


@pytest.mark.parametrize("raw, headers, status, remembered", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", [(b"Content-Length", b"2")], 200, True, id="200"),
    pytest.param(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n", [(b"Content-Length", b"2")], 404, True,
                 id="404"),
    pytest.param(b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\n", [(b"Content-Length", b"2")], 503, False,
                 id="503-may-be-retried"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", [(b"Transfer-Encoding", b"chunked")],
                 200, False, id="chunked"),
    pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\n", [(b"Content-Length", b"2")], 304, False,
                 id="304"),
    pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", [(b"Content-Length", b"2")], 200, False,
                 id="interim-head-of-another-status"),
])
def test_only_complete_length_responses_are_remembered(raw, headers, status, remembered):
    remember_raw_response(raw, parse_response_head(status, "1.1", headers, head_request=False))
    assert (raw in _RAW_RESPONSES) is remembered
    _RAW_RESPONSES.pop(raw, None)


@pytest.fixture(scope="module")
def env(mesh_catalog, tmp_path_factory, px):
    e = px.Env(mesh_catalog, tmp_path_factory.mktemp("fast"), px.unique("fast"), 1, None)
    yield e
    e.close()


def test_remembered_head_split_or_pipelined_takes_the_full_path(env, px):
    req = px.get("/same", env.host)
    with px.RawClient(env.addr) as c:
        for _ in range(3):  # the second and third are answered from the memo
            c.send(req)
            r = c.response()
            assert r.status == 200 and r.json()["path"] == "/same"
        c.send(req[:10])  # the same bytes in two reads
        c.send(req[10:])
        assert c.response().json()["path"] == "/same"
        c.send(req + px.get("/other", env.host))  # and pipelined with another request
        assert c.response().json()["path"] == "/same"
        assert c.response().json()["path"] == "/other"
        c.send(req + b"GARBAGE\r\n\r\n")  # a remembered head followed by bad bytes
        assert c.response().json()["path"] == "/same"
        assert c.response().status == 400


def test_remembered_head_from_another_client_gets_its_own_forwarded_for(env, px):
    req = px.get("/xff", env.host)
    seen = []
    for _ in range(2):
        with px.RawClient(env.addr) as c:
            c.send(req)
            headers = {k.lower(): v for k, v in c.response().json()["headers"]}
            seen.append((headers["x-forwarded-for"], headers["x-request-id"]))
    assert seen[0][0] == seen[1][0] == "127.0.0.1"
    assert seen[0][1] != seen[1][1]  # a request id per request, not per memoised head


_SLOTS = ("method", "target", "path", "host", "host_header", "version", "keep_alive", "framing",
          "content_length", "expect_continue", "upgrade", "fields", "xff", "request_id", "te_trailers",
          "idempotent", "size")


def _outcome(fn, *args, **kw):
    try:
        h = fn(*args, **kw)
    except HeadError as exc:
        return ("error", exc.status)
    return {s: getattr(h, s) for s in _SLOTS}


_TARGETS = st.one_of(
    st.builds(lambda p, q: b"/" + p + (b"?" + q if q is not None else b""),
              st.binary(max_size=40).map(lambda b: b.replace(b"#", b"")), st.none() | st.binary(max_size=20)),
    st.sampled_from([b"/", b"/a#frag", b"*", b"http://a.test/x?y", b"http://b.test/", b"relative", b"/" + b"x" * 300]),
)


@hsettings(max_examples=300, deadline=None)
@given(targets=st.lists(_TARGETS, min_size=1, max_size=6),
       extra=st.sampled_from([[], [(b"X-Forwarded-For", b"10.0.0.1")], [(b"Cookie", b"s=1"), (b"Accept", b"*/*")]]))
def test_the_head_memo_answers_exactly_what_a_full_parse_does(targets, extra):
    """The memo is keyed on the header fields, not the target: one client sends the same
    fields to ever new paths. For any sequence of targets with the same fields, a memoised
    head (or its copy for another target) equals a full parse, errors included."""
    headers = [(b"Host", b"a.test"), *extra]
    _REQUESTS.clear()
    for method in (b"GET", b"OPTIONS"):
        for target in targets:
            got = _outcome(request_head, method, target, "1.1", headers, max_bytes=300)
            assert got == _outcome(parse_request_head, method, target, "1.1", headers, max_bytes=300), target


def test_same_fields_to_new_targets_reach_the_backend_with_their_own_target(env, px):
    with px.RawClient(env.addr) as c:
        for target in ("/p/1?a=1", "/p/2", "/p/2?b=2", "/q"):
            c.send(px.get(target, env.host))
            r = c.response()
            assert r.status == 200 and r.json()["path"] == target
        c.send(px.get("/p/3#frag", env.host))      # the memoised fields do not skip the target's check
        assert c.response().status == 400


def test_whole_posts_known_by_their_head_reach_the_backend_intact_however_they_arrive(env, px):
    """A POST whose head was seen before and whose whole body came in the same read skips the
    parser (also for another target); split, short or pipelined ones take the full path. The
    backend sees every body, byte for byte, with its own target."""
    import hashlib

    def post(target: str, body: bytes, length: int | None = None) -> bytes:
        n = len(body) if length is None else length
        return (f"POST {target} HTTP/1.1\r\nHost: {env.host}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {n}\r\n\r\n").encode() + body

    def check(r, target: str, body: bytes) -> None:
        got = r.json()
        assert r.status == 200 and got["method"] == "POST" and got["path"] == target, got
        assert got["body_len"] == len(body) and got["sha256"] == hashlib.sha256(body).hexdigest(), got

    with px.RawClient(env.addr) as c:
        for i, target in enumerate(("/up", "/up", "/up?n=2", "/other/3")):
            body = bytes([65 + i]) * 1024
            c.send(post(target, body))
            check(c.response(), target, body)
        body = b"s" * 1024
        req = post("/split", body)
        c.send(req[:len(req) - 100])           # the head and part of the body, then the rest
        c.send(req[len(req) - 100:])
        check(c.response(), "/split", body)
        c.send(post("/pipe", body) + px.get("/after", env.host))   # a whole POST and the next request
        check(c.response(), "/pipe", body)
        assert c.response().json()["path"] == "/after"
    with px.RawClient(env.addr) as c:          # a known head promising more than was sent yet
        c.send(post("/late", b"x" * 1000, length=1024))
        c.send(b"y" * 24)
        check(c.response(), "/late", b"x" * 1000 + b"y" * 24)


def test_unique_targets_on_a_known_shape_are_checked_like_any_target(env, px):
    with px.RawClient(env.addr) as c:
        for n in range(5):
            target = f"/u?n={n}&t=%41~"
            c.send(px.get(target, env.host))
            r = c.response()
            assert r.status == 200 and r.json()["path"] == target
    for bad in ("/u?n=1#frag", "/u\x7f"):       # left to llhttp and the checks: refused as without the memo
        with px.RawClient(env.addr) as c:
            c.send(px.get(bad, env.host))
            assert c.response().status == 400, bad
