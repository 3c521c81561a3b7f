"""The ``llmproxy`` command line: serve, check and demo.

Exit codes: 0 success; 1 the proxy could not run (a port could not be bound);
2 the configuration or the command line is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from . import __version__
from .config import Config, load_config
from .errors import ConfigError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
# Objects allocated before the young generation is collected (CPython: 700).
_GC_YOUNG = 20_000

_EPILOG = """\
environment:
  LLMPROXY_CONFIG     configuration file used when --config is not given
  LLMPROXY_WORKERS    worker processes for serve when --workers is not given
  LLMPROXY_LOG_LEVEL  log level (debug, info, warning, error); default info
  OTEL_*              OpenTelemetry exporter settings (see the README)

exit codes: 0 ok, 1 could not run (e.g. a port is taken), 2 invalid configuration
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmproxy",
        description="An observability proxy for LLM providers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"llmproxy {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the proxy. Without --config: $LLMPROXY_CONFIG, else a "
        "built-in default that proxies /v1 to api.openai.com and /anthropic to "
        "api.anthropic.com with the clients' own credentials.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    serve.add_argument(
        "--log-level",
        default=os.environ.get("LLMPROXY_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("LLMPROXY_WORKERS", "1")),
        metavar="N",
        help="worker processes sharing the proxy port; 0: one per CPU "
        "(default: $LLMPROXY_WORKERS, else 1)",
    )
    serve.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check",
        help="validate a configuration file and exit",
        description="Validate a configuration file: exit 0 if valid, else exit 2 "
        "printing each problem as 'path.to.field: what is wrong'.",
    )
    check.add_argument("--config", metavar="FILE", required=True)

    demo = commands.add_parser(
        "demo",
        help="a first look with no API key: simulated provider, proxy, traffic",
        description="Start a simulated OpenAI-compatible provider, llmproxy in front "
        "of it and a little traffic from the openai SDK, then keep serving so you "
        "can look at the metrics, health and logs.",
    )
    demo.add_argument(
        "--port", type=int, default=8080, help="proxy port (default 8080)"
    )
    demo.add_argument(
        "--admin-port", type=int, default=9090, help="admin port (default 9090)"
    )
    demo.add_argument(
        "--requests", type=int, default=12, help="requests of demo traffic (default 12)"
    )
    demo.add_argument(
        "--exit",
        action="store_true",
        help="exit after the traffic instead of serving on",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return check(args.config)
    if args.command == "serve":
        return serve(args.config, args.log_level, args.workers, args.worker)
    from .demo import run_demo

    return run_demo(args.port, args.admin_port, args.requests, args.exit)


def check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"{path}: ok ({len(config.upstreams)} upstreams, {len(config.routes)} routes)"
    )
    return EXIT_OK


def serve(
    path: str | None, log_level: str, workers: int = 1, worker: int | None = None
) -> int:
    from .telemetry.logging import setup_logging

    listener = setup_logging(log_level)
    try:
        try:
            config = load_config(path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config.invalid", extra={"fields": {"problem": problem}})
                print(problem, file=sys.stderr)
            return EXIT_CONFIG
        log.info(
            "config.loaded",
            extra={
                "fields": {
                    "source": config.source,
                    "upstreams": sorted(config.upstreams),
                    "routes": [r.name for r in config.routes],
                    "worker": worker,
                }
            },
        )
        if worker is None and workers != 1:
            return _supervise(path, log_level, workers, config)
        return _run(_serve(config, worker))
    finally:
        listener.stop()


def _run(coro: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def _supervise(path: str | None, log_level: str, workers: int, config: Config) -> int:
    from .workers import Supervisor, default_workers

    count = workers if workers > 0 else default_workers()
    args = ["--log-level", log_level]
    if path:
        args += ["--config", path]
    return Supervisor(count, args, config.server.drain_grace).run()


def _raise_file_limit() -> None:
    """Each stream holds two sockets: lift the soft descriptor limit to the hard."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - best effort
        pass


def _tune_gc() -> None:
    """Collect garbage less often once serving.

    Each request allocates a few hundred short-lived objects and almost none in
    reference cycles, so the default young-generation threshold (700) ran a
    collection every couple of requests, about a tenth of the CPU under load.
    What start-up allocated (modules, configuration) is frozen out of every
    later collection.
    """
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, 20, 50)


async def _serve(config: Config, worker: int | None = None) -> int:
    from .app import Proxy
    from .telemetry.tracing import Tracer

    _raise_file_limit()
    try:
        tracer = Tracer.from_env()
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    proxy = Proxy(config, tracer=tracer, worker=worker)
    log.info(
        "tracing.configured" if tracer is not None else "tracing.off",
        extra={"fields": {"exporter": "otlp" if tracer is not None else None}},
    )
    try:
        await proxy.start()
    except OSError as exc:
        log.error("proxy.bind_failed", extra={"fields": {"error": str(exc)}})
        print(f"llmproxy: cannot listen: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    _tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("proxy.stopping", extra={"fields": {"grace_s": config.server.drain_grace}})
    await proxy.stop()
    log.info("proxy.stopped")
    return EXIT_OK
