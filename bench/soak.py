"""Soak: thousands of concurrent paced streams through llmproxy, for minutes.

    python bench/soak.py --streams 2000 --minutes 5

The proxy runs as ``llmproxy serve --config FILE`` in a process of its own, so
its resident memory and open descriptors can be read from ``/proc``; the
simulated provider runs in another (``python -m llmproxy.simulator``). This
process keeps ``--streams`` streams open at all times until the time is up,
each a paced chat completion, and checks every one: status 200, every content
delta in order, the finish reason, the usage and ``[DONE]``. It prints the
proxy's RSS and descriptors once a minute (every ``--sample`` seconds are
recorded), the RSS growth per minute after the warm-up as a least-squares
slope, and the descriptors before the load, at its peak and after it.

After the load, the provider is stopped so that the proxy's pooled upstream
connections close; the descriptors must then return to where they were before
the first request. Exit status 1 when a stream failed or the descriptors did
not return; the growth figure is for a person (or ``tests/test_soak_socket.py``)
to judge. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from llmproxy.simulator import completion_text

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


@dataclass
class Sample:
    at: float  # seconds since the load began
    rss_mib: float
    fds: int
    streams_done: int


@dataclass
class Report:
    streams: int
    seconds: float
    tokens: int
    pace_ms: float
    warmup_s: float
    completed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    bytes_received: int = 0
    fds_before: int = 0
    fds_peak: int = 0
    fds_after: int = 0
    rss_before_mib: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_growth_mib_per_min: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and self.completed > 0
            and (self.fds_after <= self.fds_before)
        )


def rss_mib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE / MIB


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


class Child:
    """A process of its own group, its output in a file, ended with SIGTERM."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_for_line(self, needle: str, within: float = 20.0) -> str:
        """The first line of output that holds ``needle``."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.proc.args[:4]} never said {needle!r}:\n{tail}")

    def stop(self, within: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(within)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    return env


def write_config(directory: Path, provider_url: str) -> Path:
    path = directory / "soak.yaml"
    config = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": {
            "sim": {
                "url": provider_url,
                "api": "openai",
                "health": {"path": "off"},
                "max_concurrency": 100_000,
                "timeouts": {"idle": "30s", "total": "10m"},
            }
        },
        "routes": [{"prefix": "/v1", "upstream": "sim"}],
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def check_stream(body: bytes, tokens: int) -> str | None:
    """What is wrong with one relayed stream, or ``None``."""
    events = [e for e in body.split(b"\n\n") if e]
    if not events or events[-1] != b"data: [DONE]":
        return "no [DONE] at the end"
    text: list[str] = []
    finish = usage = None
    for event in events[:-1]:
        if not event.startswith(b"data: "):
            return f"not a data event: {event[:60]!r}"
        chunk = orjson.loads(event[6:])
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
        usage = chunk.get("usage") or usage
    if "".join(text) != completion_text(tokens):
        return "the content differs"
    if finish != "stop" or not usage or usage["completion_tokens"] != tokens:
        return f"finish {finish!r}, usage {usage!r}"
    return None


async def stream_forever(
    session: aiohttp.ClientSession,
    url: str,
    report: Report,
    until: float,
    headers: dict[str, str],
) -> None:
    body = orjson.dumps(
        {
            "model": "sim-1",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "soak"}],
        }
    )
    while time.monotonic() < until:
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                received = await resp.read()
                problem = (
                    f"status {resp.status}"
                    if resp.status != 200
                    else check_stream(received, report.tokens)
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem, received = f"{type(exc).__name__}: {exc}", b""
        report.bytes_received += len(received)
        if problem is None:
            report.completed += 1
        else:
            report.failed += 1
            if len(report.failures) < 20:
                report.failures.append(problem)


async def sample_until(
    pid: int, report: Report, started: float, done: asyncio.Event, every: float
) -> None:
    next_print = 60.0
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)
        at = time.monotonic() - started
        sample = Sample(round(at, 2), round(rss_mib(pid), 2), fd_count(pid), 0)
        sample.streams_done = report.completed + report.failed
        report.samples.append(sample)
        report.fds_peak = max(report.fds_peak, sample.fds)
        if at >= next_print:
            next_print += 60.0
            print(
                f"  minute {at / 60:4.1f}: rss {sample.rss_mib:7.1f} MiB, "
                f"fds {sample.fds:5d}, streams done {sample.streams_done}",
                flush=True,
            )


async def soak(
    streams: int,
    seconds: float,
    *,
    tokens: int = 20,
    pace_ms: float = 100.0,
    warmup: float | None = None,
    sample_every: float = 1.0,
    workdir: Path | None = None,
) -> Report:
    """Run the soak and return its figures; the processes are always stopped."""
    warmup = seconds * 0.25 if warmup is None else warmup
    report = Report(streams, seconds, tokens, pace_ms, warmup)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        directory = Path(tmp)
        env = child_env()
        provider = Child(
            [sys.executable, "-m", "llmproxy.simulator", "--port", "0"],
            directory / "simulator.log",
            env,
        )
        proxy: Child | None = None
        try:
            provider_url = (await provider.wait_for_line("http://")).strip()
            config = write_config(directory, provider_url)
            proxy = Child(
                [sys.executable, "-m", "llmproxy", "serve", "--config", str(config)],
                directory / "proxy.log",
                env,
            )
            started_line = await proxy.wait_for_line('"proxy.started"')
            proxy_url = orjson.loads(started_line)["listen"]
            await _load(report, proxy.pid, proxy_url, provider)
        finally:
            if proxy is not None:
                code = proxy.stop()
                if code != 0:
                    report.failures.append(f"the proxy exited {code}")
                    report.failed += 1
            provider.stop()
    return report


async def _load(report: Report, pid: int, proxy_url: str, provider: Child) -> None:
    report.fds_before = report.fds_peak = fd_count(pid)
    report.rss_before_mib = rss_mib(pid)
    headers = {
        "x-sim-tokens": str(report.tokens),
        "x-sim-pace-ms": str(report.pace_ms),
    }
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=report.tokens * report.pace_ms / 1e3 + 60)
    started = time.monotonic()
    done = asyncio.Event()
    sampler = asyncio.create_task(
        sample_until(pid, report, started, done, min(1.0, report.seconds / 20))
    )
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        until = started + report.seconds
        url = proxy_url + "/v1/chat/completions"
        # Started over the first pace interval, not all in the same instant.
        spread = report.pace_ms / 1e3 / max(report.streams, 1)

        async def one(i: int) -> None:
            await asyncio.sleep(i * spread)
            await stream_forever(session, url, report, until, headers)

        await asyncio.gather(*(one(i) for i in range(report.streams)))
    done.set()
    await sampler

    after_warmup = [
        (s.at, s.rss_mib) for s in report.samples if s.at >= report.warmup_s
    ]
    report.rss_growth_mib_per_min = round(slope_per_minute(after_warmup), 3)
    report.rss_after_warmup_mib = after_warmup[0][1] if after_warmup else 0.0
    report.rss_end_mib = rss_mib(pid)

    # The clients are gone; stopping the provider closes the proxy's pool.
    provider.stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        report.fds_after = fd_count(pid)
        if report.fds_after <= report.fds_before:
            break
        await asyncio.sleep(0.1)


def print_report(report: Report) -> None:
    print(
        f"\n{report.streams} concurrent streams for {report.seconds:g} s "
        f"({report.tokens} tokens, {report.pace_ms:g} ms apart):"
    )
    print(f"  streams completed    {report.completed}")
    print(f"  streams failed       {report.failed}")
    for failure in report.failures:
        print(f"    {failure}")
    print(f"  bytes received       {report.bytes_received}")
    print(
        f"  proxy RSS            {report.rss_before_mib:.1f} MiB idle, "
        f"{report.rss_after_warmup_mib:.1f} after the {report.warmup_s:g} s warm-up, "
        f"{report.rss_end_mib:.1f} at the end"
    )
    print(
        f"  RSS growth           {report.rss_growth_mib_per_min:+.2f} MiB/min "
        "after warm-up (least squares)"
    )
    print(
        f"  proxy descriptors    {report.fds_before} before, {report.fds_peak} at "
        f"peak, {report.fds_after} after"
    )
    print("  result               " + ("ok" if report.ok else "FAILED"))


def raise_file_limit() -> None:
    """Each stream holds a descriptor here: lift the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per stream")
    parser.add_argument("--pace-ms", type=float, default=100.0)
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds not counted in the growth figure (default: a quarter)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)

    raise_file_limit()
    run = soak(
        args.streams,
        args.minutes * 60,
        tokens=args.tokens,
        pace_ms=args.pace_ms,
        warmup=args.warmup,
    )
    try:
        import uvloop

        report = uvloop.run(run)
    except ImportError:
        report = asyncio.run(run)
    print_report(report)
    if args.json:
        figures: dict[str, Any] = asdict(report)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
