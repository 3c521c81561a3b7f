"""A simulated OpenAI- and Anthropic-compatible provider for the demo, tests and bench.

It answers ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/messages`` and ``GET /v1/models`` in the providers' wire formats, streamed or
not. Response bytes are prebuilt per response shape and only the identity fields are
filled in per request, so the simulator is never what limits a benchmark.

Request headers steer one exchange:

- ``x-sim-tokens: N``: produce N completion tokens
- ``x-sim-pace-ms: MS``: wait MS milliseconds before each token of a stream
- ``x-sim-status: CODE``: answer CODE with the provider's error body
- ``x-sim-fail: midstream``: close the connection after half of a stream's tokens
- ``x-sim-finish: REASON``: report REASON as the finish (stop) reason
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import itertools
import logging
import os
import signal
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

DEFAULT_MODEL: Final = "sim-1"
REQUEST_LIMIT: Final = 10_000
TOKEN_LIMIT: Final = 10_000_000
EMBEDDING_DIMENSIONS: Final = 8
_WORDS: Final = (
    "Hello", " from", " the", " simulated", " provider", ",", " one", " token",
    " at", " a", " time", ".",
)  # fmt: skip
# A NUL byte never appears in orjson output, so inside a prebuilt piece it can stand
# for the identity fields (id, created) that differ per request.
_MARK: Final = b"\x00"
_FP: Final = "fp_sim"
_SSE: Final = "text/event-stream; charset=utf-8"
_JSON: Final = "application/json"
_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "unknown_url"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}
_ANTHROPIC_ERRORS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class SimulatorRequestError(ValueError):
    """The request cannot be simulated; answered as a 400 in the provider's format."""


def completion_text(tokens: int) -> str:
    """The text the simulator generates for a completion of ``tokens`` tokens."""
    return "".join(_piece(i) for i in range(tokens))


def estimate_tokens(value: object) -> int:
    """A deterministic token estimate: a quarter of the text's characters, plus one."""
    return _chars(value) // 4 + 1


def _piece(index: int) -> str:
    return _WORDS[index % len(_WORDS)]


def _chars(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(item) for item in value)
    if isinstance(value, dict):
        return _chars(value.get("content")) + _chars(value.get("text"))
    return 0


@dataclass(frozen=True, slots=True)
class _Ask:
    """What one request asks for, once headers have overridden the defaults."""

    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    tokens: int
    finish: str
    pace: float
    cut: bool


@dataclass(frozen=True, slots=True)
class _Script:
    """One response's pieces in order; a stream paces each of ``tokens``."""

    opening: tuple[bytes, ...]
    tokens: tuple[bytes, ...] = ()
    closing: tuple[bytes, ...] = ()


def _stamped(obj: dict[str, Any]) -> bytes:
    """``obj`` as JSON with the identity mark standing as its first members."""
    return b"{" + _MARK + b"," + orjson.dumps(obj)[1:]


def _data(obj: dict[str, Any], include_usage: bool) -> bytes:
    if include_usage and "usage" not in obj:
        # OpenAI sends an explicit null usage on every chunk before the usage chunk.
        obj = {**obj, "usage": None}
    return b"data: " + _stamped(obj) + b"\n\n"


