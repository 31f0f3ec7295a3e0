"""The access log line (README, "Access log"): one JSON object per request, no key, no query
string."""

from __future__ import annotations

import asyncio
import json
import os
import random
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


def test_bytes_of_a_path_that_are_not_utf8_are_logged_percent_encoded() -> None:
    """The HTTP layer keeps them as lone surrogates: JSON could write those, but no reader of
    the log could decode them (jq and Node make them U+FFFD)."""
    record = proxied_record()
    record.path = b"/weather/x\xffy/caf\xc3\xa9".decode("utf-8", "surrogateescape")
    line = accesslog.format_access_log(record)
    line.encode("utf-8")  # no lone surrogate left
    assert json.loads(line)["path"] == "/weather/x%FFy/café"


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


class RecordingStdout:
    """Stands in for sys.stdout: keeps each write separately."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def numbered_record(number: int) -> RequestRecord:
    record = proxied_record()
    record.request_id = f"req-{number}"
    return record


async def test_a_serving_worker_writes_whole_lines_in_batches_of_at_most_pipe_buf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    accesslog.start_batching(asyncio.get_running_loop())
    try:
        for number in range(100):
            accesslog.write_access_log(numbered_record(number))
        written_before_stop = len(stdout.writes)
    finally:
        accesslog.stop_batching()

    line_size = len(accesslog.format_access_log(numbered_record(50))) + 1
    per_batch = accesslog.BATCH_BYTES // line_size
    # Fewer writes than lines: a batch is written when the next line would not fit.
    assert written_before_stop == 100 // per_batch
    assert len(stdout.writes) == -(-100 // per_batch)
    for text in stdout.writes:
        assert len(text.encode()) <= accesslog.BATCH_BYTES and text.endswith("\n")
    ids = [json.loads(line)["request_id"] for line in "".join(stdout.writes).splitlines()]
    assert ids == [f"req-{number}" for number in range(100)]


async def test_a_batch_is_written_by_its_timer_with_no_more_lines_coming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(accesslog, "FLUSH_INTERVAL", 0.05)
    accesslog.start_batching(asyncio.get_running_loop())
    try:
        accesslog.write_access_log(numbered_record(1))
        assert stdout.writes == []
        for _ in range(100):
            if stdout.writes:
                break
            await asyncio.sleep(0.02)
        assert len(stdout.writes) == 1
        accesslog.write_access_log(numbered_record(2))  # the timer goes on after a batch
        for _ in range(100):
            if len(stdout.writes) == 2:
                break
            await asyncio.sleep(0.02)
        assert [json.loads(text)["request_id"] for text in stdout.writes] == ["req-1", "req-2"]
    finally:
        accesslog.stop_batching()


async def test_a_line_longer_than_pipe_buf_is_written_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    long_record = numbered_record(2)
    long_record.path = "/" + "a" * accesslog.BATCH_BYTES
    accesslog.start_batching(asyncio.get_running_loop())
    try:
        accesslog.write_access_log(numbered_record(1))
        accesslog.write_access_log(long_record)
        accesslog.write_access_log(numbered_record(3))
    finally:
        accesslog.stop_batching()

    assert [json.loads(text)["request_id"] for text in stdout.writes] == ["req-1", "req-2", "req-3"]


async def test_after_the_last_worker_stops_lines_are_written_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    loop = asyncio.get_running_loop()
    accesslog.start_batching(loop)
    accesslog.start_batching(loop)  # two workers in one process
    accesslog.write_access_log(numbered_record(1))
    accesslog.stop_batching()  # writes what it gathered; the other worker still batches
    accesslog.write_access_log(numbered_record(2))
    assert len(stdout.writes) == 1
    accesslog.stop_batching()
    accesslog.write_access_log(numbered_record(3))  # no worker serves: at once

    assert [json.loads(text)["request_id"] for text in stdout.writes] == ["req-1", "req-2", "req-3"]


def test_a_reader_gone_costs_lines_not_the_process() -> None:
    script = (
        "import os\n"
        "from gateway.accesslog import write_access_log\n"
        "from gateway.record import RequestRecord\n"
        "for _ in range(3):\n"
        "    write_access_log(RequestRecord(request_id='x', method='GET', path='/', start=0.0))\n"
        "os.write(2, b'still running\\n')\n"
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every write fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != accesslog.ACCESS_LOG_ENV},
        )
    finally:
        os.close(write_end)

    assert done.returncode == 0, done.stderr
    assert done.stderr.count("access log: cannot write to stdout") == 1
    assert done.stderr.endswith("still running\n")


def reference_line(record: RequestRecord) -> str:
    """The line as json.dumps writes the same object: the format the log promises."""
    upstream = record.upstream_duration
    entry: dict[str, object] = {
        "time": accesslog.format_time(record.start),
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path.split("?", 1)[0],
        "status": record.status,
        "code": record.code,
        "product": record.product,
        "route": record.route,
        "key": record.key_name,
        "plan": record.plan,
        "duration_ms": round(record.duration * 1000.0, 3),
        "upstream_ms": None if upstream is None else round(upstream * 1000.0, 3),
        "bytes_sent": record.bytes_sent,
    }
    if record.bytes_received is not None:
        entry["bytes_received"] = record.bytes_received
    return json.dumps(entry, separators=(",", ":"))


def test_lines_are_what_json_dumps_writes_for_random_records() -> None:
    chooser = random.Random(13)
    texts = ["", "soccer", "/soccer/{rest:path}", 'quo"te', "back\\slash", "ünï", "tab\tnl\n"]
    durations = [0.0, 0.0004, 0.0005, 0.0015, 1e-9, 0.1, 1.0, 2.5, 30.0, 86_400.0 * 365]
    for _ in range(5000):
        record = RequestRecord(
            request_id=f"{chooser.getrandbits(128):032x}",
            method=chooser.choice(["GET", "POST", "OTHER"]),
            path=chooser.choice(["/a", "/a?key=s3cret", "/" + chooser.choice(texts)]),
            start=chooser.uniform(0, 4e9),
            status=chooser.choice([200, 404, 429, 499, 503]),
            code=chooser.choice(texts),
            product=chooser.choice(texts),
            route=chooser.choice(texts),
            key_name=chooser.choice(texts),
            plan=chooser.choice(texts),
            duration=chooser.choice([*durations, chooser.uniform(0, 60)]),
            upstream_duration=chooser.choice([None, *durations, chooser.expovariate(100)]),
            bytes_sent=chooser.randrange(10**9),
            bytes_received=chooser.choice([None, chooser.randrange(10**9)]),
        )
        assert accesslog.format_access_log(record) == reference_line(record)
