"""Header and query hygiene between client and upstream (README, "Headers")."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.http.headers import (
    HOP_BY_HOP,
    client_response_head,
    decoded_lines,
    extra_headers,
    interim_head,
    request_drop_set,
    strip_query_param,
    switching_protocols_head,
    upstream_header_lines,
)


def _to_upstream(
    lines: list[tuple[str, str]], client_ip: str | None = "192.0.2.7"
) -> CIMultiDictProxy[str]:
    """upstream_header_lines over text lines, read back as a multidict."""
    raw = [(name.encode(), value.encode()) for name, value in lines]
    out = upstream_header_lines(
        raw, request_drop_set("X-API-Key"), b"backend:9000", client_ip, "https", "rid-1"
    )
    return decoded_lines(out)


def test_connection_cannot_remove_message_framing() -> None:
    out = _to_upstream([("Connection", "content-length"), ("Content-Length", "5")])
    assert out.getall("Content-Length") == ["5"]


def test_request_drops_hop_by_hop_named_and_key_headers() -> None:
    lines = [(name.title(), "v") for name in HOP_BY_HOP]
    lines += [("Connection", "X-Hop"), ("X-Hop", "1"), ("x-api-key", "secret"), ("Accept", "*/*")]
    out = _to_upstream(lines)
    assert {name.lower() for name in out} == {
        "accept",
        "host",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
    }


def test_request_gets_the_gateways_forwarding_view() -> None:
    out = _to_upstream(
        [
            ("Host", "api.example.com"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2, 10.0.0.3"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Request-ID", "client-chosen"),
        ]
    )
    assert out.getall("Host") == ["backend:9000"]
    assert out.getall("X-Forwarded-For") == ["10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["api.example.com"]
    assert out.getall("X-Request-ID") == ["rid-1"]


def test_request_without_host_or_peer_invents_neither() -> None:
    out = _to_upstream([("Accept", "*/*")], client_ip=None)
    assert "X-Forwarded-Host" not in out
    assert "X-Forwarded-For" not in out
    assert out.getall("Forwarded") == ["for=unknown;proto=https"]


def test_forwarded_gets_the_gateways_element_after_the_clients() -> None:
    """RFC 7239: the client's elements stay (as X-Forwarded-For's do), and the gateway's own
    comes last, where an upstream that trusts the gateway reads it; an audit found the
    client's Forwarded passed on alone, its made-up `for` and `proto` the only ones there."""
    out = _to_upstream([("Host", "api.example.com:8443"), ("Forwarded", "for=1.1.1.1;proto=https")])
    assert out.getall("Forwarded") == [
        'for=1.1.1.1;proto=https, for=192.0.2.7;host="api.example.com:8443";proto=https'
    ]
    ipv6 = _to_upstream([("Host", "a")], client_ip="2001:db8::1")
    assert ipv6.getall("Forwarded") == ['for="[2001:db8::1]";host="a";proto=https']


def test_forwarding_headers_the_client_calls_hop_by_hop_are_not_passed_on() -> None:
    out = _to_upstream(
        [
            ("Connection", "X-Forwarded-For, Forwarded"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("Forwarded", "for=1.2.3.4"),
        ]
    )
    assert out.getall("X-Forwarded-For") == ["192.0.2.7"]
    assert out.getall("Forwarded") == ["for=192.0.2.7;proto=https"]


def test_request_keeps_repeated_lines_in_order() -> None:
    out = _to_upstream([("X-Custom", "one"), ("Cookie", "a=1"), ("x-custom", "two")])
    assert out.getall("X-Custom") == ["one", "two"]
    assert out.getall("Cookie") == ["a=1"]


def client_response_headers(
    lines: list[tuple[str, str]], extra: dict[str, str] | None = None
) -> CIMultiDict[str]:
    """client_response_head's block as a multidict, without the Date line it adds."""
    extra_lines = extra_headers(extra) if extra else None
    head = client_response_head([(n.encode(), v.encode()) for n, v in lines], extra_lines)
    parsed = CIMultiDict[str]()
    for line in head.block.decode().split("\r\n")[:-1]:
        name, _, value = line.partition(": ")
        if name != "Date" or any(n == "Date" for n, _ in lines):
            parsed.add(name, value)
    return parsed


def test_response_drops_hop_by_hop_and_keeps_repeated_lines() -> None:
    out = client_response_headers(
        [
            ("Set-Cookie", "a=1"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Set-Cookie", "b=2"),
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "private"),
            ("Content-Length", "12"),
        ]
    )
    assert list(out.items()) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Cache-Control", "no-cache"),
        ("Cache-Control", "private"),
        ("Content-Length", "12"),
    ]