def _event(obj: dict[str, Any]) -> bytes:
    name = str(obj["type"]).encode()
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _openai_usage(ask: _Ask) -> dict[str, Any]:
    return {
        "prompt_tokens": ask.prompt_tokens,
        "completion_tokens": ask.tokens,
        "total_tokens": ask.prompt_tokens + ask.tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@functools.lru_cache(maxsize=256)
def _chat_script(ask: _Ask) -> _Script:
    head = {"object": "chat.completion", "model": ask.model, "system_fingerprint": _FP}
    if not ask.stream:
        message = {"role": "assistant", "content": completion_text(ask.tokens)}
        choice = {"index": 0, "message": message, "logprobs": None}
        body = {**head, "choices": [{**choice, "finish_reason": ask.finish}]}
        return _Script((_stamped({**body, "usage": _openai_usage(ask)}),))
    head["object"] = "chat.completion.chunk"

    def chunk(delta: dict[str, str], reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return _data({**head, "choices": [choice]}, ask.include_usage)

    opening = (chunk({"role": "assistant", "content": ""}, None),)
    tokens = tuple(chunk({"content": _piece(i)}, None) for i in range(ask.tokens))
    return _Script(opening, tokens, _openai_closing(ask, head, chunk({}, ask.finish)))


@functools.lru_cache(maxsize=256)
def _completion_script(ask: _Ask) -> _Script:
    head = {"object": "text_completion", "model": ask.model}

    def choice(text: str, reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}

    if not ask.stream:
        text = completion_text(ask.tokens)
        body = {**head, "choices": [choice(text, ask.finish)]}
        return _Script((_stamped({**body, "usage": _openai_usage(ask)}),))
    tokens = tuple(
        _data({**head, "choices": [choice(_piece(i), None)]}, ask.include_usage)
        for i in range(ask.tokens)
    )
    last = _data({**head, "choices": [choice("", ask.finish)]}, ask.include_usage)
    return _Script((), tokens, _openai_closing(ask, head, last))


def _openai_closing(ask: _Ask, head: dict[str, Any], last: bytes) -> tuple[bytes, ...]:
    if not ask.include_usage:
        return (last, b"data: [DONE]\n\n")
    usage = _data({**head, "choices": [], "usage": _openai_usage(ask)}, True)
    return (last, usage, b"data: [DONE]\n\n")


@functools.lru_cache(maxsize=256)
def _messages_script(ask: _Ask) -> _Script:
    usage = {
        "input_tokens": ask.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": ask.tokens,
    }
    message = {"type": "message", "role": "assistant", "model": ask.model}
    if not ask.stream:
        content = [{"type": "text", "text": completion_text(ask.tokens)}]
        end = {"stop_reason": ask.finish, "stop_sequence": None, "usage": usage}
        return _Script((_stamped({**message, "content": content, **end}),))
    return _Script(_messages_opening(message, usage), *_messages_rest(ask))


def _messages_opening(
    message: dict[str, Any], usage: dict[str, int]
) -> tuple[bytes, ...]:
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 1}
    started = b'{"type":"message_start","message":' + _stamped(start) + b"}"
    block = {"type": "text", "text": ""}
    return (
        b"event: message_start\ndata: " + started + b"\n\n",
        _event({"type": "content_block_start", "index": 0, "content_block": block}),
        _event({"type": "ping"}),
    )


def _messages_rest(ask: _Ask) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    tokens = tuple(
        _event(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": _piece(i)},
            }
        )
        for i in range(ask.tokens)
    )
    delta = {"stop_reason": ask.finish, "stop_sequence": None}
    closing = (
        _event({"type": "content_block_stop", "index": 0}),
        _event(
            {
                "type": "message_delta",
                "delta": delta,
                "usage": {"output_tokens": ask.tokens},
            }
        ),
        _event({"type": "message_stop"}),
    )
    return tokens, closing


class _RateWindow:
    """Requests and tokens spent in the current second, for the rate-limit headers."""

    __slots__ = ("input", "output", "requests", "second")

    def __init__(self) -> None:
        self.second = self.requests = self.input = self.output = 0

    def take(self, ask: _Ask) -> None:
        now = int(time.time())
        if now != self.second:
            self.second, self.requests, self.input, self.output = now, 0, 0, 0
        self.requests += 1
        self.input += ask.prompt_tokens
        self.output += ask.tokens


