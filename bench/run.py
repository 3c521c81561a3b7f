"""Benchmark llmproxy against the simulated provider itself and a bare aiohttp proxy.

    python bench/run.py [--quick] [--out bench/results/NAME.json]

Every target is measured alone on one core (``taskset -c``); the load generators
and the provider behind the proxies share another. Raw figures go to a JSON file
and a Markdown table of ratios is printed. bench/README.md says what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import report
import wrk
import yaml
from processes import (
    ROOT,
    Cores,
    Processes,
    TargetUnavailable,
    children_cpu,
    cpu_seconds,
    free_port,
    peak_rss_kb,
    wait_ready,
)

BENCH = ROOT / "bench"
PYTHON = sys.executable


@dataclass(frozen=True)
class Target:
    """A server to measure: its kind, plus environment and config it runs with."""

    name: str
    kind: str  # direct | bare | llmproxy
    env: Mapping[str, str] = field(default_factory=dict)
    # Merged over the generated llmproxy configuration (kind "llmproxy" only).
    config: Mapping[str, Any] = field(default_factory=dict)


TARGETS = (
    Target("direct", "direct"),
    Target("bare", "bare"),
    Target("llmproxy", "llmproxy"),
    # A variant is one more entry, for example:
    # Target("llmproxy-telemetry-off", "llmproxy", env={"OTEL_SDK_DISABLED": "true"}),
)


@dataclass(frozen=True)
class Workload:
    """One load pattern: unary (wrk) or streamed (stream_client.py)."""

    name: str
    concurrency: int
    stream: bool
    pace_ms: float | None = None
    tokens: int | None = None


WORKLOADS = (
    Workload("nonstream_c16", 16, stream=False),
    Workload("nonstream_c1", 1, stream=False),
    Workload("stream_c16", 16, stream=True, tokens=16),
    Workload("paced_c1", 1, stream=True, pace_ms=20, tokens=16),
    Workload("paced_c64", 64, stream=True, pace_ms=20, tokens=16),
)


def start_provider(procs: Processes, cores: Cores) -> tuple[str, int]:
    """Start the simulated provider the proxies forward to; return its URL and pid."""
    port = free_port()
    argv = [PYTHON, "-m", "llmproxy.simulator", "--port", str(port)]
    process = procs.start("provider", [*Cores.pin(cores.provider), *argv], {})
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/v1/models", timeout=30)
    return url, process.pid


def llmproxy_config(
    port: int, admin_port: int, upstream: str, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The configuration llmproxy is benchmarked with, ``extra`` merged over it."""
    config: dict[str, Any] = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
        },
        "upstreams": {"sim": {"url": upstream, "api": "openai"}},
        "routes": [{"prefix": "/v1", "upstream": "sim"}],
    }
    return _merge(config, extra)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Bench:
    """One run's shared facts: its processes, core plan, provider and phase length."""

    procs: Processes
    cores: Cores
    upstream: str
    provider_pid: int
    seconds: float

    def start(self, target: Target) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``target`` on the target core and wait until it serves."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ready = [url + "/v1/models"]
        if target.kind == "direct":
            argv = [PYTHON, "-m", "llmproxy.simulator", "--port", str(port)]
        elif target.kind == "bare":
            script = str(BENCH / "bare_proxy.py")
            argv = [PYTHON, script, "--upstream", self.upstream, "--port", str(port)]
        else:
            admin = free_port()
            config = llmproxy_config(port, admin, self.upstream, target.config)
            path = self.procs.logs / f"{target.name}.yaml"
            path.write_text(yaml.safe_dump(config))
            argv = [PYTHON, "-m", "llmproxy", "serve", "--config", str(path)]
            ready.insert(0, f"http://127.0.0.1:{admin}/readyz")
        pinned = [*Cores.pin(self.cores.target), *argv]
        process = self.procs.start(target.name, pinned, target.env)
        try:
            for check, timeout in zip(ready, (30.0, 10.0), strict=False):
                wait_ready(process, check, timeout)
        except TargetUnavailable as exc:
            self.procs.stop(process)
            raise TargetUnavailable(f"{exc}\n{self.procs.tail(target.name)}") from exc
        return process, url

    def target(self, target: Target) -> dict[str, Any]:
        """Every workload against ``target``; one that will not start is skipped."""
        try:
            process, url = self.start(target)
        except TargetUnavailable as exc:
            print(f"[{target.name}] SKIPPED: {exc}", file=sys.stderr)
            reason = str(exc).splitlines()[0]
            return {"status": "skipped", "reason": reason, "log": str(exc)}
        try:
            self.warm_up(url)
            pid = process.pid
            workloads = {w.name: self.workload(target, w, url, pid) for w in WORKLOADS}
            rss = peak_rss_kb(process.pid)
            return {"status": "ok", "workloads": workloads, "peak_rss_kb": rss}
        finally:
            self.procs.stop(process)

    def warm_up(self, url: str) -> None:
        """Let the target open connections and fill caches before it is measured."""
        for workload in (WORKLOADS[0], WORKLOADS[2]):
            self.stream_client(url, workload, min(self.seconds, 1.0))

    def workload(
        self, target: Target, workload: Workload, url: str, pid: int
    ) -> dict[str, Any]:
        """One workload against one target; a failed one is recorded, not raised."""
        try:
            result = self.measure(workload, url, pid)
        except (subprocess.SubprocessError, ValueError) as exc:
            print(f"[{target.name}] {workload.name}: FAILED: {exc}", file=sys.stderr)
            return {"failed": str(exc)}
        print(f"[{target.name}] {workload.name}: {_brief(result)}", file=sys.stderr)
        return result

    def measure(self, workload: Workload, url: str, pid: int) -> dict[str, Any]:
        """Run the load generator, with the CPU time each process spent on it."""
        before = cpu_seconds(pid), cpu_seconds(self.provider_pid), children_cpu()
        if workload.stream or shutil.which("wrk") is None:
            result = self.stream_client(url, workload, self.seconds)
        else:
            pin = Cores.pin(self.cores.load)
            endpoint = url + "/v1/chat/completions"
            text = wrk.run(pin, endpoint, workload.concurrency, self.seconds)
            result = wrk.parse(text)
        spent = cpu_seconds(pid) - before[0]
        result["cpu_s"] = spent
        result["cpu_util"] = spent / result["elapsed_s"]
        count = result["completed"]
        result["cpu_us_per_req"] = spent / count * 1e6 if count else None
        # The provider and the load generator share a core: when it is full, that
        # core, not the target, limits the figures.
        provider = cpu_seconds(self.provider_pid) - before[1]
        # A Python client counts its own CPU, leaving out its start-up.
        load = result.get("client_cpu_s", children_cpu() - before[2])
        result["load_side_cpu_util"] = (provider + load) / result["elapsed_s"]
        return result

    def stream_client(
        self, url: str, workload: Workload, seconds: float
    ) -> dict[str, Any]:
        """Run bench/stream_client.py on the load core and return its summary."""
        argv = [PYTHON, str(BENCH / "stream_client.py"), "--url", url]
        argv += ["--warmup", "0", "-c", str(workload.concurrency), "-d", str(seconds)]
        argv += ["--mode", "stream" if workload.stream else "unary"]
        if workload.pace_ms is not None:
            argv += ["--pace-ms", str(workload.pace_ms)]
        if workload.tokens is not None:
            argv += ["--tokens", str(workload.tokens)]
        done = subprocess.run(
            [*Cores.pin(self.cores.load), *argv],
            capture_output=True,
            check=True,
            timeout=seconds + 90,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        result: dict[str, Any] = json.loads(done.stdout)
        result["tool"] = "stream_client"
        result["latency_ms"] = result["total_ms"]
        return result


def _brief(result: dict[str, Any]) -> str:
    latency = result.get("latency_ms") or {}
    p50, p99 = latency.get("p50", float("nan")), latency.get("p99", float("nan"))
    errors = result["errors"] + result.get("incomplete", 0)
    return (
        f"{result['rate_per_s']:,.0f}/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"target cpu {result['cpu_util']:.0%}, errors {errors}"
    )


def metadata(args: argparse.Namespace, seconds: float, cores: Cores) -> dict[str, Any]:
    """What a reader needs to compare two result files."""
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seconds_per_workload": seconds,
        "cores": vars(cores),
        "unary_load_generator": "wrk" if shutil.which("wrk") else "stream_client.py",
        "cpu": models[0] if models else platform.processor(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "commit": commit.strip() or None,
        "workloads": [vars(w) for w in WORKLOADS],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases, for CI")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/)")
    parser.add_argument("--seconds", type=float, help="seconds per workload")
    names = ",".join(t.name for t in TARGETS)
    parser.add_argument("--targets", default=names, help=f"subset of {names}")
    return parser.parse_args(argv)


def run_bench(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every selected target through every workload; write and print results."""
    args = parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    cores = Cores.plan()
    if cores.target is None:
        print("no taskset or a single core: processes are not pinned", file=sys.stderr)
    if shutil.which("wrk") is None:
        note = "wrk not found (apt-get install -y wrk): unary load comes from Python"
        print(note, file=sys.stderr)
    selected = [t for t in TARGETS if t.name in args.targets.split(",")]
    results: dict[str, Any] = {"meta": metadata(args, seconds, cores), "targets": {}}
    with (
        tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as logs,
        Processes(Path(logs)) as procs,
    ):
        bench = Bench(procs, cores, *start_provider(procs, cores), seconds)
        for target in selected:
            results["targets"][target.name] = bench.target(target)
    results["meta"]["loadavg_at_end"] = os.getloadavg()
    results["ratios"] = report.ratios(results["targets"])
    write_results(results, args.out or _default_out(args.quick))
    print(report.markdown(results["targets"]))
    meta = results["meta"]
    start, end = meta["loadavg_at_start"][0], meta["loadavg_at_end"][0]
    cores_used = meta["cores"]
    print(f"\nload average {start:.2f} at start, {end:.2f} at end; cores {cores_used}")
    return results


def _default_out(quick: bool) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return BENCH / "results" / f"{stamp}{'-quick' if quick else ''}.json"


def write_results(results: dict[str, Any], path: Path) -> None:
    """Write the raw figures as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}", file=sys.stderr)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Unwind through the finally blocks, which end every process started.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python bench/run.py``."""
    signal.signal(signal.SIGTERM, _terminate)
    run_bench(argv)


if __name__ == "__main__":
    main()
