"""The balancer's sans-IO core: raw requests -> the parse result or the refusal, framing of
bodies both ways, the heads we send, routing and backend choice. No sockets."""

from __future__ import annotations

import pytest

from balancer import forward
from balancer.bodies import ChunkedBody, CloseBody, LengthBody
from balancer.h1 import (
    CHUNKED,
    CLOSE,
    LENGTH,
    NONE,
    BackendError,
    Limits,
    ProtocolError,
    Request,
    can_retry,
    parse_request,
    parse_response,
)
from balancer.routing import (
    LEAST_CONNECTIONS,
    Answer,
    Forward,
    Hold,
    Redirect,
    Route,
    Router,
    Settings,
)

LIMITS = Limits(max_request_line=100, max_head=1000, max_headers=20, max_body=1000)


def parse(raw: bytes) -> Request:
    result = parse_request(raw, LIMITS)
    assert result is not None, "head incomplete"
    return result[0]


# --- valid requests: raw bytes -> what we parsed ----------------------------------------

VALID = [
    # (raw, method, target, host, framing, length, keep_alive)
    (b"GET / HTTP/1.1\r\nHost: blog.localhost\r\n\r\n", b"GET", b"/", "blog.localhost",
     NONE, 0, True),
    (b"GET /a?b=c HTTP/1.1\r\nHost: Blog.Example.COM.:8080\r\n\r\n", b"GET", b"/a?b=c",
     "blog.example.com", NONE, 0, True),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", b"POST", b"/x", "a",
     LENGTH, 5, True),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", b"POST", b"/x", "a",
     NONE, 0, True),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n", b"POST", b"/", "a",
     CHUNKED, 0, True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"GET", b"/", "a",
     NONE, 0, False),
    (b"GET / HTTP/1.0\r\n\r\n", b"GET", b"/", "", NONE, 0, False),
    (b"GET / HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n", b"GET", b"/", "a",
     NONE, 0, True),
    (b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET", b"/", "a", NONE, 0, True),
    (b"GET http://b.example/p?q HTTP/1.1\r\nHost: other\r\n\r\n", b"GET", b"/p?q",
     "b.example", NONE, 0, True),
    (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", b"OPTIONS", b"*", "a", NONE, 0, True),
    (b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", b"GET", b"/", "[::1]", NONE, 0, True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Tab:\tv \t\r\n\r\n", b"GET", b"/", "a",
     NONE, 0, True),
]


@pytest.mark.parametrize("raw,method,target,host,framing,length,keep_alive", VALID)
def test_valid_requests_parse(raw: bytes, method: bytes, target: bytes, host: str,
                              framing: int, length: int, keep_alive: bool) -> None:
    result = parse_request(raw, LIMITS)
    assert result is not None
    req, size = result
    assert (req.method, req.target, req.host, req.framing, req.length, req.keep_alive) == (
        method, target, host, framing, length, keep_alive)
    assert raw[size - 4:size] == b"\r\n\r\n"


# --- refused requests: raw bytes -> status (the backend never sees them) -------------------

REFUSED = [
    # smuggling
    ("CL and TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 400),
    ("TE and CL", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 3\r\n\r\n", 400),
    ("duplicate CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Content-Length: 3\r\n\r\n", 400),
    ("CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n", 400),
    ("negative CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("signed CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", 400),
    ("hex CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n", 400),
    ("empty CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", 400),
    ("huge CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
     400),
    ("TE not final chunked", b"POST / HTTP/1.1\r\nHost: a\r\n"
     b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("TE gzip then chunked", b"POST / HTTP/1.1\r\nHost: a\r\n"
     b"Transfer-Encoding: gzip, chunked\r\n\r\n", 400),
    ("TE chunked twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 400),
    ("TE identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", 400),
    ("TE with junk", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc", 400),
    ("tab before colon", b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400),
    ("bare LF in a header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nX-B: c\r\n\r\n", 400),
    ("bare LF head", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare CR in a header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rX-B: c\r\n\r\n", 400),
    ("NUL in a header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A\r\n\r\n", 400),
    ("bad header name", b"GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n", 400),
    # request line and Host
    ("no version", b"GET /\r\nHost: a\r\n\r\n", 400),
    ("two spaces", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("lowercase http", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("HTTP/2", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("relative target", b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    ("no Host in 1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("bad Host", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("Host with user", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    ("bad Expect", b"POST / HTTP/1.1\r\nHost: a\r\nExpect: fly\r\nContent-Length: 1\r\n\r\n",
     417),
    # sizes
    ("long request line", b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    ("long request line, incomplete", b"GET /" + b"a" * 200, 414),
    ("headers over the limit", b"GET / HTTP/1.1\r\nHost: a\r\n"
     + b"X-A: " + b"b" * 90 + b"\r\n" + b"X-B: " + b"b" * 990 + b"\r\n\r\n", 431),
    ("headers over the limit, incomplete", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: "
     + b"b" * 1100, 431),
    ("too many headers", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 21 + b"\r\n", 431),
    ("body over the limit", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n",
     413),
]


@pytest.mark.parametrize("raw,status", [(r, s) for _, r, s in REFUSED],
                         ids=[name for name, _, _ in REFUSED])
def test_bad_requests_refused_with_their_status(raw: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(raw, LIMITS)
    assert caught.value.status == status
    assert caught.value.message


def test_incomplete_head_asks_for_more() -> None:
    assert parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n", LIMITS) is None
    assert parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r", LIMITS) is None


def test_hop_by_hop_and_connection_named_headers_removed() -> None:
    req = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\n"
                b"Keep-Alive: 5\r\nTE: trailers\r\nX-Secret: 1\r\nProxy-Connection: x\r\n"
                b"Upgrade: h2c\r\nX-Kept: 2\r\n\r\n")
    assert req.headers == [b"Host: a\r\n", b"X-Kept: 2\r\n"]
    assert req.upgrade is None  # Upgrade without Connection: upgrade is no upgrade


def test_forwarded_headers_set_by_the_balancer() -> None:
    req = parse(b"POST /p HTTP/1.1\r\nHost: blog.localhost:8080\r\n"
                b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
                b"X-Forwarded-Host: evil\r\nContent-Length: 2\r\n\r\nhi")
    head = forward.request_head(req, "192.0.2.7", b"http")
    assert head.startswith(b"POST /p HTTP/1.1\r\nHost: blog.localhost:8080\r\n")
    assert b"X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n" in head
    assert b"X-Forwarded-Proto: http\r\n" in head and b"https" not in head
    assert b"X-Forwarded-Host: blog.localhost:8080\r\n" in head and b"evil" not in head
    assert b"Via: 1.1 tally\r\n" in head
    assert head.count(b"Content-Length") == 1 and head.endswith(b"Content-Length: 2\r\n\r\n")


def test_chunked_request_is_forwarded_chunked_and_expect_handled_here() -> None:
    req = parse(b"PUT /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b"Expect: 100-continue\r\n\r\n")
    assert req.expect_continue
    head = forward.request_head(req, "127.0.0.1", b"http")
    assert b"Transfer-Encoding: chunked\r\n" in head and b"Expect" not in head


def test_websocket_upgrade_passes_through() -> None:
    req = parse(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert req.upgrade == b"websocket"
    head = forward.request_head(req, "127.0.0.1", b"http")
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in head
    assert b"Sec-WebSocket-Key: k\r\n" in head


def test_retry_only_when_safe() -> None:
    get = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    post = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    assert can_retry(get, sent=True) and can_retry(post, sent=False)
    assert not can_retry(post, sent=True)


# --- bodies ------------------------------------------------------------------------------


def feed_all(body: ChunkedBody, pieces: list[bytes]) -> bytes:
    return b"".join(body.feed(p) for p in pieces)


def test_chunked_decoding_byte_by_byte_with_extension_and_trailer() -> None:
    raw = b"5;name=v\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\nGET /next"
    whole = ChunkedBody()
    assert whole.feed(raw) == b"hello0123456789" and whole.done
    assert whole.rest == b"GET /next"
    split = ChunkedBody()
    assert feed_all(split, [raw[i:i + 1] for i in range(len(raw))]) == b"hello0123456789"
    assert split.done and split.rest == b"GET /next"


@pytest.mark.parametrize("raw,status", [
    (b"x\r\n", 400),                       # not hex
    (b"-5\r\nhello\r\n", 400),             # signed
    (b"0x5\r\nhello\r\n", 400),            # 0x prefix
    (b" 5\r\nhello\r\n", 400),             # leading space
    (b"1234567890123456\r\n", 400),        # overflow: 16 hex digits
    (b"5\r\nhelloXX", 400),                # data not followed by CRLF
    (b"5\nhello\r\n", 400),                # bare LF after the size
    (b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n", 400),
    (b"3E9\r\n", 413),                     # 1001 bytes: over the limit
], ids=["not-hex", "signed", "0x", "space", "overflow", "no-crlf", "bare-lf", "trailer",
        "limit"])
def test_bad_chunks_refused(raw: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        ChunkedBody(limit=LIMITS.max_body).feed(raw)
    assert caught.value.status == status


def test_chunked_body_cut_short_is_an_error() -> None:
    body = ChunkedBody()
    body.feed(b"5\r\nhel")
    with pytest.raises(ProtocolError):
        body.feed(b"")


def test_length_and_close_bodies() -> None:
    body = LengthBody(5)
    assert body.feed(b"hel") == b"hel" and not body.done
    assert body.feed(b"loGET") == b"lo" and body.done and body.rest == b"GET"
    close = CloseBody()
    assert close.feed(b"abc") == b"abc" and not close.done
    assert close.feed(b"") == b"" and close.done


# --- responses from backends ---------------------------------------------------------------


def response(raw: bytes, method: bytes = b"GET"):
    result = parse_response(raw, method, LIMITS)
    assert result is not None
    return result[0]


@pytest.mark.parametrize("raw,method,framing,length,reusable", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", b"GET", LENGTH, 3, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", CHUNKED, 0, True),
    (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", CLOSE, 0, False),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", b"GET",
     LENGTH, 1, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", b"GET", LENGTH, 1, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n", b"HEAD", NONE, 0, True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET", NONE, 0, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 30\r\n\r\n", b"GET", NONE, 0, True),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
     b"GET", NONE, 0, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n", b"GET", LENGTH, 2, True),
    (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", b"GET", NONE, 0, True),
])
def test_response_framing(raw: bytes, method: bytes, framing: int, length: int,
                          reusable: bool) -> None:
    resp = response(raw, method)
    assert (resp.framing, resp.length, resp.reusable) == (framing, length, reusable)


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"SIP/2.0 200 OK\r\n\r\n",
])
def test_bad_responses_are_backend_errors(raw: bytes) -> None:
    with pytest.raises(BackendError):
        parse_response(raw, b"GET", LIMITS)


def test_response_head_for_the_client() -> None:
    req = parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    resp = response(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close, X-Hop"
                    b"\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\r\n")
    head, framing, keep = forward.response_head(resp, req, keep_alive=True)
    assert framing == CHUNKED and keep
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nVia: 1.1 tally\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    old = parse(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    head, framing, keep = forward.response_head(resp, old, keep_alive=True)
    assert framing == CLOSE and not keep and b"Connection: close\r\n" in head
    assert forward.chunk(b"hello") == b"5\r\nhello\r\n"


def test_head_response_keeps_its_content_length_and_sends_no_body() -> None:
    req = parse(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    resp = response(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n", b"HEAD")
    head, framing, keep = forward.response_head(resp, req, keep_alive=True)
    assert framing == NONE and b"Content-Length: 30\r\n" in head


# --- routing and backend choice --------------------------------------------------------------


def router(*routes: Route, **settings) -> Router:
    r = Router(Settings(**settings))
    r.update(routes, version=1)
    return r


def test_exact_then_longest_wildcard_wins() -> None:
    r = router(Route("*.example.com", "wide", ("10.0.0.1:80",)),
               Route("*.api.example.com", "api", ("10.0.0.2:80",)),
               Route("www.example.com", "www", ("10.0.0.3:80",)))
    assert r.lookup("www.example.com")[0].app == "www"
    assert r.lookup("x.example.com")[0].app == "wide"
    assert r.lookup("a.b.example.com")[0].app == "wide"
    assert r.lookup("v1.api.example.com")[0].app == "api"
    assert r.lookup("example.com") is None
    assert r.lookup("badexample.com") is None


def test_decisions_unknown_maintenance_no_backend() -> None:
    r = router(Route("blog.localhost", "blog", ("127.0.0.1:7000",)),
               Route("down.localhost", "down", ("127.0.0.1:7001",), maintenance=True),
               Route("new.localhost", "new", ()))
    assert r.decide("nope.localhost", 0.0) == Answer(404, "unknown host")
    assert r.decide("down.localhost", 0.0) == Answer(503, "maintenance")
    assert isinstance(r.decide("new.localhost", 0.0), Hold)
    decision = r.decide("blog.localhost", 0.0)
    assert isinstance(decision, Forward) and decision.backend.address == "127.0.0.1:7000"


def test_round_robin_and_passive_health() -> None:
    r = router(Route("a", "a", ("h:1", "h:2", "h:3")), cooldown=2.0)
    picks = [r.decide("a", 0.0).backend.address for _ in range(6)]
    assert sorted(picks) == ["h:1", "h:1", "h:2", "h:2", "h:3", "h:3"]
    bad = r.lookup("a")[1][0]
    r.failed(bad, now=10.0)
    assert all(r.decide("a", 10.5).backend is not bad for _ in range(6))
    assert any(r.decide("a", 12.5).backend is bad for _ in range(6))  # cooldown over
    r.failed(bad, now=20.0)
    assert bad.down_until == 24.0  # failing again: out for twice as long
    r.failed(bad, now=30.0)
    assert bad.down_until == 38.0
    r.succeeded(bad)
    assert bad.down_until == 0.0 and bad.failures == 0


def test_all_backends_failing_means_hold_and_retry_excludes_the_tried() -> None:
    r = router(Route("a", "a", ("h:1", "h:2")))
    first = r.decide("a", 0.0).backend
    second = r.decide("a", 0.0, exclude=(first,)).backend
    assert second is not first
    assert isinstance(r.decide("a", 0.0, exclude=(first, second)), Hold)
    r.failed(first, 0.0)
    r.failed(second, 0.0)
    assert isinstance(r.decide("a", 0.0), Hold)
    assert r.next_wake(r.lookup("a")[1], 0.0) == 2.0


def test_a_single_backend_tried_or_cooling_down_means_hold() -> None:
    r = router(Route("a", "a", ("h:1",)), cooldown=2.0)
    only = r.decide("a", 0.0).backend
    assert isinstance(r.decide("a", 0.0, exclude=(only,)), Hold)
    r.failed(only, 0.0)
    assert isinstance(r.decide("a", 1.0), Hold)
    assert r.decide("a", 2.5).backend is only


def test_least_connections_prefers_the_idle_backend() -> None:
    r = router(Route("a", "a", ("h:1", "h:2")), policy=LEAST_CONNECTIONS)
    busy = r.lookup("a")[1][0]
    busy.active = 3
    assert all(r.decide("a", 0.0).backend is not busy for _ in range(4))


def test_backend_state_survives_a_route_update() -> None:
    r = router(Route("a", "a", ("h:1", "h:2")))
    kept = r.lookup("a")[1][0]
    kept.active = 2
    r.update([Route("a", "a", ("h:1", "h:3")), Route("*.b", "b", ("h:1",))], version=2)
    assert r.lookup("a")[1][0] is kept and r.lookup("x.b")[1][0] is kept
    assert [b.address for b in r.lookup("a")[1]] == ["h:1", "h:3"] and r.version == 2


# --- router metrics and access log ------------------------------------------------------------


def test_metrics_by_status_class_and_percentiles() -> None:
    from balancer.metrics import Metrics

    m = Metrics()
    for i in range(100):
        m.record("blog", 200 if i < 90 else 503, (i + 1) / 1000)  # 1..100 ms
    m.held("blog")
    m.retried("blog")
    blog = m.apps["blog"]
    assert blog.classes[2] == 90 and blog.classes[5] == 10
    assert 0.05 <= blog.percentile(0.5) <= 0.055  # bucket bounds: within 10% above
    assert 0.099 <= blog.percentile(0.99) <= 0.11
    text = m.prometheus()
    assert 'tally_router_requests_total{app="blog",class="5xx"} 10' in text
    assert 'tally_router_held_total{app="blog"} 1' in text
    assert 'tally_router_latency_seconds{app="blog",quantile="0.99"}' in text


def test_access_log_lines_and_bounded_buffer() -> None:
    from balancer.accesslog import AccessLog, line

    text = line(b"GET", b'/a"b', "blog.localhost", "10.0.0.1", 200, 12, 0.0034, "h:1")
    assert text == ('at=info method=GET path="/a\\"b" host=blog.localhost fwd="10.0.0.1" '
                    "status=200 bytes=12 service=3ms backend=h:1")
    assert line(b"GET", b"/", "a", "b", 502, 0, 0.0, None).startswith("at=error")
    log = AccessLog(max_lines=2)
    for i in range(3):
        log.add("blog", f"line {i}")
    assert log.dropped == 1
    assert log.take() == {"blog": b"line 1\nline 2\n"} and log.take() == {}


def test_https_only_routes_redirect_plain_requests() -> None:
    r = router(Route("shop.localhost", "shop", ("h:1",), https_only=True, hsts="max-age=60"))
    assert isinstance(r.decide("shop.localhost", 0.0, secure=False), Redirect)
    assert isinstance(r.decide("shop.localhost", 0.0, secure=True), Forward)
    from balancer.pages import redirect
    reply = redirect(b"https://shop.localhost:8443/a?b", close=False, head=False)
    assert reply.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n"
                            b"Location: https://shop.localhost:8443/a?b\r\n")


def test_acme_challenges_are_answered_before_maintenance_and_redirects() -> None:
    from balancer.routing import Challenge
    from balancer.sources import RoutesError, routes_from_json

    [route] = routes_from_json([{"hostname": "shop.example", "app": "shop",
                                 "backends": ["h:1"], "maintenance": True, "https_only": True,
                                 "challenges": {"tok-1": "tok-1.thumb"}}])
    r = router(route)
    hit = r.decide("shop.example", 0.0, target=b"/.well-known/acme-challenge/tok-1")
    assert isinstance(hit, Challenge) and hit.key_authorization == "tok-1.thumb"
    other = r.decide("shop.example", 0.0, target=b"/.well-known/acme-challenge/tok-2")
    assert isinstance(other, Answer) and other.status == 503  # an unknown token: as ever
    assert isinstance(r.decide("shop.example", 0.0, target=b"/"), Answer)
    from balancer.pages import text
    assert text(200, b"tok-1.thumb", close=False, head=False).endswith(
        b"Content-Length: 11\r\nCache-Control: no-store\r\nConnection: keep-alive\r\n\r\n"
        b"tok-1.thumb")
    with pytest.raises(RoutesError, match="challenges"):
        routes_from_json([{"hostname": "a.example", "challenges": {"t": "x\r\nSet-Cookie: 1"}}])


def test_router_samples_are_what_happened_since_the_last_stored() -> None:
    from balancer.metrics import Metrics

    m = Metrics()
    m.record("blog", 200, 0.002)
    m.record("blog", 503, 0.5)
    m.record(None, 404, 0.001)  # no app: not sampled
    m.held("blog")
    samples, mark = m.samples()
    assert [(s["app"], s["requests"], s["s2xx"], s["s5xx"], s["held"]) for s in samples] == [
        ("blog", 2, 1, 1, 1)]
    assert sum(samples[0]["buckets"].values()) == 2
    m.record("blog", 200, 0.002)
    again, _ = m.samples()  # the first were not stored: they come again, with the new one
    assert again[0]["requests"] == 3
    m.sent(mark)
    later, mark = m.samples()
    assert [(s["requests"], s["s2xx"], s["held"]) for s in later] == [(1, 1, 0)]
    m.sent(mark)
    assert m.samples() == ([], {})


def test_access_log_stream_offsets_acks_and_overflow() -> None:
    from balancer.accesslog import Stream

    s = Stream("router.blog.8080.0", epoch=1, now=0.0)
    s.add(b"a\n", max_pending=10, epoch=2)
    s.add(b"bb\n", max_pending=10, epoch=2)
    assert s.offset_of_last(b"bb\n") == 2 and s.pending == b"a\nbb\n"
    s.ack(1, 2, now=1.0)  # the collector wrote the first line
    assert (s.base, s.pending, s.acked_at) == (2, b"bb\n", 1.0)
    s.ack(0, 5, now=2.0)  # an old epoch's acknowledgement moves nothing
    assert s.base == 2
    s.add(b"x" * 9, max_pending=10, epoch=3)  # too far behind: a new epoch from 0
    assert (s.epoch, s.base, s.pending) == (3, 0, b"x" * 9)
