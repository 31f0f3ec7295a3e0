"""The configuration loader: every mistake reported as `file:line: path: message`, and a good
configuration turned into exactly the `Config` it describes."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.config import (
    Address,
    ApiKey,
    AuthConfig,
    Config,
    ConfigError,
    ConfigIssue,
    Gone,
    Maintenance,
    PathParamRule,
    Plan,
    Product,
    QueryParamRule,
    QuotaRule,
    RateRule,
    Redirect,
    Route,
    ServerConfig,
    StorageConfig,
    Timeouts,
    Upstream,
    load_config,
    parse_duration,
)
from gateway.config.model import CostField
from gateway.config.products import parse_template
from gateway.limits.headers import LIMIT_HEADER_NAMES
from gateway.problems import REQUEST_ID_HEADER
from gateway.routing import RouteTable
from tests.support.config import MINIMAL_PRODUCTS, issues_of, write_config_file
from tests.support.paths import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "config"
EXPECT = "# expect: "


def expectations(fixture: Path) -> list[str]:
    """The `# expect: ...` lines at the top of a fixture, one per reported issue."""
    expected = []
    # Replaced, not refused: a fixture's own mistake may be a byte that is not UTF-8.
    for line in fixture.read_bytes().decode("utf-8", "replace").splitlines():
        if not line.startswith(EXPECT):
            break
        expected.append(line.removeprefix(EXPECT))
    return expected


BAD_FIXTURES = sorted(FIXTURES.glob("bad_*.yaml"))


def test_there_are_bad_fixtures_and_each_states_its_errors() -> None:
    assert len(BAD_FIXTURES) > 40
    for fixture in BAD_FIXTURES:
        assert expectations(fixture), f"{fixture.name} has no `{EXPECT}` header"


@pytest.mark.parametrize("fixture", BAD_FIXTURES, ids=lambda path: path.stem)
def test_bad_fixture_reports_exactly_its_errors(
    fixture: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Load by a relative name, as a user would, so the file in each message is predictable.
    monkeypatch.chdir(FIXTURES)
    assert issues_of(fixture.name) == expectations(fixture)


def test_several_mistakes_are_all_reported_in_line_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES)
    reported = issues_of("bad_several.yaml")
    assert len(reported) == 8
    lines = [int(issue.split(":")[1]) for issue in reported]
    assert lines == sorted(lines)


# -- the issue and the error ----------------------------------------------------------------


def test_issue_text_forms() -> None:
    issue = ConfigIssue("config/plans.yaml", 12, "plans.trial.quota.per", "must be one of x, y")
    assert str(issue) == "config/plans.yaml:12: plans.trial.quota.per: must be one of x, y"
    assert str(ConfigIssue("GATEWAY_REDIS_URL", None, "storage.url", "bad")) == (
        "GATEWAY_REDIS_URL: storage.url: bad"
    )
    assert str(ConfigIssue("a.yaml", 3, "", "not YAML")) == "a.yaml:3: not YAML"


def test_config_error_message_lists_every_issue() -> None:
    error = ConfigError(
        [ConfigIssue("a.yaml", 1, "x", "one"), ConfigIssue("b.yaml", 2, "y", "two")]
    )
    assert str(error) == "a.yaml:1: x: one\nb.yaml:2: y: two"
    assert len(error.issues) == 2


# -- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
        ("3", 3.0),
        (3, 3.0),
        (0.2, 0.2),
        ("0s", 0.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("2m500ms", 120.5),
    ],
)
def test_parse_duration(written: object, seconds: float) -> None:
    assert parse_duration(written) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "written",
    [
        *("2 days", "-1s", "1.5.2s", "", "ms", "1d", True, None, -3, float("inf"), [1]),
        *("1h30", "1hh", "1h-1m", "9" * 400 + "s", "9" * 400),
    ],
)
def test_parse_duration_refuses(written: object) -> None:
    with pytest.raises(ValueError, match="must be a duration like 250ms, 2s, 5m or 1h"):
        parse_duration(written)


# -- path templates -------------------------------------------------------------------------


def test_template_parameters_and_shape() -> None:
    template, problems = parse_template("/soccer/v4/{lang}/competitions/{id}/{rest:path}")
    assert problems == []
    assert template.params == ("lang", "id", "rest")
    assert template.shape == "/soccer/v4/{}/competitions/{}/{:path}"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/a/{x:int}", "{x:int}: unknown parameter kind 'int' (only {name:path})"),
        ("/a/{1x}", "{1x}: invalid parameter name '1x'"),
        ("/a//b", "must not contain an empty segment (//)"),
        ("/a/{x", "'{x': a parameter must fill a whole segment, like {name}"),
        ("/a?b=1", "must not contain ? or # (declare query parameters under `query`)"),
    ],
)
def test_template_problems(path: str, problem: str) -> None:
    assert parse_template(path)[1] == [problem]


# -- a good configuration -------------------------------------------------------------------

FULL_YAML = """\
server:
  listen: "[::1]:8081"
  admin_listen: 0.0.0.0:9091
  workers: 0
  drain_timeout: 5s
  timeouts: {client_header: 500ms, client_body: 2, keepalive: 1m}
