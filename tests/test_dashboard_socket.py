"""Every PromQL expression in the dashboard and the rules is run against a real
Prometheus scraping a real llmproxy under test traffic, and returns data.

The proxy runs in front of the simulated provider with five upstreams, each
there to produce some of the series: ``openai`` (streams, usage, anomalies,
429s that are retried, probes), ``anthropic`` (529 overloaded), ``flaky`` (500s
until its breaker opens), ``dead`` (nothing listens: failed probes, connection
errors; route ``/dead`` falls back to ``openai``, ``/down`` does not) and
``slow`` (one slot and one place in its queue: queue waits, queue_full, streams
without usage). A ``prometheus`` server scrapes the admin port and evaluates
the rules every second.

What "returns data" means, per expression:

- dashboard targets and recording rules: the expression returns at least one
  series with a finite value, with the template variables set as Grafana sets
  them when every value of each is selected;
- alerts: an alert returns data only while it fires, so each operand of its
  comparisons and of its ``and``/``or``/``unless`` must return data instead;
  the thresholds (number literals) are left out;
- ``offset 1d`` and ``offset 1w`` read data from before this Prometheus
  started, so an expression that has one must evaluate successfully as it is,
  and return data with its offsets removed. This concerns the latency alert's
  baseline (``llmproxy:request_duration_seconds:p99_1h offset 1d``), the
  tokens-per-request alert's (``...:ratio_rate1h offset 1w``) and the
  dashboard's "a day ago" and "a week ago" lines.

Every rule must also have been evaluated by Prometheus without an error.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import NO_PROBE, ProxyFactory, RunningProxy
from prometheus_client.parser import text_string_to_metric_families
from test_deploy_rules import RULES, dashboard_exprs, load_dashboard, load_rules

from llmproxy.simulator import Simulator, start_simulator

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus server is not installed (CI installs Debian's prometheus)",
)

# Grafana's own variables, as a dashboard over the last few minutes sets them.
GRAFANA_VALUES = {"__rate_interval": "1m", "__range": "1m", "__interval": "15s"}
_OFFSET = re.compile(r"\s+offset\s+\d+[smhdwy]")
_SET_OR_COMPARISON = re.compile(r"==|!=|>=|<=|>|<|\b(?:and|or|unless)\b")
_MODIFIERS = re.compile(
    r"^\s*(?:bool\b\s*)?(?:(?:on|ignoring)\s*\([^)]*\)\s*)?"
    r"(?:group_(?:left|right)\b\s*(?:\([^)]*\))?\s*)?"
)
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")
_NUMBER = re.compile(r"\s*[0-9.]+\s*")
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def proxy_raw(sim_url: str) -> dict[str, Any]:
    def sim(**extra: Any) -> dict[str, Any]:
        return {"url": sim_url, "api": "openai", "health": NO_PROBE, **extra}

    probed = {"interval": "1s", "timeout": "1s"}
    return {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": {
            "openai": sim(health=probed),
            # No retries: each 529 is one fault, far from opening its breaker.
            "anthropic": sim(api="anthropic", retries={"attempts": 1}),
            "flaky": sim(
                breaker={"failures": 2, "window": "10s", "reset_after": "60s"},
                retries={"attempts": 1},
            ),
            "dead": {"url": "http://127.0.0.1:1", "api": "openai", "health": probed},
            "slow": sim(max_concurrency=1, max_queue=1, inject_stream_usage=False),
        },
        "routes": [
            {"prefix": "/v1", "upstream": "openai"},
            {"prefix": "/anthropic", "upstream": "anthropic", "strip_prefix": True},
            {"prefix": "/flaky", "upstream": "flaky", "strip_prefix": True},
            {
                "prefix": "/dead",
                "upstream": "dead",
                "strip_prefix": True,
                "fallbacks": ["openai"],
            },
            {"prefix": "/down", "upstream": "dead", "strip_prefix": True},
            {"prefix": "/slow", "upstream": "slow", "strip_prefix": True},
        ],
    }


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


class Traffic:
    """Requests through the proxy that give every series the expressions read."""

    def __init__(self, session: aiohttp.ClientSession, proxy_url: str) -> None:
        self.session = session
        self.url = proxy_url

    async def post(
        self, path: str, body: dict[str, Any], **headers: str
    ) -> tuple[int, bytes]:
        sim_headers = {f"x-sim-{k.replace('_', '-')}": v for k, v in headers.items()}
        async with self.session.post(
            self.url + path, json=body, headers=sim_headers
        ) as resp:
            try:
                return resp.status, await resp.read()
            except aiohttp.ClientPayloadError:
                return resp.status, b""  # the stream that was cut on purpose

    async def wave(self) -> None:
        usage = {"stream_options": {"include_usage": True}}
        json_out = {"response_format": {"type": "json_object"}}
        chat = "/v1/chat/completions"
        claude = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}],
        }
        calls: list[Awaitable[tuple[int, bytes]]] = [
            self.post(chat, chat_body("gpt-4o")),
            self.post(chat, chat_body("gpt-4o", stream=True, **usage)),
            self.post(chat, chat_body("gpt-4o", stream=True), pace_ms="5"),
            self.post(chat, chat_body("gpt-4o", max_tokens=4)),
            self.post(chat, chat_body("gpt-4o", **json_out)),
            self.post(chat, chat_body("gpt-4o"), finish="content_filter"),
            self.post(chat, chat_body("gpt-4o", stream=True), fail="midstream"),
            self.post(chat, chat_body("sim-1")),  # no price
            self.post(chat, chat_body("gpt-4o"), status="429"),
            self.post("/anthropic/v1/messages", {**claude, "stream": True}),
            self.post("/anthropic/v1/messages", claude, pace_ms="1"),
            self.post("/anthropic/v1/messages", claude, status="529"),
            self.post("/dead" + chat, chat_body("gpt-4o")),
            self.post("/down" + chat, chat_body("gpt-4o")),
            self.flaky(),
            *[
                self.post(
                    "/slow" + chat,
                    chat_body("gpt-4o-mini", stream=True),
                    pace_ms="20",
                    tokens="10",
                )
                for _ in range(3)
            ],
        ]
        await asyncio.gather(*calls)

    async def flaky(self) -> tuple[int, bytes]:
        """Two 500s open the breaker; the third request is refused by it."""
        body = chat_body("gpt-4o")
        for _ in range(2):
            await self.post("/flaky/v1/chat/completions", body, status="500")
        return await self.post("/flaky/v1/chat/completions", body)


class Prometheus:
    """A ``prometheus`` server in a subprocess, and its HTTP API."""

    def __init__(self, tmp: Path, target: str, session: aiohttp.ClientSession):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.session = session
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "llmproxy", "static_configs": [{"targets": [target]}]}
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        self.args = [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Prometheus:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, stdout=log, stderr=log
            )
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 10)

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(self.url + path, params=params) as resp:
            return await resp.json()

    async def query(self, expr: str) -> dict[str, Any]:
        async with self.session.post(
            self.url + "/api/v1/query", data={"query": expr}
        ) as resp:
            return dict(await resp.json())

    async def until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Poll ``check`` until it holds; fail with the server's log after 30s."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await self._holds(check):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.log.read_text()}")

    async def _holds(self, check: Callable[[], Awaitable[bool]]) -> bool:
        assert self.process is not None and self.process.returncode is None, (
            self.log.read_text()
        )
        try:
            return await check()
        except aiohttp.ClientError:
            return False  # not listening yet

    async def label_values(self, label: str, selector: str) -> list[str]:
        answer = await self.get(
            f"/api/v1/label/{label}/values", **{"match[]": selector}
        )
        return sorted(v for v in answer["data"] if v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def operands(expr: str) -> list[str]:
    """The operands of ``expr``'s top-level comparisons and set operations,
    split again inside parentheses that wrap a whole operand."""
    parts, depth, start, quote, i = [], 0, 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := _SET_OR_COMPARISON.match(expr, i)):
            parts.append(expr[start:i])
            i = start = match.end()
            continue
        i += 1
    parts.append(expr[start:])
    if len(parts) == 1:
        inner = _unwrap(expr.strip())
        return [expr.strip()] if inner is None else operands(inner)
    leaves = []
    for part in parts:
        part = _MODIFIERS.sub("", part, count=1)
        leaves.extend(operands(part))
    return leaves


def with_bool(expr: str) -> str:
    """``expr`` with ``bool`` after each comparison outside braces and strings:
    0 or 1 for every pair the comparison matches, instead of a filter."""
    out, braces, quote, i = [], 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                out.append(expr[i : i + 2])
                i += 2
                continue
            if char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "{}":
            braces += 1 if char == "{" else -1
        elif not braces and (match := _COMPARISON.match(expr, i)):
            out.append(match.group() + " bool")
            i = match.end()
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _unwrap(expr: str) -> str | None:
    """``expr`` without the parentheses around all of it, or None if it has none."""
    if not expr.startswith("("):
        return None
    depth = 0
    for i, char in enumerate(expr):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return expr[1:-1] if i == len(expr) - 1 else None
    return None


def _grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus query."""
    return "(" + "|".join(_REGEX_SPECIAL.sub(r"\\\\\1", v) for v in values) + ")"


