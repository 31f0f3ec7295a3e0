"""What a TLS ClientHello offers: enough of it to refuse a client that speaks only TLS 1.0 or
1.1 with the alert that says so.

The proxy port speaks TLS 1.2 and 1.3. OpenSSL refuses an older client in the handshake and
queues a protocol_version alert, but the event loop's TLS protocol closes the connection
before that alert leaves (uvloop's and asyncio's alike), so such a client saw the connection
end with no reason ("unexpected EOF") instead of "protocol version". The gateway reads the
versions a ClientHello offers itself (RFC 8446 4.1.2 and 4.2.1; RFC 5246 7.4.1.2 before it)
and writes that alert (RFC 8446 6.2) before closing.
"""

from __future__ import annotations

# A TLS record: type(1) legacy_version(2) length(2); a handshake: type(1) length(3).
_RECORD_HEADER = 5
_CLIENT_HELLO = 1
_SUPPORTED_VERSIONS = 0x002B
_TLS_1_2 = 0x0303

# alert(21), TLS 1.0 as the record's version (what a server answering a client it cannot
# serve puts there: any client reads it), length 2, fatal(2) protocol_version(70).
PROTOCOL_VERSION_ALERT = bytes((0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46))


def offers_only_old_versions(data: bytes) -> bool:
    """Whether `data`, a connection's first bytes, hold a ClientHello that offers no TLS
    version from 1.2 on. False whenever that cannot be told from `data` (cut short, not a
    ClientHello, malformed): the TLS library then judges the handshake as it comes."""
    try:
        return _highest_version(data) < _TLS_1_2
    except (IndexError, ValueError):
        return False


def _highest_version(data: bytes) -> int:
    length = int.from_bytes(data[3:5])
    record = data[_RECORD_HEADER : _RECORD_HEADER + length]
    if len(record) < length or record[0] != _CLIENT_HELLO:
        raise ValueError("not a whole ClientHello in one record")
    hello = record[4 : 4 + int.from_bytes(record[1:4])]
    legacy_version = int.from_bytes(hello[0:2])
    at = 2 + 32  # the version, the random
    at += 1 + hello[at]  # session id
    at += 2 + int.from_bytes(hello[at : at + 2])  # cipher suites
    at += 1 + hello[at]  # compression methods
    if at == len(hello):
        return legacy_version  # no extensions: SSL 3.0 style, or TLS 1.0-1.2
    end = at + 2 + int.from_bytes(hello[at : at + 2])
    at += 2
    while at + 4 <= end:
        kind = int.from_bytes(hello[at : at + 2])
        size = int.from_bytes(hello[at + 2 : at + 4])
        body = hello[at + 4 : at + 4 + size]
        if kind == _SUPPORTED_VERSIONS:
            # A list of 2-byte versions after its length byte; GREASE values (0x?a?a) are
            # higher than any real one but never offered alone.
            versions = [int.from_bytes(body[i : i + 2]) for i in range(1, 1 + body[0], 2)]
            return max((v for v in versions if v & 0x0F0F != 0x0A0A), default=0)
        at += 4 + size
    return legacy_version