storage:
  url: redis://127.0.0.1:6379/0
  timeout: 100ms
  on_error: allow
auth:
  header: X-Key
  query_param: null
products:
  soccer:
    upstream: &shared
      <<: {connect_timeout: 1s, timeout: 1h}
      url: https://data.example.com/base/
      timeout: 5s
    routes:
      - path: /soccer/v4/{lang}/info.json
        methods: [get, Post]
        params:
          lang: {enum: [en, 1, no], pattern: "[a-z0-9]+"}
        query:
          limit: {type: int, min: 1, max: 100, required: true}
          q: {min: 2, enum: [ab, ba], pattern: "[ab]+"}
      - path: /soccer/v3/{rest:path}
        gone: {sunset: 2026-01-01}
      - path: /soccer/v2/{rest:path}
        gone: true
      - path: /soccer/latest/{rest:path}
        redirect: {to: "/soccer/v4/{rest}", permanent: true}
  weather:
    upstream: {<<: *shared, url: "http://127.0.0.1:9000"}
    maintenance: true
    routes:
      - path: /weather/{city}
plans:
  free:
  fast:
    rate: {limit: 5, per: 200ms}
  monthly:
    rate: {limit: 10, per: minute}
    quota: {limit: 1000, per: month, timezone: Europe/Berlin}
keys:
  - name: acme.prod_1
    key_sha256: 9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08
    plans: {soccer: monthly, weather: fast}
  - name: demo
    key: open-sesame
    disabled: true
