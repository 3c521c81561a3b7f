"""CI guard: run the quick bench, fail only when a loose bound is broken.

The bounds are deliberately loose, and every one compares targets measured in
the same run: CI machines are shared and noisy, so this catches a proxy that
became several times slower, buffers streams, slows down beside a dead upstream
or drops requests, not a regression of a few percent.

    python bench/check.py [--allow-skip] [bench/run.py options]

Exit status: 0 every bound holds; 1 a bound is broken or a target did not run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import report
import run

Results = dict[str, Any]
Targets = dict[str, dict[str, Any]]
# The target held to the bounds: llmproxy with metrics, traces and logs on.
OURS = "llmproxy-full"
# (workload, metric path, lowest allowed llmproxy/bare ratio)
THROUGHPUT_FLOORS = (
    ("nonstream_c16", ("rate_per_s",), 0.5),
    ("stream_c16", ("rate_per_s",), 0.5),
    ("paced_c64", ("rate_per_s",), 0.7),
)
# Added latency at concurrency 1 over the bare proxy, milliseconds.
MAX_ADDED_P50_MS = 5.0
# Paced tokens: llmproxy's gap p50 within these factors of the provider's own, and
# its first token at most this much later than the provider's.
GAP_FACTORS = (0.5, 2.0)
MAX_LATER_TTFT_MS = 20.0
# The healthy route's p50 beside a dead upstream, against the same alone.
MAX_DEAD_UPSTREAM_SLOWDOWN = 2.0
MAX_ERROR_SHARE = 0.005


def throughput(targets: Targets) -> list[str]:
    """llmproxy keeps at least a floor of the bare proxy's throughput."""
    problems = []
    for workload, path, floor in THROUGHPUT_FLOORS:
        ours = report.figure(targets[OURS], workload, path)
        bare = report.figure(targets["bare"], workload, path)
        if ours is None or bare is None or ours < floor * bare:
            problems.append(f"{workload}: {OURS} {ours} < {floor} x bare {bare}")
    return problems


def latency(targets: Targets) -> list[str]:
    """At concurrency 1 llmproxy adds at most a few milliseconds over bare."""
    path = ("latency_ms", "p50")
    ours = report.figure(targets[OURS], "nonstream_c1", path)
    bare = report.figure(targets["bare"], "nonstream_c1", path)
    if ours is None or bare is None or ours > bare + MAX_ADDED_P50_MS:
        return [f"nonstream_c1 p50: {OURS} {ours} ms > bare {bare} ms + 5 ms"]
    return []


def pacing(targets: Targets) -> list[str]:
    """Tokens reach the client as the provider paced them: not buffered, not
    held back."""
    problems = []
    low, high = GAP_FACTORS
    for workload in ("paced_c1", "paced_c64"):
        gap = report.figure(targets[OURS], workload, ("gap_ms", "p50"))
        own_gap = report.figure(targets["direct"], workload, ("gap_ms", "p50"))
        if gap is None or own_gap is None or not low * own_gap <= gap <= high * own_gap:
            problems.append(f"{workload}: token gap p50 {gap} ms, direct {own_gap} ms")
        ttft = report.figure(targets[OURS], workload, ("ttft_ms", "p50"))
        own = report.figure(targets["direct"], workload, ("ttft_ms", "p50"))
        if ttft is None or own is None or ttft > own + MAX_LATER_TTFT_MS:
            problems.append(f"{workload}: first token p50 {ttft} ms, direct {own} ms")
    return problems


def errors(targets: Targets) -> list[str]:
    """No target fails or cuts more than a sliver of its requests."""
    problems = []
    for name, target in targets.items():
        for workload, result in target.get("workloads", {}).items():
            if "failed" in result:
                problems.append(f"{name} {workload}: failed: {result['failed']}")
                continue
            bad = result["errors"] + result.get("incomplete", 0)
            if bad > MAX_ERROR_SHARE * max(result["completed"], 1):
                problems.append(f"{name} {workload}: {bad} errors or cut streams")
    return problems


def dead_upstream(results: Results) -> list[str]:
    """A dead upstream does not slow the healthy route down."""
    scenario = results.get("dead_upstream")
    if scenario is None:
        return []
    if scenario.get("status") != "ok":
        return [f"dead-upstream did not run: {scenario.get('reason')}"]
    path = ("latency_ms", "p50")
    quiet = report.figure({"workloads": scenario["quiet"]}, "nonstream_c1", path)
    loud = report.figure({"workloads": scenario["dead_traffic"]}, "nonstream_c1", path)
    if quiet is None or loud is None or loud > MAX_DEAD_UPSTREAM_SLOWDOWN * quiet:
        return [f"healthy route p50 {loud} ms beside a dead upstream, {quiet} alone"]
    return errors({"dead-upstream": {"workloads": scenario["dead_traffic"]}})


def memory(results: Results) -> list[str]:
    """Every one of the streams held open at once completes, in both rounds."""
    scenario = results.get("memory")
    if scenario is None:
        return []
    if scenario.get("status") != "ok":
        return [f"memory did not run: {scenario.get('reason')}"]
    return [
        f"memory round {i + 1}: not every stream completed: {result}"
        for i, result in enumerate(scenario["rounds"])
        if not result.get("all_completed")
    ]


CHECKS: tuple[Callable[[Targets], list[str]], ...] = (
    throughput,
    latency,
    pacing,
    errors,
)


def violations(results: Results, allow_skip: bool) -> list[str]:
    """Every broken bound, as one line each; empty when all hold."""
    targets: Targets = results["targets"]
    skipped = []
    for name in ("direct", "bare", OURS):
        target = targets.get(name, {})
        if target.get("status") != "ok":
            reason = target.get("reason", "not selected")
            skipped.append(f"{name} did not run: {reason}")
    scenarios = dead_upstream(results) + memory(results)
    if skipped:
        # The ratios need every target; errors of those that ran still count.
        return errors(targets) + scenarios + ([] if allow_skip else skipped)
    return [problem for check in CHECKS for problem in check(targets)] + scenarios


def main(argv: list[str]) -> int:
    """Run the quick bench and report the bounds it breaks."""
    allow_skip = "--allow-skip" in argv
    passthrough = [arg for arg in argv if arg != "--allow-skip"]
    results = run.run_bench(["--quick", *passthrough])
    problems = violations(results, allow_skip)
    for problem in problems:
        print(f"BOUND BROKEN: {problem}", file=sys.stderr)
    print("bench check: " + ("FAILED" if problems else "ok"), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