class SimulatedProvider:
    """The request handler: one callable for every path, as ``web.Server`` wants."""

    def __init__(self, pace: float = 0.0, tokens: int = 16) -> None:
        self.pace = pace
        self.tokens = tokens
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._window = _RateWindow()
        chat = functools.partial(self._openai, _chat_script, "chatcmpl-")
        legacy = functools.partial(self._openai, _completion_script, "cmpl-")
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): chat,
            ("POST", "/v1/completions"): legacy,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/messages"): self._messages,
            ("GET", "/v1/models"): _list_models,
        }

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request; a request it cannot simulate gets a 400."""
        anthropic = request.path == "/v1/messages"
        route = self._routes.get((request.method, request.path))
        if route is None:
            message = f"Unknown request URL: {request.method} {request.path}"
            return self._error(404, message, anthropic)
        try:
            status = request.headers.get("x-sim-status")
            if status is not None:
                return self._error(_status(status), "Simulated error.", anthropic)
            return await route(request)
        except SimulatorRequestError as exc:
            return self._error(400, str(exc), anthropic)

    async def _ask(self, request: web.BaseRequest, finishes: tuple[str, str]) -> _Ask:
        body = await _json_body(request)
        headers = request.headers
        tokens = int(_number(headers, "x-sim-tokens", self.tokens))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if truncated := isinstance(limit, int) and 0 <= limit < tokens:
            tokens = int(limit)
        options = body.get("stream_options")
        prompt = [body.get(key) for key in ("system", "messages", "prompt")]
        return _Ask(
            model=_model(body),
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict)
            and options.get("include_usage") is True,
            prompt_tokens=estimate_tokens(prompt),
            tokens=tokens,
            finish=headers.get("x-sim-finish") or finishes[truncated],
            pace=_number(headers, "x-sim-pace-ms", self.pace * 1e3) / 1e3,
            cut=headers.get("x-sim-fail") == "midstream",
        )

    def _next_id(self) -> str:
        return f"{self._prefix}{next(self._ids):08x}"

    async def _openai(
        self, script: Callable[[_Ask], _Script], kind: str, request: web.BaseRequest
    ) -> web.StreamResponse:
        ask = await self._ask(request, ("stop", "length"))
        rid = self._next_id()
        stamp = f'"id":"{kind}{rid}","created":{int(time.time())}'.encode()
        headers = self._openai_headers(rid, ask)
        headers["Content-Type"] = _SSE if ask.stream else _JSON
        return await _answer(request, ask, script(ask), stamp, headers)

    async def _messages(self, request: web.BaseRequest) -> web.StreamResponse:
        ask = await self._ask(request, ("end_turn", "max_tokens"))
        rid = self._next_id()
        headers = self._anthropic_headers(rid, ask)
        headers["Content-Type"] = _SSE if ask.stream else _JSON
        stamp = f'"id":"msg_{rid}"'.encode()
        return await _answer(request, ask, _messages_script(ask), stamp, headers)

    async def _embeddings(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await _json_body(request)
        inputs = _embedding_inputs(body.get("input"))
        prompt = sum(_input_tokens(x) for x in inputs)
        answer = {
            "object": "list",
            "data": _embeddings(body, inputs),
            "model": _model(body),
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        ask = _Ask(_model(body), False, False, prompt, 0, "", 0.0, False)
        headers = self._openai_headers(self._next_id(), ask)
        headers["Content-Type"] = _JSON
        return web.Response(body=orjson.dumps(answer), headers=headers)

    def _openai_headers(self, rid: str, ask: _Ask) -> dict[str, str]:
        window = self._window
        window.take(ask)
        tokens_left = max(TOKEN_LIMIT - window.input - window.output, 0)
        return {
            "x-request-id": f"req_{rid}",
            "x-ratelimit-limit-requests": str(REQUEST_LIMIT),
            "x-ratelimit-remaining-requests": str(REQUEST_LIMIT - window.requests),
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": str(TOKEN_LIMIT),
            "x-ratelimit-remaining-tokens": str(tokens_left),
            "x-ratelimit-reset-tokens": "1s",
        }

    def _anthropic_headers(self, rid: str, ask: _Ask) -> dict[str, str]:
        window = self._window
        window.take(ask)
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(window.second + 1))
        headers = {"request-id": f"req_{rid}"}
        spent = {
            "requests": (REQUEST_LIMIT, window.requests),
            "tokens": (TOKEN_LIMIT, window.input + window.output),
            "input-tokens": (TOKEN_LIMIT, window.input),
            "output-tokens": (TOKEN_LIMIT, window.output),
        }
        for resource, (limit, used) in spent.items():
            prefix = f"anthropic-ratelimit-{resource}-"
            headers[prefix + "limit"] = str(limit)
            headers[prefix + "remaining"] = str(max(limit - used, 0))
            headers[prefix + "reset"] = reset
        return headers

    def _error(self, status: int, message: str, anthropic: bool) -> web.Response:
        rid = f"req_{self._next_id()}"
        headers = {"request-id" if anthropic else "x-request-id": rid}
        headers["Content-Type"] = _JSON
        if status in (429, 503, 529):
            headers["retry-after"] = "1"
        if anthropic:
            kind = _ANTHROPIC_ERRORS.get(status, "api_error")
            body: dict[str, Any] = {"type": "error"}
            body["error"] = {"type": kind, "message": message}
        else:
            default = "server_error" if status >= 500 else "invalid_request_error"
            kind, code = _OPENAI_ERRORS.get(status, (default, None))
            error = {"message": message, "type": kind, "param": None, "code": code}
            body = {"error": error}
        return web.Response(status=status, body=orjson.dumps(body), headers=headers)


_MODELS: Final = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": DEFAULT_MODEL, "object": "model", "owned_by": "llmproxy"}],
    }
)


async def _list_models(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(body=_MODELS, content_type=_JSON)


async def _answer(
    request: web.BaseRequest,
    ask: _Ask,
    script: _Script,
    stamp: bytes,
    headers: dict[str, str],
) -> web.StreamResponse:
    if not ask.stream:
        body = script.opening[0].replace(_MARK, stamp, 1)
        return web.Response(body=body, headers=headers)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    tokens = script.tokens[: len(script.tokens) // 2] if ask.cut else script.tokens
    try:
        # One write per piece, so that each event is its own chunk on the wire.
        for piece in script.opening:
            await response.write(piece.replace(_MARK, stamp, 1))
        for piece in tokens:
            if ask.pace > 0:
                await asyncio.sleep(ask.pace)
            await response.write(piece.replace(_MARK, stamp, 1))
        if ask.cut:
            _hang_up(request)
            return response
        for piece in script.closing:
            await response.write(piece.replace(_MARK, stamp, 1))
    except ConnectionResetError:
        # The client left mid-stream; aiohttp notices on its own, nothing to answer.
        return response
    await response.write_eof()
    return response


def _hang_up(request: web.BaseRequest) -> None:
    """Close the connection without the stream's end, as a provider crash does."""
    transport = request.transport
    if transport is not None:
        # close(), not abort(): the pieces already written must still arrive.
        transport.close()


