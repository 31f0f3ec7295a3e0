"""The metering rig's `stream` upstream (tests.support.metering_rig): an upstream that says what
a call cost where streamed answers say it, after their head. Raw bytes, since no HTTP library
at hand writes trailers. Each request on a connection is answered by its query:

- `trailer=N` (an `X-Units-Used` trailer line each) and `head=N` (a line in the head instead):
  a chunked JSON body of `bytes=N` padding (default 10), in chunks of 16 KiB; `cut` (the
  trailer's lines and one more, then the connection closes before the terminator),
  `trailer_kib=N` (N lines of 1 KiB after the trailer's);
- `usage=TEXT`: a JSON body `{"usage": {"total_tokens": TEXT}, "pad": ...}` (TEXT as JSON
  text: `12`, `12.5`, `"12"`; `usage=` with nothing leaves the field out, `usage=<` sends a
  body that is not JSON), with a length; gzip-compressed when the request accepts gzip;
- `events=N`: a `text/event-stream` of N token events, then `{"usage": {"total_tokens":
  TEXT}}` when `usage=TEXT` is given, then `[DONE]`, chunked, in pieces of `split=K` bytes;
- `messages=IN,OUT`: a stream in the shape of Anthropic's Messages API, the input tokens in
  its first event and the output tokens in its last `message_delta`;
- `hang`: after the first chunk (of events: before the usage event) nothing more is sent
  until the gateway closes the connection;
- `raw=NAME`: the answer a test put in `RAW_ANSWERS[NAME]`, head and all, byte for byte, in
  pieces of `split=K` bytes (default: at once); then, with `cut`, the connection closes, and
  with `hang`, nothing more is sent until the gateway closes it (noted in `HUNG_UP`).
"""

from __future__ import annotations

import gzip
import json
from urllib.parse import parse_qs, urlsplit

from tests.support.raw_upstream import Peer

__all__ = ["HUNG_UP", "RAW_ANSWERS", "reporting_upstream"]

# The exact bytes of answers a test chooses (`raw=NAME`): line ends, framing and event shapes
# that no generator above writes.
RAW_ANSWERS: dict[str, bytes] = {}
# The names of the raw answers whose hanging connection the gateway closed.
HUNG_UP: set[str] = set()


async def reporting_upstream(peer: Peer) -> None:
    reader = peer.reader
    while head := await reader.readuntil(b"\r\n\r\n"):
        query = parse_qs(urlsplit(head.split(b" ", 2)[1].decode()).query, keep_blank_values=True)
        if "raw" in query:
            done = await _raw(peer, query)
        elif "messages" in query:
            done = await _messages(peer, query)
        elif "events" in query:
            done = await _events(peer, query)
        elif "usage" in query:
            done = await _json_body(peer, query, b"accept-encoding: gzip" in head.lower())
        else:
            done = await _trailing(peer, query)
        if done:
            return


async def _trailing(peer: Peer, query: dict[str, list[str]]) -> bool:
    body = json.dumps({"pad": "x" * int(query.get("bytes", ["10"])[0])}).encode()
    lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", b"Transfer-Encoding: chunked"]
    lines += [b"X-Units-Used: " + value.encode() for value in query.get("head", [])]
    peer.writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    for at in range(0, len(body), 16384):
        await _chunk(peer, body[at : at + 16384])
        if "hang" in query:
            await peer.reader.read()  # until the gateway closes
            return True
    trailer = b"".join(b"X-Units-Used: %s\r\n" % v.encode() for v in query.get("trailer", []))
    padding = int(query.get("trailer_kib", ["0"])[0])
    trailer += b"".join(b"X-Pad-%04d: %s\r\n" % (n, b"p" * 1010) for n in range(padding))
    if "cut" in query:
        # A line after the report, so that the parser has read the report's line whole.
        await peer.send(b"0\r\n" + trailer + b"X-After: 1\r\n")
        return True  # closed before the terminator
    await peer.send(b"0\r\n" + trailer + b"\r\n")
    return False


async def _json_body(peer: Peer, query: dict[str, list[str]], gzipped: bool) -> bool:
    usage = query["usage"][0]
    pad = "x" * int(query.get("bytes", ["10"])[0])
    if usage == "<":
        body = b"<html>not JSON</html>"
    elif usage:
        body = b'{"usage": {"total_tokens": %s}, "pad": "%s"}' % (usage.encode(), pad.encode())
    else:
        body = b'{"usage": {}, "pad": "%s"}' % pad.encode()
    lines = [b"HTTP/1.1 200 OK", b"Content-Type: application/json; charset=utf-8"]
    if gzipped:
        body = gzip.compress(body)
        lines.append(b"Content-Encoding: gzip")
    lines.append(b"Content-Length: %d" % len(body))
    await peer.send(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    return False


async def _events(peer: Peer, query: dict[str, list[str]]) -> bool:
    events = [
        b'data: {"choices": [{"text": "token %d"}]}\n\n' % n for n in range(int(query["events"][0]))
    ]
    stream = b"".join(events)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    peer.writer.write(head)
    split = int(query.get("split", ["16384"])[0])
    for at in range(0, len(stream), split):
        await _chunk(peer, stream[at : at + split])
    if "hang" in query:
        await peer.reader.read()  # until the gateway closes
        return True
    ending = b""
    if "usage" in query:
        # A multi-line data field, CRLF line ends: one JSON document over two data lines.
        ending += (
            b'data: {"usage":\r\ndata: {"total_tokens": %s}}\r\n\r\n' % query["usage"][0].encode()
        )
    ending += b"data: [DONE]\n\n"
    for at in range(0, len(ending), split):
        await _chunk(peer, ending[at : at + split])
    await peer.send(b"0\r\n\r\n")
    return False


async def _messages(peer: Peer, query: dict[str, list[str]]) -> bool:
    """A stream in the shape of Anthropic's Messages API: the input tokens in its first
    event (under `message`), the output tokens so far in each `message_delta`, the last one
    final; `messages=IN,OUT`."""
    given, taken = query["messages"][0].split(",")
    events = [
        b'event: message_start\ndata: {"type": "message_start", "message": {"id": "m1", '
        b'"usage": {"input_tokens": %s, "output_tokens": 1}}}\n\n' % given.encode(),
        *(
            b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": '
            b'{"text": "token %d"}}\n\n' % n
            for n in range(5)
        ),
        b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 2}}\n\n',
        b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": %s}}\n\n'
        % taken.encode(),
        b'event: message_stop\ndata: {"type": "message_stop"}\n\n',
    ]
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    peer.writer.write(head)
    for event in events:
        await _chunk(peer, event)
    await peer.send(b"0\r\n\r\n")
    return False


async def _raw(peer: Peer, query: dict[str, list[str]]) -> bool:
    answer = RAW_ANSWERS[query["raw"][0]]
    split = int(query.get("split", [str(len(answer))])[0])
    for at in range(0, len(answer), split):
        await peer.send(answer[at : at + split])
    if "hang" in query:
        await peer.reader.read()  # until the gateway closes
        HUNG_UP.add(query["raw"][0])
    return "cut" in query or "hang" in query


async def _chunk(peer: Peer, data: bytes) -> None:
    await peer.send(b"%x\r\n%s\r\n" % (len(data), data))
