"""The scenarios beyond the main table: a dead upstream beside a healthy one,
memory with thousands of streams open at once, and one worker process against two."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from harness import Bench, Flood, Running, client_result, skipped
from plan import (
    DEAD_ROUTE_CONNECTIONS,
    DEAD_UPSTREAM,
    DEAD_UPSTREAM_WORKLOADS,
    WORKERS_TARGETS,
    Target,
    memory_workload,
)
from processes import (
    ROOT,
    Cores,
    TargetUnavailable,
    fetch_text,
    metric_value,
    peak_rss_kb,
    reset_peak_rss,
    rss_kb,
)

# How long the flood runs before the healthy route is measured: long enough for
# the dead upstream's breaker to open.
FLOOD_LEAD_S = 1.0


def dead_upstream(bench: Bench) -> dict[str, Any]:
    """The healthy route's latency alone, then beside a flood on the dead route."""
    target = Target("dead-upstream", "llmproxy", config=DEAD_UPSTREAM, collector="ok")
    try:
        running = bench.start(target)
    except TargetUnavailable as exc:
        return skipped(target, exc)
    try:
        bench.warm_up(running.url)
        quiet = bench.workloads(running, DEAD_UPSTREAM_WORKLOADS)
        flood = Flood(bench, running.url + "/dead", DEAD_ROUTE_CONNECTIONS)
        try:
            time.sleep(FLOOD_LEAD_S)
            loud = bench.workloads(running, DEAD_UPSTREAM_WORKLOADS)
        finally:
            dead_route = flood.finish()
        print(
            f"[dead-upstream] /dead: {dead_route['rate_per_s']:,.0f}/s", file=sys.stderr
        )
        metrics = fetch_text(running.admin + "/metrics") if running.admin else None
        state = metric_value(
            metrics or "", "llmproxy_circuit_breaker_state", 'upstream="dead"'
        )
    finally:
        bench.stop(running)
    return {
        "status": "ok",
        "quiet": quiet,
        "dead_traffic": loud,
        "dead_route": dead_route,
        "dead_breaker_state": state,
    }


def memory(bench: Bench, streams: int) -> dict[str, Any]:
    """llmproxy-full's RSS before, during and after rounds of ``streams`` paced
    streams held open at once. The second round shows whether the first one's
    growth was a one-off (pools, arenas) or a cost that keeps adding up."""
    target = Target("memory", "llmproxy", collector="ok")
    try:
        running = bench.start(target)
    except TargetUnavailable as exc:
        return skipped(target, exc)
    try:
        bench.warm_up(running.url)
        before = rss_kb(running.pid)
        rounds = [burst(bench, running, streams) for _ in range(2)]
    finally:
        bench.stop(running)
    return {
        "status": "ok",
        "streams": streams,
        "rss_before_kb": before,
        "rounds": rounds,
    }


def burst(bench: Bench, running: Running, streams: int) -> dict[str, Any]:
    """One round of ``streams`` streams at once, watching the proxy's in-flight
    count; the result has the proxy's peak and final RSS."""
    workload = memory_workload(streams)
    argv = bench.client_argv(running.url, workload, 0)
    fresh = reset_peak_rss(running.pid)
    client = subprocess.Popen(
        [*Cores.pin(bench.cores.load), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    inflight = 0.0
    # The pipe only gets the summary at the end, so it cannot fill meanwhile.
    while client.poll() is None:
        text = fetch_text(running.admin + "/metrics") if running.admin else None
        now = metric_value(text or "", "llmproxy_inflight_requests", 'upstream="sim"')
        inflight = max(inflight, now or 0.0)
        time.sleep(0.25)
    out, _ = client.communicate()
    if client.returncode != 0:
        return {"failed": f"stream_client exited with {client.returncode}"}
    result = client_result(out)
    result["peak_inflight"] = inflight
    result["peak_rss_kb"] = peak_rss_kb(running.pid) if fresh else None
    result["rss_after_kb"] = rss_kb(running.pid)
    result["all_completed"] = (
        result["completed"] == streams
        and result["errors"] == 0
        and result["incomplete"] == 0
    )
    print(f"[memory] {streams} streams: {memory_brief(result)}", file=sys.stderr)
    return result


def memory_brief(result: dict[str, Any]) -> str:
    """One line about a round of the memory scenario, for the progress log."""
    peak = (result.get("peak_rss_kb") or 0) / 1024
    total = result.get("total_ms") or {}
    return (
        f"{result['completed']} completed, {result['errors']} errors, "
        f"{result['incomplete']} cut, peak in flight {result['peak_inflight']:.0f}, "
        f"peak RSS {peak:.0f} MiB, stream max {total.get('max', 0) / 1e3:.1f} s"
    )


def workers(bench: Bench) -> dict[str, Any]:
    """llmproxy-full with one worker process, then two, with nothing pinned: the
    scheduler spreads the workers, the provider and the load generators over
    every core, as it would in a container with no CPU pinning."""
    free = dataclasses.replace(bench, cores=Cores(None, None, None))
    with unpinned(bench.provider_pid):
        return {target.name: free.target(target) for target in WORKERS_TARGETS}


@contextlib.contextmanager
def unpinned(pid: int) -> Iterator[None]:
    """Let process ``pid`` run on every core for a while, then pin it back."""
    pinned = os.sched_getaffinity(pid)
    os.sched_setaffinity(pid, os.sched_getaffinity(0))
    try:
        yield
    finally:
        os.sched_setaffinity(pid, pinned)
