"""Starting a target and its trace sink, running workloads, reading its costs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import wrk
import yaml
from plan import (
    ROUNDS_WORKLOADS,
    SLOW_COLLECTOR_S,
    WORKLOAD,
    WORKLOADS,
    Target,
    Workload,
)
from plan import llmproxy_config as make_config
from processes import (
    ROOT,
    Cores,
    Processes,
    TargetUnavailable,
    children_cpu,
    cpu_seconds,
    fetch_text,
    free_port,
    metric_value,
    peak_rss_kb,
    reset_peak_rss,
    wait_ready,
)

BENCH = ROOT / "bench"
PYTHON = sys.executable
CHAT = "/v1/chat/completions"


@dataclass
class Running:
    """A started target: its process, URLs and, when it traces, its trace sink."""

    target: Target
    process: subprocess.Popen[bytes]
    url: str
    admin: str | None = None  # llmproxy's admin base URL
    sink: subprocess.Popen[bytes] | None = None
    sink_url: str | None = None  # the sink's base URL
    peak_rss_kb: int = 0  # VmHWM over the run, across per-workload resets

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Bench:
    """One run's shared facts: its processes, core plan, provider and phase length."""

    procs: Processes
    cores: Cores
    upstream: str
    provider_pid: int
    seconds: float

    def start(self, target: Target) -> Running:
        """Start ``target`` (and its sink) and wait until it serves."""
        sink, sink_url, env = None, None, dict(target.env)
        if target.collector in ("ok", "slow"):
            sink, sink_url = self.start_sink(target)
        if target.collector is not None:
            endpoint = (sink_url or "http://127.0.0.1:1") + "/v1/traces"
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
        try:
            process, url, admin = self.start_server(target, env)
        except TargetUnavailable:
            if sink is not None:
                self.procs.stop(sink)
            raise
        return Running(target, process, url, admin, sink, sink_url)

    def start_sink(self, target: Target) -> tuple[subprocess.Popen[bytes], str]:
        """Start bench/otlp_sink.py on the load core for ``target``'s spans."""
        port = free_port()
        delay = SLOW_COLLECTOR_S if target.collector == "slow" else 0.0
        argv = [PYTHON, str(BENCH / "otlp_sink.py"), "--port", str(port)]
        argv += ["--delay", str(delay)]
        name = f"{target.name}-sink"
        sink = self.procs.start(name, [*Cores.pin(self.cores.load), *argv], {})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(sink, url + "/stats", timeout=30)
        except TargetUnavailable as exc:
            self.procs.stop(sink)
            raise TargetUnavailable(
                f"trace sink: {exc}\n{self.procs.tail(name)}"
            ) from exc
        return sink, url

    def start_server(
        self, target: Target, env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], str, str | None]:
        """Start the target's server on the target core; return it and its URLs."""
        port = free_port()
        url, admin = f"http://127.0.0.1:{port}", None
        ready = [url + "/v1/models"]
        if target.kind == "direct":
            argv = [PYTHON, "-m", "llmproxy.simulator", "--port", str(port)]
        elif target.kind == "bare":
            script = str(BENCH / "bare_proxy.py")
            argv = [PYTHON, script, "--upstream", self.upstream, "--port", str(port)]
        else:
            admin_port = free_port()
            admin = f"http://127.0.0.1:{admin_port}"
            config = make_config(port, admin_port, self.upstream, target.config)
            path = self.procs.logs / f"{target.name}.yaml"
            path.write_text(yaml.safe_dump(config))
            argv = [PYTHON, "-m", "llmproxy", "serve", "--config", str(path)]
            if target.workers is not None:
                argv += ["--workers", str(target.workers)]
            ready.insert(0, admin + "/readyz")
        pinned = [*Cores.pin(self.cores.target), *argv]
        process = self.procs.start(target.name, pinned, env)
        try:
            for check, timeout in zip(ready, (30.0, 10.0), strict=False):
                wait_ready(process, check, timeout)
        except TargetUnavailable as exc:
            self.procs.stop(process)
            raise TargetUnavailable(f"{exc}\n{self.procs.tail(target.name)}") from exc
        return process, url, admin

    def stop(self, running: Running) -> dict[str, Any] | None:
        """Stop the target, then its sink; return what the sink received."""
        self.procs.stop(running.process)
        if running.sink is None or running.sink_url is None:
            return None
        # After the target: it flushes its last spans as it stops.
        text = fetch_text(running.sink_url + "/stats")
        self.procs.stop(running.sink)
        stats: dict[str, Any] | None = json.loads(text) if text else None
        return stats

    def target(self, target: Target) -> dict[str, Any]:
        """Every workload of ``target``; one that will not start is skipped."""
        try:
            running = self.start(target)
        except TargetUnavailable as exc:
            return skipped(target, exc)
        try:
            self.warm_up(running.url)
            names = target.workloads or [w.name for w in WORKLOADS]
            result: dict[str, Any] = {"status": "ok"}
            result["workloads"] = self.workloads(running, names)
            result["peak_rss_kb"] = running.peak_rss_kb or None
            result["telemetry"] = self.telemetry(running)
        finally:
            received = self.stop(running)
        if received is not None:
            result["collector_received"] = received
        return result

    def interleaved(
        self, targets: Sequence[Target], rounds: int
    ) -> dict[str, dict[str, Any]]:
        """Every workload of every target, the targets all started at once and
        taking turns: each workload runs on each target in turn, ``rounds`` times
        over for the throughput workloads, and the median round is kept. A shared
        machine's drift then falls on all the targets alike, not on whichever
        happened to run while it was busy."""
        results: dict[str, dict[str, Any]] = {}
        running: dict[str, Running] = {}
        measured: dict[str, dict[str, list[dict[str, Any]]]] = {}
        try:
            for target in targets:
                try:
                    running[target.name] = self.start(target)
                except TargetUnavailable as exc:
                    results[target.name] = skipped(target, exc)
            for each in running.values():
                self.warm_up(each.url)
            for workload in WORKLOADS:
                turns = rounds if workload.name in ROUNDS_WORKLOADS else 1
                for _ in range(turns):
                    for name, each in running.items():
                        names = each.target.workloads
                        if names is None or workload.name in names:
                            result = self.workload(each, workload, each.url)
                            rows = measured.setdefault(name, {})
                            rows.setdefault(workload.name, []).append(result)
            for name, each in running.items():
                results[name] = {
                    "status": "ok",
                    "workloads": {
                        workload: median_round(tries)
                        for workload, tries in measured.get(name, {}).items()
                    },
                    "peak_rss_kb": each.peak_rss_kb or None,
                    "telemetry": self.telemetry(each),
                }
        finally:
            for name, each in running.items():
                received = self.stop(each)
                if received is not None and name in results:
                    results[name]["collector_received"] = received
        return {t.name: results[t.name] for t in targets if t.name in results}

    def warm_up(self, url: str) -> None:
        """Let the target open connections and fill caches before it is measured."""
        for name in ("nonstream_c16", "stream_c16"):
            self.stream_client(url, WORKLOAD[name], min(self.seconds, 1.0))

    def workloads(
        self, running: Running, names: Iterable[str], base: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """The named workloads one after another, against ``base`` (the target's
        URL by default); a failed one is recorded, not raised."""
        return {
            name: self.workload(running, WORKLOAD[name], base or running.url)
            for name in names
        }

    def workload(
        self, running: Running, workload: Workload, base: str
    ) -> dict[str, Any]:
        """One workload, with the target's peak RSS during it where Linux allows."""
        name = running.target.name
        running.peak_rss_kb = max(running.peak_rss_kb, peak_rss_kb(running.pid) or 0)
        fresh = reset_peak_rss(running.pid)
        try:
            result = self.measure(workload, base, running.pid)
        except (subprocess.SubprocessError, ValueError) as exc:
            print(f"[{name}] {workload.name}: FAILED: {exc}", file=sys.stderr)
            return {"failed": str(exc)}
        peak = peak_rss_kb(running.pid) or 0
        running.peak_rss_kb = max(running.peak_rss_kb, peak)
        if fresh:
            result["peak_rss_kb"] = peak
        print(f"[{name}] {workload.name}: {brief(result)}", file=sys.stderr)
        return result

    def measure(self, workload: Workload, url: str, pid: int) -> dict[str, Any]:
        """Run the load generator, with the CPU time each process spent on it."""
        before = cpu_seconds(pid), cpu_seconds(self.provider_pid), children_cpu()
        if workload.stream or shutil.which("wrk") is None:
            result = self.stream_client(url, workload, self.seconds)
        else:
            pin = Cores.pin(self.cores.load)
            text = wrk.run(pin, url + CHAT, workload.concurrency, self.seconds)
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

    def client_argv(self, url: str, workload: Workload, seconds: float) -> list[str]:
        """The command line of bench/stream_client.py for ``workload``, unpinned."""
        argv = [PYTHON, str(BENCH / "stream_client.py"), "--url", url]
        argv += ["--warmup", "0", "-c", str(workload.concurrency), "-d", str(seconds)]
        argv += ["--mode", "stream" if workload.stream else "unary"]
        if workload.pace_ms is not None:
            argv += ["--pace-ms", str(workload.pace_ms)]
        if workload.tokens is not None:
            argv += ["--tokens", str(workload.tokens)]
        if workload.once:
            argv += ["--once", "--timeout", "300"]
        return argv

    def stream_client(
        self, url: str, workload: Workload, seconds: float
    ) -> dict[str, Any]:
        """Run bench/stream_client.py on the load core and return its summary."""
        done = subprocess.run(
            [*Cores.pin(self.cores.load), *self.client_argv(url, workload, seconds)],
            capture_output=True,
            check=True,
            timeout=seconds + 90,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return client_result(done.stdout)

    def telemetry(self, running: Running) -> dict[str, float | None] | None:
        """llmproxy's own counts of spans it dropped or failed to export."""
        if running.admin is None:
            return None
        text = fetch_text(running.admin + "/metrics") or ""
        return {
            "spans_dropped": metric_value(text, "llmproxy_spans_dropped_total"),
            "spans_export_failed": metric_value(
                text, "llmproxy_spans_export_failed_total"
            ),
        }


def client_result(stdout: bytes) -> dict[str, Any]:
    """stream_client.py's JSON summary, with its total time as the latency."""
    result: dict[str, Any] = json.loads(stdout)
    result["tool"] = "stream_client"
    result["latency_ms"] = result["total_ms"]
    return result


def median_round(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The round of median throughput (the lower of the two middle ones), with
    every round's throughput in run order under ``rounds_per_s``."""
    done = [t for t in tries if "rate_per_s" in t]
    if not done:
        return tries[0]
    chosen = dict(sorted(done, key=lambda t: t["rate_per_s"])[(len(done) - 1) // 2])
    if len(tries) > 1:
        chosen["rounds_per_s"] = [t.get("rate_per_s") for t in tries]
    return chosen


def skipped(target: Target, exc: TargetUnavailable) -> dict[str, Any]:
    """The record of a target that did not start."""
    print(f"[{target.name}] SKIPPED: {exc}", file=sys.stderr)
    return {"status": "skipped", "reason": str(exc).splitlines()[0], "log": str(exc)}


def brief(result: dict[str, Any]) -> str:
    """One line about a workload's result, for the progress log."""
    latency = result.get("latency_ms") or {}
    p50, p99 = latency.get("p50", math.nan), latency.get("p99", math.nan)
    errors = result["errors"] + result.get("incomplete", 0)
    return (
        f"{result['rate_per_s']:,.0f}/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"target cpu {result['cpu_util']:.0%}, errors {errors}"
    )


class Flood:
    """Load on a second URL that runs while other workloads are measured.

    wrk where it is installed, each connection pausing 20 ms between requests
    (clients retrying against an outage, not a flood that would take the proxy's
    whole core), else stream_client.py at full speed; both print their summary
    when SIGINT ends them. Runs at nice 19 on the load core, so that it takes
    what CPU the measuring client and the provider leave.
    """

    def __init__(self, bench: Bench, base: str, connections: int) -> None:
        nice = ["nice", "-n", "19", *Cores.pin(bench.cores.load)]
        self.wrk = shutil.which("wrk") is not None
        # The longest it may run: stopped by SIGINT long before.
        horizon = 3600.0
        if self.wrk:
            script = wrk.PACED_SCRIPT
            argv = [*nice, *wrk.command(base + CHAT, connections, horizon, script)]
        else:
            unary = Workload("flood", connections, stream=False)
            argv = [*nice, *bench.client_argv(base, unary, horizon)]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        self.started = time.monotonic()

    def finish(self) -> dict[str, Any]:
        """Stop the load and return its summary."""
        self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise
        summary = wrk.parse(out.decode()) if self.wrk else client_result(out)
        summary["ran_s"] = time.monotonic() - self.started
        return summary
