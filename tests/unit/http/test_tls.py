"""Server contexts from PEM files: every file that cannot serve is named, in the config too."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.http.tls import (
    CertificateSwitch,
    TlsFileError,
    certificate_warnings,
    server_context,
)
from tests.support.certificates import (
    make_certificate,
    make_chain,
    make_expired_certificate,
    make_signed_certificate,
    valid_now,
)

PRODUCTS = """
products:
  shop:
    upstream: {url: "http://127.0.0.1:9000"}
    routes:
      - path: /shop
"""


def test_context_speaks_tls_12_and_13_and_http11(tmp_path: Path) -> None:
    made = make_certificate(tmp_path)
    context = server_context(str(made.cert), str(made.key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3)


def test_key_of_another_certificate_is_named(tmp_path: Path) -> None:
    first = make_certificate(tmp_path, "first")
    second = make_certificate(tmp_path, "second")
    with pytest.raises(TlsFileError) as caught:
        server_context(str(first.cert), str(second.key))
    assert caught.value.role == "key"
    assert str(caught.value) == f"{second.key} does not belong to the certificate {first.cert}"


@pytest.mark.parametrize("algorithm", ["RSA", "ED25519"])
def test_a_key_of_another_type_than_the_certificate_is_named_as_not_belonging(
    tmp_path: Path, algorithm: str
) -> None:
    """An RSA (or Ed25519) key beside a P-256 certificate, as after a renewal that changed the
    key type: OpenSSL files the key in another slot than the certificate and says
    NO_CERTIFICATE_ASSIGNED, which was reported as a key that is "not a usable private key"."""
    made = make_certificate(tmp_path)
    other = tmp_path / f"{algorithm.lower()}.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", algorithm, "-out", str(other)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(TlsFileError) as caught:
        server_context(str(made.cert), str(other))
    assert caught.value.role == "key"
    assert str(caught.value) == f"{other} does not belong to the certificate {made.cert}"


@pytest.mark.parametrize("role", ["cert", "key"])
def test_a_named_pipe_is_refused_rather_than_waited_on(tmp_path: Path, role: str) -> None:
    """Opening a named pipe waits for a writer: `gateway check`, a start or a reload (and every
    reload after it, which waits its turn) waited for good on one named as a certificate."""
    made = make_certificate(tmp_path)
    pipe = tmp_path / f"pipe.{role}"
    os.mkfifo(pipe)
    cert, key = (pipe, made.key) if role == "cert" else (made.cert, pipe)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            server_context(str(cert), str(key))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        # A writer that opens and closes at once ends the wait (an empty read) of the reader.
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"opening the named pipe {pipe} as the {role} waited for a writer")
    [error] = outcome
    assert isinstance(error, TlsFileError)
    assert error.role == role
    assert str(error) == f"{pipe} cannot be read: it is a named pipe, not a file"


def test_key_and_certificate_swapped_are_named(tmp_path: Path) -> None:
    made = make_certificate(tmp_path)
    with pytest.raises(TlsFileError) as caught:
        server_context(str(made.key), str(made.cert))
    assert caught.value.role == "cert"
    assert str(caught.value) == f"{made.key} is not a PEM certificate"


def test_unreadable_key_is_named(tmp_path: Path) -> None:
    made = make_certificate(tmp_path)
    # A folder in place of the key: unreadable even for root, who reads any file.
    with pytest.raises(TlsFileError) as caught:
        server_context(str(made.cert), str(tmp_path))
    assert caught.value.role == "key"
    assert str(caught.value) == f"{tmp_path} cannot be read: Is a directory"


def test_an_encrypted_key_is_named_and_never_prompts_for(tmp_path: Path) -> None:
    """OpenSSL asks a terminal for the passphrase (a gateway started with one waited there for
    good), or, without one, failed in a way that named the certificate."""
    made = make_certificate(tmp_path)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(made.key), "-aes256", "-passout", "pass:abc",
         "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    with pytest.raises(TlsFileError) as caught:
        server_context(str(made.cert), str(encrypted))
    assert caught.value.role == "key"
    assert (
        str(caught.value) == f"{encrypted} is encrypted: the gateway takes a key without passphrase"
    )


@pytest.mark.parametrize("cut", ["cert", "key"])
def test_a_cut_file_is_the_one_named(tmp_path: Path, cut: str) -> None:
    """Cut after its PEM header: OpenSSL's error has no reason then, and a cut key was blamed
    on the certificate."""
    made = make_certificate(tmp_path)
    broken = tmp_path / f"cut.{cut}"
    broken.write_bytes((made.cert if cut == "cert" else made.key).read_bytes()[:100])
    cert, key = (broken, made.key) if cut == "cert" else (made.cert, broken)
    with pytest.raises(TlsFileError) as caught:
        server_context(str(cert), str(key))
    assert caught.value.role == cut
    assert str(caught.value).startswith(f"{broken} is not a usable ")
    assert not str(caught.value).endswith("()")


def test_config_resolves_relative_paths_against_its_own_folder(tmp_path: Path) -> None:
    make_certificate(tmp_path / "conf" / "certs")
    config_file = tmp_path / "conf" / "gateway.yaml"
    config_file.write_text("server:\n  tls: {cert: certs/tls.crt, key: certs/tls.key}\n" + PRODUCTS)
    config = load_config(config_file, env={})
    assert config.server.tls is not None
    assert config.server.tls.cert == str(tmp_path / "conf" / "certs" / "tls.crt")
    assert isinstance(config.server.tls.context, ssl.SSLContext)


def test_config_names_the_key_that_does_not_match(tmp_path: Path) -> None:
    first = make_certificate(tmp_path, "first")
    second = make_certificate(tmp_path, "second")
    config_file = tmp_path / "gateway.yaml"
    tls = f"server:\n  tls: {{cert: {first.cert}, key: {second.key}}}\n"
    config_file.write_text(tls + PRODUCTS)
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, env={})
    assert [str(issue) for issue in caught.value.issues] == [
        f"{config_file}:2: server.tls.key: {second.key} does not belong to the certificate "
        f"{first.cert}"
    ]


def test_an_expired_certificate_is_loaded_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL loads an expired certificate without a word, and every client that checks
    certificates refuses each handshake: the load says so. It is not refused (nginx and Envoy
    load it too): a gateway whose certificate ran out would not start again after a restart."""
    expired = make_expired_certificate(tmp_path)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(
        f"server:\n  tls: {{cert: {expired.cert}, key: {expired.key}}}\n" + PRODUCTS
    )
    with caplog.at_level(logging.WARNING, logger="gateway.http.tls"):
        config = load_config(config_file, env={})
    assert config.server.tls is not None
    assert [record.getMessage() for record in caplog.records] == [
        f"the certificate file {expired.cert}: certificate 1 of 1 (CN=localhost) expired on "
        "2020-01-02 00:00:00 UTC: clients that check certificates refuse it"
    ]
    caplog.clear()
    fresh = make_certificate(tmp_path, "fresh", serial=3)
    config_file.write_text(f"server:\n  tls: {{cert: {fresh.cert}, key: {fresh.key}}}\n" + PRODUCTS)
    with caplog.at_level(logging.WARNING, logger="gateway.http.tls"):
        load_config(config_file, env={})
    assert caplog.records == []


