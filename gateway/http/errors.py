"""Every error the HTTP layer raises, as one tree.

    HttpError
    ├── RequestError                the client's request could not be read
    │   ├── MalformedRequest        not valid HTTP (or a head over the size limit)
    │   ├── PlainHttpOnTlsPort      plain HTTP sent to the port that speaks TLS
    │   ├── HeadTimeout             the request head did not arrive in time
    │   └── BodyTimeout             the request body stalled
    ├── SendTimeout                 the client took nothing of its answer in time
    └── UpstreamError               the server the client side talked to failed
        ├── ConnectError            refused, unresolvable, TLS handshake failed
        ├── ConnectTimeout          no connection in time
        ├── ResponseTimeout         no answer head in time (or the request body not taken)
        ├── ServerDisconnected      closed or reset before its answer head
        ├── MalformedResponse       what came back is not HTTP
        ├── RequestBodyFailed       the request body's source failed while it was sent
        └── ResponseBodyError       failed after the answer head: the answer can only be cut

A client that goes away is a `ConnectionResetError`, as asyncio reports it everywhere else.
The messages describe the failure only ("connection refused"); whoever maps an error to an
answer adds what the failure means to its own users.
"""

from __future__ import annotations


class HttpError(Exception):
    """Base of every error of the HTTP layer; `str()` says what happened, in lower case."""


class RequestError(HttpError):
    """The client's request could not be read."""


class MalformedRequest(RequestError):
    pass


class PlainHttpOnTlsPort(RequestError):
    def __init__(self) -> None:
        super().__init__("plain HTTP was sent to the port that speaks HTTPS")


class HeadTimeout(RequestError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request head did not arrive within {seconds:g}s")
        self.seconds = seconds


class BodyTimeout(RequestError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body stalled for more than {seconds:g}s")
        self.seconds = seconds


class SendTimeout(HttpError):
    """The client received nothing of what was written to it for `seconds`: it stopped
    reading (one that reads slowly but steadily is never this)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the client took nothing of its answer for {seconds:g}s")
        self.seconds = seconds


class UpstreamError(HttpError):
    """The server at the other end of a client connection failed."""


class ConnectError(UpstreamError):
    pass


class ConnectTimeout(UpstreamError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no connection within {seconds:g}s")
        self.seconds = seconds


class ResponseTimeout(UpstreamError):
    def __init__(self, seconds: float, *, during_upload: bool = False) -> None:
        what = "did not accept the request body" if during_upload else "did not answer"
        super().__init__(f"{what} within {seconds:g}s")
        self.seconds = seconds
        self.during_upload = during_upload


class ServerDisconnected(UpstreamError):
    pass


class MalformedResponse(UpstreamError):
    pass


class RequestBodyFailed(UpstreamError):
    """The request body's source raised; `__cause__` is what it raised, when there was one."""


class ResponseBodyError(UpstreamError):
    pass
