"""The claim on listen addresses, within one process: a second claim of an address finds the
first (the same as another gateway would, but for the pid it names)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from gateway import listen_claim
from gateway.config.model import Address
from tests.support.sockets import free_port


@pytest.fixture(autouse=True)
def released() -> Iterator[None]:
    yield
    listen_claim.release()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("::1", "LOCALHOST."),
        ("127.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "::"),
    ],
)
def test_one_address_however_spelled_is_claimed_once(first: str, second: str) -> None:
    port = free_port()
    assert listen_claim.claim([("server.listen", Address(first, port))]) is None
    refused = listen_claim.claim([("server.admin_listen", Address(second, port))])
    assert refused == (
        f"server.admin_listen: cannot listen on {Address(second, port)}: Address already in use "
        f"(gateway pid {os.getpid()} is starting or serving there)"
    )


@pytest.mark.parametrize(("first", "second"), [("127.0.0.1", "127.0.0.2"), ("127.0.0.1", "::1")])
def test_other_hosts_on_one_port_are_claimed_apart(first: str, second: str) -> None:
    port = free_port()
    assert listen_claim.claim([("server.listen", Address(first, port))]) is None
    assert listen_claim.claim([("server.admin_listen", Address(second, port))]) is None


def test_a_released_claim_can_be_made_again() -> None:
    port = free_port()
    assert listen_claim.claim([("server.listen", Address("localhost", port))]) is None
    listen_claim.release()
    assert listen_claim.claim([("server.listen", Address("127.0.0.1", port))]) is None


def test_port_zero_is_never_claimed() -> None:
    assert listen_claim.claim([("server.listen", Address("127.0.0.1", 0))]) is None
    assert listen_claim.claim([("server.listen", Address("127.0.0.1", 0))]) is None


def test_a_claim_asked_about_again_and_again_still_answers() -> None:
    """Nothing accepts the askers' connections: once the holder's queue was full, the next
    gateway started on the port waited to connect for good (the third attempt hung)."""
    port = free_port()
    assert listen_claim.claim([("server.listen", Address("127.0.0.1", port))]) is None
    answers: list[str | None] = []

    def ask() -> None:
        for _ in range(40):
            answers.append(listen_claim.claim([("server.listen", Address("127.0.0.1", port))]))

    asking = threading.Thread(target=ask, daemon=True)  # daemon: a hung connect must not
    asking.start()  # keep the test run from ending
    asking.join(10)
    assert not asking.is_alive(), f"hung after {len(answers)} answers"
    assert all(answer and "Address already in use" in answer for answer in answers)
    assert f"(gateway pid {os.getpid()} is" in str(answers[0])
    assert "(another gateway is starting or serving there)" in str(answers[-1])
