"""Inbound authentication on real sockets: no key, no forward."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from conftest import FakeProvider, ProxyFactory, Recording, proxy_config

from llmproxy.config import build_config
from llmproxy.errors import ConfigError

KEY = "proxy-key-0123456789abcdef"


async def post(url: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"{}", headers=headers) as resp:
            return resp.status, await resp.read(), dict(resp.headers)


async def test_requests_without_the_key_are_refused_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMPROXY_KEY", KEY)
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsecond-key-abcdefghijklmnop\n")
    raw = proxy_config(provider.url)
    raw["server"]["auth"] = {"keys": ["${LLMPROXY_KEY}"], "keys_file": str(keys)}
    running = await start_proxy(raw)
    provider.reply(Recording.load("openai/chat_completion"))
    url = running.url + "/v1/chat/completions"

    for headers in (
        {},
        {"x-llmproxy-key": "wrong"},
        {"x-llmproxy-key": KEY[:-1]},
        {"Authorization": f"Bearer {KEY}"},
    ):
        status, body, resp_headers = await post(url, headers)
        assert status == 401 and b'"auth"' in body, headers
        assert resp_headers["WWW-Authenticate"] == "Bearer"
    # Unknown paths answer 401 too: nothing is learnt without a key.
    status, _, _ = await post(running.url + "/nowhere", {})
    assert status == 401
    assert provider.received == []

    for key in (KEY, "second-key-abcdefghijklmnop"):
        status, _, _ = await post(
            url, {"x-llmproxy-key": key, "Authorization": "Bearer sk-x"}
        )
        assert status == 200
    # The proxy's key is never forwarded; the client's provider key is.
    assert all("x-llmproxy-key" not in r.headers for r in provider.received)
    assert provider.received[-1].headers["Authorization"] == "Bearer sk-x"
    await running.settle()
    assert [e.error_type for e in running.exchanges].count("auth") == 5


async def send_raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    try:
        async with asyncio.timeout(2):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("header", ["x-llmproxy-key", "Authorization"])
async def test_keys_that_are_not_text_are_refused_socket(
    header: str,
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = proxy_config(provider.url)
    raw["server"]["auth"] = {"keys": [KEY, "cl\u00e9-0123456789abcdef"]}
    if header == "Authorization":
        raw["server"]["auth"]["header"] = header
        for upstream in raw["upstreams"].values():
            upstream["headers"] = {"Authorization": "Bearer sk-upstream"}
    running = await start_proxy(raw)
    provider.reply(Recording.load("openai/chat_completion"))
    prefix = b"Bearer " if header == "Authorization" else b""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"

    # obs-text reaches the handler as lone surrogates: a wrong key, not a crash.
    for value in (b"\xff", KEY.encode() + b"\xff", b"\x80" + KEY.encode(), b"cl\xe9"):
        line = b"%s: %s%s\r\n" % (header.encode(), prefix, value)
        answer = await send_raw(
            running.url, head + line + b"Content-Length: 2\r\n\r\n{}"
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    # A key that is UTF-8 text matches byte for byte.
    line = b"%s: %s%s\r\n" % (
        header.encode(),
        prefix,
        "cl\u00e9-0123456789abcdef".encode(),
    )
    answer = await send_raw(running.url, head + line + b"Content-Length: 2\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert len(provider.received) == 1
    assert not [r for r in caplog.records if r.exc_info]
    await running.settle()
    assert [e.error_type for e in running.exchanges] == ["auth"] * 4 + [None]


async def test_bearer_mode_needs_upstream_credentials_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    raw = proxy_config(provider.url)
    raw["server"]["auth"] = {"keys": [KEY], "header": "Authorization"}
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert "upstreams.openai.headers: must set the upstream's credentials" in str(
        info.value.problems
    )

    for upstream in raw["upstreams"].values():
        upstream["headers"] = {"Authorization": "Bearer sk-upstream"}
    running = await start_proxy(raw)
    provider.reply(Recording.load("openai/chat_completion"))
    status, _, _ = await post(
        running.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    )
    assert status == 200
    assert provider.received[-1].headers["Authorization"] == "Bearer sk-upstream"


def test_auth_config_errors(tmp_path: Path) -> None:
    raw = proxy_config("http://127.0.0.1:1")
    raw["server"]["auth"] = {
        "keys": ["short"],
        "keys_file": str(tmp_path / "none"),
        "header": "bad header",
    }
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    problems = "\n".join(info.value.problems)
    assert "server.auth.keys_file: cannot read" in problems
    assert "server.auth.header: expected a header name" in problems
    assert "server.auth.keys: keys must be at least 16 characters" in problems
