"""CI guard: run the quick bench, fail only when a loose bound is broken.

The bounds are deliberately loose: CI machines are shared and noisy, so this
catches a proxy that became several times slower, buffers streams or drops
requests, not a regression of a few percent.

    python bench/check.py [--allow-skip] [bench/run.py options]

Exit status: 0 every bound holds; 1 a bound is broken or llmproxy did not run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import report
import run

Targets = dict[str, dict[str, Any]]
PACE_MS = 20.0
# (workload, metric path, lowest allowed llmproxy/bare ratio)
THROUGHPUT_FLOORS = (
    ("nonstream_c16", ("rate_per_s",), 0.3),
    ("stream_c16", ("rate_per_s",), 0.3),
    ("paced_c64", ("rate_per_s",), 0.7),
)
MAX_ERROR_SHARE = 0.005


def throughput(targets: Targets) -> list[str]:
    """llmproxy keeps at least a floor of the bare proxy's throughput."""
    problems = []
    for workload, path, floor in THROUGHPUT_FLOORS:
        ours = report.figure(targets["llmproxy"], workload, path)
        bare = report.figure(targets["bare"], workload, path)
        if ours is None or bare is None or ours < floor * bare:
            problems.append(f"{workload}: llmproxy {ours} < {floor} x bare {bare}")
    return problems


def latency(targets: Targets) -> list[str]:
    """At concurrency 1 llmproxy adds at most a few milliseconds over bare."""
    path = ("latency_ms", "p50")
    ours = report.figure(targets["llmproxy"], "nonstream_c1", path)
    bare = report.figure(targets["bare"], "nonstream_c1", path)
    if ours is None or bare is None or ours > bare + 5.0:
        return [f"nonstream_c1 p50: llmproxy {ours} ms > bare {bare} ms + 5 ms"]
    return []


def pacing(targets: Targets) -> list[str]:
    """Tokens reach the client as paced: not buffered, not held back."""
    problems = []
    for workload in ("paced_c1", "paced_c64"):
        gap = report.figure(targets["llmproxy"], workload, ("gap_ms", "p50"))
        ttft = report.figure(targets["llmproxy"], workload, ("ttft_ms", "p50"))
        if gap is None or not 0.5 * PACE_MS <= gap <= 2 * PACE_MS:
            problems.append(f"{workload}: token gap p50 {gap} ms, paced {PACE_MS} ms")
        if ttft is None or ttft > PACE_MS + 50:
            problems.append(f"{workload}: time to first token p50 {ttft} ms")
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


CHECKS: tuple[Callable[[Targets], list[str]], ...] = (
    throughput,
    latency,
    pacing,
    errors,
)


def violations(targets: Targets, allow_skip: bool) -> list[str]:
    """Every broken bound, as one line each; empty when all hold."""
    skipped = []
    for name in ("bare", "llmproxy"):
        target = targets.get(name, {})
        if target.get("status") != "ok":
            reason = target.get("reason", "not selected")
            skipped.append(f"{name} did not run: {reason}")
    if skipped:
        # The ratios need both targets; errors of those that ran still count.
        return errors(targets) + ([] if allow_skip else skipped)
    return [problem for check in CHECKS for problem in check(targets)]


def main(argv: list[str]) -> int:
    """Run the quick bench and report the bounds it breaks."""
    allow_skip = "--allow-skip" in argv
    passthrough = [arg for arg in argv if arg != "--allow-skip"]
    results = run.run_bench(["--quick", *passthrough])
    problems = violations(results["targets"], allow_skip)
    for problem in problems:
        print(f"BOUND BROKEN: {problem}", file=sys.stderr)
    print("bench check: " + ("FAILED" if problems else "ok"), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
