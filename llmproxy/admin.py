"""The admin listener: metrics and health, never proxied traffic."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .app import Proxy


def admin_app(proxy: Proxy) -> web.Application:
    """``/metrics``, ``/healthz``, ``/readyz`` and ``/health`` for ``proxy``."""

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(proxy.exposition_registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        # Upstream health is deliberately not part of readiness: a provider
        # outage must not take every replica out of its Service at once.
        if proxy.ready:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reason": proxy.not_ready_reason}, 503)

    async def health(request: web.Request) -> web.Response:
        report = proxy.health_report()
        return _json(report, 200 if proxy.ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/health", health)
    return app


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json"
    )
