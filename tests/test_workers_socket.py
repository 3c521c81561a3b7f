"""``llmproxy serve --workers 2`` on real sockets: one port, one /metrics, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import FakeProvider, Recording
from prometheus_client.parser import text_string_to_metric_families
from test_shutdown_socket import free_port, wait_ready


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    for _ in range(int(within / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def requests_total(text: str) -> float:
    return sum(value for _, value in samples(text, "llmproxy_requests_total"))


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
async def test_two_workers_share_a_port_and_one_metrics_socket(
    provider: FakeProvider, tmp_path: Path
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    port, admin = free_port(), free_port()
    config = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin}",
            "drain_grace": "2s",
        },
        "upstreams": {"fake": {"url": provider.url, "health": {"path": "off"}}},
        "routes": [{"prefix": "/v1", "upstream": "fake"}],
        "telemetry": {"log_requests": False},
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
        "--workers",
        "2",
        stdout=(tmp_path / "out.log").open("wb"),
        env={**os.environ, "OTEL_SDK_DISABLED": "true"},
    )
    base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    try:
        await wait_ready(admin_url, proc)
        await until(lambda: len(children(proc.pid)) == 2)
        workers = children(proc.pid)
        assert len(workers) == 2

        async def burst(n: int) -> None:
            for _ in range(n):  # a new connection each: the kernel spreads them
                async with aiohttp.ClientSession() as session:
                    async with session.post(
                        base + "/v1/chat/completions", data=b"{}"
                    ) as resp:
                        assert resp.status == 200
                        await resp.read()

        await burst(40)
        await asyncio.sleep(1.2)  # the recorders flush, the files are current
        async with aiohttp.ClientSession() as session:
            async with session.get(admin_url + "/metrics") as resp:
                text = await resp.text()
            async with session.get(admin_url + "/health") as resp:
                health = await resp.json()
        assert requests_total(text) == 40
        # Health is worker 0's alone: one state set, not one per worker added up.
        states = samples(text, "llmproxy_upstream_health")
        assert sorted(v for labels, v in states if labels["upstream"] == "fake") == [
            0.0,
            0.0,
            1.0,
        ]
        assert list(health["upstreams"]) == ["fake"]

        # A worker that dies is replaced; the port keeps serving meanwhile.
        os.kill(workers[1], signal.SIGKILL)
        await asyncio.sleep(0.3)  # the kernel drops the dead worker's listener
        await burst(10)
        await until(
            lambda: (
                len(children(proc.pid)) == 2 and workers[1] not in children(proc.pid)
            )
        )
        await burst(10)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
    assert code == 0