def _has_data(answer: dict[str, Any]) -> bool:
    data = answer["data"]
    if data["resultType"] == "scalar":
        return True
    return any(math.isfinite(float(s["value"][1])) for s in data["result"])


def _total_requests(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llmproxy_requests_total"
    )


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = await start_simulator("127.0.0.1", 0, tokens=16)
    yield sim
    await sim.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


async def run_traffic(
    prometheus: Prometheus, running: RunningProxy, session: aiohttp.ClientSession
) -> None:
    """Send the traffic, and return once Prometheus has scraped all of it and
    evaluated every rule on it."""

    async def scraping() -> bool:
        answer = await prometheus.query('up{job="llmproxy"} == 1')
        return bool(answer["data"]["result"])

    await prometheus.until("the first scrape", scraping)

    # Two waves, the second sent only once Prometheus has scraped the first,
    # so that every rate has two samples and an increase between them. (A fixed
    # sleep between the waves is not enough on a loaded machine: a series born
    # in the first wave whose first scrape came after the second would show no
    # increase, and quantiles over it none at all.)
    traffic = Traffic(session, running.url)
    for wave in ("first", "second"):
        await traffic.wave()
        await _until_scraped(prometheus, running, session, wave)
    since = time.time()

    async def evaluated() -> bool:
        groups = (await prometheus.get("/api/v1/rules"))["data"]["groups"]
        return all(_seconds(g["lastEvaluation"]) > since for g in groups)

    await prometheus.until("the rules to be evaluated", evaluated)


