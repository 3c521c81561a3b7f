"""Running wrk for the unary workloads, and reading its ``--latency`` report."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

POST_SCRIPT = Path(__file__).resolve().parent / "post.lua"
# Each connection pauses 20 ms between requests: load at a bounded rate.
PACED_SCRIPT = POST_SCRIPT.with_name("post_paced.lua")
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def command(
    url: str, concurrency: int, seconds: float, script: Path = POST_SCRIPT
) -> list[str]:
    """The wrk command line that POSTs chat completions to ``url``."""
    return [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(round(seconds), 1)}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]


def run(prefix: list[str], url: str, concurrency: int, seconds: float) -> str:
    """Run wrk (behind ``prefix``, e.g. taskset) and return its report."""
    done = subprocess.run(
        [*prefix, *command(url, concurrency, seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return done.stdout


def parse(report: str) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and error counts from a wrk report."""
    rate = _RATE.search(report)
    total = _TOTAL.search(report)
    if rate is None or total is None:
        raise ValueError("not a wrk report: " + report[-500:])
    latency = {
        f"p{name}": float(value) * _UNIT_MS[unit]
        for name, value, unit in _PERCENTILE.findall(report)
    }
    non_2xx = _NON_2XX.search(report)
    socket = _SOCKET.search(report)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    return {
        "tool": "wrk",
        "completed": int(total.group(1)),
        "elapsed_s": float(total.group(2)) * _UNIT_MS[total.group(3)] / 1e3,
        "rate_per_s": float(rate.group(1)),
        "errors": errors,
        "latency_ms": latency,
    }