def test_response_extra_headers_replace_the_upstreams() -> None:
    out = client_response_headers(
        [("X-Request-ID", "upstream"), ("X-RateLimit-Limit", "999"), ("ETag", '"x"')],
        {"X-Request-ID": "rid-1", "X-RateLimit-Limit": "10"},
    )
    assert out.getall("X-Request-ID") == ["rid-1"]
    assert out.getall("X-RateLimit-Limit") == ["10"]
    assert out.getall("ETag") == ['"x"']


def test_response_length_next_to_chunked_is_dropped() -> None:
    out = client_response_headers([("Transfer-Encoding", "chunked"), ("Content-Length", "5")])
    assert list(out.items()) == []
    head = client_response_head([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")])
    assert head.content_length is None


def test_response_head_reports_the_length_and_adds_a_date_only_when_missing() -> None:
    head = client_response_head([(b"Content-Length", b"12"), (b"ETag", b'"x"')])
    assert head.content_length == 12
    assert head.block.startswith(b'Content-Length: 12\r\nETag: "x"\r\nDate: ')
    dated = client_response_head([(b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT")])
    assert dated.block == b"Date: Tue, 01 Jan 2030 00:00:00 GMT\r\n"
    assert dated.content_length is None


def test_response_head_notes_the_keep_alive_it_drops() -> None:
    """For the connection pool (its `timeout=N`), from the one look at each line there is;
    lines joined, also when a Connection line has lines dropped the other way."""
    lines = [(b"Keep-Alive", b"timeout=5"), (b"A", b"1"), (b"Keep-Alive", b"max=100")]
    head = client_response_head(lines)
    assert head.keep_alive == b"timeout=5,max=100"
    assert head.block.startswith(b"A: 1\r\nDate: ")
    listed = client_response_head([(b"Connection", b"X-Hop"), (b"X-Hop", b"1"), *lines])
    assert listed.keep_alive == b"timeout=5,max=100"
    assert listed.block.startswith(b"A: 1\r\nDate: ")
    assert client_response_head([(b"A", b"1")]).keep_alive is None


def test_response_connection_listed_date_is_dropped_and_replaced() -> None:
    head = client_response_head(
        [(b"Connection", b"Date"), (b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT"), (b"A", b"1")]
    )
    assert b"2030" not in head.block
    assert head.block.startswith(b"A: 1\r\nDate: ")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ""),
        ("api_key=s", ""),
        ("a=1&api_key=s&b=2", "a=1&b=2"),
        ("api_key=s&a=1&api_key=t", "a=1"),
        ("api%5Fkey=s&a=1", "a=1"),
        ("api_key&a=1", "a=1"),
        ("API_KEY=keep&api_keys=keep&xapi_key=keep", "API_KEY=keep&api_keys=keep&xapi_key=keep"),
        ("b=%2F%20+&a=x%3Dy&api_key=s&c", "b=%2F%20+&a=x%3Dy&c"),
        ("a=1;api_key=s&b", "a=1;api_key=s&b"),  # `;` is not a separator for the key parser
    ],
)
def test_strip_query_param(query: str, expected: str) -> None:
    assert strip_query_param(query, "api_key") == expected


def test_strip_query_param_without_a_name_keeps_everything() -> None:
    assert strip_query_param("api_key=s&a=1", None) == "api_key=s&a=1"


def test_interim_head_keeps_its_lines_but_hop_by_hop_ones() -> None:
    lines = [
        (b"Link", b"</a.css>; rel=preload"),
        (b"Connection", b"X-Private"),
        (b"X-Private", b"secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Link", b"</b.js>; rel=preload"),
    ]
    assert interim_head(103, b"Early Hints", lines) == (
        b"HTTP/1.1 103 Early Hints\r\n"
        b"Link: </a.css>; rel=preload\r\n"
        b"Link: </b.js>; rel=preload\r\n\r\n"
    )
    assert interim_head(103, b"", []) == b"HTTP/1.1 103 Early Hints\r\n\r\n"
    assert interim_head(199, b"", []) == b"HTTP/1.1 199 Interim\r\n\r\n"


def test_switching_protocols_head_says_what_it_switched_to() -> None:
    lines = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        (b"Date", b"Tue, 01 Dec 2026 10:00:00 GMT"),
    ]
    head = switching_protocols_head(
        "Switching Protocols", lines, extra_headers({"X-Request-ID": "abc"})
    )
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
        b"X-Request-ID: abc\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


def test_switching_protocols_head_loses_the_upstreams_content_length() -> None:
    """A 1xx may not carry a Content-Length (RFC 9110 8.6): the interim answers lost theirs,
    the 101 kept it, and a client could read that many bytes of the new protocol as its body."""
    lines = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Content-Length", b"5"),
        (b"Date", b"Tue, 01 Dec 2026 10:00:00 GMT"),
    ]
    head = switching_protocols_head("Switching Protocols", lines, None)
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