"""


def expected_full(path: str) -> Config:
    soccer = "soccer"
    return Config(
        server=ServerConfig(
            listen=Address("::1", 8081),
            admin_listen=Address("0.0.0.0", 9091),
            workers=os.cpu_count() or 1,
            timeouts=Timeouts(client_header=0.5, client_body=2.0, keepalive=60.0),
            drain_timeout=5.0,
            admin_token="s3cret",
        ),
        storage=StorageConfig(url="redis://127.0.0.1:6379/0", timeout=0.1, on_error="allow"),
        auth=AuthConfig(header="X-Key", query_param=None),
        products={
            "soccer": Product(
                name="soccer",
                upstream=Upstream(
                    url="https://data.example.com/base/",
                    scheme="https",
                    host="data.example.com",
                    port=443,
                    base_path="/base",
                    connect_timeout=1.0,
                    timeout=5.0,
                ),
                routes=(
                    Route(
                        product=soccer,
                        path="/soccer/v4/{lang}/info.json",
                        methods=frozenset({"GET", "POST"}),
                        params={
                            "lang": PathParamRule(
                                "lang", frozenset({"en", "1", "no"}), re.compile("[a-z0-9]+")
                            )
                        },
                        query={
                            "limit": QueryParamRule("limit", "int", 1, 100, required=True),
                            "q": QueryParamRule(
                                "q",
                                "string",
                                2,
                                None,
                                False,
                                frozenset({"ab", "ba"}),
                                re.compile("[ab]+"),
                            ),
                        },
                        line=21,
                    ),
                    Route(
                        product=soccer,
                        path="/soccer/v3/{rest:path}",
                        gone=Gone("Thu, 01 Jan 2026 00:00:00 GMT"),
                        line=28,
                    ),
                    Route(product=soccer, path="/soccer/v2/{rest:path}", gone=Gone(), line=30),
                    Route(
                        product=soccer,
                        path="/soccer/latest/{rest:path}",
                        redirect=Redirect("/soccer/v4/{rest}", permanent=True),
                        line=32,
                    ),
                ),
            ),
            "weather": Product(
                name="weather",
                upstream=Upstream(
                    url="http://127.0.0.1:9000",
                    scheme="http",
                    host="127.0.0.1",
                    port=9000,
                    base_path="",
                    connect_timeout=1.0,
                    timeout=5.0,
                ),
                routes=(Route(product="weather", path="/weather/{city}", line=38),),
                maintenance=Maintenance(),
            ),
        },
        plans={
            "free": Plan("free"),
            "fast": Plan("fast", rate=RateRule(5, 0.2, "200ms")),
            "monthly": Plan(
                "monthly",
                rate=RateRule(10, 60.0, "minute"),
                quota=QuotaRule(1000, "month", ZoneInfo("Europe/Berlin")),
            ),
        },
        keys=(
            ApiKey(
                "acme.prod_1",
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                {"soccer": "monthly", "weather": "fast"},
            ),
            ApiKey("demo", hashlib.sha256(b"open-sesame").hexdigest(), {}, disabled=True),
        ),
        sources=(path,),
    )


def test_full_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(FULL_YAML, encoding="utf-8")
    config = load_config(path, env={"GATEWAY_ADMIN_TOKEN": "s3cret"})
    assert config == expected_full(str(path))


def test_plain_key_is_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(FULL_YAML, encoding="utf-8")
    config = load_config(path, env={"GATEWAY_ADMIN_TOKEN": "s3cret"})
    assert "open-sesame" not in repr(config)


def test_defaults_of_a_minimal_config(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL_PRODUCTS, encoding="utf-8")
    config = load_config(path, env={})
    assert config.server == ServerConfig()
    assert config.storage == StorageConfig()
    assert config.auth == AuthConfig()
    assert config.plans == {}
    assert config.keys == ()
    assert config.products["shop"].routes == (Route(product="shop", path="/shop", line=5),)


def test_example_config_folder_loads() -> None:
    config = load_config(REPO_ROOT / "config", env={})
    assert [Path(source).name for source in config.sources] == [
        "gateway.yaml",
        "keys.yaml",
        "plans.yaml",
        "products.yaml",
    ]
    assert config.server.listen == Address("127.0.0.1", 8080)
    assert config.server.admin_listen == Address("127.0.0.1", 9090)
    assert config.storage.is_memory
    assert set(config.products) == {"soccer", "weather", "legacy"}
    info, live, v3, latest = config.products["soccer"].routes
    assert live.websocket and not info.websocket
    assert info.params["lang"].enum == frozenset({"en", "de", "fr"})
    assert info.query["limit"] == QueryParamRule("limit", "int", 1, 100)
    assert v3.gone == Gone("Thu, 01 Jan 2026 00:00:00 GMT")
    assert latest.redirect == Redirect("/soccer/v4/{rest}")
    assert config.products["legacy"].maintenance == Maintenance(
        600, "The legacy API is down while it moves to v4."
    )
    assert config.plans["tiny"] == Plan("tiny", quota=QuotaRule(5, "day", ZoneInfo("UTC")))
    demo = config.key_by_name("demo-trial")
    assert demo is not None
    assert demo.key_sha256 == hashlib.sha256(b"trial-key-123").hexdigest()
    disabled = config.key_by_name("demo-disabled")
    assert disabled is not None and disabled.disabled


# -- a folder of files ----------------------------------------------------------------------


def test_folder_sections_are_merged_from_sorted_files(tmp_path: Path) -> None:
    (tmp_path / "b_products.yaml").write_text(MINIMAL_PRODUCTS, encoding="utf-8")
    (tmp_path / "a_server.yaml").write_text("server:\n  listen: 127.0.0.1:8000\n", "utf-8")
    (tmp_path / "c_plans.yaml").write_text("plans:\n  free:\n", encoding="utf-8")
    (tmp_path / "d_empty.yaml").write_text("# nothing here yet\n", encoding="utf-8")
    # Neither is configuration: another suffix, and an editor's lock file.
    (tmp_path / "notes.yml").write_text("not: [valid", encoding="utf-8")
    (tmp_path / ".#c_plans.yaml").write_text("not: [valid", encoding="utf-8")
    config = load_config(tmp_path, env={})
    assert config.server.listen == Address("127.0.0.1", 8000)
    assert set(config.products) == {"shop"}
    assert config.plans == {"free": Plan("free")}
    names = ["a_server.yaml", "b_products.yaml", "c_plans.yaml", "d_empty.yaml"]
    assert config.sources == tuple(str(tmp_path / name) for name in names)


def test_folder_section_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("# products\n\n" + MINIMAL_PRODUCTS, encoding="utf-8")
    (tmp_path / "b.yaml").write_text("plans: {}\nproducts: {}\n", encoding="utf-8")
    assert issues_of(tmp_path) == [
        f"{tmp_path / 'b.yaml'}:2: products: already defined in {tmp_path / 'a.yaml'}:3"
    ]


def test_folder_issues_are_sorted_by_file_then_line(tmp_path: Path) -> None:
    # Keys are checked after the server although their file sorts first.
    (tmp_path / "a_keys.yaml").write_text(
        "keys:\n  - {name: k, key: s, plans: {shop: gold}}\n", encoding="utf-8"
    )
    (tmp_path / "b_rest.yaml").write_text(
        "server:\n  workers: many\n" + MINIMAL_PRODUCTS, encoding="utf-8"
    )
    assert issues_of(tmp_path) == [
        f"{tmp_path / 'a_keys.yaml'}:2: keys[0].plans.shop: unknown plan 'gold' "
        "(plans: none are declared)",
        f"{tmp_path / 'b_rest.yaml'}:2: server.workers: must be an integer",
    ]


def test_syntax_errors_of_every_file_are_reported_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("server: [1,\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("plans:\n  x: {per: day}}\n", encoding="utf-8")
    (tmp_path / "c.yaml").write_text("keys: nope\n", encoding="utf-8")
    reported = issues_of(tmp_path)
    assert [issue.split(":")[0:2] for issue in reported] == [
        [str(tmp_path / "a.yaml"), "2"],
        [str(tmp_path / "b.yaml"), "2"],
    ]


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    assert issues_of(tmp_path) == [f"{tmp_path}: no *.yaml files in this folder"]
    (tmp_path / "products.yml").write_text(MINIMAL_PRODUCTS, encoding="utf-8")
    assert issues_of(tmp_path) == [
        f"{tmp_path}: no *.yaml files in this folder (products.yml not read: a folder's files "
        "end in .yaml)"
    ]
    missing = tmp_path / "nope.yaml"
    assert issues_of(missing) == [f"{missing}: no such file or folder"]


def test_a_path_that_cannot_be_looked_at_is_a_config_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    too_long = tmp_path / ("a" * 300)
    assert issues_of(too_long) == [f"{too_long}: cannot be read: File name too long"]


def test_a_route_for_every_other_method_after_one_for_some_is_matched(tmp_path: Path) -> None:
    """`POST` costs 10, every other method 1: the second route takes what the first does not
    (among routes matching a path, the first that accepts the method wins). It was refused as
    'never matched'."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "products:\n"
        "  shop:\n"
        "    upstream: {url: 'http://127.0.0.1:9000'}\n"
        "    routes:\n"
        "      - {path: '/upload/{rest:path}', methods: [POST], cost: 10}\n"
        "      - {path: '/upload/{rest:path}'}\n"
        "      - {path: '/items/{id}', methods: [GET]}\n"
        "      - {path: '/items/{id}', methods: [DELETE], cost: 3}\n"
    )
    routes = RouteTable(load_config(path, env={}).products.values())
    assert routes.match("POST", "/upload/a").route.cost == 10
    assert routes.match("PUT", "/upload/a").route.cost == 1
    assert routes.match("GET", "/upload/a").route.cost == 1
    assert routes.match("DELETE", "/items/1").route.cost == 3


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"products: \xff\n")
    assert issues_of(path) == [
        f"{path}:1: not UTF-8: byte 0xff in column 11 (save the file as UTF-8)"
    ]


