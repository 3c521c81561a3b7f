"""The simulated provider, driven over loopback sockets by the official SDKs."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from llmproxy.simulator import Simulator, completion_text, start_simulator

PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello to the simulator."}
]
CLAUDE_PROMPT: list[MessageParam] = [
    {"role": "user", "content": "Say hello to the simulator."}
]
PROMPT_TOKENS = len("Say hello to the simulator.") // 4 + 1


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = await start_simulator("127.0.0.1", 0, tokens=5)
    try:
        yield simulator
    finally:
        await simulator.close()


@pytest.fixture
async def oai(sim: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    async with client:
        yield client


@pytest.fixture
async def claude(sim: Simulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=sim.url, api_key="x", max_retries=0)
    async with client:
        yield client


async def test_chat_completion_socket(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.chat.completions.create(
        model="gpt-4o",
        messages=PROMPT,
    )

    assert answer.model == "gpt-4o"
    assert answer.choices[0].message.content == completion_text(5)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        PROMPT_TOKENS,
        5,
    )
    assert answer.usage.total_tokens == PROMPT_TOKENS + 5


async def test_chat_stream_with_usage_socket(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=PROMPT,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion_text(5)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, 5)
    assert len({c.id for c in chunks}) == 1


async def test_stream_events_arrive_as_separate_writes_socket(sim: Simulator) -> None:
    body = {"stream": True, "messages": PROMPT}
    headers = {"x-sim-pace-ms": "10", "x-sim-tokens": "3"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            sim.url + "/v1/chat/completions", json=body, headers=headers
        ) as response,
    ):
        pieces = [piece async for piece in response.content.iter_any()]

    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert len(pieces) >= 1 + 3
    assert all(piece.endswith(b"\n\n") for piece in pieces)
    assert b"".join(pieces).count(b"\n\n") == 1 + 3 + 2
    assert pieces[-1].endswith(b"data: [DONE]\n\n")


async def test_max_tokens_ends_with_length_socket(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.chat.completions.create(
        model="m",
        messages=PROMPT,
        max_tokens=2,
    )

    assert answer.choices[0].message.content == completion_text(2)
    assert answer.choices[0].finish_reason == "length"


async def test_legacy_completion_socket(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.completions.create(model="davinci", prompt="abcdefgh")

    assert answer.choices[0].text == completion_text(5)
    assert answer.usage is not None and answer.usage.prompt_tokens == 3


async def test_embeddings_socket(oai: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 unless told otherwise, so both encodings are used.
    b64 = await oai.embeddings.create(model="emb", input=["one", "two three"])
    floats = await oai.embeddings.create(
        model="emb", input=["one", "two three"], encoding_format="float"
    )

    assert [len(item.embedding) for item in b64.data] == [8, 8]
    assert [item.embedding for item in b64.data] == [
        item.embedding for item in floats.data
    ]
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == 1 + 3


async def test_models_socket(oai: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in oai.models.list()]

    assert models == ["sim-1"]


async def test_anthropic_message_socket(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        system="Be brief.",
        messages=CLAUDE_PROMPT,
    )

    assert message.model == "claude-sonnet-4-5"
    assert message.content[0].type == "text"
    assert message.content[0].text == completion_text(5)
    assert message.stop_reason == "end_turn"
    prompt = len("Be brief.Say hello to the simulator.") // 4 + 1
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, 5)


async def test_anthropic_stream_socket(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=3,
        messages=CLAUDE_PROMPT,
    ) as stream:
        events = [event.type async for event in stream]
        final = await stream.get_final_message()

    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-2:] == ["message_delta", "message_stop"]
    assert final.content[0].type == "text"
    assert final.content[0].text == completion_text(3)
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 3)


async def test_status_hook_openai_socket(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.chat.completions.create(
            model="m",
            messages=PROMPT,
            extra_headers={"x-sim-status": "429"},
        )

    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "rate_limit_error"


async def test_status_hook_anthropic_socket(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        await claude.messages.create(
            model="m",
            max_tokens=10,
            messages=CLAUDE_PROMPT,
            extra_headers={"x-sim-status": "529"},
        )

    assert caught.value.status_code == 529
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Simulated error."},
    }


async def test_midstream_failure_cuts_the_stream_socket(sim: Simulator) -> None:
    headers = {"x-sim-fail": "midstream", "x-sim-tokens": "8"}
    received = bytearray()
    async with aiohttp.ClientSession() as session:
        url = sim.url + "/v1/chat/completions"
        async with session.post(url, json={"stream": True}, headers=headers) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in resp.content.iter_any():
                    received += piece

    assert received.count(b'"content":') == 1 + 4
    assert b"[DONE]" not in received


async def test_pace_header_spaces_tokens_socket(sim: Simulator) -> None:
    headers = {"x-sim-pace-ms": "20", "x-sim-tokens": "4"}
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        url = sim.url + "/v1/chat/completions"
        async with session.post(url, json={"stream": True}, headers=headers) as resp:
            async for _line in resp.content:
                arrivals.append(time.perf_counter())

    assert arrivals[-1] - arrivals[0] >= 4 * 0.02 * 0.9


async def test_unknown_path_is_a_json_404_socket(sim: Simulator) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(sim.url + "/v2/nothing") as resp,
    ):
        body = await resp.json()

    assert resp.status == 404
    assert body["error"]["type"] == "invalid_request_error"


async def test_invalid_hook_value_is_a_400_socket(sim: Simulator) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            sim.url + "/v1/chat/completions",
            json={},
            headers={"x-sim-tokens": "many"},
        ) as resp,
    ):
        body = await resp.json()

    assert resp.status == 400
    assert "x-sim-tokens" in body["error"]["message"]


async def test_command_line_prints_its_url_socket() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmproxy.simulator", "--port", "0",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        url = line.decode().strip()
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + "/v1/models") as resp,
        ):
            assert resp.status == 200
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
