"""`gateway run | check | hash-key`: the command line (README, "Quick start" and "Configuration
reference")."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

# What GATEWAY_LOG_LEVEL may name (in any case; logging also knows WARN, FATAL and NOTSET).
_LEVELS = "debug, info, warning, error, critical"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="API gateway: keys, quotas and rate limits in front of APIs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_config = os.environ.get("GATEWAY_CONFIG")

    run = commands.add_parser("run", help="serve the proxy and admin ports")
    run.add_argument(
        "--config",
        default=default_config,
        required=default_config is None,
        help="YAML file or folder of *.yaml (default: $GATEWAY_CONFIG)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes sharing the port (default: server.workers; 0 = one per CPU)",
    )

    check = commands.add_parser("check", help="validate a config and exit")
    check.add_argument(
        "--config",
        default=default_config,
        required=default_config is None,
        help="YAML file or folder of *.yaml (default: $GATEWAY_CONFIG)",
    )

    hash_key = commands.add_parser("hash-key", help="print the key_sha256 of an API key")
    hash_key.add_argument("key")
    return parser


def _key_as_given(argv: Sequence[str]) -> list[str]:
    """`hash-key KEY` takes one argument, the key, whatever it begins with: one in 64 of the
    admin API's secrets (`secrets.token_urlsafe`) begins with `-`, and argparse took it for an
    option (a usage error) unless `--` came before it. `-h` and `--help` still ask for help."""
    if len(argv) == 2 and argv[0] == "hash-key" and argv[1] not in ("-h", "--help", "--"):
        return [argv[0], "--", argv[1]]
    return list(argv)


def answer(lines: Sequence[str], code: int) -> int:
    """Print `lines` on stdout and return `code`, also when the reader has gone (`check | head
    -1`, `| grep -q ok`): its BrokenPipeError was a traceback, and the shell reads the code."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): nothing to print to
        return code
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # What is still buffered would fail again when the interpreter flushes at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_key_as_given(sys.argv[1:] if argv is None else argv))
    if args.command == "run":
        # Held before anything is imported for serving (aiohttp and the rest take ~0.4 s), as
        # `gateway.server.serve` holds them until it can act on them: a SIGTERM or SIGHUP in
        # that time killed the gateway (143, 129) where a stop or a reload is promised.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
    if args.command == "hash-key":
        if not args.key:
            # An empty key is no key (a request that sends one has none): its digest in a key
            # entry would never match, and `hash-key "$KEY"` with KEY unset printed it silently.
            print("gateway hash-key: KEY is empty, and an empty key is no key", file=sys.stderr)
            return 2
        # The bytes given, as the proxy hashes the bytes a client sends (argv is decoded with
        # surrogateescape: a key that is not UTF-8 comes back as it was).
        return answer([hashlib.sha256(os.fsencode(args.key)).hexdigest()], 0)
    if args.command == "check":
        from gateway.config import ConfigError, load_config

        try:
            load_config(args.config)
        except ConfigError as exc:
            return answer([str(issue) for issue in exc.issues], 1)
        return answer(["ok"], 0)
    asked_level = os.environ.get("GATEWAY_LOG_LEVEL", "").strip() or "INFO"
    if asked_level.upper() not in logging.getLevelNamesMapping():
        # logging.basicConfig's ValueError was a traceback.
        print(f"GATEWAY_LOG_LEVEL: must be one of {_LEVELS}, not {asked_level!r}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=asked_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A PROMETHEUS_MULTIPROC_DIR from the environment (another program's, another gateway's)
    # is not this gateway's to read or empty: taken out before the metrics module reads it,
    # it becomes where this gateway makes a folder of its own (README, "Metrics").
    metrics_in = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None) or None
    from gateway.config.loader import ENV_WORKERS, ENV_WORKERS_GIVEN_AS, MAX_WORKERS
    from gateway.server import serve

    if args.workers is not None:
        if not 0 <= args.workers <= MAX_WORKERS:
            print(f"--workers: must be 0 to {MAX_WORKERS}", file=sys.stderr)
            return 2
        # Through the environment, so that every load of the config judges this count: a
        # file's `workers: 2` on memory:// was refused though `--workers 1` was asked for.
        os.environ[ENV_WORKERS] = str(args.workers)
        os.environ[ENV_WORKERS_GIVEN_AS] = "--workers"
    return serve(args.config, metrics_in=metrics_in)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