def test_key_expires_is_read_as_unix_time(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        """
products:
  shop:
    upstream: {url: "http://127.0.0.1:9000"}
    routes: [{path: "/shop/{item}"}]
plans: {free: }
keys:
  - {name: unquoted, key: one, plans: {shop: free}, expires: 2027-01-01T00:00:00Z}
  - {name: quoted, key: two, plans: {shop: free}, expires: "2027-01-01T01:00:00+01:00"}
  - {name: forever, key: three, plans: {shop: free}}
""",
        encoding="utf-8",
    )
    config = load_config(path, env={})
    new_year = 1798761600.0
    assert [key.expires for key in config.keys] == [new_year, new_year, None]


@pytest.mark.parametrize("kind", ["symlink-to-nothing", "folder"])
def test_a_yaml_entry_that_is_no_file_is_reported_not_skipped(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    write_config_file(folder, "")
    if kind == "folder":
        (folder / "zz.yaml").mkdir()
    else:
        (folder / "zz.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(ConfigError) as raised:
        load_config(folder, env={})
    assert [issue.file for issue in raised.value.issues] == [str(folder / "zz.yaml")]
    assert "cannot be read" in str(raised.value.issues[0])


def test_a_yml_file_beside_the_yaml_files_is_said_to_be_unread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator who names a file `keys.yml` finds its keys missing: the load says why."""
    (tmp_path / "products.yaml").write_text(MINIMAL_PRODUCTS, encoding="utf-8")
    (tmp_path / "keys.yml").write_text("keys: []\n", encoding="utf-8")
    (tmp_path / ".#plans.yml").write_text("plans: {}\n", encoding="utf-8")  # an editor's
    with caplog.at_level(logging.WARNING, logger="gateway.config.loader"):
        load_config(tmp_path, env={})
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path}: keys.yml not read: only a folder's *.yaml files are"
    ]


@pytest.mark.parametrize("name", [REQUEST_ID_HEADER, *LIMIT_HEADER_NAMES, "Retry-After"])
def test_no_answer_header_of_the_gateway_can_be_a_cost_header(tmp_path: Path, name: str) -> None:
    """The config's refusal is written apart from the headers it guards (the config sits
    below the limits): every header the gateway sets on an answer is refused all the same."""
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "products:\n  shop:\n    upstream: {url: 'http://127.0.0.1:9000'}\n    routes:\n"
        f"      - {{path: /shop, cost_header: {name}}}\n"
    )
    assert issues_of(path) == [
        f"{path}:5: products.shop.routes[0].cost_header: must not be {name}: HTTP or the "
        "gateway uses that header"
    ]


def test_a_route_reads_its_cost_from_a_header_or_a_json_field(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "products:\n  llm:\n    upstream: {url: 'http://127.0.0.1:9000'}\n    routes:\n"
        "      - {path: /v1/chat, cost: 50, cost_field: usage.total_tokens}\n"
        "      - {path: /v1/search, cost_header: X-Units-Used}\n"
        "      - {path: /v1/models}\n"
        "      - path: /v1/messages\n"
        "        cost_field: [message.usage.input_tokens, usage.output_tokens]\n"
        "      - path: /v1/priced\n"
        "        cost_field:\n"
        "          - message.usage.input_tokens\n"
        "          - {field: usage.output_tokens, weight: 5}\n"
    )
    chat, search, models, messages, priced = load_config(path, env={}).products["llm"].routes
    assert messages.cost_field == (
        CostField(("message", "usage", "input_tokens")),
        CostField(("usage", "output_tokens")),
    )
    assert priced.cost_field == (
        CostField(("message", "usage", "input_tokens"), 1),
        CostField(("usage", "output_tokens"), 5),
    )
    assert (chat.cost_field, chat.cost_header, chat.reports_cost) == (
        (CostField(("usage", "total_tokens")),),
        None,
        True,
    )
    assert (search.cost_field, search.cost_header, search.reports_cost) == (
        None,
        b"x-units-used",
        True,
    )
    assert (models.cost_field, models.cost_header, models.reports_cost) == (None, None, False)
