"""The application factory: wires configuration, listeners and telemetry.

``Proxy`` owns the proxy and admin listeners, the upstream clients and the
telemetry sinks; it does no request work itself. ``start`` binds both ports (a
port of 0 picks a free one, for tests) and ``stop`` drains and closes.

With worker processes (``worker`` set), every worker binds the proxy port with
``SO_REUSEPORT`` and the kernel spreads connections among them; only worker 0
binds the admin port, runs the health probes and serves ``/metrics``, which
adds up every worker's metrics from prometheus_client's shared files.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from .admin import admin_app
from .cache import ResponseCache, new_cache
from .config import Config
from .dispatch import Dispatcher
from .estimate import settle
from .forward import Forwarder
from .health import HealthMonitor
from .server import ProxyServer
from .telemetry import Recorder, Sink
from .telemetry.capture import CaptureSink
from .telemetry.logging import log_exchange, protocol_log
from .telemetry.metrics import Metrics
from .upstream import UpstreamClient, new_clients

if TYPE_CHECKING:
    from .telemetry.tracing import Tracer

log = logging.getLogger(__name__)


class Proxy:
    """A running llmproxy: listeners, upstream clients and telemetry."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        tracer: Tracer | None = None,
        sinks: list[Sink] | None = None,
        worker: int | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self.primary = not worker  # a single process, or worker 0
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(
            config, self.registry, multiprocess=worker is not None, primary=self.primary
        )
        self.tracer = tracer
        if tracer is not None:
            tracer.on_drop = self.metrics.spans_were_dropped
        self.capture: CaptureSink | None = None
        self.recorder = Recorder([*self._default_sinks(), *(sinks or [])])
        self.clients: dict[str, UpstreamClient] = {}
        self.dispatcher: Dispatcher | None = None
        self.cache: ResponseCache | None = None
        self.health: HealthMonitor | None = None
        self.ready = False
        self.not_ready_reason = "starting"
        self._runners: list[web.BaseRunner] = []
        self._server: ProxyServer | None = None
        self._listener: asyncio.Server | None = None
        self._stopped = False
        self._sync_task: asyncio.Task[None] | None = None
        self.proxy_address: tuple[str, int] = config.server.listen
        self.admin_address: tuple[str, int] = config.server.admin_listen

    def _default_sinks(self) -> list[Sink]:
        if not self.config.telemetry.enabled:
            return []
        # Settled first: every later sink sees the same, finished record.
        sinks: list[Sink] = [settle, self.metrics.observe]
        if self.config.telemetry.log_requests:
            sinks.append(log_exchange)
        if self.tracer is not None:
            sinks.append(self.tracer.sink)
        if self.config.telemetry.capture_path is not None:
            self.capture = CaptureSink(self.config.telemetry)
            sinks.append(self.capture)
        return sinks

    @property
    def proxy_url(self) -> str:
        return _url(self.proxy_address)

    @property
    def admin_url(self) -> str:
        return _url(self.admin_address)

    async def start(self) -> None:
        """Bind both listeners; raises ``OSError`` if a port cannot be bound."""
        self.clients = new_clients(self.config.upstreams)
        self.dispatcher = Dispatcher(
            self.clients, self.tracer, on_breaker_change=self.metrics.breaker_changed
        )
        self.metrics.track_limiters(self.dispatcher.limiters)
        if self.primary:
            self.health = HealthMonitor(
                self.config.upstreams,
                self.dispatcher.breakers,
                on_change=self.metrics.health_changed,
                on_probe=self.metrics.probed,
            )
            self.recorder.sinks.append(self.health.observe)
        if any(route.cache is not None for route in self.config.routes):
            auth = self.config.server.auth
            self.cache = new_cache(
                self.config.cache,
                auth.header if auth.keys else None,
                on_evict=self.metrics.cache_evicted,
                on_error=self.metrics.cache_failed,
            )
            self.metrics.track_cache(self.cache)
        forwarder = Forwarder(
            self.config,
            self.dispatcher,
            self.recorder,
            tracer=self.tracer,
            cache=self.cache,
        )
        # A connection that has not sent a whole request's headers this long
        # after connecting or after its last response is closed.
        self._server = ProxyServer(forwarder, self.config.server.client_timeout)
        admin_runner = web.AppRunner(
            admin_app(self),
            access_log=None,
            shutdown_timeout=1.0,
            logger=protocol_log,
            keepalive_timeout=self.config.server.client_timeout,
        )
        try:
            host, port = self.config.server.listen
            self._listener = await asyncio.get_running_loop().create_server(
                self._server,
                host,
                port,
                reuse_port=self.worker is not None or None,
                backlog=1024,
            )
            bound = self._listener.sockets[0].getsockname()
            self.proxy_address = (str(bound[0]), int(bound[1]))
            if self.primary:
                self.admin_address = await _listen(
                    admin_runner, self.config.server.admin_listen
                )
                self._runners.append(admin_runner)
        except BaseException:
            await self.stop()
            raise
        if self.health is not None:
            self.health.start()
        self._sync_task = asyncio.create_task(self._sync())
        self.ready = True
        self.not_ready_reason = ""
        log.info(
            "proxy.started",
            extra={
                "fields": {
                    "listen": self.proxy_url,
                    "admin_listen": self.admin_url,
                    "config": self.config.source,
                }
            },
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace, close."""
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        self.not_ready_reason = "shutting down"
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self._listener is not None:
            self._listener.close()  # no new connections
        if self._server is not None:
            await self._server.shutdown(self.config.server.drain_grace)
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self.health is not None:
            await self.health.stop()
        for client in self.clients.values():
            await client.close()
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.cache is not None:
            await self.cache.close()
        self.recorder.flush()
        if self.tracer is not None:
            # Flushing may wait on a sick collector: never on the event loop.
            await asyncio.to_thread(self.tracer.shutdown)
        if self.capture is not None:
            self.capture.close()

    async def _sync(self) -> None:
        """Once a second, copy counts kept outside prometheus_client into it."""
        while True:
            await asyncio.sleep(1.0)
            self.metrics.sync(self.tracer)

    def exposition_registry(self) -> CollectorRegistry:
        """The registry ``/metrics`` renders: all workers' metrics, added up."""
        if self.worker is None:
            return self.registry
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry

    def health_report(self) -> dict[str, Any]:
        """The ``/health`` document: overall status is the worst upstream's."""
        report: dict[str, Any] = {"status": "UP", "upstreams": {}}
        if self.health is not None:
            report = self.health.report()
        report["ready"] = self.ready
        if not self.ready:
            report["reason"] = self.not_ready_reason
        return report


async def _listen(
    runner: web.BaseRunner, address: tuple[str, int], reuse_port: bool = False
) -> tuple[str, int]:
    await runner.setup()
    site = web.TCPSite(
        runner, address[0], address[1], reuse_port=reuse_port or None, backlog=1024
    )
    await site.start()
    bound = runner.addresses[0]
    return str(bound[0]), int(bound[1])


def _url(address: tuple[str, int]) -> str:
    host, port = address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
