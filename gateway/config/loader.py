"""Load the YAML configuration (one file, or a folder of `*.yaml` files) into a `Config`.

Every section is validated and every mistake is collected, so that one `gateway check`
lists all of them; `ConfigError` carries them as `file:line: path: message` issues.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from gateway.config.access import KeysReader, read_plans
from gateway.config.addresses import (
    ADDRESS_HINT,
    is_loopback,
    listens_clash,
    parse_address,
)
from gateway.config.files import Section, files_of, read_sections
from gateway.config.load_warnings import LoadWarning, tell_warnings
from gateway.config.model import (
    ON_ERROR_CHOICES,
    Address,
    ApiKey,
    AuthConfig,
    Config,
    OnError,
    Plan,
    Product,
    ServerConfig,
    StorageConfig,
    Timeouts,
    TlsConfig,
)
from gateway.config.products import ProductsReader
from gateway.config.storage_url import storage_url_problem
from gateway.config.yamlnodes import ConfigError, ConfigIssue, Fields, Walker
from gateway.config.yamltree import Node
from gateway.http import tls
from gateway.http.headers import HOP_BY_HOP, SET_BY_PROXY
from gateway.http.tls import TlsFileError, server_context

ENV_REDIS_URL = "GATEWAY_REDIS_URL"
ENV_ADMIN_TOKEN = "GATEWAY_ADMIN_TOKEN"
# What `gateway run --workers N` sets: a count in place of server.workers, seen by every load
# of the config (reloads included), so that what depends on the count judges that one.
ENV_WORKERS = "GATEWAY_WORKERS"
# Set by `gateway run --workers N` beside ENV_WORKERS, which carries the count to every load of
# the config: a mistake in that count is then named as the user gave it (`--workers: ...`).
ENV_WORKERS_GIVEN_AS = "GATEWAY_WORKERS_GIVEN_AS"
_MAX_TOKEN = 4096
# More processes than any one machine runs usefully: a typo (80000 for 8) must not fork away the
# machine's memory before anything notices.
MAX_WORKERS = 256

_SERVER_KEYS = ("listen", "admin_listen", "workers", "timeouts", "drain_timeout", "tls")
_TIMEOUT_KEYS = ("client_header", "client_body", "keepalive", "websocket_idle")
_TLS_KEYS = ("cert", "key")
_STORAGE_KEYS = ("url", "timeout", "on_error", "local_fraction")
_AUTH_KEYS = ("header", "query_param")
# Where a key could not be: a header that is never forwarded as sent (hop-by-hop, or set by
# the gateway on the way up), the body's framing, or the standard form of the X-Forwarded-*.
_NOT_A_KEY_HEADER = HOP_BY_HOP | SET_BY_PROXY | {"content-length", "forwarded"}
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

log = logging.getLogger(__name__)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; raise `ConfigError` listing every mistake.

    `env` supplies GATEWAY_REDIS_URL and GATEWAY_ADMIN_TOKEN (default: `os.environ`). The
    load's warnings are logged (`gateway check` prints them so), whether it succeeds or not.
    """
    warnings: list[LoadWarning] = []
    try:
        return load_config_gathering(path, env, warnings)
    finally:
        tell_warnings(warnings)


def load_config_gathering(
    path: str | os.PathLike[str], env: Mapping[str, str] | None, warnings: list[LoadWarning]
) -> Config:
    """`load_config`, with the load's warnings added to `warnings` instead of logged: for a
    load whose warnings another process tells (`gateway.config.load_warnings`)."""
    env = os.environ if env is None else env
    # The node tree of a big file is a million small objects without a cycle among them;
    # the cyclic collector would walk them again and again as they pile up (a fifth of the
    # time for 100,000 keys), for nothing.
    with collector_paused():
        return _load(path, env, warnings)


