"""The access log line (README, "Access log"): one JSON object per request, no key, no query
string."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from gateway import accesslog
from gateway.record import RequestRecord
from tests.support.paths import REPO_ROOT

RFC3339_MS_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


@pytest.fixture(autouse=True)
def _log_enabled() -> Iterator[None]:
    before = accesslog.access_log_enabled()
    accesslog.set_access_log_enabled(True)
    yield
    accesslog.set_access_log_enabled(before)


def proxied_record() -> RequestRecord:
    return RequestRecord(
        request_id="req-1",
        method="GET",
        path="/soccer/v4/en/competitions/sr:competition:17/info.json",
        start=1714564800.25,  # 2024-05-01T12:00:00.250Z
        status=200,
        code="upstream",
        product="soccer",
        route="/soccer/v4/{lang}/competitions/{competition_id}/info.json",
        key_name="acme-trial",
        plan="trial",
        limit_outcome="allowed",
        duration=0.0123456,
        upstream_duration=0.0101,
        bytes_sent=512,
    )


def test_a_proxied_request_is_one_json_object_with_every_field() -> None:
    line = accesslog.format_access_log(proxied_record())

    assert "\n" not in line
    entry = json.loads(line)
    assert entry == {
        "time": "2024-05-01T12:00:00.250Z",
        "request_id": "req-1",
        "method": "GET",
        "path": "/soccer/v4/en/competitions/sr:competition:17/info.json",
        "status": 200,
        "code": "upstream",
        "product": "soccer",
        "route": "/soccer/v4/{lang}/competitions/{competition_id}/info.json",
        "key": "acme-trial",
        "plan": "trial",
        "duration_ms": 12.346,
        "upstream_ms": 10.1,
        "bytes_sent": 512,
    }


def test_a_request_answered_by_the_gateway_has_null_upstream_ms() -> None:
    record = RequestRecord(request_id="r", method="GET", path="/nowhere", start=0.5)
    record.status, record.code, record.duration = 404, "invalid_route", 0.0004

    entry = json.loads(accesslog.format_access_log(record))

    assert entry["upstream_ms"] is None
    assert entry["product"] == "" and entry["route"] == "" and entry["key"] == ""
    assert entry["time"] == "1970-01-01T00:00:00.500Z"
    assert entry["duration_ms"] == 0.4


def test_a_query_string_never_reaches_the_log() -> None:
    record = proxied_record()
    record.path = "/soccer/v4/en/info.json?api_key=s3cret-key&limit=5"

    line = accesslog.format_access_log(record)

    assert "s3cret-key" not in line
    assert json.loads(line)["path"] == "/soccer/v4/en/info.json"


@pytest.mark.parametrize(
    ("unix_time", "expected"),
    [
        (1714564800.3, "2024-05-01T12:00:00.300Z"),
        (1714564800.9996, "2024-05-01T12:00:00.999Z"),
        (1714564799.001, "2024-05-01T11:59:59.001Z"),
    ],
)
def test_time_is_rfc3339_utc_with_milliseconds(unix_time: float, expected: str) -> None:
    assert accesslog.format_time(unix_time) == expected
    assert RFC3339_MS_UTC.fullmatch(expected)


def test_write_puts_one_line_per_request_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    accesslog.write_access_log(proxied_record())
    accesslog.write_access_log(proxied_record())

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert out.endswith("\n") and len(lines) == 2
    assert all(json.loads(line)["request_id"] == "req-1" for line in lines)


def test_a_disabled_log_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    accesslog.set_access_log_enabled(False)

    accesslog.write_access_log(proxied_record())

    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("setting", "lines"), [("off", 0), ("OFF", 0), ("on", 1), (None, 1)])
def test_the_environment_variable_turns_the_log_off(setting: str | None, lines: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != accesslog.ACCESS_LOG_ENV}
    if setting is not None:
        env[accesslog.ACCESS_LOG_ENV] = setting
    script = (
        "from gateway.accesslog import write_access_log\n"
        "from gateway.record import RequestRecord\n"
        "write_access_log(RequestRecord(request_id='x', method='GET', path='/', start=0.0))\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )

    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == lines
