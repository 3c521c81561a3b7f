"""``llmproxy demo``: a first look with no API key.

Starts the simulated provider on a free loopback port, llmproxy in front of it,
sends a little traffic through the official ``openai`` SDK (plain and streamed
chat, a stream that did not ask for usage, embeddings, a rate-limited call and a
stream the provider breaks off), prints what the proxy recorded and where to
look, then keeps serving until interrupted.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import openai

from .app import Proxy
from .cli import _run
from .config import build_config
from .exchange import Exchange
from .simulator import start_simulator
from .telemetry.logging import setup_logging

PACE = 0.02  # seconds per simulated token: realistic enough to see streaming


def run_demo(port: int, admin_port: int, requests: int, exit_after: bool) -> int:
    listener = setup_logging("info")
    try:
        return _run(_demo(port, admin_port, requests, exit_after))
    finally:
        listener.stop()


async def _demo(port: int, admin_port: int, requests: int, exit_after: bool) -> int:
    sim = await start_simulator(pace=PACE, tokens=24)
    seen: list[Exchange] = []
    config = build_config(
        {
            "server": {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin_port}",
            },
            "upstreams": {
                "simulated": {"url": sim.url, "api": "openai", "provider": "openai"}
            },
            "routes": [{"prefix": "/v1", "upstream": "simulated"}],
        },
        source="<demo>",
    )
    proxy = Proxy(config, sinks=[seen.append])
    try:
        await proxy.start()
    except OSError as exc:
        await sim.close()
        print(
            f"llmproxy demo: cannot listen: {exc} (try --port/--admin-port)",
            file=sys.stderr,
        )
        return 1
    try:
        await _traffic(proxy.proxy_url + "/v1", requests)
        proxy.recorder.flush()
        await asyncio.sleep(0.2)  # let the log thread write before the summary
        _summary(proxy, seen)
        if not exit_after:
            print("Press Ctrl-C to stop.", file=sys.stderr)
            await _wait_for_signal()
    finally:
        await proxy.stop()
        await sim.close()
    return 0


async def _traffic(base_url: str, requests: int) -> None:
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="sk-demo-not-a-real-key", max_retries=0
    )
    messages: Any = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say something about observability."},
    ]
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=messages),
        lambda: _stream(client, messages, {"include_usage": True}),
        lambda: _stream(client, messages, None),
        lambda: client.embeddings.create(model="text-embedding-3-small", input="hello"),
        lambda: client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,
            extra_headers={"x-sim-status": "429"},
        ),
        lambda: _stream(client, messages, None, {"x-sim-fail": "midstream"}),
    ]
    for i in range(requests):
        try:
            await calls[i % len(calls)]()
        except (openai.APIError, openai.APIConnectionError):
            pass  # the failures are part of the demo: the proxy records them


async def _stream(
    client: openai.AsyncOpenAI,
    messages: Any,
    options: dict[str, bool] | None,
    headers: dict[str, str] | None = None,
) -> None:
    extra: dict[str, Any] = {"stream_options": options} if options else {}
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=messages, stream=True, extra_headers=headers, **extra
    )
    async for _ in stream:
        pass


def _summary(proxy: Proxy, seen: list[Exchange]) -> None:
    rows = [
        (
            "operation",
            "model",
            "stream",
            "status",
            "error",
            "tokens in/out",
            "first token",
            "total",
        )
    ]
    for ex in seen:
        first = ex.since_start(ex.t_first_token)
        rows.append(
            (
                ex.operation or "-",
                ex.request_model or "-",
                "yes" if ex.stream else "no",
                str(ex.status),
                ex.error_type or "-",
                f"{_n(ex.input_tokens)}/{_n(ex.output_tokens)}",
                f"{first * 1000:.0f} ms" if first is not None else "-",
                f"{ex.duration * 1000:.0f} ms",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\nllmproxy demo: what the proxy recorded", file=sys.stderr)
    for row in rows:
        print(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)),
            file=sys.stderr,
        )
    print(
        f"""
Where to look:
  proxy        {proxy.proxy_url}/v1   (OPENAI_BASE_URL={proxy.proxy_url}/v1)
  metrics      curl {proxy.admin_url}/metrics
  health       curl {proxy.admin_url}/health
  logs         the JSON lines above: one per request
  try it       curl {proxy.proxy_url}/v1/chat/completions -H 'content-type: \
application/json' -d '{{"model":"gpt-4o","stream":true,"messages":[{{"role":"user",\
"content":"hi"}}]}}'""",
        file=sys.stderr,
    )


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