async def _until_scraped(
    prometheus: Prometheus,
    running: RunningProxy,
    session: aiohttp.ClientSession,
    wave: str,
) -> None:
    """Return once Prometheus holds every request the proxy has counted."""
    await running.settle()
    async with session.get(running.admin_url + "/metrics") as resp:
        total = _total_requests(await resp.text())

    async def all_scraped() -> bool:
        answer = await prometheus.query("sum(llmproxy_requests_total)")
        result = answer["data"]["result"]
        return bool(result) and float(result[0]["value"][1]) == total

    await prometheus.until(f"the {wave} wave to be scraped", all_scraped)


def _seconds(rfc3339: str) -> float:
    """A Prometheus timestamp (nanoseconds, any offset) as Unix seconds."""
    match = re.fullmatch(r"([^.]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", rfc3339)
    assert match, rfc3339
    whole, fraction, zone = match.groups()
    moment = datetime.fromisoformat(whole + zone.replace("Z", "+00:00"))
    return moment.timestamp() + float("0." + (fraction or "0"))


async def test_every_dashboard_and_rule_expression_returns_data_socket(
    tmp_path: Path,
    simulator: Simulator,
    start_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
) -> None:
    running = await start_proxy(proxy_raw(simulator.url))
    target = running.admin_url.removeprefix("http://")
    async with Prometheus(tmp_path, target, session) as prometheus:
        await run_traffic(prometheus, running, session)
        problems = await _check_rules_evaluated(prometheus)
        values = await _variables(prometheus, problems)
        for expr in dashboard_exprs(load_dashboard()):
            problems += await _check(prometheus, _substitute(expr, values), False)
        for group in load_rules()["groups"]:
            for rule in group["rules"]:
                problems += await _check(prometheus, rule["expr"], "alert" in rule)
                if "record" in rule:
                    problems += await _check(prometheus, rule["record"], False)
    assert not problems, "\n".join(problems)


async def _check_rules_evaluated(prometheus: Prometheus) -> list[str]:
    groups = (await prometheus.get("/api/v1/rules"))["data"]["groups"]
    names = {g["name"] for g in groups}
    expected = {g["name"] for g in load_rules()["groups"]}
    problems = (
        [f"rule groups not loaded: {expected - names}"] if expected - names else []
    )
    for group in groups:
        for rule in group["rules"]:
            if rule["health"] != "ok":
                problems.append(f"{rule['name']}: {rule['health']} {rule['lastError']}")
    return problems


async def _variables(prometheus: Prometheus, problems: list[str]) -> dict[str, str]:
    """Each template variable with all its values selected, as Grafana writes it."""
    values = dict(GRAFANA_VALUES)
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = _substitute(variable["definition"], values)
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
        assert match, definition
        found = await prometheus.label_values(match.group(2), match.group(1))
        if not found:
            problems.append(f"variable {variable['name']} has no values: {definition}")
        values[variable["name"]] = _grafana_regex(found or ["none"])
    return values


def _substitute(expr: str, values: dict[str, str]) -> str:
    substituted = re.sub(r"\$(\w+)", lambda m: values.get(m[1], m[0]), expr)
    assert "$" not in substituted, substituted
    return substituted


async def _check(prometheus: Prometheus, expr: str, alert: bool) -> list[str]:
    """What is wrong with ``expr``: it fails to evaluate, or returns no data."""
    answer = await prometheus.query(expr)
    if answer["status"] != "success":
        return [f"{expr}\n  fails: {answer.get('error')}"]
    # An alert returns data only while it fires: its operands must, and so must
    # its bool form, which shows that the operands' labels match each other.
    parts = [*operands(expr), with_bool(expr)] if alert else [expr, *operands(expr)]
    problems = []
    for part in dict.fromkeys(parts):
        if _NUMBER.fullmatch(part):
            continue  # a threshold
        answer = await prometheus.query(_OFFSET.sub("", part))
        if answer["status"] != "success" or not _has_data(answer):
            problems.append(f"{expr}\n  no data from: {part}")
    return problems