async def _json_body(request: web.BaseRequest) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise SimulatorRequestError("The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise SimulatorRequestError("The request body must be a JSON object.")
    return body


def _number(headers: Mapping[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SimulatorRequestError(f"{name} must be a number.") from exc
    if not 0 <= value <= 1_000_000:
        raise SimulatorRequestError(f"{name} must be between 0 and 1000000.")
    return value


def _status(raw: str) -> int:
    if not raw.isdigit() or not 400 <= int(raw) <= 599:
        raise SimulatorRequestError("x-sim-status must be a status from 400 to 599.")
    return int(raw)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else DEFAULT_MODEL


def _embeddings(body: dict[str, Any], inputs: list[Any]) -> list[dict[str, Any]]:
    dims = body.get("dimensions")
    if not (isinstance(dims, int) and 0 < dims <= 4096):
        dims = EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    return [
        {"object": "embedding", "index": i, "embedding": _vector(x, dims, as_base64)}
        for i, x in enumerate(inputs)
    ]


def _embedding_inputs(value: object) -> list[Any]:
    # A list of integers is one input, already tokenized.
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(x, int) for x in value)
    ):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise SimulatorRequestError("input must be a string, or a non-empty list.")


def _input_tokens(item: object) -> int:
    return len(item) if isinstance(item, list) else estimate_tokens(item)


def _vector(item: object, dims: int, as_base64: bool) -> list[float] | str:
    """A deterministic embedding of ``item``; float32-exact, so base64 round-trips."""
    seed = zlib.crc32(orjson.dumps(item))
    values = [((seed >> (i % 24)) & 0xFF) / 256 - 0.5 for i in range(dims)]
    if not as_base64:
        return values
    return base64.b64encode(struct.pack(f"<{dims}f", *values)).decode()


def make_handler(pace: float = 0.0, tokens: int = 16) -> SimulatedProvider:
    """A request handler for ``aiohttp.web.Server``; ``pace`` is seconds per token."""
    return SimulatedProvider(pace=pace, tokens=tokens)


@dataclass(frozen=True, slots=True)
class Simulator:
    """A running simulator: where it listens, and how to stop it."""

    host: str
    port: int
    _runner: web.ServerRunner

    @property
    def url(self) -> str:
        """The base URL, without a path: ``http://127.0.0.1:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening; streams still running are cut after a second."""
        await self._runner.cleanup()
        log.info("simulator.closed", extra={"port": self.port})


async def start_simulator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    pace: float = 0.0,
    tokens: int = 16,
) -> Simulator:
    """Start a simulator listening on ``host:port`` (0 picks a free port)."""
    server = web.Server(make_handler(pace, tokens), access_log=None)
    runner = web.ServerRunner(server, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    log.info("simulator.listening", extra={"host": host, "port": bound})
    return Simulator(host, bound, runner)


async def _serve(args: argparse.Namespace) -> None:
    host, port = args.host, args.port
    sim = await start_simulator(host, port, pace=args.pace, tokens=args.tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(sim.url, flush=True)
    try:
        await stop.wait()
    finally:
        await sim.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> None:
    """Run the simulator until SIGINT or SIGTERM, printing its URL once listening."""
    parser = argparse.ArgumentParser(
        prog="python -m llmproxy.simulator", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds per token")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(args))


if __name__ == "__main__":
    main()