@contextlib.contextmanager
def collector_paused(*, then_freeze: bool = False) -> Iterator[None]:
    """No cyclic garbage collection inside (if it was on); with `then_freeze`, what is alive
    at the end is left out of later full collections (`gc.freeze`) before it resumes."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            if then_freeze:
                gc.freeze()
            gc.enable()


def _load(
    path: str | os.PathLike[str], env: Mapping[str, str], warnings: list[LoadWarning]
) -> Config:
    if not os.fspath(path).strip():
        # Path("") is the working directory: its *.yaml files, whatever they are.
        raise ConfigError([ConfigIssue("--config", None, "", "is empty (or GATEWAY_CONFIG is)")])
    issues: list[ConfigIssue] = []
    files = files_of(Path(path), issues, warnings)
    sections = read_sections(files, issues)
    # A file that could not be read or parsed makes the rest guesswork (a missing `products`
    # would be reported for the file that failed to parse), so stop at those errors.
    if not files or any(not issue.path for issue in issues):
        raise ConfigError(issues)
    config = _Builder(sections, env, issues, files, warnings).build()
    if issues or config is None:
        order = {file: index for index, file in enumerate(files)}
        # Stable: issues in the same file and line keep the order they were found in.
        issues.sort(key=lambda issue: (order.get(issue.file, len(order)), issue.line or 0))
        raise ConfigError(issues)
    return config


def _usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a container's cpuset), as nginx's
    `worker_processes auto` counts them: os.cpu_count() is every CPU of the host, and all there
    is where the system keeps no affinity (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _on_error(w: Walker, node: Node, path: str) -> OnError | None:
    choice = w.choice(node, path, ON_ERROR_CHOICES)
    # The same string, taken from ON_ERROR_CHOICES so that it carries the Literal type.
    return next((option for option in ON_ERROR_CHOICES if option == choice), None)


def _fraction(w: Walker, node: Node, path: str) -> float | None:
    """A share above 0 and at most 1."""
    value = w.scalar(node)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        w.report(node, path, "must be a number above 0 and at most 1, e.g. 0.5")
        return None
    return float(value)


class _Builder:
    def __init__(
        self,
        sections: dict[str, Section],
        env: Mapping[str, str],
        issues: list[ConfigIssue],
        files: list[str],
        warnings: list[LoadWarning],
    ) -> None:
        self.sections = sections
        self.env = env
        self.issues = issues
        self.files = files
        self.warnings = warnings

    def _section(self, name: str) -> Section | None:
        """The section, unless it is absent or empty: `keys:` with every entry under it
        commented out is no keys, as `keys: []` is, not "must be a list"."""
        section = self.sections.get(name)
        if section is None or section.walker.is_null(section.value):
            return None
        return section

    def _fields(self, name: str, allowed: tuple[str, ...]) -> tuple[Walker, Fields] | None:
        section = self._section(name)
        if section is None:
            return None
        fields = section.walker.mapping(section.value, name, allowed)
        return None if fields is None else (section.walker, fields)

    def build(self) -> Config | None:
        storage = self._storage()
        server = self._server(storage)
        auth = self._auth()
        products, product_names = self._products()
        plans, plan_names = self._plans()
        keys = self._keys(product_names, plan_names)
        if products is None:
            return None
        return Config(
            server=server,
            storage=storage,
            auth=auth,
            products=products,
            plans=plans,
            keys=keys,
            sources=tuple(self.files),
        )

    # -- server, storage, auth ------------------------------------------------------------

    def _admin_token(self) -> str | None:
        """The admin token from the environment, without the spaces a shell or a secrets
        file may leave around it (the credentials presented are compared stripped too)."""
        raw = self.env.get(ENV_ADMIN_TOKEN)
        if raw is None or raw == "":
            return None
        token = raw.strip()
        if not token:
            self.issues.append(ConfigIssue(ENV_ADMIN_TOKEN, None, "", "is blank"))
            return None
        if len(token) > _MAX_TOKEN:
            # Longer than aiohttp takes a header line: no request could ever present it.
            self.issues.append(
                ConfigIssue(ENV_ADMIN_TOKEN, None, "", f"is longer than {_MAX_TOKEN} characters")
            )
        return token

    def _server(self, storage: StorageConfig) -> ServerConfig:
        defaults = ServerConfig()
        token = self._admin_token()
        found = self._fields("server", _SERVER_KEYS)
        if found is None:
            return ServerConfig(admin_token=token, workers=self._workers(None, storage))
        w, fields = found

        def address(node: Node, path: str) -> Address | None:
            text = w.scalar(node)
            try:
                if not isinstance(text, str):
                    raise ValueError(ADDRESS_HINT)  # `listen: 8080` lacks the host
                return parse_address(text)
            except ValueError as exc:
                w.report(node, path, str(exc))
                return None

        listen = w.optional(fields, "listen", address, defaults.listen)
        admin = w.optional(fields, "admin_listen", address, defaults.admin_listen)
        admin_node = fields.value("admin_listen") or fields.value("listen")
        if admin_node is not None and listens_clash(listen, admin):
            w.report(
                admin_node, "server.admin_listen", f"must differ from server.listen ({listen})"
            )
        if "admin_listen" in fields and not is_loopback(admin.host) and token is None:
            w.report(
                fields.value("admin_listen"),
                "server.admin_listen",
                f"is not a loopback address, so {ENV_ADMIN_TOKEN} must be set",
            )
        return ServerConfig(
            listen=listen,
            admin_listen=admin,
            workers=self._workers(found, storage),
            timeouts=self._timeouts(w, fields),
            drain_timeout=w.optional(fields, "drain_timeout", w.duration, defaults.drain_timeout),
            admin_token=token,
            tls=self._tls(w, fields),
        )

    def _tls(self, w: Walker, server: Fields) -> TlsConfig | None:
        node = server.value("tls")
        if node is None:
            return None
        fields = w.mapping(node, server.at("tls"), _TLS_KEYS)
        if fields is None:
            return None
        cert = w.required(fields, "cert", w.string)
        key = w.required(fields, "key", w.string)
        if cert is None or key is None:
            return None
        # Relative paths are relative to the file that names them, not to the working folder.
        folder = Path(w.file).parent
        cert_path, key_path = str(folder / cert), str(folder / key)
        try:
            context = server_context(cert_path, key_path)
        except TlsFileError as exc:
            w.report(fields.value(exc.role), fields.at(exc.role), str(exc))
            return None
        said = tls.certificate_warnings(cert_path)
        self.warnings.extend(LoadWarning(tls.log.name, message) for message in said)
        return TlsConfig(cert_path, key_path, context)

    def _timeouts(self, w: Walker, server: Fields) -> Timeouts:
        defaults = Timeouts()
        node = server.value("timeouts")
        fields = None if node is None else w.mapping(node, server.at("timeouts"), _TIMEOUT_KEYS)
        if fields is None:
            return defaults
        return Timeouts(
            client_header=w.optional(fields, "client_header", w.duration, defaults.client_header),
            client_body=w.optional(fields, "client_body", w.duration, defaults.client_body),
            keepalive=w.optional(fields, "keepalive", w.duration, defaults.keepalive),
            websocket_idle=w.optional(
                fields, "websocket_idle", w.duration, defaults.websocket_idle
            ),
        )

    def _workers(self, found: tuple[Walker, Fields] | None, storage: StorageConfig) -> int:
        """server.workers, or ENV_WORKERS in its place; 0 is one per CPU."""
        workers = 1
        if found is not None:
            w, fields = found
            workers = w.optional(
                fields, "workers", lambda n, p: w.integer(n, p, minimum=0, maximum=MAX_WORKERS), 1
            )
        raw = self.env.get(ENV_WORKERS, "").strip()
        where: tuple[Walker, Node] | None = None  # the file's line, unless ENV_WORKERS says
        if raw and raw.isdecimal() and int(raw) <= MAX_WORKERS:
            workers = int(raw)
        elif raw:
            problem = f"must be a whole number from 0 to {MAX_WORKERS}"
            self.issues.append(ConfigIssue(ENV_WORKERS, None, "server.workers", problem))
        elif found is not None and (node := found[1].value("workers")) is not None:
            where = found[0], node
        if workers == 0:
            workers = min(_usable_cpus(), MAX_WORKERS)
        if workers > 1 and storage.is_memory:
            problem = (
                f"memory:// storage lives inside one process; {workers} workers need "
                f"redis:// storage (storage.url or {ENV_REDIS_URL})"
            )
            if where is not None:
                where[0].report(where[1], "server.workers", problem)
            else:
                given_as = self.env.get(ENV_WORKERS_GIVEN_AS) or ENV_WORKERS
                self.issues.append(ConfigIssue(given_as, None, "server.workers", problem))
        return workers

    def _storage(self) -> StorageConfig:
        defaults = StorageConfig()
        url, timeout, on_error = defaults.url, defaults.timeout, defaults.on_error
        local_fraction = defaults.local_fraction
        found = self._fields("storage", _STORAGE_KEYS)
        if found is not None:
            w, fields = found

            def checked_url(node: Node, path: str) -> str | None:
                text = w.string(node, path)
                problem = None if text is None else storage_url_problem(text)
                if problem is not None:
                    w.report(node, path, problem)
                    return None
                return None if text is None else text.strip()

            url = w.optional(fields, "url", checked_url, url)
            timeout = w.optional(fields, "timeout", w.duration, timeout)
            on_error = w.optional(fields, "on_error", lambda n, p: _on_error(w, n, p), on_error)
            local_fraction = w.optional(
                fields, "local_fraction", lambda n, p: _fraction(w, n, p), local_fraction
            )
        override = self.env.get(ENV_REDIS_URL, "").strip()
        if override:
            problem = storage_url_problem(override)
            if problem is None:
                url = override
            else:
                self.issues.append(ConfigIssue(ENV_REDIS_URL, None, "storage.url", problem))
        return StorageConfig(
            url=url, timeout=timeout, on_error=on_error, local_fraction=local_fraction
        )

    def _auth(self) -> AuthConfig:
        defaults = AuthConfig()
        found = self._fields("auth", _AUTH_KEYS)
        if found is None:
            return defaults
        w, fields = found

        def header(node: Node, path: str) -> str | None:
            text = w.string(node, path)
            if text is not None and not _HEADER_TOKEN.fullmatch(text):
                w.report(node, path, "must be an HTTP header name")
                return None
            if text is not None and text.lower() in _NOT_A_KEY_HEADER:
                # HTTP's own (framing, hop-by-hop: never forwarded, or needed as they are) or
                # the gateway's (set by it on the way up): a key there could not be one.
                w.report(node, path, f"must not be {text}: HTTP or the gateway uses that header")
                return None
            return text

        query_param = defaults.query_param
        node = fields.value("query_param")
        if node is not None:
            # null switches the query parameter off: keys in URLs end up in logs.
            query_param = None if w.is_null(node) else w.string(node, "auth.query_param")
        return AuthConfig(
            header=w.optional(fields, "header", header, defaults.header),
            query_param=query_param,
        )

    # -- products, plans, keys ------------------------------------------------------------

    def _products(self) -> tuple[dict[str, Product] | None, set[str] | None]:
        section = self.sections.get("products")
        if section is None:
            where = self.files[0] if len(self.files) == 1 else os.path.dirname(self.files[0])
            self.issues.append(ConfigIssue(where, None, "products", "is required"))
            return None, None
        if section.walker.is_null(section.value):
            # Every product commented out is an empty section, as for `keys:`; what is
            # wrong with it is that it is empty, not that it is no mapping.
            section.walker.report(section.value, "products", "must declare at least one product")
            return None, None
        products, names = ProductsReader(section.walker).read(section.value)
        return products, names

    def _plans(self) -> tuple[dict[str, Plan], set[str] | None]:
        section = self._section("plans")
        if section is None:
            return {}, set()
        return read_plans(section.walker, section.value)

    def _keys(self, products: set[str] | None, plans: set[str] | None) -> tuple[ApiKey, ...]:
        section = self._section("keys")
        if section is None:
            return ()
        return KeysReader(section.walker, products, plans).read(section.value)
