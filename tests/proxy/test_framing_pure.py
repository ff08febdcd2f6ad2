"""Pure rules of the proxy's message handling: request/response heads, retries, prefixes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from proxy._decisions import hedge_decision, retry_decision
from proxy._framing import (CHUNKED, LENGTH, NONE, UNTIL_CLOSE, HeadError, generated, parse_request_head,
                            parse_response_head, strip_prefix, trailer_block)


def head(*lines: tuple[bytes, bytes], method: bytes = b"GET", url: bytes = b"/", version: str = "1.1"):
    return parse_request_head(method, url, version, list(lines))


def fields_of(h) -> dict[bytes, bytes]:
    f = h.fields
    return {f[i].lower(): f[i + 2] for i in range(0, len(f), 4)}


def test_plain_get_keeps_alive_and_has_no_body():
    h = head((b"Host", b"Web.Example:8080"), (b"Accept", b"*/*"))
    assert (h.host, h.host_header, h.keep_alive, h.framing, h.path) == (b"web.example", b"Web.Example:8080", True,
                                                                         NONE, b"/")
    assert fields_of(h) == {b"accept": b"*/*"}


def test_http10_closes_unless_keep_alive():
    assert not head(version="1.0").keep_alive
    assert head((b"Connection", b"Keep-Alive"), version="1.0").keep_alive


@pytest.mark.parametrize("lines, status", [
    pytest.param([], 400, id="missing-host"),
    pytest.param([(b"Host", b"a"), (b"Host", b"a")], 400, id="two-hosts"),
    pytest.param([(b"Host", b"a b")], 400, id="host-space"),
    pytest.param([(b"Host", b"user@a")], 400, id="host-userinfo"),
    pytest.param([(b"Host", b"a:8x")], 400, id="host-bad-port"),
    pytest.param([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip")], 400, id="te-not-chunked-final"),
    pytest.param([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked, chunked")], 400, id="te-chunked-twice"),
    pytest.param([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")], 501, id="te-other-coding"),
    pytest.param([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked,")], 400, id="te-empty-element"),
    pytest.param([(b"Host", b"a"), (b"Expect", b"200-ok")], 417, id="expect-unknown"),
])
def test_invalid_request_heads(lines, status):
    with pytest.raises(HeadError) as err:
        head(*lines)
    assert err.value.status == status


def test_versions_and_methods():
    with pytest.raises(HeadError) as err:
        head((b"Host", b"a"), version="2.0")
    assert err.value.status == 505
    with pytest.raises(HeadError) as err:
        head((b"Host", b"a"), method=b"CONNECT", url=b"a:443")
    assert err.value.status == 501
    with pytest.raises(HeadError) as err:
        head((b"Transfer-Encoding", b"chunked"), version="1.0")
    assert err.value.status == 400
    with pytest.raises(HeadError) as err:
        head((b"Host", b"a"), url=b"/x#frag")
    assert err.value.status == 400


def test_too_many_headers_is_431():
    with pytest.raises(HeadError) as err:
        parse_request_head(b"GET", b"/", "1.1", [(b"Host", b"a")] + [(b"X", b"y")] * 100, max_headers=100)
    assert err.value.status == 431


def test_hop_by_hop_and_connection_nominated_fields_removed_but_ours_protected():
    h = head((b"Host", b"a"), (b"Connection", b"keep-alive, X-Secret, X-Forwarded-For, Host"),
             (b"X-Secret", b"1"), (b"Keep-Alive", b"300"), (b"Proxy-Connection", b"x"), (b"TE", b"trailers, gzip"),
             (b"Upgrade", b"websocket"), (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-Proto", b"https"),
             (b"X-Other", b"ok"))
    assert fields_of(h) == {b"x-other": b"ok"}
    assert h.xff == b"1.2.3.4"           # kept for appending, not droppable via Connection
    assert h.te_trailers and h.upgrade is None  # Upgrade without "Connection: upgrade" is no upgrade


def test_upgrade_requires_connection_upgrade_and_h2c_is_ignored():
    h = head((b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))
    assert h.upgrade == b"websocket"
    h = head((b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"h2c"))
    assert h.upgrade is None


def test_absolute_form_target_becomes_origin_form_and_must_match_host():
    h = head((b"Host", b"a.test"), url=b"http://A.test/p?q=1")
    assert (h.target, h.path, h.host) == (b"/p?q=1", b"/p", b"a.test")
    with pytest.raises(HeadError):
        head((b"Host", b"b.test"), url=b"http://a.test/p")


def test_framing_of_requests():
    assert head((b"Host", b"a"), (b"Content-Length", b"12")).framing == LENGTH
    h = head((b"Host", b"a"), (b"Transfer-Encoding", b"Chunked"))
    assert h.framing == CHUNKED and b"transfer-encoding" not in fields_of(h)


@pytest.mark.parametrize("status, lines, head_request, framing, keep", [
    pytest.param(200, [(b"Content-Length", b"5")], False, LENGTH, True, id="length"),
    pytest.param(200, [(b"Transfer-Encoding", b"chunked")], False, CHUNKED, True, id="chunked"),
    pytest.param(200, [], False, UNTIL_CLOSE, False, id="until-close"),
    pytest.param(200, [(b"Content-Length", b"5")], True, NONE, True, id="head"),
    pytest.param(204, [], False, NONE, True, id="204"),
    pytest.param(304, [(b"Content-Length", b"5")], False, NONE, True, id="304"),
    pytest.param(200, [(b"Content-Length", b"5"), (b"Connection", b"close")], False, LENGTH, False, id="close"),
])
def test_response_framing(status, lines, head_request, framing, keep):
    r = parse_response_head(status, "1.1", lines, head_request=head_request)
    assert (r.framing, r.keep_alive) == (framing, keep)


def test_response_with_unknown_transfer_coding_is_refused():
    with pytest.raises(HeadError):
        parse_response_head(200, "1.1", [(b"Transfer-Encoding", b"gzip, chunked")], head_request=False)
    with pytest.raises(HeadError):
        parse_response_head(200, "2.0", [], head_request=False)


def test_response_hop_by_hop_removed():
    r = parse_response_head(200, "1.1", [(b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
                                         (b"Keep-Alive", b"timeout=5"), (b"Server", b"s"),
                                         (b"Content-Length", b"0")], head_request=False)
    assert b"".join(r.fields) == b"Server: s\r\n"


@pytest.mark.parametrize("target, prefix, out", [
    (b"/api/users?q=1", b"/api", b"/users?q=1"),
    (b"/api", b"/api", b"/"),
    (b"/api?q=1", b"/api", b"/?q=1"),
    (b"/api/", b"/api/", b"/"),
    (b"/apix", b"/api", b"/x"),
])
def test_strip_prefix(target, prefix, out):
    assert strip_prefix(target, prefix) == out


def test_trailer_block_drops_framing_fields():
    assert trailer_block(None) == b"0\r\n\r\n"
    assert trailer_block([(b"X-Checksum", b"abc"), (b"Content-Length", b"1"), (b"Transfer-Encoding", b"x")]) == \
        b"0\r\nX-Checksum: abc\r\n\r\n"


def test_generated_answer_is_short_text():
    out = generated(503, "no ready instance of service web")
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert out.endswith(b"\r\n\r\nno ready instance of service web\n")
    assert b"connection: close" in out


_R = dict(idempotent=True, replayable=True, response_started=False, retries=0, max_retries=2, time_left=5.0)


@pytest.mark.parametrize("failure, status, changes, expected", [
    pytest.param("connect", None, {}, True, id="connect"),
    pytest.param("connect", None, {"idempotent": False}, True, id="connect-post"),
    pytest.param("reset", None, {"idempotent": False}, True, id="reset-before-response-post"),
    pytest.param("timeout", None, {}, True, id="timeout-get"),
    pytest.param("timeout", None, {"idempotent": False}, False, id="timeout-post"),
    pytest.param(None, 503, {}, True, id="503-get"),
    pytest.param(None, 503, {"idempotent": False}, False, id="503-post"),
    pytest.param(None, 500, {}, False, id="500"),
    pytest.param("connect", None, {"replayable": False}, False, id="body-too-large"),
    pytest.param("reset", None, {"response_started": True}, False, id="response-started"),
    pytest.param("reset", None, {"retries": 2}, False, id="attempts-used"),
    pytest.param("timeout", None, {"retries": 2}, False, id="attempts-used-timeout"),
    # Connect failures have their own allowance: attempts + one per endpoint.
    pytest.param("connect", None, {"retries": 2, "connect_failures": 1, "endpoints": 3}, True,
                 id="connect-after-attempts-used"),
    pytest.param("connect", None, {"connect_failures": 5, "endpoints": 3}, True, id="connect-allowance-last"),
    pytest.param("connect", None, {"connect_failures": 6, "endpoints": 3}, False, id="connect-allowance-used"),
    pytest.param("connect", None, {"time_left": 0.0}, False, id="no-time-left"),
])
def test_retry_decision(failure, status, changes, expected):
    assert retry_decision(failure=failure, status=status, **{**_R, **changes}) is expected


_H = dict(safe=True, replayable=True, response_started=False, upgrade=False, hedged=False, retries=0,
          max_retries=2, time_left=5.0)


@pytest.mark.parametrize("changes, expected", [
    pytest.param({}, True, id="get-waiting"),
    pytest.param({"safe": False}, False, id="post-or-put-never"),
    pytest.param({"hedged": True}, False, id="once-per-request"),
    pytest.param({"response_started": True}, False, id="head-arrived"),
    pytest.param({"upgrade": True}, False, id="upgrade"),
    pytest.param({"replayable": False}, False, id="body-too-large"),
    pytest.param({"retries": 2}, False, id="attempts-used"),
    pytest.param({"time_left": 0.0}, False, id="no-time-left"),
])
def test_hedge_decision(changes, expected):
    assert hedge_decision(**{**_H, **changes}) is expected


def test_request_head_memo_returns_the_validated_head_for_the_same_bytes_only():
    from proxy import _framing
    a = _framing.request_head(b"GET", b"/m", "1.1", [(b"Host", b"memo.test")])
    assert _framing.request_head(b"GET", b"/m", "1.1", [(b"Host", b"memo.test")]) is a
    b = _framing.request_head(b"GET", b"/m", "1.1", [(b"Host", b"memo.test"), (b"Connection", b"close")])
    assert b is not a and not b.keep_alive and a.keep_alive
    for _ in range(2):  # an invalid head raises every time: errors are never memoised
        with pytest.raises(HeadError):
            _framing.request_head(b"GET", b"/m", "1.1", [(b"Host", b"memo.test"), (b"Host", b"x")])
    big = [(b"Host", b"memo.test"), (b"X-Big", b"v" * 5000)]
    assert _framing.request_head(b"GET", b"/", "1.1", big) is not _framing.request_head(b"GET", b"/", "1.1", big)


def test_head_memo_is_bounded():
    from proxy import _framing
    for i in range(_framing.MEMO_ENTRIES + 10):
        _framing.response_head(200, "1.1", [(b"X-N", b"%d" % i), (b"Content-Length", b"0")], False)
    assert len(_framing._RESPONSES) <= _framing.MEMO_ENTRIES


# -- whole requests known by their bytes or their shape (proxy._framing.known_request) ------

_KNOWN_SLOTS = ("method", "target", "path", "host", "host_header", "version", "keep_alive", "framing",
                "content_length", "expect_continue", "upgrade", "fields", "xff", "request_id", "idempotent", "size")


def _parsed(raw: bytes):
    """What the full path makes of ``raw`` (one request head): llhttp, then the checks."""
    import httptools
    got: dict = {"headers": []}

    class P:
        def on_url(self, url):
            got["url"] = got.get("url", b"") + url

        def on_header(self, n, v):
            got["headers"].append((n, v))

        def on_headers_complete(self):
            got["done"] = True
    p = httptools.HttpRequestParser(P())
    p.feed_data(raw)
    return parse_request_head(p.get_method(), got["url"], p.get_http_version(), got["headers"])


@pytest.fixture
def memo():
    from proxy import _framing
    for m in (_framing._RAW_REQUESTS, _framing._RAW_BODIED, _framing._SHAPES):
        m.clear()
    yield _framing
    for m in (_framing._RAW_REQUESTS, _framing._RAW_BODIED, _framing._SHAPES):
        m.clear()


GET_A = b"GET /a HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n"
POST_A = b"POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\n"


@pytest.mark.parametrize("raw, body_len, known", [
    pytest.param(b"GET /b?q=1&r=%20x HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, True, id="other-target"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, True, id="same-target"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 2, False, id="bytes-after-a-bodiless-head"),
    pytest.param(b"GET /a#f HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, False, id="fragment"),
    pytest.param(b'GET /a"b HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n', 0, False, id="quote-left-to-llhttp"),
    pytest.param(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, False, id="non-ascii"),
    pytest.param(b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, False, id="absolute-form"),
    pytest.param(b"GET /" + b"x" * 600 + b" HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, False, id="target-too-long"),
    pytest.param(b"GET /a HTTP/1.1\r\nHost: b.test\r\nAccept: */*\r\n\r\n", 0, False, id="other-host"),
    pytest.param(b"GET /a HTTP/1.0\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, False, id="other-version"),
    pytest.param(b"DELETE /a HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, False, id="other-method"),
    pytest.param(b"GET  /a HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n", 0, False, id="two-spaces"),
    pytest.param(b"POST /z?1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\n", 3, True, id="post-whole-body"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\n", 2, False, id="post-body-short"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\n", 4, False, id="post-then-more"),
    pytest.param(b"POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\n", 4, False, id="other-length"),
])
def test_a_whole_request_is_known_without_parsing_only_when_a_parse_would_give_the_same(memo, raw, body_len, known):
    for seen in (GET_A, POST_A):
        memo.remember_raw_request(seen, _parsed(seen))
    got = memo.known_request(raw, body_len, 512, 8192)
    assert (got is not None) is known
    if known:
        want = _parsed(raw)
        assert {s: getattr(got, s) for s in _KNOWN_SLOTS} == {s: getattr(want, s) for s in _KNOWN_SLOTS}


def test_only_requests_the_fast_path_can_finish_are_remembered(memo):
    closing = b"GET /a HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    chunked = b"POST /a HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    expect = b"PUT /a HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    for raw in (closing, chunked, expect):
        memo.remember_raw_request(raw, _parsed(raw))
        assert memo.known_request(raw.replace(b" /a ", b" /b "), 3 if raw is expect else 0, 512, 8192) is None
    assert not memo._RAW_REQUESTS and not memo._RAW_BODIED and not memo._SHAPES
    memo.remember_raw_request(POST_A, _parsed(POST_A))
    assert POST_A in memo._RAW_BODIED and POST_A not in memo._RAW_REQUESTS


@hsettings(max_examples=400, deadline=None)
@given(target=st.binary(min_size=1, max_size=30).filter(lambda t: b" " not in t and b"\r" not in t and b"\n" not in t),
       body=st.sampled_from([0, 3]))
def test_known_request_never_takes_a_target_the_parser_would_treat_otherwise(target, body):
    """Any target at all after a remembered head of the same shape: either the memo declines
    (the full path decides), or its answer is exactly what llhttp and the checks make of it."""
    from proxy import _framing
    seen = GET_A if body == 0 else POST_A
    _framing.remember_raw_request(seen, _parsed(seen))
    raw = seen.replace(b" /a ", b" " + target + b" ", 1)
    got = _framing.known_request(raw, body, 512, 8192)
    if got is not None:
        want = _parsed(raw)
        assert {s: getattr(got, s) for s in _KNOWN_SLOTS} == {s: getattr(want, s) for s in _KNOWN_SLOTS}
    if target[:1] == b"/" and all(c in b"abcXYZ019-._~!$&'()*+,;=:@/?%" for c in target):
        assert got is not None, target   # and plain targets are taken