def test_every_certificate_of_the_file_is_checked_the_intermediates_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain whose leaf is fine but whose intermediate ran out is refused by every client
    that builds the chain, and a leaf dated in the future (a clock off, a certificate issued
    for later) by every client that checks it: each is named, by its place and its CN."""
    chain = make_chain(
        tmp_path / "chain",
        leaf=("20990101000000Z", "20990301000000Z"),  # GeneralizedTime, from 2050 on
        intermediate=("20200101000000Z", "20200102000000Z"),
    )
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(f"server:\n  tls: {{cert: {chain.cert}, key: {chain.key}}}\n" + PRODUCTS)
    with caplog.at_level(logging.WARNING, logger="gateway.http.tls"):
        config = load_config(config_file, env={})
    assert config.server.tls is not None
    assert [record.getMessage() for record in caplog.records] == [
        f"the certificate file {chain.cert}: certificate 1 of 3 (CN=localhost) is not valid "
        "until 2099-01-01 00:00:00 UTC: clients that check certificates refuse it",
        f"the certificate file {chain.cert}: certificate 2 of 3 (CN=Test Intermediate CA) "
        "expired on 2020-01-02 00:00:00 UTC: clients that check certificates refuse it",
    ]

    caplog.clear()
    fine = make_chain(tmp_path / "fine", leaf=valid_now(), intermediate=valid_now())
    config_file.write_text(f"server:\n  tls: {{cert: {fine.cert}, key: {fine.key}}}\n" + PRODUCTS)
    with caplog.at_level(logging.WARNING, logger="gateway.http.tls"):
        load_config(config_file, env={})
    assert caplog.records == []


def test_a_certificate_is_named_by_its_place_alone_without_a_cn_and_by_a_cn_not_ascii(
    tmp_path: Path,
) -> None:
    expired = ("20200101000000Z", "20200102000000Z")
    nameless, _ = make_signed_certificate(tmp_path, "nameless", "/O=Example", None, expired)
    named, _ = make_signed_certificate(
        tmp_path, "named", "/O=Example/CN=Zürich Test CA", None, expired
    )
    both = tmp_path / "both.crt"
    both.write_text(nameless.read_text() + named.read_text())
    refused = "expired on 2020-01-02 00:00:00 UTC: clients that check certificates refuse it"
    assert certificate_warnings(str(both)) == [
        f"the certificate file {both}: certificate 1 of 2 {refused}",
        f"the certificate file {both}: certificate 2 of 2 (CN=Zürich Test CA) {refused}",
    ]


def test_switch_hands_new_handshakes_the_newest_context(tmp_path: Path) -> None:
    first = make_certificate(tmp_path, "first", serial=1)
    second = make_certificate(tmp_path, "second", serial=2)
    initial = server_context(str(first.cert), str(first.key))
    switch = CertificateSwitch(initial)
    assert switch.listener_context is initial
    renewed = server_context(str(second.cert), str(second.key))
    switch.use(renewed)
    # A handshake in memory, both ends ours: the client sees the renewed certificate.
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = switch.listener_context.wrap_bio(to_server, to_client, server_side=True)
    client = second.client_context().wrap_bio(to_client, to_server, server_hostname="localhost")
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
    peer = client.getpeercert()
    assert peer is not None and peer["serialNumber"] == second.serial
