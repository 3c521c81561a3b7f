"""SIGTERM on a real ``llmproxy serve`` process: in-flight streams finish whole."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from conftest import FakeProvider, Recording

STREAMS = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "llmproxy exited during start-up"
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("llmproxy did not become ready")


async def serve(
    tmp_path: Path, provider_url: str, grace: str, log: Path | None = None
) -> tuple[asyncio.subprocess.Process, str, str]:
    """``llmproxy serve`` in front of ``provider_url``; its request log lines go
    to ``log`` (none without it)."""
    port, admin = free_port(), free_port()
    config = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin}",
            "drain_grace": grace,
        },
        "upstreams": {"fake": {"url": provider_url, "health": {"path": "off"}}},
        "routes": [{"prefix": "/v1", "upstream": "fake"}],
        "telemetry": {"log_requests": log is not None},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmproxy",
        "serve",
        "--config",
        str(path),
        stdout=log.open("wb") if log is not None else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OTEL_SDK_DISABLED": "true"},
    )
    base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    try:
        await wait_ready(admin_url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, base, admin_url


@pytest.mark.slow
async def test_sigterm_lets_100_streams_finish_byte_exact_socket(
    provider: FakeProvider, tmp_path: Path
) -> None:
    rec = Recording.load("openai/chat_completions_stream_include_usage")
    events = [e + b"\n\n" for e in rec.body.split(b"\n\n") if e]
    provider.reply(rec, chunks=events, pace=0.15)  # about 1.4 s per stream
    log = tmp_path / "stdout.jsonl"
    proc, base, admin = await serve(tmp_path, provider.url, "10s", log)
    started = asyncio.Event()
    heads = 0

    async def one(session: aiohttp.ClientSession) -> bytes:
        nonlocal heads
        async with session.post(base + "/v1/chat/completions", data=b"{}") as resp:
            first = await resp.content.readany()
            heads += 1
            if heads == STREAMS:
                started.set()
            return first + await resp.content.read()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 15)
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        # Draining: not ready, and no longer accepting new connections.
        async with session.get(admin + "/readyz") as resp:
            assert resp.status == 503
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.post(base + "/v1/chat/completions", data=b"{}"):
                pass
        bodies = await asyncio.gather(*tasks)
        code = await asyncio.wait_for(proc.wait(), 15)
    assert code == 0, (await proc.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
    assert all(body == rec.body for body in bodies)
    assert time.monotonic() - sent_at < 10
    # Telemetry was flushed before the exit: a complete log line per stream.
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == STREAMS
    assert all(r["status"] == 200 and r["output_tokens"] == 5 for r in requests)
    assert not [r for r in requests if r.get("error_type")]


@pytest.mark.slow
async def test_streams_past_the_grace_are_cut_and_exit_is_clean_socket(
    provider: FakeProvider, tmp_path: Path
) -> None:
    rec = Recording.load("openai/chat_completions_stream_include_usage")
    events = [e + b"\n\n" for e in rec.body.split(b"\n\n") if e]
    provider.reply(rec, chunks=events, pace=2.0)  # far longer than the grace
    proc, base, _ = await serve(tmp_path, provider.url, "500ms")
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/chat/completions", data=b"{}") as resp:
            await resp.content.readany()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.content.read()
    assert await asyncio.wait_for(proc.wait(), 10) == 0
